"""Latency from an eventfd write to the code that handles it.

Two paths, measured interleaved (A B A B ...) so drift in the machine's load
hits both alike:

  A  interrupt thread: write -> epoll wakes the pmd interrupt thread -> it
     reads the counter -> the registered callback runs;
  B  direct wait: write -> a thread blocked in pmd.interrupts.wait() returns.

The writer stamps time.perf_counter_ns() just before the write, the receiver
just on entry to its code; both clocks are CLOCK_MONOTONIC. After writing,
the writer blocks on an Event, so the receiver gets the GIL at once: this is
the best case. A Python thread busy elsewhere adds up to
sys.getswitchinterval() (5 ms) of waiting for the GIL.

    python bench/interrupt_latency.py            # 2000 samples of each
    python bench/interrupt_latency.py --quick    # 200
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Measure the checkout this script is in, even where another pmd is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pmd.driver.interrupts import EventFd, InterruptThread, wait  # noqa: E402

WARMUP = 50  # first samples of each kind, discarded (caches, thread start)
TIMEOUT = 2.0  # per sample; only reached if something is broken


class Receiver:
    """Where a receiving thread stamps its time and tells the writer it is done."""

    def __init__(self) -> None:
        self.stamp = 0
        self.done = threading.Event()

    def hit(self) -> None:
        self.stamp = time.perf_counter_ns()
        self.done.set()


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: a value that was measured)."""
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def measure(n: int) -> dict[str, list[float]]:
    intr = InterruptThread(name="pmd-intr")
    via_thread, direct = Receiver(), Receiver()
    stop = threading.Event()
    with EventFd() as efd_a, EventFd() as efd_b:

        def callback(fd: int, count: int, arg: Any) -> None:
            via_thread.hit()

        def waiter() -> None:
            while not stop.is_set():
                if wait(efd_b, timeout=0.5):
                    direct.hit()

        intr.register(efd_a, callback)
        waiter_thread = threading.Thread(target=waiter, name="bench-waiter", daemon=True)
        waiter_thread.start()
        samples: dict[str, list[float]] = {"interrupt thread callback": [], "direct wait()": []}
        kinds: list[tuple[str, EventFd, Receiver]] = [
            ("interrupt thread callback", efd_a, via_thread),
            ("direct wait()", efd_b, direct),
        ]
        try:
            for i in range(n + WARMUP):
                for name, efd, receiver in kinds:
                    receiver.done.clear()
                    time.sleep(0.0002)  # let the receiver settle back into its wait
                    start = time.perf_counter_ns()
                    efd.signal()
                    if not receiver.done.wait(TIMEOUT):
                        raise RuntimeError(f"{name}: no wakeup within {TIMEOUT} s")
                    if i >= WARMUP:
                        samples[name].append((receiver.stamp - start) / 1000.0)
        finally:
            stop.set()
            waiter_thread.join(TIMEOUT)
            intr.stop()
    return samples


def describe() -> str:
    return (f"{platform.python_implementation()} {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
            f"switch interval {sys.getswitchinterval() * 1000:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--samples", type=int, default=2000,
                        help="samples of each path (default 2000)")
    parser.add_argument("--quick", action="store_true", help="200 samples")
    args = parser.parse_args(argv)
    n = 200 if args.quick else args.samples
    if n < 1:
        parser.error("--samples must be at least 1")
    samples = measure(n)
    print(f"eventfd write -> handler latency, {n} samples each, interleaved ({describe()})")
    print(f"{'path':<28}{'median':>9}{'p90':>9}{'p99':>9}{'min':>9}{'max':>9}   (us)")
    for name, values in samples.items():
        values.sort()
        row = [percentile(values, 50), percentile(values, 90), percentile(values, 99),
               values[0], values[-1]]
        print(f"{name:<28}" + "".join(f"{v:9.1f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
