"""Capture (``pmd capture``) and parse rates on the built-in device, as ratios to rx-only.

One port on the built-in device's generator (64-byte UDP frames, as fast as they are
taken; the device pinned to one CPU, this thread to the other, as ``pmd fwd`` places
them). Each round measures, one after the other (on a shared and noisy VM), for
``--seconds`` each:

  rx        testpmd's rxonly: ``rx_discard`` bursts, nothing copied (``pmd fwd --mode rxonly``)
  parse     copy-mode ``rx_burst`` with timestamps, then ``HeaderParser.parse_into`` on each burst
  arrow     ``pmd.arrow.record_batches``: record batches of 4096 packets, thrown away
  pcap      ``pmd.capture.run`` to classic pcap (nanosecond) in tmpfs (/dev/shm)
  pcapng    the same, pcapng
  parquet   the same, Parquet (needs pyarrow; skipped without it)

The rx-only samples are taken between every two others (rx, parse, rx, arrow, rx,
pcap, ...): a mode's ratio is its rate over the mean of the rx samples right before
and right after it; the table gives the medians over the rounds. Each capture file is checked: its size is what the packets
captured take (pcap, pcapng), or its row count is (Parquet); then it is removed.

    python bench/capture.py            # about a minute
    python bench/capture.py --quick    # a few seconds

The last line is ``rx_mpps=<x> capture_pcap_mpps=<y> capture_pcap_ratio=<y/x> ...`` for
every mode.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # measure the checkout this script is in

import numpy as np  # noqa: E402

import pmd  # noqa: E402
from pmd import capture, fwd  # noqa: E402
from pmd.parse import HeaderParser  # noqa: E402

try:
    import pyarrow  # noqa: F401

    HAVE_ARROW = True
except ImportError:
    HAVE_ARROW = False

BURST = 64


def rx_only(port: Any, seconds: float) -> tuple[int, float]:
    rxq = port.rx_queue(0)
    n = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for _ in range(64):
            n += rxq.rx_discard(BURST)
    return n, time.monotonic() - start


def rx_parse(port: Any, seconds: float) -> tuple[int, float]:
    rxq = port.rx_queue(0)
    out = np.zeros((BURST, rxq.max_packet_len), np.uint8)
    lens = np.zeros(BURST, np.uint32)
    ts = np.zeros(BURST, np.uint64)
    parser = HeaderParser(BURST)
    rx, parse_into = rxq.rx_burst, parser.parse_into
    n = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for _ in range(64):
            n += parse_into(out, lens, rx(out, lens, timestamps=ts))
    if n and not (parser.columns["dst_port"][:1] > 0).all():
        raise AssertionError("the parse did not find the generator's UDP header")
    return n, time.monotonic() - start


def arrow_batches(port: Any, seconds: float) -> tuple[int, float]:
    from pmd.arrow import record_batches

    start = time.monotonic()
    n = sum(b.num_rows for b in record_batches(port.rx_queue(0), burst=BURST, timeout=seconds))
    return n, time.monotonic() - start


def capture_to(ext: str, where: Path) -> Callable[[Any, float], tuple[int, float]]:
    def run(port: Any, seconds: float) -> tuple[int, float]:
        path = where / f"bench{ext}"
        s = capture.run(port, path, duration=seconds, burst=BURST, interval=None, report=lambda line: None)
        check_file(path, ext, s.captured)
        path.unlink()
        return s.captured, s.seconds
    return run


def check_file(path: Path, ext: str, packets: int) -> None:
    size = path.stat().st_size
    if ext == ".pcap":
        want = 24 + packets * (16 + 64)
    elif ext == ".pcapng":
        want = 28 + 32 + packets * (32 + 64)        # SHB, IDB, an EPB of 64 bytes per packet
    else:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
        if rows != packets:
            raise AssertionError(f"{path}: {rows} rows for {packets} packets captured")
        return
    if size != want:
        raise AssertionError(f"{path}: {size} bytes, {packets} packets take {want}")


def sample(port: Any, name: str, fn: Callable[[Any, float], tuple[int, float]], seconds: float) -> float:
    n, dt = fn(port, seconds)
    if n == 0:
        raise AssertionError(f"{name}: no packet in {dt:.2f} s")
    return n / dt / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two short rounds")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=0.8, help="per mode per round")
    ap.add_argument("--queue-size", type=int, default=capture.QUEUE_SIZE,
                    help=f"ring entries (default {capture.QUEUE_SIZE}, as pmd capture's)")
    args = ap.parse_args(argv)
    rounds, seconds = (2, 0.3) if args.quick else (args.rounds, args.seconds)
    where = Path(tempfile.mkdtemp(prefix="pmd-bench-capture-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    modes: dict[str, Callable[[Any, float], tuple[int, float]]] = {"rx": rx_only, "parse": rx_parse}
    if HAVE_ARROW:
        modes["arrow"] = arrow_batches
    modes["pcap"] = capture_to(".pcap", where)
    modes["pcapng"] = capture_to(".pcapng", where)
    if HAVE_ARROW:
        modes["parquet"] = capture_to(".parquet", where)
    device_cpu, cpus = fwd.default_placement(True)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    try:
        with pmd.open_port("sim", wire="generator", rate=0.0, size=64, flows=1, cpu=device_cpu) as port:
            port.start(queue_size=args.queue_size)
            if cpus:
                capture.pin_this_thread(cpus[0])
            rx_only(port, 0.2)                       # warm up: the device's first packets
            for _ in range(rounds):
                # rx, A, rx, B, rx, ...: each mode against the mean of the rx samples on
                # either side of it, so that a change of the machine's load between two
                # samples moves both sides of a ratio alike.
                rx_before = sample(port, "rx", rx_only, seconds)
                rates["rx"].append(rx_before)
                for name, fn in modes.items():
                    if name == "rx":
                        continue
                    mpps = sample(port, name, fn, seconds)
                    rx_after = sample(port, "rx", rx_only, seconds)
                    rates[name].append(mpps)
                    rates["rx"].append(rx_after)
                    ratios[name].append(mpps / ((rx_before + rx_after) / 2))
                    rx_before = rx_after
            dropped = port.stats()["rx_dropped"]
    finally:
        shutil.rmtree(where, ignore_errors=True)
    print(f"64 B frames from the built-in device's generator, burst {BURST}, files in tmpfs; "
          f"medians of {rounds} rounds of {seconds} s per sample, rx between every two (load {os.getloadavg()[0]:.1f}); "
          f"rx drops {dropped}")
    print(f"{'mode':>8} {'Mpps':>8} {'/ rx':>6}")
    for name in modes:
        ratio = statistics.median(ratios[name]) if ratios[name] else 1.0
        print(f"{name:>8} {statistics.median(rates[name]):8.3f} {ratio:6.2f}")
    summary = {"rx_mpps": statistics.median(rates["rx"])}
    for name in modes:
        if name == "rx":
            continue
        key = name if name in ("parse", "arrow") else f"capture_{name}"
        summary[f"{key}_mpps"] = statistics.median(rates[name])
        summary[f"{key}_ratio"] = statistics.median(ratios[name])
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
