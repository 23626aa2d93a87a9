"""The ``pmd`` command (also ``python -m pmd``).

    pmd status                 network and virtio devices, their drivers, and which pmd can use
    pmd info DEVICE            config space, capabilities, virtio structures, VFIO regions and IRQs
    pmd info --config FILE     the same from a saved config space
    pmd bind DEVICE            give a device to vfio-pci (refuses an active interface unless --force)
    pmd unbind DEVICE          give it back to its kernel driver
    pmd loopback               the data path in one process with live statistics

Each subcommand is a thin layer over the library; errors are printed as one
line with the remedy, exit status 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import PmdError


def _cmd_status(args: argparse.Namespace) -> int:
    from . import pci

    rows = pci.status_rows()
    print(pci.format_status(rows))
    if not any(r.usable for r in rows):
        print("\nNo device is usable by pmd now: a virtio-net device must be bound to vfio-pci "
              "(pmd bind DEVICE) and its /dev/vfio/<group> must exist. Without one, pmd runs on "
              "the in-process loopback (pmd loopback).")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import pci

    if args.config:
        data = Path(args.config).read_bytes()
        print(pci.format_info(data, title=args.config))
        return 0
    if not args.device:
        raise SystemExit("pmd info: give a DEVICE (e.g. 0000:00:03.0) or --config FILE")
    dev = pci.read_device(args.device)
    print(pci.format_info(dev.read_config(), bar_sizes=dev.bar_sizes(), title=str(dev.address)))
    print(f"  driver {dev.driver or '(none)'}, IOMMU group "
          f"{dev.iommu_group if dev.iommu_group is not None else '(none)'}, NUMA node {dev.numa_node}")
    if dev.driver != pci.VFIO_PCI:
        print(f"  VFIO regions and IRQs: not shown, the device is not bound to vfio-pci "
              f"(pmd bind {dev.address})")
        return 0
    from .vfio import VfioDevice

    with VfioDevice.open(str(dev.address)) as vdev:
        print(format_vfio(vdev))
    return 0


def format_vfio(vdev) -> str:  # type: ignore[no-untyped-def]
    """VFIO's view of an open device: flags, regions (with sparse areas), IRQ indexes."""
    info = vdev.device_info
    out = [f"VFIO device: flags {info.flags:#x} ({'reset' if info.supports_reset else 'no reset'}), "
           f"{info.num_regions} regions, {info.num_irqs} IRQ indexes"]
    for r in vdev.regions():
        if not r.size:
            continue
        line = (f"  region {r.index}: offset {r.offset:#x} size {r.size:#x} "
                f"[{r.describe_flags()}]")
        if r.sparse_areas:
            line += " sparse " + ", ".join(f"{a.offset:#x}+{a.size:#x}" for a in r.sparse_areas)
        out.append(line)
    for index in range(info.num_irqs):
        irq = vdev.irq_info(index)
        if irq.count:
            out.append(f"  irq {index} ({irq.name}): {irq.count} vector(s), flags {irq.flags:#x}")
    return "\n".join(out)


def _cmd_bind(args: argparse.Namespace) -> int:
    from . import pci

    before = pci.bind(args.device, force=args.force)
    print(f"{args.device}: bound to vfio-pci (was {before or 'unbound'})")
    return 0


def _cmd_unbind(args: argparse.Namespace) -> int:
    from . import pci

    before = pci.unbind(args.device, force=args.force)
    print(f"{args.device}: unbound from {before or 'nothing'}; its kernel driver may take it back")
    return 0


def _cmd_loopback(args: argparse.Namespace) -> int:
    import numpy as np

    from .loopback import Loopback

    burst = args.burst
    size = args.size
    if not 60 <= size <= 1514:
        raise SystemExit("pmd loopback: --size must be 60 to 1514 bytes")
    if not 1 <= burst <= args.queue_size:
        raise SystemExit(f"pmd loopback: --burst must be 1 to the queue size ({args.queue_size})")
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    old = signal.signal(signal.SIGINT, on_signal)
    try:
        with Loopback(queue_size=args.queue_size) as lb:
            tx, rx, pool = lb.driver_tx, lb.driver_rx, lb.pool
            ids = np.zeros(burst, np.uint32)
            lens = np.zeros(burst, np.uint32)
            pkts = np.zeros((burst, size), np.uint8)
            out = np.zeros((burst, rx.max_packet_len), np.uint8)
            plen = np.full(burst, size, np.uint32)
            # A UDP-looking frame: broadcast destination, locally administered source.
            pkts[:, :12] = [255] * 6 + [2, 0, 0, 0, 0, 1]
            pkts[:, 12:14] = [8, 0]
            if args.mode == "zerocopy":
                seed = pool.alloc(burst)
                pool.data[seed, :size] = pkts
                tx.tx_burst_zc(seed, plen)
            print(f"pmd loopback: {args.mode}, {size}-byte packets, burst {burst}, "
                  f"queue size {args.queue_size} (driver and device side in this process)")
            start = last = time.perf_counter()
            end = start + args.duration if args.duration else None
            total = last_total = 0
            while not stop:
                for _ in range(256):
                    lb.step(burst)
                    if args.mode == "zerocopy":
                        n = rx.rx_burst_zc(ids, lens)
                        tx.tx_burst_zc(ids[:n], lens[:n])
                    else:
                        n = rx.rx_burst(out, lens)
                        tx.tx_burst(pkts, plen)
                    total += n
                now = time.perf_counter()
                if now - last >= 1.0:
                    rate = (total - last_total) / (now - last)
                    s = rx.stats()
                    print(f"  {now - start:6.1f}s  rx {rate / 1e6:7.3f} Mpps  {rate * size * 8 / 1e9:7.2f} Gbit/s"
                          f"  drops {s['dropped']}  errors {s['bad_used_id'] + s['bad_used_len'] + s['used_not_in_flight']}",
                          flush=True)
                    last, last_total = now, total
                if end is not None and now >= end:
                    break
            elapsed = time.perf_counter() - start
            s = lb.stats()
    finally:
        signal.signal(signal.SIGINT, old)
    mpps = total / elapsed / 1e6 if elapsed > 0 else 0.0
    errors = sum(s[k]["bad_used_id"] + s[k]["bad_used_len"] + s[k]["used_not_in_flight"]
                 for k in ("driver_rx", "driver_tx"))
    print(f"summary: packets={total} seconds={elapsed:.2f} mpps={mpps:.3f} "
          f"gbps={total * size * 8 / elapsed / 1e9 if elapsed else 0:.2f} "
          f"drops={s['driver_rx']['dropped']} errors={errors}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmd", description="A user-space virtio-net poll-mode driver.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("status", help="list network and virtio devices and whether pmd can use them"
                   ).set_defaults(func=_cmd_status)

    info = sub.add_parser("info", help="show a device: config space, capabilities, VFIO regions, IRQs")
    info.add_argument("device", nargs="?", help="PCI address, e.g. 0000:00:03.0")
    info.add_argument("--config", metavar="FILE", help="read a saved config space instead of a device")
    info.set_defaults(func=_cmd_info)

    for name, func, text in (("bind", _cmd_bind, "give a device to vfio-pci"),
                             ("unbind", _cmd_unbind, "give a device back to its kernel driver")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("device", help="PCI address, e.g. 0000:00:03.0")
        sp.add_argument("--force", action="store_true",
                        help="even if it carries an interface that is up")
        sp.set_defaults(func=func)

    lb = sub.add_parser("loopback", help="run the data path in one process with live statistics")
    lb.add_argument("--duration", type=float, default=5.0, help="seconds (0: until Ctrl-C)")
    lb.add_argument("--size", type=int, default=64, help="packet size in bytes (60-1514)")
    lb.add_argument("--burst", type=int, default=32, help="packets per burst")
    lb.add_argument("--queue-size", type=int, default=256, help="ring entries")
    lb.add_argument("--mode", choices=("zerocopy", "copy"), default="zerocopy")
    lb.set_defaults(func=_cmd_loopback)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PmdError as e:
        print(f"pmd {args.command}: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        # Bad input (an address, a file) or a system refusal: one line, no traceback.
        print(f"pmd {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
