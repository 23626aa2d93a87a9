"""pmd against DPDK's own virtio driver, on the same vhost-user back-end, head to head.

One ``dpdk-testpmd`` with a ``net_vhost`` port is the device (DPDK's vhost library),
its forwarding lcore on CPU 0, exactly as in ``bench/dpdk.py`` (BASELINE.md). On
CPU 1, in turn, the driver is

  DPDK   a second testpmd with DPDK's virtio PMD (``net_virtio_user``, mrg_rxbuf=1,
         in_order=1): ``dpdk.measure_detailed``, which starts both testpmds;
  pmd    this process, pinned to CPU 1: ``pmd.open_port("vhost-user:SOCK")`` and
         ``pmd.fwd`` (what ``pmd fwd`` runs), burst 32, queue size 256, one queue pair.

Directions, as in ``bench/dpdk.py``:

  tx   driver txonly -> vhost rxonly; figure: the back-end's Rx-pps (testpmd's own
       statistics, for both drivers). pmd sends prebuilt pool buffers by id.
  rx   vhost txonly -> driver rxonly; figure: packets the driver received per second
       (DPDK: its Rx-pps; pmd: ``rx_burst_zc`` then ``pool.free``, counted by the port).
  io   both sides macswap, one burst of 32 circulating (the driver sends it first,
       DPDK's ``--tx-first``); figure: packets the driver received per second. A round
       trip per burst: latency-bound.

Samples alternate pmd, DPDK, pmd, DPDK, ... for each direction and size; the
core-to-core round trip (``dpdk.core_round_trip_ns()``) is measured before each
sample (this machine switches between about 100 and 500 ns, bench/README.md). A
sample's figure is the median of its one-second intervals after a warm-up; the
ratio pmd/DPDK is the median over the pairs of back-to-back samples.

    python bench/vs_dpdk.py            # 64 and 1500 B, tx rx io, 3 runs, 5 s samples
    python bench/vs_dpdk.py --quick    # 64 B, 2 runs, 2 s samples: under three minutes
    python bench/vs_dpdk.py --quick --ring packed   # both drivers on packed rings (DPDK: packed_vq=1)
    python bench/vs_dpdk.py --quick --in-order on   # pmd with VIRTIO_F_IN_ORDER (enable="IN_ORDER")

DPDK's virtio-user runs with in_order=1 either way: the comparison.

The last line is ``ratio_64_tx=<x> ratio_64_rx=<y> ratio_64_io=<z>`` (and the
1500 B ones when measured). Needs ``dpdk-testpmd`` (Debian's dpdk-dev) and, as
root, reserves the huge pages DPDK's two testpmds need (``dpdk.ensure_hugepages``).
No PCI device is touched; every testpmd, socket and DPDK runtime file is removed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import queue
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))          # measure the checkout this script is in
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import dpdk  # noqa: E402
from pmd import fwd  # noqa: E402
from pmd.backends import open_port  # noqa: E402
from pmd.abi import virtio as V  # noqa: E402
from pmd.driver.virtio.net import layout_options  # noqa: E402

DIRECTIONS = ("tx", "rx", "io")
BURST = 32
QUEUE_SIZE = 256
CPUS = dpdk.CPUS            # (back-end's forwarding CPU, driver's CPU)
_FWD = {"tx": "txonly", "rx": "rxonly", "io": "macswap"}


#: the rx and tx queue statistics of pmd's last sample (in-order batches, bad entries, ...)
LAST_QUEUE_STATS: list[dict] = []


def _circulate(port, burst: int, size: int) -> None:
    """Start io's circulation, as testpmd's --tx-first does: send one burst and forward
    it once by hand when it comes back, so the forwarding loop starts with packets in
    flight. A back-end that polls its rings before both are ready may drop the first
    burst (it has nowhere to put it): after a second with nothing back, send another;
    after five, give up."""
    frame = np.frombuffer(fwd.udp_frame(size, port.mac), np.uint8)
    rxq, txq = port.rx_queue(0), port.tx_queue(0)
    ids, lens = np.zeros(burst, np.uint32), np.zeros(burst, np.uint32)
    for _ in range(5):
        if txq.tx_burst(np.tile(frame, (burst, 1)), np.full(burst, size, np.uint32)) != burst:
            raise RuntimeError("could not send the circulating burst")
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            n = rxq.rx_burst_zc(ids, lens)
            if n:
                sent = txq.tx_burst_zc(ids[:n], lens[:n])
                if sent < n:
                    port.pool(0).free(ids[sent:n])
                return
            time.sleep(0.0005)
    raise RuntimeError("the circulating burst never came back from the back-end (5 tries)")


def measure_pmd(direction: str, size: int = 64, *, burst: int = BURST, seconds: float = 5.0,
                warmup: float = 1.0, cpus: tuple[int, int] = CPUS,
                ring: str = "split", in_order: bool = False) -> tuple[float, list[float], float]:
    """One pmd sample against a fresh vhost back-end: (median Mpps, per-second Mpps, other CPUs).
    ``ring``: "split" (the default) or "packed" (enable="RING_PACKED"; DPDK's vhost offers it);
    ``in_order``: VIRTIO_F_IN_ORDER too (enable="IN_ORDER"; DPDK's vhost offers it)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    exe = dpdk._testpmd()
    if exe is None:
        raise RuntimeError(dpdk.available()[1])
    dpdk._sweep_stale()
    dpdk.ensure_hugepages()
    prefix = f"pmdh{os.getpid()}x{secrets.token_hex(3)}"
    tmp = tempfile.mkdtemp(prefix="pmd-vs-")
    sock = os.path.join(tmp, "vhost.sock")
    backend_cmd, _ = dpdk._commands(exe, direction, size, burst, sock, prefix, True, True, False, cpus)
    saved = os.sched_getaffinity(0)
    backend = None
    port = None
    stop = threading.Event()
    failure: list[BaseException] = []
    runner = None
    try:
        backend = dpdk._Testpmd("vhost backend", backend_cmd, prefix + "v")
        deadline = time.monotonic() + dpdk.START_TIMEOUT
        while not os.path.exists(sock):
            if not backend.alive():
                raise backend.error("exited before creating the vhost-user socket")
            if time.monotonic() > deadline:
                raise backend.error("no vhost-user socket")
            time.sleep(0.05)
        os.sched_setaffinity(0, {cpus[1]})    # the port's threads and fwd's worker inherit it
        opts = layout_options(ring)
        if in_order:
            opts["enable"] = ",".join(x for x in (opts.get("enable"), "IN_ORDER") if x)
        port = open_port("vhost-user:" + sock, timeout=10.0, wait=10.0, **opts)
        port.start(queue_pairs=1, queue_size=QUEUE_SIZE)
        if port.ring_layout != ring:
            raise RuntimeError(f"pmd runs {port.ring_layout} rings, not {ring}")
        if bool(port.features & (1 << V.IN_ORDER)) != in_order:
            raise RuntimeError(f"pmd runs with VIRTIO_F_IN_ORDER {'off' if in_order else 'on'}, not as asked")
        if direction == "io":                 # the one burst that circulates (testpmd's --tx-first)
            _circulate(port, burst, size)

        def forward() -> None:
            try:
                assert port is not None
                fwd.run(port, _FWD[direction], burst=burst, size=size, stop=stop, report=lambda line: None,
                        interval=3600.0, tx_retry=0)
            except BaseException as e:  # noqa: BLE001 - reported below
                failure.append(e)
                stop.set()

        runner = threading.Thread(target=forward, name="vs-dpdk-fwd", daemon=True)
        runner.start()
        stop.wait(warmup)
        n = max(1, round(seconds))
        t0, (busy0, _) = time.monotonic(), dpdk._cpu_times()
        ours0 = backend.cpu_ticks() + _self_ticks()
        rates: list[float] = []
        if direction == "tx":                 # the back-end's own Rx-pps, as for DPDK
            while not backend.samples.empty():
                backend.samples.get_nowait()
            backend.samples.get(timeout=5.0)  # the second in progress: partial
            for _ in range(n):
                rates.append(backend.samples.get(timeout=5.0)[0])
        else:
            t_prev, c_prev = time.monotonic(), port.stats()["rx_packets"]
            for _ in range(n):
                stop.wait(max(0.0, t_prev + 1.0 - time.monotonic()))
                t, c = time.monotonic(), port.stats()["rx_packets"]
                rates.append((c - c_prev) / max(t - t_prev, 1e-9) / 1e6)
                t_prev, c_prev = t, c
        if failure:
            raise RuntimeError(f"pmd fwd {_FWD[direction]} failed: {failure[0]!r}") from failure[0]
        if not backend.alive():
            raise backend.error("exited during the measurement")
        t1, (busy1, _) = time.monotonic(), dpdk._cpu_times()
        ours1 = backend.cpu_ticks() + _self_ticks()
        other = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / os.sysconf("SC_CLK_TCK") / max(t1 - t0, 1e-3))
        LAST_QUEUE_STATS[:] = [port.rx_queue(0).stats(), port.tx_queue(0).stats()]
        return statistics.median(rates), rates, other
    except queue.Empty:
        assert backend is not None
        raise backend.error("statistics stopped coming") from None
    finally:
        stop.set()
        if runner is not None:
            runner.join(10.0)
        try:
            if port is not None:
                port.close()
        finally:
            os.sched_setaffinity(0, saved)
            if backend is not None:
                backend.stop()
                dpdk._cleanup_files(backend.prefix)
            shutil.rmtree(tmp, ignore_errors=True)


def _self_ticks() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _rt() -> float:
    try:
        return dpdk.core_round_trip_ns(samples=100_000)
    except (RuntimeError, OSError):
        return math.nan


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 B, 2 runs, 2 s samples: under three minutes")
    ap.add_argument("--runs", type=int, help="pairs of samples per direction and size (default 3, --quick 2)")
    ap.add_argument("--seconds", type=float, help="counted seconds per sample (default 5, --quick 2)")
    ap.add_argument("--sizes", help="comma-separated frame sizes (default 64,1500; --quick 64)")
    ap.add_argument("--directions", default="tx,rx,io", help="comma-separated, among tx,rx,io")
    ap.add_argument("--burst", type=int, default=BURST)
    ap.add_argument("--ring", choices=("split", "packed"), default="split",
                    help="ring layout of both drivers (DPDK: packed_vq=1); default split")
    ap.add_argument("--in-order", choices=("on", "off"), default="off",
                    help="pmd with VIRTIO_F_IN_ORDER (DPDK's virtio-user has in_order=1 either way); default off")
    args = ap.parse_args(argv)
    runs = args.runs or (2 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    warmup = 0.5 if args.quick else 1.0
    sizes = [int(s) for s in (args.sizes or ("64" if args.quick else "64,1500")).split(",")]
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    for d in directions:
        if d not in DIRECTIONS:
            ap.error(f"unknown direction {d!r}; one of {', '.join(DIRECTIONS)}")
    ok, why = dpdk.available()
    if not ok:
        print(f"vs_dpdk: DPDK is not available: {why}")
        return 2
    configs = [(d, s) for s in sizes for d in directions]
    old = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return _run(configs, runs, seconds, warmup, args.burst, args.ring, args.in_order == "on")
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(configs: list[tuple[str, int]], runs: int, seconds: float, warmup: float, burst: int,
         ring: str = "split", in_order: bool = False) -> int:
    print(f"pmd vs DPDK's virtio-user on one vhost-user back-end (dpdk-testpmd net_vhost), "
          f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}, {dpdk._testpmd_version(dpdk._testpmd() or '')}")
    print(f"{ring} ring, pmd in-order {'on' if in_order else 'off'} (DPDK in_order=1), burst {burst}, queue size {QUEUE_SIZE}, one queue pair; back-end on CPU {CPUS[0]}, driver on CPU "
          f"{CPUS[1]}; median of {max(1, round(seconds))} one-second intervals per sample; pmd and DPDK "
          "alternate; rt = core-to-core round trip before the sample (fast < "
          f"{dpdk.FAST_ROUND_TRIP_NS:.0f} ns); other = CPUs others used (busy from {dpdk.IDLE_LOAD})")
    print()
    hdr = f"{'run':>3} {'dir':<3} {'size':>5} {'who':<4} | {'Mpps':>7} {'min':>7} {'max':>7} | {'rt ns':>6} {'mode':<4} | {'other':>5} | {'ratio':>6}"
    print(hdr)
    print("-" * len(hdr))
    pmd_all: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    dpdk_all: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    ratios: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    rts: list[float] = []
    failed = 0
    t_start = time.monotonic()
    for run in range(1, runs + 1):
        for direction, size in configs:
            rt = _rt()
            rts.append(rt)
            try:
                p, prates, pother = measure_pmd(direction, size, burst=burst, seconds=seconds, warmup=warmup,
                                                ring=ring, in_order=in_order)
            except (RuntimeError, OSError) as e:
                failed += 1
                print(f"{run:>3} {direction:<3} {size:>5} {'pmd':<4} | failed: {e}", flush=True)
                continue
            pmd_all[(direction, size)].append(p)
            print(f"{run:>3} {direction:<3} {size:>5} {'pmd':<4} | {p:>7.3f} {min(prates):>7.3f} {max(prates):>7.3f} | "
                  f"{rt:>6.0f} {dpdk.round_trip_mode(rt):<4} | {pother:>5.2f} |", flush=True)
            rt = _rt()
            rts.append(rt)
            try:
                d = dpdk.measure_detailed(direction, size, burst, seconds, packed_vq=ring == "packed")
            except (RuntimeError, OSError) as e:
                failed += 1
                print(f"{run:>3} {direction:<3} {size:>5} {'dpdk':<4} | failed: {e}", flush=True)
                continue
            dpdk_all[(direction, size)].append(d.mpps)
            ratio = p / d.mpps if d.mpps > 0 else math.nan
            ratios[(direction, size)].append(ratio)
            lo, hi = d.spread
            print(f"{run:>3} {direction:<3} {size:>5} {'dpdk':<4} | {d.mpps:>7.3f} {lo:>7.3f} {hi:>7.3f} | "
                  f"{rt:>6.0f} {dpdk.round_trip_mode(rt):<4} | {d.other_cpu:>5.2f} | {ratio:>6.3f}", flush=True)

    def med(v: list[float]) -> float:
        return statistics.median(v) if v else math.nan

    print()
    print(f"{'dir':<3} {'size':>5} | {'pmd Mpps':>8} {'DPDK Mpps':>9} | {'pmd/DPDK':>8} {'min':>6} {'max':>6} | pairs")
    for c in configs:
        r = ratios[c]
        print(f"{c[0]:<3} {c[1]:>5} | {med(pmd_all[c]):>8.3f} {med(dpdk_all[c]):>9.3f} | {med(r):>8.3f} "
              f"{min(r) if r else math.nan:>6.3f} {max(r) if r else math.nan:>6.3f} | {len(r)}")
    good = [r for r in rts if not math.isnan(r)]
    rt_med = statistics.median(good) if good else math.nan
    print(f"round trip: median {rt_med:.0f} ns, {sum(1 for r in good if dpdk.round_trip_mode(r) == 'fast')} of "
          f"{len(good)} samples fast; took {time.monotonic() - t_start:.1f} s")
    print(" ".join(f"ratio_{s}_{d}={med(ratios[(d, s)]):.3f}" for d, s in configs))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
