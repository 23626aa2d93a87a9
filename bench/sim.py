"""pmd's driver against pmd's built-in virtio-net device in another process, one core each.

The device is ``pmd.open_port("sim", wire=...)``: ``python -m pmd.sim`` in a
process of its own, reached over vfio-user (UNIX socket, shared DMA memory,
mmap-ed doorbells, eventfds). Every thread of the device process is pinned to
one CPU and the driver's threads to the other, as ``bench/dpdk.py`` pins
DPDK's two testpmds (device / vhost backend on CPU 0, driver / virtio-user
frontend on CPU 1). The driver runs ``pmd.fwd`` (what ``pmd fwd`` runs), burst
32, queue size 256 (virtio-user's default), one queue pair:

  tx   fwd txonly: bursts of 32 pool buffers holding a prebuilt frame, sent by
       id (``tx_burst_zc``: per packet the driver writes only the virtio-net
       header), as fast as the ring takes them, into a device with the ``null``
       wire (it drops what it takes).
       Figure: packets the device took from the tx ring (its engine's
       ``tx_packets``, read over the control socket), per second.
       DPDK: virtio-user txonly -> vhost rxonly, the backend's Rx-pps.
  rx   generator wire at full rate (frames built by the device, ``--rate 0``);
       fwd rxonly: ``rx_burst_zc`` and ``pool.free``. Figure: packets the driver
       received per second. DPDK: vhost txonly -> virtio-user rxonly, the
       frontend's Rx-pps.
  io   loopback wire (the device copies each packet from the tx ring into the
       rx ring); the driver sends one burst of 32 frames once, then fwd io
       sends whatever it receives straight back (``rx_burst_zc`` ->
       ``tx_burst_zc``, no copy in the driver). So exactly one burst
       circulates, and the figure, packets the driver received per second, is
       32 packets per round trip driver -> device -> driver: latency-bound, not
       a throughput. DPDK: both sides macswap, one burst circulating
       (``--tx-first``), the frontend's Rx-pps: the same shape (its
       frontend touches 12 bytes per packet more, the MAC swap).

Each pmd sample is one session: spawn the device, start the port, pin,
warm up, then ``seconds`` one-second intervals; the sample's figure is the
median of the intervals. With ``--dpdk`` (the default when ``dpdk.available()``
says testpmd can run, except with ``--quick``), each pmd sample is followed by
DPDK's figure for the same direction and size (``dpdk.measure_detailed``), so
the two alternate: pmd, DPDK, pmd, DPDK, ... The core-to-core round trip
(``dpdk.core_round_trip_ns()``) is measured before every sample: this machine
is bimodal for cross-core work (bench/README.md). Before each sample it waits
(up to ``--wait-idle`` s) for the rest of the machine to be quiet, and flags a
sample "busy" when other processes used more than 0.25 CPUs meanwhile; the
medians are over the samples that were not busy (all of them if none was).
The ratio pmd/DPDK is the median over runs of the ratio of two back-to-back
samples.

    python bench/sim.py                 # 64 and 1500 B, tx rx io (io at 64 B); DPDK if available
    python bench/sim.py --runs 3        # the whole table three times, interleaved
    python bench/sim.py --quick         # 64 B only, 2 s samples, no DPDK unless --dpdk: under a minute

The last line is ``sim_mpps tx64=... rx64=... io64=... tx1500=... rx1500=...
[ratio_tx64=... ratio_rx64=... ...] rt_ns=...``. Every device process, its
socket directory and DPDK's files are removed on every path (the device
also on SIGTERM of this process). No PCI device is touched.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
# Measure the checkout this script is in, even where another pmd is installed.
sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import dpdk  # noqa: E402
from pmd import fwd  # noqa: E402
from pmd.backends import open_port  # noqa: E402
from pmd.driver.virtio.net import layout_options  # noqa: E402
from pmd.driver.port import Port  # noqa: E402

MODES = ("tx", "rx", "io")
SIZES = (64, 1500)
BURST = 32
QUEUE_SIZE = 256
WARMUP = 1.0
IDLE_LOAD = dpdk.IDLE_LOAD
#: (device CPU, driver CPU): where dpdk.py puts the vhost backend's and the virtio-user frontend's lcores
CPUS = dpdk.CPUS

_WIRES = {"tx": "null", "rx": "generator", "io": "loopback"}
_FWD_MODES = {"tx": "txonly", "rx": "rxonly", "io": "io"}


@dataclass
class PmdMeasurement:
    """One pmd session (one sample). Rates in Mpps."""

    mode: str
    size: int
    burst: int
    mpps: float  # median of ``intervals``
    intervals: list[float]  # one figure per interval (about a second each)
    packets: int  # counted over the intervals
    seconds: float  # their total length
    other_cpu: float  # CPUs used meanwhile by processes other than the driver and the device
    device_per_round: float  # packets the device engine took or delivered per polling round (io: both)
    device_cpu: float  # CPUs the device process used (1.0: its core all the time)
    driver_cpu: float  # CPUs this process used
    drops: int  # driver-side drops over the session (io: also packets the tx ring did not take)
    errors: int  # bad used entries the driver saw
    cpus: tuple[int, int] | None  # (device CPU, driver CPU), None when not pinned
    device_pid: int = 0
    socket_path: str = ""
    device_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.intervals), max(self.intervals)) if self.intervals else (math.nan, math.nan)


def pick_cpus(cpus: tuple[int, int] | None = CPUS) -> tuple[int, int] | None:
    """``cpus`` if both are allowed to this process, else two allowed ones, else None (one CPU)."""
    allowed = sorted(os.sched_getaffinity(0))
    if cpus is not None and cpus[0] != cpus[1] and set(cpus) <= set(allowed):
        return cpus
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


def pin_process(pid: int, cpu: int) -> int:
    """Pin every thread of process ``pid`` to ``cpu`` (threads it makes later inherit it)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
            n += 1
        except (ProcessLookupError, FileNotFoundError):  # a thread that just ended
            pass
    return n


def set_timerslack(pid: int, ns: int) -> None:
    """Set the timer slack of every thread of process ``pid`` (``/proc/TID/timerslack_ns``)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{tid}/timerslack_ns", "w") as f:
                f.write(str(ns))
        except FileNotFoundError:  # a thread that just ended
            pass


def _ticks(pid: int | str) -> int:
    """utime + stime of a whole process, in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _machine_busy() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = v
    return user + nice + system + irq + softirq


def child_pids() -> list[int]:
    """PIDs of this process's children that still exist (zombies included)."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.append(int(entry))
    return out


def _device_counters(port: Port) -> tuple[float, dict[str, Any]]:
    """(time, device 0's statistics): the time is the middle of the control request."""
    t0 = time.monotonic()
    st = port.sim.stats()[0]
    return (t0 + time.monotonic()) / 2, st


def measure_pmd(mode: str, size: int = 64, *, burst: int = BURST, seconds: float = 5.0,
                warmup: float = WARMUP, queue_size: int = QUEUE_SIZE,
                cpus: tuple[int, int] | None = CPUS, interval: float = 1.0,
                device_timerslack_ns: int | None = None, ring: str = "split") -> PmdMeasurement:
    """One pmd sample: a device process with the mode's wire, pmd's fwd on the port, pinned.

    ``mode``: "tx", "rx" or "io" (see the module docstring). After ``warmup``
    seconds of traffic, ``seconds`` are counted in intervals of ``interval``
    seconds; the result is the median interval. The device process, its
    sockets and the forwarding thread are gone when this returns or raises,
    and the calling thread's CPU affinity is what it was. ``ring``: "split" or
    "packed" (the built-in device offers both).

    ``device_timerslack_ns`` (a diagnostic, needs root or CAP_SYS_NICE): set the
    timer slack of the device process's threads. Its engine calls
    ``time.sleep(0)`` after a round that moved nothing and sets its own slack
    to 1 ns so that sleep is short; 50000 (Linux's default) shows the cost of
    the old behaviour, a sleep of about 57 us.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not 60 <= size <= 1514:
        raise ValueError("size must be 60 to 1514 bytes")
    cpus = pick_cpus(cpus)
    n_intervals = max(1, round(seconds / interval)) if seconds >= interval else 1
    step = seconds / n_intervals
    kwargs: dict[str, Any] = {"wire": _WIRES[mode], "queue_size": max(queue_size, 1024), **layout_options(ring)}
    if mode == "rx":
        kwargs.update(rate=0, size=size)
    saved = os.sched_getaffinity(0)
    port: Port | None = None
    stop = threading.Event()
    failure: list[BaseException] = []
    summaries: list[fwd.Summary] = []
    runner: threading.Thread | None = None
    try:
        if cpus is not None:
            # The driver's threads (fwd's worker, the port's interrupt thread) are made from here on:
            # they inherit this. The device process inherits it too; it is moved to its CPU below.
            os.sched_setaffinity(0, {cpus[1]})
        port = open_port("sim", **kwargs)
        for _ in range(2):  # before start (the engine thread inherits it) and after
            if cpus is not None:
                pin_process(port.sim.pid, cpus[0])
            if device_timerslack_ns is not None:
                set_timerslack(port.sim.pid, device_timerslack_ns)
            if not port.started:
                port.start(queue_pairs=1, queue_size=queue_size)
        if port.ring_layout != ring:
            raise RuntimeError(f"pmd runs {port.ring_layout} rings, not {ring}")
        device_pid, socket_path = port.sim.pid, port.sim.socket_path
        if mode == "io":
            # One burst to circulate: loopback wire -> rx -> fwd io sends it back -> ...
            frame = np.frombuffer(fwd.udp_frame(size, port.mac), np.uint8)
            sent = port.tx_queue(0).tx_burst(np.tile(frame, (burst, 1)), np.full(burst, size, np.uint32))
            if sent != burst:
                raise RuntimeError(f"could not send the circulating burst ({sent} of {burst} queued)")

        def forward() -> None:
            try:
                assert port is not None
                summaries.append(fwd.run(port, _FWD_MODES[mode], burst=burst, size=size, stop=stop,
                                         report=lambda line: None, interval=3600.0))
            except BaseException as e:  # noqa: BLE001 - reported below
                failure.append(e)
                stop.set()

        runner = threading.Thread(target=forward, name="bench-sim-fwd", daemon=True)
        runner.start()

        def count() -> tuple[float, int]:
            assert port is not None
            if mode == "tx":  # packets the device took
                t, st = _device_counters(port)
                return t, int(st["tx_packets"])
            t = time.monotonic()
            return t, int(port.stats()["rx_packets"])

        def check() -> None:
            assert port is not None
            if failure:
                raise RuntimeError(f"pmd fwd {_FWD_MODES[mode]} failed: {failure[0]!r}") from failure[0]
            if not port.sim.running:
                raise RuntimeError(f"the device process exited ({port.sim.returncode}):\n"
                                   f"{port.sim.log_text()[-2000:]}")

        stop.wait(warmup)
        check()
        me = os.getpid()
        t_first, c_first = count()
        busy0, drv_t0, dev_t0 = _machine_busy(), _ticks(me), _ticks(device_pid)
        _, dev0 = _device_counters(port)
        drv0 = port.stats()
        rates: list[float] = []
        t_prev, c_prev = t_first, c_first
        for _ in range(n_intervals):
            stop.wait(max(0.0, t_prev + step - time.monotonic()))
            check()
            t, c = count()
            rates.append((c - c_prev) / max(t - t_prev, 1e-9) / 1e6)
            t_prev, c_prev = t, c
        busy1, drv_t1, dev_t1 = _machine_busy(), _ticks(me), _ticks(device_pid)
        _, dev1 = _device_counters(port)
        drv1 = port.stats()
        elapsed = max(t_prev - t_first, 1e-9)
        hz = os.sysconf("SC_CLK_TCK")
        other = max(0.0, ((busy1 - busy0) - (drv_t1 - drv_t0) - (dev_t1 - dev_t0)) / hz / elapsed)
        e0, e1 = dev0["engine"], dev1["engine"]
        moved = (e1["tx_packets"] - e0["tx_packets"]) + (e1["rx_packets"] - e0["rx_packets"])
        rounds = e1["rounds"] - e0["rounds"]
        stop.set()
        runner.join(10.0)
        check()
        # fwd's drops (rx drops, and io packets a full tx ring did not take) over the whole session
        drops = summaries[0].drops if summaries else int(drv1["rx_dropped"])
        errors = int(drv1["device_errors"] - drv0["device_errors"])
        return PmdMeasurement(mode, size, burst, statistics.median(rates), rates, c_prev - c_first, elapsed,
                              other, moved / rounds if rounds else 0.0, (dev_t1 - dev_t0) / hz / elapsed,
                              (drv_t1 - drv_t0) / hz / elapsed, drops, errors, cpus, device_pid,
                              socket_path, dev1)
    finally:
        stop.set()
        if runner is not None:
            runner.join(10.0)
        try:
            if port is not None:
                port.close()  # stops the device process (SIGTERM, then SIGKILL) and removes its sockets
        finally:
            os.sched_setaffinity(0, saved)


def measure(mode: str, size: int = 64, **kwargs: Any) -> float:
    """pmd's Mpps for one mode and size (``measure_pmd(...).mpps``)."""
    return measure_pmd(mode, size, **kwargs).mpps


# --------------------------------------------------------------------------- command line


def _rt_or_nan(samples: int = 100_000) -> float:
    try:
        return dpdk.core_round_trip_ns(samples, cpus=pick_cpus() or dpdk.CPUS)
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return math.nan


def _wait_idle(limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and dpdk.machine_load(0.5) >= IDLE_LOAD:
        pass


def _median(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return statistics.median(good) if good else math.nan


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so every finally runs: device processes, testpmds, files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="64 B only, 2 s samples, short warm-up, no DPDK unless --dpdk; under a minute")
    ap.add_argument("--seconds", type=float, help="counted seconds per sample (default 5, --quick 2)")
    ap.add_argument("--warmup", type=float, help=f"seconds of traffic before counting (default {WARMUP}, "
                                                 "--quick 0.5)")
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole table (interleaved), default 1")
    ap.add_argument("--sizes", default=None, help="comma-separated frame sizes (default 64,1500; --quick 64)")
    ap.add_argument("--modes", default="tx,rx,io", help="comma-separated modes among tx,rx,io")
    ap.add_argument("--io-all-sizes", action="store_true", help="io at every size, not only at 64 B")
    ap.add_argument("--burst", type=int, default=BURST)
    ap.add_argument("--queue-size", type=int, default=QUEUE_SIZE)
    ap.add_argument("--ring", choices=("split", "packed"), default="split",
                    help="ring layout of both drivers (DPDK: packed_vq=1); default split")
    ap.add_argument("--device-timerslack-ns", type=int, default=None, metavar="NS",
                    help="diagnostic: set the device threads' timer slack (Linux default 50000; "
                         "the engine sets its own to 1 ns; 50000 shows what its idle time.sleep(0) cost before)")
    dp = ap.add_mutually_exclusive_group()
    dp.add_argument("--dpdk", dest="dpdk", action="store_true", default=None,
                    help="measure DPDK too (default when available, except with --quick)")
    dp.add_argument("--no-dpdk", dest="dpdk", action="store_false")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="S",
                    help=f"before each sample wait up to S s for the rest of the machine to use less than "
                         f"{IDLE_LOAD} CPUs (default 30, --quick 0)")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else WARMUP)
    wait_idle = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 30.0)
    sizes = [int(s) for s in (args.sizes or ("64" if args.quick else "64,1500")).split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; one of {', '.join(MODES)}")
    configs = [(m, s) for s in sizes for m in modes if m != "io" or s == 64 or args.io_all_sizes]
    if not configs:
        ap.error("nothing to measure (io runs at 64 B only without --io-all-sizes)")

    ok, why = dpdk.available()
    use_dpdk = args.dpdk if args.dpdk is not None else (ok and not args.quick)
    if use_dpdk and not ok:
        print(f"sim: DPDK requested but not available: {why}")
        return 2
    old = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return _run(args, configs, seconds, warmup, wait_idle, use_dpdk, ok, why)
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(args: argparse.Namespace, configs: list[tuple[str, int]], seconds: float, warmup: float,
         wait_idle: float, use_dpdk: bool, ok: bool, why: str) -> int:
    cpus = pick_cpus()

    print(f"pmd driver <-> pmd's built-in virtio-net device in another process (vfio-user), "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    print(f"{args.ring} ring, burst {args.burst}, queue size {args.queue_size}, one queue pair; device on CPU "
          f"{cpus[0] if cpus else '-'}, driver on CPU {cpus[1] if cpus else '-'}"
          + ("" if cpus else " (one CPU: not pinned)")
          + f"; {warmup:g} s warm-up, median of {max(1, round(seconds))} one-second intervals per sample")
    print("  tx = driver txonly (prebuilt buffers by id) -> null wire, packets the device took; "
          "rx = generator wire -> driver rxonly (rx_burst_zc, free);")
    print("  io = loopback wire, driver io (rx_burst_zc -> tx_burst_zc), one burst circulating, packets the "
          "driver received; DPDK: the same directions with dpdk-testpmd (bench/dpdk.py)")
    print(f"  rt = core-to-core round trip before the sample (fast < {dpdk.FAST_ROUND_TRIP_NS:.0f} ns); "
          f"other = CPUs others used meanwhile (busy from {IDLE_LOAD}); dev/rnd = packets per device "
          "engine round, devcpu = CPUs the device process used")
    if args.device_timerslack_ns is not None:
        print(f"  diagnostic: the device's threads run with a timer slack of {args.device_timerslack_ns} ns")
    if use_dpdk:
        print(f"  DPDK: {why}; samples alternate pmd, DPDK, pmd, DPDK, ...")
    elif not ok:
        print(f"  DPDK: not measured ({why})")
    else:
        print("  DPDK: not measured (--quick; add --dpdk)")
    print()
    hdr = (f"{'run':>3} {'mode':<4} {'size':>5} {'who':<4} | {'Mpps':>7} {'min':>7} {'max':>7} | "
           f"{'rt ns':>6} {'mode':<4} | {'other':>5} | {'dev/rnd':>7} {'devcpu':>6} {'ratio':>6}")
    print(hdr)
    print("-" * len(hdr))
    pmd_all: dict[tuple[str, int], list[tuple[float, bool]]] = {c: [] for c in configs}
    dpdk_all: dict[tuple[str, int], list[tuple[float, bool]]] = {c: [] for c in configs}
    ratios: dict[tuple[str, int], list[tuple[float, bool]]] = {c: [] for c in configs}
    rts: list[float] = []
    failed = 0
    t_start = time.monotonic()
    for run in range(1, args.runs + 1):
        for mode, size in configs:
            _wait_idle(wait_idle)
            rt = _rt_or_nan()
            rts.append(rt)
            try:
                p = measure_pmd(mode, size, burst=args.burst, seconds=seconds, warmup=warmup,
                                queue_size=args.queue_size, cpus=cpus,
                                device_timerslack_ns=args.device_timerslack_ns, ring=args.ring)
            except (RuntimeError, OSError) as e:
                failed += 1
                print(f"{run:>3} {mode:<4} {size:>5} {'pmd':<4} | failed: {e}", flush=True)
                continue
            lo, hi = p.spread
            p_quiet = p.other_cpu < IDLE_LOAD
            pmd_all[(mode, size)].append((p.mpps, p_quiet))
            notes = ("  busy" if not p_quiet else "") + (f"  drops={p.drops}" if p.drops else "") + \
                (f"  errors={p.errors}" if p.errors else "")
            print(f"{run:>3} {mode:<4} {size:>5} {'pmd':<4} | {p.mpps:>7.3f} {lo:>7.3f} {hi:>7.3f} | "
                  f"{rt:>6.0f} {dpdk.round_trip_mode(rt):<4} | {p.other_cpu:>5.2f} | "
                  f"{p.device_per_round:>7.1f} {p.device_cpu:>6.2f} {'':>6}{notes}", flush=True)
            if not use_dpdk:
                continue
            _wait_idle(wait_idle)
            rt = _rt_or_nan()
            rts.append(rt)
            try:
                d = dpdk.measure_detailed(mode, size, args.burst, seconds, packed_vq=args.ring == "packed")
            except RuntimeError as e:
                failed += 1
                print(f"{run:>3} {mode:<4} {size:>5} {'dpdk':<4} | failed: {e}", flush=True)
                continue
            lo, hi = d.spread
            d_quiet = d.other_cpu < IDLE_LOAD
            dpdk_all[(mode, size)].append((d.mpps, d_quiet))
            ratio = p.mpps / d.mpps if d.mpps > 0 else math.nan
            ratios[(mode, size)].append((ratio, p_quiet and d_quiet))
            print(f"{run:>3} {mode:<4} {size:>5} {'dpdk':<4} | {d.mpps:>7.3f} {lo:>7.3f} {hi:>7.3f} | "
                  f"{rt:>6.0f} {dpdk.round_trip_mode(rt):<4} | {d.other_cpu:>5.2f} | {'':>7} {'':>6} "
                  f"{ratio:>6.3f}{'  busy' if not d_quiet else ''}", flush=True)

    def med(values: list[tuple[float, bool]]) -> float:
        # Medians over the samples not flagged busy (all of them if every one was).
        quiet = [v for v, q in values if q]
        return _median(quiet or [v for v, _ in values])

    print()
    print(f"{'mode':<4} {'size':>5} | {'pmd Mpps':>8} {'DPDK Mpps':>9} {'pmd/DPDK':>8} | samples")
    for mode, size in configs:
        pm = med(pmd_all[(mode, size)])
        dm = med(dpdk_all[(mode, size)]) if use_dpdk else math.nan
        rm = med(ratios[(mode, size)]) if use_dpdk else math.nan
        print(f"{mode:<4} {size:>5} | {pm:>8.3f} {dm:>9.3f} {rm:>8.3f} | "
              f"{len(pmd_all[(mode, size)])} pmd, {len(dpdk_all[(mode, size)])} DPDK")
    rt_med = _median(rts)
    print(f"round trip: median {rt_med:.0f} ns ({dpdk.round_trip_mode(rt_med)}), "
          f"{sum(1 for r in rts if dpdk.round_trip_mode(r) == 'fast')} of {len(rts)} samples fast; "
          f"took {time.monotonic() - t_start:.1f} s")
    parts = [f"{m}{s}={med(v):.3f}" for (m, s), v in pmd_all.items()]
    if use_dpdk:
        parts += [f"ratio_{m}{s}={med(v):.3f}" for (m, s), v in ratios.items()]
    print(f"sim_mpps {' '.join(parts)} rt_ns={rt_med:.0f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
