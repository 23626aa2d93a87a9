"""Aggregate packet rate of 1 and 2 threads, each on its own queue pair.

pmd's design: one queue pair per thread, the GIL released in every burst, so N
threads on N cores should move N times the packets. Two set-ups, measured
interleaved (1 thread, 2 threads, 1, 2, ...: this machine's cross-core figures
swing between runs, a ratio from one run does not):

  loopback  each thread owns an in-process ``Loopback`` (the driver's and the
            device side of one queue pair, 64 B frames) and runs rounds of a
            queue's worth of packets: txonly in C (``pmd.driver._fwd.txonly``), the
            device moving them tx ring -> rx ring (``Loopback.step``), one
            ``rx_burst_zc`` and one ``pool.free``. Four Python calls per round
            of QUEUE packets, so the GIL is held for a few per cent of the time.
            Thread i is pinned to CPU i. Figure: packets received per second,
            summed over the threads.
  sim       the built-in device (``open_port("sim", wire="generator")``, one
            process) generating 64 B frames of two flows as fast as it can on
            every queue pair, ``pmd.fwd`` rxonly on 1 or 2 queue pairs, placed as
            ``pmd fwd`` places them: the device's engine (one thread for all
            queues) on the last CPU, one forwarding thread per other CPU polling
            its pairs in turn. On a 2-core machine that is one core each, so
            the figure says that more pairs cost nothing (target: 1.0), not
            that they add speed.

    python bench/scaling.py            # 5 runs of 3 s samples
    python bench/scaling.py --quick    # 2 runs of 1 s samples, loopback and sim

The last line is ``scaling_2q=<loopback: 2-thread Mpps / 1-thread Mpps, median of the
per-run ratios> sim_scaling_2q=<the same on the built-in device>``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # measure this checkout, even where another pmd is installed

import numpy as np  # noqa: E402

from pmd import fwd  # noqa: E402
from pmd.backends import open_port  # noqa: E402
from pmd.driver import _fwd, _queue  # noqa: E402
from pmd.loopback import Loopback  # noqa: E402

QUEUE = 1024        # packets per loopback round (the ring size)
BURST = 32
SIZE = 64


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _loopback_worker(lb: Loopback, cpu: int | None, start: threading.Barrier, stop: threading.Event,
                     counts: list[int], i: int, errors: list[BaseException]) -> None:
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})          # this thread only
        tx, rx, pool = lb.driver_tx, lb.driver_rx, lb.pool
        ids = np.zeros(QUEUE, np.uint32)
        lens = np.zeros(QUEUE, np.uint32)
        start.wait()
        n_total = 0
        while not stop.is_set():
            _fwd.txonly(tx, SIZE, BURST, QUEUE // BURST)
            lb.step(QUEUE)
            n = rx.rx_burst_zc(ids, lens)
            pool.free(ids, n)
            n_total += n
            counts[i] = n_total
    except BaseException as e:  # noqa: BLE001 - reported by the caller
        errors.append(e)
        stop.set()


def measure_loopback(threads: int, seconds: float = 3.0, warmup: float = 0.3) -> float:
    """Aggregate Mpps of ``threads`` threads, each with its own Loopback, pinned one per CPU."""
    cpus = _cpus()
    lbs = [Loopback(queue_size=QUEUE, n_buffers=4 * QUEUE + 512) for _ in range(threads)]
    stop = threading.Event()
    start = threading.Barrier(threads + 1)
    counts = [0] * threads
    errors: list[BaseException] = []
    ts = [threading.Thread(target=_loopback_worker, name=f"scaling-{i}",
                           args=(lbs[i], cpus[i % len(cpus)] if len(cpus) > 1 else None, start, stop,
                                 counts, i, errors))
          for i in range(threads)]
    try:
        for t in ts:
            t.start()
        start.wait()
        time.sleep(warmup)
        c0, t0 = sum(counts), time.perf_counter()
        time.sleep(seconds)
        c1, t1 = sum(counts), time.perf_counter()
    finally:
        stop.set()
        for t in ts:
            t.join(10)
        for lb in lbs:
            lb.close()
    if errors:
        raise RuntimeError(f"a loopback thread failed: {errors[0]!r}") from errors[0]
    return (c1 - c0) / (t1 - t0) / 1e6


SIM_FLOWS = 2


def measure_sim(queues: int, seconds: float = 3.0, warmup: float = 0.3) -> float:
    """Aggregate rx Mpps of ``pmd.fwd`` rxonly on ``queues`` queue pairs of the built-in device,
    placed as ``pmd fwd`` places it: the device on the last CPU, one forwarding thread per
    other CPU polling the pairs in turn. SIM_FLOWS flows, RSS off: flow f on pair f mod
    pairs, so each pair has traffic and 1 and 2 pairs generate the same flows."""
    device_cpu, cpus = fwd.default_placement(True)
    extra = {} if device_cpu is None else {"cpu": device_cpu}
    with open_port("sim", wire="generator", rate=0, size=SIZE, queue_pairs=queues, flows=SIM_FLOWS,
                   disable="RSS,HASH_REPORT", **extra) as port:
        port.start(queue_pairs=queues)
        fwd.run(port, "rxonly", queues=queues, duration=warmup, report=lambda line: None, cpus=cpus)
        s = fwd.run(port, "rxonly", queues=queues, duration=seconds, report=lambda line: None, cpus=cpus)
        if s.errors:
            raise RuntimeError(f"the built-in device reported {s.errors} errors")
        return s.mpps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 runs of 1 s samples")
    ap.add_argument("--runs", type=int, help="interleaved runs (default 5, --quick 2)")
    ap.add_argument("--seconds", type=float, help="counted seconds per sample (default 3, --quick 1)")
    ap.add_argument("--no-sim", action="store_true", help="the in-process loopback only")
    args = ap.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    cpus = _cpus()
    print(f"scaling over queue pairs, one thread each: {platform.machine()}, {len(cpus)} CPUs {cpus}, "
          f"Linux {platform.release()}, Python {platform.python_version()}")
    print(f"64 B; loopback: rounds of {QUEUE} packets, thread i on CPU i; sim: rxonly on the built-in "
          f"device's generator; {seconds:g} s samples, 1 and 2 threads interleaved, {runs} runs")
    if len(cpus) < 2:
        print("  one CPU: 2 threads cannot run at once here; the ratio says what the GIL costs")
    print(f"{'run':>3} {'setup':<8} {'1 thread':>9} {'2 threads':>10} {'ratio':>6}  GIL taken back by spinning "
          f"(docs/bursts.md): spun, spun_out")
    setups = [("loopback", measure_loopback)] + ([] if args.no_sim else [("sim", measure_sim)])
    ratios: dict[str, list[float]] = {name: [] for name, _ in setups}
    for run in range(1, runs + 1):
        for name, measure in setups:
            h0 = _queue.gil_handoffs()
            one = measure(1, seconds)
            two = measure(2, seconds)
            h1 = _queue.gil_handoffs()
            ratios[name].append(two / one if one else 0.0)
            print(f"{run:>3} {name:<8} {one:>9.2f} {two:>10.2f} {ratios[name][-1]:>6.2f}  "
                  f"{h1['spun'] - h0['spun']}, {h1['spun_out'] - h0['spun_out']}", flush=True)
    med = {name: statistics.median(r) for name, r in ratios.items()}
    print("median ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    line = f"scaling_2q={med['loopback']:.2f}"
    if "sim" in med:
        line += f" sim_scaling_2q={med['sim']:.2f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
