"""The ``pmd`` command (also ``python -m pmd``).

    pmd status                 network and virtio devices, their drivers, and which pmd can use
    pmd info DEVICE            config space, capabilities, virtio structures, VFIO regions and IRQs
    pmd info --config FILE     the same from a saved config space
    pmd bind DEVICE            give a device to vfio-pci (refuses an active interface unless --force)
    pmd unbind DEVICE          give it back to its kernel driver
    pmd loopback               the data path in one process with live statistics
    pmd fwd [DEVICE]           forward packets (rxonly, txonly, io, macswap) with live statistics
    pmd capture [DEVICE] -w FILE   write what a port receives to FILE.pcap, .pcapng or .parquet (as tcpdump -w)
    pmd sim --socket PATH      the built-in virtio-net device, served over vfio-user for another process
    pmd --version              this pmd's version

status, info, fwd and capture take --json: JSON only on stdout (fwd, capture: one object per --stats-period,
then the summary, one a line). Each subcommand is a thin layer over the library; errors are
printed as one line with the remedy, exit status 1; options that cannot work (a wire without
what it needs) exit 2, as argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..driver import sysfs
from ..errors import PmdError
from .data import info_data, status_data, vfio_data, virtio_data
from .text import format_info, format_status, format_vfio, format_virtio, port_rss_text

__all__ = ["main", "build_parser", "format_vfio", "version", "UsageError"]


def version() -> str:
    """This pmd's version: ``pmd.__version__``, the one pyproject.toml gives its distribution
    (tests/test_package.py checks that an installed wheel's metadata agrees)."""
    from .. import __version__

    return __version__


def _cmd_status(args: argparse.Namespace) -> int:
    rows = sysfs.status_rows(vfio_dir=args.vfio_dir)
    why = None if any(r.usable for r in rows) else _why_none_usable(rows, Path(args.vfio_dir))
    if args.json:
        print(json.dumps({**status_data(rows, why), "without_a_device": _WITHOUT_A_DEVICE}))
        return 0
    print(format_status(rows))
    if why is not None:
        print("No device is usable by pmd now: " + "; ".join(why) + ".")
        print("A virtio-net device must be bound to vfio-pci (pmd bind DEVICE) and its "
              f"{args.vfio_dir}/<group> must exist. Without one, pmd runs on its built-in "
              f"virtio-net device, in a process of its own over vfio-user: {_WITHOUT_A_DEVICE}.")
    return 0


_WITHOUT_A_DEVICE = '`pmd fwd` with no DEVICE, or open_port("sim") in Python'


def _why_none_usable(rows: Sequence[sysfs.StatusRow], vfio_dir: Path) -> list[str]:
    """The machine-wide reasons no device is usable, most basic first."""
    why: list[str] = []
    nets = [r for r in rows if r.name.startswith("virtio-net")]
    if not nets:
        why.append("there is no virtio-net device on this machine")
    if not (vfio_dir / "vfio").exists():
        why.append(f"this kernel offers no VFIO ({vfio_dir / 'vfio'} does not exist: "
                   "modprobe vfio-pci, or a kernel with CONFIG_VFIO_PCI)")
    if rows and all(r.iommu_group is None for r in rows):
        why.append("no device is in an IOMMU group (no IOMMU is enabled: intel_iommu=on / "
                   "amd_iommu=on, or vfio's enable_unsafe_noiommu_mode=1)")
    for r in nets:
        if r.driver and r.driver != sysfs.VFIO_PCI:
            up = (f" and carries {', '.join(r.active_interfaces)}, which is up" if r.active_interfaces else "")
            why.append(f"{r.address} is bound to {r.driver}{up}")
    why += [f"{r.address}: {r.reason}" for r in nets if r.driver in (None, sysfs.VFIO_PCI)]
    return why or ["see the reason on each line above"]


def _cmd_info(args: argparse.Namespace) -> int:
    if args.config:
        data = Path(args.config).read_bytes()
        if args.json:
            print(json.dumps(info_data(data, title=args.config)))
        else:
            print(format_info(data, title=args.config), end="")
        return 0
    if not args.device:
        raise PmdError("give a DEVICE (e.g. 0000:00:03.0) or --config FILE")
    dev = sysfs.read_device(args.device)
    config, bar_sizes = dev.read_config(), dev.bar_sizes()
    where = {"driver": dev.driver, "iommu_group": dev.iommu_group, "numa_node": dev.numa_node}
    vfio: dict[str, Any] | None = None
    virtio: dict[str, Any] | None = None
    if not args.json:
        print(format_info(config, bar_sizes=bar_sizes, title=str(dev.address)), end="")
        print(f"Sysfs: driver {dev.driver or '(none)'}, IOMMU group "
              f"{dev.iommu_group if dev.iommu_group is not None else '(none)'}, NUMA node {dev.numa_node}")
    if dev.driver != sysfs.VFIO_PCI:
        if args.json:
            print(json.dumps({**info_data(config, bar_sizes=bar_sizes, title=str(dev.address)), "sysfs": where,
                              "vfio": None, "virtio": None,
                              "vfio_not_shown": f"the device is not bound to vfio-pci (pmd bind {dev.address})"}))
        else:
            print(f"VFIO: not shown, the device is not bound to vfio-pci (pmd bind {dev.address})")
        return 0
    from ..driver.access.vfio import VfioAccess

    from ..driver.virtio.pci import open_transport

    with VfioAccess.open(str(dev.address), dev_dir=args.vfio_dir) as vdev:
        if args.json:
            vfio = vfio_data(vdev)
        else:
            print(format_vfio(vdev))
        # reading the offered features touches no state a driver keeps (4.1.4.3)
        t = open_transport(vdev, owns_access=False)
        try:
            if args.json:
                virtio = virtio_data(t.device_features(), transport_bits=t.feature_bits, transport=t.describe(),
                                     interrupts=t.interrupt_mode())
            else:
                print(format_virtio(t.device_features(), transport_bits=t.feature_bits, transport=t.describe(),
                                    interrupts=t.interrupt_mode()),
                      end="")
        finally:
            t.close()
    if args.json:
        print(json.dumps({**info_data(config, bar_sizes=bar_sizes, title=str(dev.address)), "sysfs": where,
                          "vfio": vfio, "virtio": virtio}))
    return 0


def _cmd_bind(args: argparse.Namespace) -> int:
    before = sysfs.bind(args.device, force=args.force)
    print(f"{args.device}: bound to vfio-pci (was {before or 'unbound'})")
    return 0


def _cmd_unbind(args: argparse.Namespace) -> int:
    before = sysfs.unbind(args.device, force=args.force)
    print(f"{args.device}: unbound from {before or 'nothing'}; its kernel driver may take it back")
    return 0


def _cmd_loopback(args: argparse.Namespace) -> int:
    import numpy as np

    from ..loopback import Loopback

    burst = args.burst
    size = args.size
    if not 60 <= size <= 1514:
        raise UsageError("--size must be 60 to 1514 bytes")
    if not 1 <= burst <= args.queue_size:
        raise UsageError(f"--burst must be 1 to the queue size ({args.queue_size})")
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


class UsageError(Exception):
    """Options that cannot work together, or an option a choice needs: one line, exit status 2
    (as argparse's own usage errors)."""


# What the built-in device's wires need from the command line, and which options they take.
_WIRE_OPTIONS = {"generator": ("rate", "flows"), "pcap": ("pcap_in", "pcap_out", "rate"), "tap": ("tap",),
                 "loopback": (), "pair": ()}
_OPTION_NAMES = {"rate": "--rate", "flows": "--flows", "pcap_in": "--pcap-in", "pcap_out": "--pcap-out",
                 "tap": "--tap"}


def _wire_options(args: argparse.Namespace) -> dict[str, Any]:
    """The built-in device's wire and its options from ``pmd fwd``'s, or a :class:`UsageError`
    naming what is missing: a wire that cannot move a packet without an option says so."""
    wire = args.wire
    given = {k for k in _OPTION_NAMES if getattr(args, k) is not None}
    stray = sorted(given - set(_WIRE_OPTIONS[wire]))
    if stray:
        takes = ", ".join(f"{_OPTION_NAMES[k]} ({w})" for k in stray
                          for w in [next(w for w, o in _WIRE_OPTIONS.items() if k in o)])
        raise UsageError(f"{takes} {'applies' if len(stray) == 1 else 'apply'} to another wire; "
                         f"--wire {wire} takes {', '.join(_OPTION_NAMES[k] for k in _WIRE_OPTIONS[wire]) or 'none'}")
    receives = args.mode != "txonly"
    if wire == "pcap" and args.pcap_in is None and args.pcap_out is None:
        raise UsageError("--wire pcap needs --pcap-in FILE (the frames pmd receives) or --pcap-out FILE "
                         "(where what pmd sends is written)")
    if wire == "pcap" and receives and args.pcap_in is None:
        raise UsageError(f"--wire pcap with --mode {args.mode} receives nothing without --pcap-in FILE "
                         "(the frames pmd receives)")
    if wire == "tap" and args.tap is None:
        raise UsageError("--wire tap needs --tap NAME (the TAP interface to create or attach to; needs "
                         "CAP_NET_ADMIN)")
    if wire == "loopback" and args.mode == "rxonly":
        raise UsageError("--wire loopback returns what pmd sends, and --mode rxonly sends nothing: "
                         "use --mode io --tx-first, or another --wire")
    if wire == "loopback" and args.mode in ("io", "macswap") and not args.tx_first:
        raise UsageError(f"--wire loopback with --mode {args.mode} has nothing to forward until pmd sends: "
                         "add --tx-first (one burst first, as testpmd's)")
    if args.pcap_in is not None and not Path(args.pcap_in).is_file():
        raise UsageError(f"--pcap-in {args.pcap_in}: no such file")
    kw: dict[str, Any] = {"wire": wire}
    if wire in ("generator", "pcap"):
        kw["rate"] = args.rate or 0.0
    if wire == "generator":
        kw["size"] = args.size
        kw["flows"] = args.flows or 1
    if wire == "pcap":
        kw["pcap_in"] = str(Path(args.pcap_in).resolve()) if args.pcap_in else None
        kw["pcap_out"] = str(Path(args.pcap_out).resolve()) if args.pcap_out else None
    if wire == "tap":
        kw["tap"] = args.tap
    return kw


def _cmd_fwd(args: argparse.Namespace) -> int:
    from .. import fwd
    from ..backends import open_port

    device = args.device or "sim"
    kw: dict[str, Any] = {}
    builtin = device == "sim" or device.startswith("sim:")
    if args.stats_period is not None and args.stats_period < 0:
        raise UsageError("--stats-period must be 0 (no periodic statistics) or more seconds")
    device_cpu, cpus = (None, None) if args.no_pin else fwd.default_placement(builtin)
    if args.cpus is not None:
        cpus = _cpu_list(args.cpus)
        fwd.check_cpus(cpus)
    if args.device_cpu is not None:
        if not builtin:
            raise UsageError("--device-cpu places the built-in device (no DEVICE, or 'sim'); "
                             "pin another device's process yourself")
        device_cpu = args.device_cpu
    kw.update(_port_options(args, device, builtin, device_cpu))
    # --json: stdout carries JSON only, one object a line; what a person reads goes to stderr.
    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    period = args.stats_period if args.stats_period is not None else (0.0 if args.json else 1.0)

    def on_period(p: dict[str, Any]) -> None:
        print(json.dumps({"type": "stats", **p}), flush=True)

    # Until fwd.run takes SIGTERM over, it interrupts like Ctrl-C, so the port
    # (and the built-in device) is closed on the way out.
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with open_port(device, legacy=True if args.legacy else None, disable=args.disable or 0,
                       enable=args.enable or 0, **kw) as port:
            port.start(queue_pairs=args.queues, queue_size=args.queue_size)
            say(f"pmd fwd: {device} ({port.transport.describe()}), mode {args.mode}, "
                f"{args.queues} queue pair(s), {port.ring_layout} rings, burst {args.burst}"
                + (f", wire {args.wire}" if builtin else "") + (", tx first" if args.tx_first else ""))
            say("  placement: " + _placement_text(builtin, device_cpu, cpus, args.queues))
            if args.queues > 1:
                say("  rss: " + port_rss_text(port.rss))
            summary = fwd.run(port, args.mode, queues=args.queues, burst=args.burst, size=args.size,
                              duration=args.duration or None, pcap=args.pcap, tx_retry=args.tx_retry,
                              report=(lambda line: None) if args.json else say, cpus=cpus,
                              interval=period or None, on_period=on_period if args.json else None,
                              tx_first=args.tx_first)
            if args.json:
                print(json.dumps({"type": "summary", "device": device, "wire": args.wire if builtin else None,
                                  "queues": args.queues, "burst": args.burst, "size": args.size,
                                  **summary.as_dict()}), flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0


def _port_options(args: argparse.Namespace, device: str, builtin: bool, device_cpu: int | None) -> dict[str, Any]:
    """``open_port``'s keyword arguments from the device options ``pmd fwd`` and ``pmd capture`` share."""
    kw: dict[str, Any] = {}
    if builtin:
        kw["cpu"] = device_cpu
        kw["queue_pairs"] = args.queues
        kw.update(_wire_options(args))
    elif args.wire != "generator" or any(getattr(args, k) is not None for k in _OPTION_NAMES):
        raise UsageError("--wire and its options (--pcap-in, --pcap-out, --tap, --flows, --rate) apply to "
                         "the built-in device only (no DEVICE, or 'sim')")
    if device.startswith("vhost-user:"):
        kw["server"] = args.server
        kw["timeout"] = args.timeout
        if args.server:
            kw["accept_timeout"] = args.accept_timeout
        else:
            kw["wait"] = args.accept_timeout
    elif args.server:
        raise UsageError("--server applies to vhost-user:PATH only (pmd listens, the backend connects)")
    return kw


def _cmd_capture(args: argparse.Namespace) -> int:
    from .. import capture, fwd
    from ..backends import open_port

    device = args.device or "sim"
    builtin = device == "sim" or device.startswith("sim:")
    if args.write is None:
        raise UsageError("-w FILE is needed: where the packets go (FILE.pcap, FILE.pcapng or FILE.parquet)")
    try:
        capture.format_of(args.write)
    except ValueError as e:
        raise UsageError(f"-w {e}") from None
    if args.count is not None and args.count < 1:
        raise UsageError(f"-c {args.count}: give a positive number of packets (or no -c: until Ctrl-C)")
    if args.snaplen < 0 or args.snaplen > capture.MAX_SNAPLEN:
        raise UsageError(f"-s {args.snaplen}: give 1 to {capture.MAX_SNAPLEN} bytes (0: {capture.MAX_SNAPLEN}, "
                         "as tcpdump)")
    for flag, value in (("-C", args.file_size), ("-G", args.file_seconds), ("--duration", args.duration)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} {value}: give a positive number (or leave it out: no limit)")
    if args.stats_period is not None and args.stats_period < 0:
        raise UsageError("--stats-period must be 0 (no periodic statistics) or more seconds")
    fmt = capture.format_of(args.write)
    if not 1 <= args.burst <= capture.CHUNK[fmt]:
        raise UsageError(f"--burst must be 1 to {capture.CHUNK[fmt]}")
    if fmt == "parquet":
        try:
            import pyarrow  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            raise UsageError("-w FILE.parquet needs pyarrow: pip install 'pmd[arrow]' (or write .pcap or "
                             ".pcapng)") from None
    device_cpu, cpus = (None, None) if args.no_pin else fwd.default_placement(builtin)
    if args.device_cpu is not None:
        if not builtin:
            raise UsageError("--device-cpu places the built-in device (no DEVICE, or 'sim'); "
                             "pin another device's process yourself")
        device_cpu = args.device_cpu
    kw = _port_options(args, device, builtin, device_cpu)

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    period = args.stats_period if args.stats_period is not None else (0.0 if args.json else 1.0)

    def on_period(p: dict[str, Any]) -> None:
        print(json.dumps({"type": "stats", **p}), flush=True)

    snaplen = args.snaplen or capture.MAX_SNAPLEN
    # Until capture.run takes SIGINT and SIGTERM over, they interrupt, and the port
    # (and the built-in device) is closed on the way out.
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with open_port(device, legacy=True if args.legacy else None, disable=args.disable or 0,
                       enable=args.enable or 0, **kw) as port:
            port.start(queue_pairs=args.queues, queue_size=args.queue_size)
            say(f"pmd capture: {device} ({port.transport.describe()}) queue {args.queue}, burst {args.burst}, "
                f"snaplen {snaplen}, writing {fmt} to {args.write}"
                + (f", wire {args.wire}" if builtin else "")
                + (f", a new file every {args.file_size:g} MB" if args.file_size else "")
                + (f", a new file every {args.file_seconds:g} s" if args.file_seconds else ""))
            if cpus:
                capture.pin_this_thread(cpus[0])
            summary = capture.run(port, args.write, queue=args.queue, count=args.count, snaplen=snaplen,
                                  burst=args.burst, duration=args.duration,
                                  file_size=round(args.file_size * 1_000_000) if args.file_size else None,
                                  file_seconds=args.file_seconds, interval=period or None,
                                  report=(lambda line: None) if args.json else say,
                                  on_period=on_period if args.json else None)
            if args.json:
                print(json.dumps({"type": "summary", "device": device, "wire": args.wire if builtin else None,
                                  "format": fmt, "snaplen": snaplen, **summary.as_dict()}), flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0


def _cpu_list(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3] (as taskset and testpmd's --lcores write them)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"--cpus {text!r}: give CPU numbers, e.g. 0 or 0,1 or 0-3") from None
    return out


def _placement_text(builtin: bool, device_cpu: int | None, cpus: list[int] | None, queues: int) -> str:
    from .. import fwd
    parts = []
    if builtin:
        parts.append(f"device on CPU {device_cpu}" if device_cpu is not None else "device not pinned")
    if cpus:
        # One thread per CPU, polling its queue pairs in turn ("q0+q1 on CPU 0").
        parts.append("forwarding " + ", ".join("+".join(f"q{q}" for q in qs) + f" on CPU {cpu}"
                                               for qs, cpu in fwd.assign_queues(queues, cpus)))
    else:
        parts.append("forwarding threads not pinned")
    return "; ".join(parts) + ("" if cpus or device_cpu is not None else " (--cpus, --device-cpu to pin)")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_sim(args: argparse.Namespace) -> int:
    from ..sim.process import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmd", description="A user-space virtio-net poll-mode driver.")
    p.add_argument("--version", action="version", version=f"pmd {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def add_vfio_dir(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--vfio-dir", metavar="DIR", default="/dev/vfio",
                            help="where VFIO's character devices are (default /dev/vfio)")

    status = sub.add_parser("status", help="list network and virtio devices and whether pmd can use them")
    add_vfio_dir(status)
    status.add_argument("--json", action="store_true", help="one JSON object on stdout: devices, usable, "
                                                             "why_none_usable")
    status.set_defaults(func=_cmd_status)

    info = sub.add_parser("info", help="show a device: config space, capabilities, VFIO regions, IRQs")
    info.add_argument("device", nargs="?", help="PCI address, e.g. 0000:00:03.0")
    info.add_argument("--config", metavar="FILE", help="read a saved config space instead of a device")
    add_vfio_dir(info)
    info.add_argument("--json", action="store_true",
                      help="one JSON object on stdout: header, bars, capabilities, virtio_structures, msix; "
                           "for a device also sysfs, vfio, virtio")
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

    fw = sub.add_parser("fwd", help="forward packets (rxonly, txonly, io, macswap) with live statistics")
    fw.add_argument("device", nargs="?", help="PCI address, 'sim', 'vfio-user:PATH' or 'vhost-user:PATH' "
                                              "(default: the built-in device)")
    fw.add_argument("--mode", choices=("rxonly", "txonly", "io", "macswap"), default="io")
    fw.add_argument("--queues", type=int, default=1,
                    help="queue pairs (a thread each, or with pinning a thread per CPU polling its share)")
    fw.add_argument("--cpus", metavar="LIST",
                    help="CPUs of the forwarding threads, e.g. 0 or 0,1: one thread per CPU, polling queue "
                         "pairs i, i+n, ... in turn (testpmd's --lcores); default with the built-in device: "
                         "every CPU but the device's")
    fw.add_argument("--device-cpu", type=int, metavar="N",
                    help="CPU of the built-in device's process (default: the last CPU this process may use)")
    fw.add_argument("--no-pin", action="store_true", help="pin nothing: leave placement to the scheduler")
    fw.add_argument("--burst", type=int, default=32, help="packets per burst")
    fw.add_argument("--size", type=int, default=64, help="packet size for txonly and the generator")
    fw.add_argument("--queue-size", type=int, default=256, help="ring entries (0: the device's maximum)")
    fw.add_argument("--duration", type=float, default=0.0, help="seconds (0: until Ctrl-C)")
    fw.add_argument("--pcap", metavar="FILE",
                    help="write the packets received (rxonly, io, macswap) or sent (txonly) to a capture "
                         "file: pcapng with nanosecond timestamps if FILE ends in .pcapng, else classic pcap")
    fw.add_argument("--legacy", action="store_true", help="drive a transitional device's legacy interface")
    fw.add_argument("--disable", metavar="FEATURES", help="feature names not to negotiate, e.g. MRG_RXBUF")
    fw.add_argument("--enable", metavar="FEATURES",
                    help="features pmd takes only when asked: RING_PACKED (the packed ring), "
                         "IN_ORDER (buffers used in order)")
    fw.add_argument("--wire", default="generator",
                    choices=("generator", "loopback", "pcap", "pair", "tap"),
                    help="what is behind the built-in device (default: a traffic generator); loopback "
                         "returns what pmd sends (io: with --tx-first), pcap plays --pcap-in and writes "
                         "--pcap-out, tap is a Linux TAP interface (--tap NAME)")
    fw.add_argument("--rate", type=float, default=None,
                    help="generator, pcap: packets per second the wire offers (default 0: as fast as taken)")
    fw.add_argument("--flows", type=int, default=None, metavar="N", help="generator: UDP flows (default 1)")
    fw.add_argument("--pcap-in", metavar="FILE", help="pcap wire: the frames pmd receives")
    fw.add_argument("--pcap-out", metavar="FILE", help="pcap wire: where the frames pmd sends are written")
    fw.add_argument("--tap", metavar="NAME", help="tap wire: the TAP interface (made if missing; CAP_NET_ADMIN)")
    fw.add_argument("--tx-first", action="store_true",
                    help="send one burst on each queue pair before forwarding (testpmd's --tx-first): "
                         "what gets --wire loopback --mode io moving")
    fw.add_argument("--stats-period", type=float, default=None, metavar="S",
                    help="statistics every S seconds (default 1; with --json, none unless given); 0: only "
                         "the summary")
    fw.add_argument("--json", action="store_true",
                    help="JSON on stdout, one object a line: with --stats-period, {\"type\": \"stats\", ...} "
                         "each period; {\"type\": \"summary\", ...} at the end; the banner goes to stderr")
    fw.add_argument("--tx-retry", type=int, default=10000,
                    help="io/macswap: tries for a full tx ring before dropping (0: drop at once)")
    fw.add_argument("--server", action="store_true",
                    help="vhost-user: listen on PATH and wait for the backend to connect (DPDK: client=1)")
    fw.add_argument("--accept-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="vhost-user: how long to wait for the backend (to connect, or to listen) (default 30)")
    fw.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                    help="vhost-user: how long each request may wait for the backend's answer (default 5)")
    fw.set_defaults(func=_cmd_fwd)

    cp = sub.add_parser("capture", help="capture packets to a file (pcap, pcapng, Parquet), as tcpdump -w",
                        description="Receive on one queue and write every packet to FILE, whose extension says "
                                    "the format: .pcap (classic, nanosecond timestamps), .pcapng, .parquet "
                                    "(the columns of pmd.arrow.schema; needs pyarrow). With -C or -G the files "
                                    "rotate: FILE, then FILE with 1, 2, ... before the extension "
                                    "(docs/capture.md).")
    cp.add_argument("device", nargs="?", help="PCI address, 'sim', 'vfio-user:PATH' or 'vhost-user:PATH' "
                                              "(default: the built-in device, its traffic generator)")
    cp.add_argument("-w", dest="write", metavar="FILE", help="where the packets go: FILE.pcap, FILE.pcapng or "
                                                              "FILE.parquet")
    cp.add_argument("-c", dest="count", type=int, metavar="COUNT", help="stop after COUNT packets")
    cp.add_argument("-s", dest="snaplen", type=int, default=0, metavar="SNAPLEN",
                    help="bytes kept of each packet (default 0: 262144, the whole packet)")
    cp.add_argument("-C", dest="file_size", type=float, metavar="SIZE",
                    help="a new file once this one has passed SIZE million bytes (tcpdump's -C)")
    cp.add_argument("-G", dest="file_seconds", type=float, metavar="SECONDS",
                    help="a new file every SECONDS seconds (tcpdump's -G)")
    cp.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    cp.add_argument("--queue", type=int, default=0, help="the rx queue to capture (default 0)")
    cp.add_argument("--queues", type=int, default=1, help="queue pairs to start (default 1)")
    cp.add_argument("--burst", type=int, default=64, help="packets per receive burst (default 64)")
    cp.add_argument("--queue-size", type=int, default=256, help="ring entries (default 256; 0: the device's maximum)")
    cp.add_argument("--device-cpu", type=int, metavar="N",
                    help="CPU of the built-in device's process (default: the last CPU this process may use)")
    cp.add_argument("--no-pin", action="store_true", help="pin nothing: leave placement to the scheduler")
    cp.add_argument("--legacy", action="store_true", help="drive a transitional device's legacy interface")
    cp.add_argument("--disable", metavar="FEATURES", help="feature names not to negotiate, e.g. MRG_RXBUF")
    cp.add_argument("--enable", metavar="FEATURES", help="features pmd takes only when asked (RING_PACKED, "
                                                          "IN_ORDER)")
    cp.add_argument("--wire", default="generator", choices=("generator", "pcap", "tap"),
                    help="what is behind the built-in device (default: a traffic generator); pcap plays "
                         "--pcap-in, tap is a Linux TAP interface (--tap NAME)")
    cp.add_argument("--size", type=int, default=64, help="generator: packet size (default 64)")
    cp.add_argument("--rate", type=float, default=None,
                    help="generator, pcap: packets per second the wire offers (default 0: as fast as taken)")
    cp.add_argument("--flows", type=int, default=None, metavar="N", help="generator: UDP flows (default 1)")
    cp.add_argument("--pcap-in", metavar="FILE", help="pcap wire: the frames pmd receives")
    cp.add_argument("--tap", metavar="NAME", help="tap wire: the TAP interface (made if missing; CAP_NET_ADMIN)")
    cp.add_argument("--stats-period", type=float, default=None, metavar="S",
                    help="statistics every S seconds (default 1; with --json, none unless given); 0: only "
                         "the summary")
    cp.add_argument("--json", action="store_true",
                    help="JSON on stdout, one object a line: {\"type\": \"stats\", ...} each period (with "
                         "--stats-period), {\"type\": \"summary\", ...} at the end; the banner goes to stderr")
    cp.add_argument("--server", action="store_true",
                    help="vhost-user: listen on PATH and wait for the backend to connect (DPDK: client=1)")
    cp.add_argument("--accept-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="vhost-user: how long to wait for the backend (default 30)")
    cp.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                    help="vhost-user: how long each request may wait for the backend's answer (default 5)")
    # what the wire checks of pmd fwd read: capture only receives
    cp.set_defaults(func=_cmd_capture, mode="rxonly", tx_first=False, pcap_out=None)

    from ..sim.process import add_arguments as add_sim_arguments

    sim = sub.add_parser("sim", help="run the built-in virtio-net device for another process",
                         description="pmd's built-in virtio-net device, served over vfio-user on --socket "
                                     "until SIGTERM or Ctrl-C (docs/sim.md); drive it with "
                                     "pmd fwd vfio-user:SOCKET or open_port('vfio-user:SOCKET')")
    add_sim_arguments(sim)
    sim.set_defaults(func=_cmd_sim)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"pmd {args.command}: {e}", file=sys.stderr)
        return 2
    except PmdError as e:
        print(f"pmd {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pmd {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        # Bad input (an address, a file) or a system refusal: one line, no traceback.
        text = str(e)
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            text = f"{e.filename}: {e.strerror}"
        print(f"pmd {args.command}: {' '.join(text.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
