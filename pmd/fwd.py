"""Forwarding modes in the manner of DPDK's testpmd: rxonly, txonly, io, macswap.

One thread per queue pair, or per CPU given, polling its queue pairs in turn (the GIL
is released inside every burst, so threads run in parallel; txonly, io and macswap run
their loops in C, pmd.driver._fwd, many bursts per call); the main thread prints
statistics once a second and a final summary, and stops everything on Ctrl-C,
SIGTERM, after ``duration`` seconds, or when ``stop`` is set.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Protocol, Sequence

import numpy as np

from .abi.ethernet import udp_frame
from .abi.pcap import PcapngWriter, PcapWriter, open_writer
from .driver import _fwd
from .driver._rx import RxQueue
from .driver._tx import TxQueue

MODES = ("rxonly", "txonly", "io", "macswap")
# Bursts (txonly) or polls (io, macswap) per call of the C loops in pmd.driver._fwd: the
# stop event is checked between calls, so a stop waits for at most this many (about
# a quarter of a millisecond at 64 B), and the interpreter's cost is paid once per call.
BURSTS_PER_CALL = 256


class PortLike(Protocol):
    mac: bytes

    def rx_queue(self, queue: int = 0) -> Any: ...
    def tx_queue(self, queue: int = 0) -> Any: ...
    def stats(self) -> dict[str, Any]: ...


@dataclass
class Summary:
    mode: str
    seconds: float
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    drops: int
    errors: int

    @property
    def packets(self) -> int:
        return self.tx_packets if self.mode == "txonly" else self.rx_packets

    @property
    def mpps(self) -> float:
        return self.packets / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def gbps(self) -> float:
        bytes_ = self.tx_bytes if self.mode == "txonly" else self.rx_bytes
        return bytes_ * 8 / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"summary: mode={self.mode} seconds={self.seconds:.2f} rx={self.rx_packets} "
                f"tx={self.tx_packets} mpps={self.mpps:.3f} gbps={self.gbps:.3f} drops={self.drops} "
                f"errors={self.errors}")

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain data (``pmd fwd --json``): the counts, and the rates of :meth:`line`."""
        return {"mode": self.mode, "seconds": round(self.seconds, 6), "rx_packets": self.rx_packets,
                "tx_packets": self.tx_packets, "rx_bytes": self.rx_bytes, "tx_bytes": self.tx_bytes,
                "packets": self.packets, "mpps": round(self.mpps, 6), "gbps": round(self.gbps, 6),
                "drops": self.drops, "errors": self.errors}


def _txonly(txq: Any, frame: bytes, burst: int, stop: threading.Event,
            pcap: PcapWriter | PcapngWriter | None = None,
            pcap_lock: threading.Lock | None = None) -> Generator[None, None, None]:
    """testpmd's txonly, as turns (see :func:`_turns`): the same frame, burst after burst,
    without copying it each time.

    Every buffer on the pool's free stack gets the frame once; then buffers go
    out by id (``tx_burst_zc``) and come back to the pool when the device has
    read them, still holding it, so per packet only the virtio-net header is
    written (DPDK's txonly copies the headers into each mbuf). Buffers posted
    to the rx ring are not touched: txonly never receives, so they never
    come back to the free stack to be sent. With ``pcap``, what is sent is written there too
    (the loop in Python then, a burst at a time).
    """
    pool = txq.pool
    txq.reclaim()                 # buffers an earlier run left in the tx ring, if the device is done
    if len(frame) > pool.data_room:
        raise ValueError(f"a {len(frame)}-byte frame does not fit the pool's {pool.data_room}-byte buffers")
    free = pool.alloc(pool.available)
    try:
        pool.data[free, :len(frame)] = np.frombuffer(frame, np.uint8)
    finally:
        pool.free(free)
    # At most a ring's worth is in flight and a burst in hand: then alloc never fails.
    if pool.available < txq.vq.size + burst:
        raise ValueError(f"txonly with burst {burst} needs {txq.vq.size + burst} free pool buffers "
                         f"(the tx ring and one burst), the pool has {pool.available}: use a smaller burst")
    if isinstance(txq, TxQueue) and pcap is None:
        # The loop in C: buffers go from the pool to the ring, no ids through Python.
        while True:
            _fwd.txonly(txq, len(frame), burst, BURSTS_PER_CALL)
            yield
    lens = np.full(burst, len(frame), np.uint32)
    rows = np.tile(np.frombuffer(frame, np.uint8), (burst, 1)) if pcap is not None else None
    ids = pool.alloc(burst)
    try:
        while True:
            sent = txq.tx_burst_zc(ids, lens)
            if sent and pcap is not None and rows is not None:
                with pcap_lock or threading.Lock():
                    pcap.write_burst(rows, lens, sent)
            if sent == burst:
                pool.alloc_into(ids)  # the same array again: no allocation per burst
            elif sent:
                ids = np.concatenate((ids[sent:], pool.alloc(sent)))
            yield
    finally:
        pool.free(ids)


def _turns(port: PortLike, queue: int, mode: str, burst: int, size: int, stop: threading.Event,
           pcap: PcapWriter | PcapngWriter | None, pcap_lock: threading.Lock, drops: list[int],
           tx_retry: int) -> Generator[None, None, None]:
    """Queue pair ``queue``'s forwarding as a generator: each ``next`` is one turn (a C loop
    of many bursts, or one burst in Python). A worker runs the turns of its queue pairs
    in turn, as a testpmd lcore runs its streams; closing the generator gives back what
    it holds."""
    rxq, txq = port.rx_queue(queue), port.tx_queue(queue)
    ids = np.zeros(burst, np.uint32)
    lens = np.zeros(burst, np.uint32)
    if mode == "txonly":
        yield from _txonly(txq, udp_frame(size, port.mac), burst, stop, pcap, pcap_lock)
        return
    if mode == "rxonly" and pcap is not None:
        out = np.zeros((burst, rxq.max_packet_len), np.uint8)
        while True:
            n = rxq.rx_burst(out, lens)
            if n:
                with pcap_lock:
                    pcap.write_burst(out, lens, n)
            yield
    if mode == "rxonly":
        # testpmd's rxonly: receive, count, free; in one call, no ids through Python.
        per_call = min(burst, 256)
        while True:
            rxq.rx_discard(per_call)
            yield
    pool = rxq.pool               # rx and tx of a pair share it: forwarding needs no copy
    if pcap is None and isinstance(rxq, RxQueue) and isinstance(txq, TxQueue) and txq.pool is pool:
        # The loop in C (pmd.driver._fwd): many polls per call, the GIL released.
        swap = mode == "macswap"
        while True:
            _, dropped = _fwd.forward(rxq, txq, burst, swap, BURSTS_PER_CALL, tx_retry)
            if dropped:
                drops[queue] += dropped
            yield
    data = pool.data
    while True:
        n = rxq.rx_burst_zc(ids, lens)
        if not n:
            txq.reclaim()
            yield
            continue
        got = ids[:n]
        if pcap is not None:
            with pcap_lock:
                pcap.write_burst(data, lens, n, ids=got)   # by id: no fancy-index copy
        if mode == "macswap":
            pool.swap_macs(got)
        sent = txq.tx_burst_zc(got, lens[:n])
        tries = 0
        while sent < n and tries < tx_retry and not stop.is_set():
            # tx ring full: the device is behind. Retry (each burst reclaims
            # what it finished) before dropping, like testpmd's tx retry.
            sent += txq.tx_burst_zc(got[sent:], lens[sent:n])
            tries += 1
        if sent < n:
            pool.free(got[sent:])
            drops[queue] += n - sent
        yield


def _worker(port: PortLike, queues: Sequence[int], mode: str, burst: int, size: int, stop: threading.Event,
            pcap: PcapWriter | PcapngWriter | None, pcap_lock: threading.Lock, errors: list[BaseException],
            drops: list[int], tx_retry: int, cpu: int | None = None) -> None:
    """One forwarding thread: the turns of ``queues`` round robin until ``stop``."""
    turns: list[Generator[None, None, None]] = []
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})      # this thread only (Linux: 0 is the caller)
        turns = [_turns(port, q, mode, burst, size, stop, pcap, pcap_lock, drops, tx_retry) for q in queues]
        while not stop.is_set():
            for t in turns:
                next(t)
    except BaseException as e:  # reported by run()
        errors.append(e)
        stop.set()
    finally:
        for t in turns:
            t.close()


def assign_queues(queues: int, cpus: Sequence[int] | None) -> list[tuple[list[int], int | None]]:
    """Forwarding threads as (queue pairs, CPU): with ``cpus``, one thread per CPU (at most
    one per queue pair), thread i on ``cpus[i]`` polling pairs i, i + n, ... in turn, as
    testpmd spreads its streams over ``--lcores``: two busy threads never share a CPU.
    Without, one unpinned thread per queue pair."""
    if not cpus:
        return [([q], None) for q in range(queues)]
    n = min(queues, len(cpus))
    return [(list(range(i, queues, n)), cpus[i]) for i in range(n)]


def check_cpus(cpus: Sequence[int]) -> None:
    """CPUs for forwarding threads: at least one, each one this process may run on."""
    allowed = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in allowed]
    if not cpus or bad:
        raise ValueError(f"CPUs {', '.join(map(str, bad)) or '(none given)'}: forwarding threads run on CPUs "
                         f"this process may use: {', '.join(map(str, sorted(allowed)))}")


def default_placement(builtin_device: bool) -> tuple[int | None, list[int] | None]:
    """Where ``pmd fwd`` runs things when not told: with the built-in device and at least
    two CPUs, the device on the last CPU this process may use and the forwarding threads
    on the others (round robin), as bench/sim.py measures; otherwise nothing is pinned
    (a device in another process, or vhost-user's back-end, has its own placement)."""
    allowed = sorted(os.sched_getaffinity(0))
    if not builtin_device or len(allowed) < 2:
        return None, None
    return allowed[-1], allowed[:-1]


def _queue_line(q: int, now: dict[str, Any], before: dict[str, Any], dt: float) -> str:
    """One queue pair's rates over the last period (``pmd fwd`` with several queues)."""
    def rate(side: str, key: str) -> float:
        return float(now[f"{side}_queues"][q][key] - before[f"{side}_queues"][q][key]) / dt

    return (f"q{q}  rx {rate('rx', 'packets') / 1e6:8.3f} Mpps {rate('rx', 'bytes') * 8 / 1e9:7.3f} Gbit/s  "
            f"tx {rate('tx', 'packets') / 1e6:8.3f} Mpps {rate('tx', 'bytes') * 8 / 1e9:7.3f} Gbit/s")


def _period(q_count: int, now: float, start: float, dt: float, s: dict[str, Any], prev: dict[str, Any],
            base: dict[str, Any], drops: int) -> dict[str, Any]:
    """One period's statistics as plain data: rates over the period, counts since the start."""
    def rate(key: str, scale: float = 1.0) -> float:
        return round(float(s[key] - prev[key]) * scale / dt, 3)

    out: dict[str, Any] = {
        "seconds": round(now - start, 3),
        "rx_pps": rate("rx_packets"), "tx_pps": rate("tx_packets"),
        "rx_bps": rate("rx_bytes", 8), "tx_bps": rate("tx_bytes", 8),
        "rx_packets": s["rx_packets"] - base["rx_packets"], "tx_packets": s["tx_packets"] - base["tx_packets"],
        "drops": s["rx_dropped"] - base["rx_dropped"] + drops,
        "errors": s["device_errors"] - base["device_errors"],
    }
    if q_count > 1:
        out["queues"] = [{side + "_" + unit: round((s[f"{side}_queues"][q][key] - prev[f"{side}_queues"][q][key])
                                                   * (8 if key == "bytes" else 1) / dt, 3)
                          for side in ("rx", "tx") for key, unit in (("packets", "pps"), ("bytes", "bps"))}
                         for q in range(q_count)]
    return out


def _period_line(p: dict[str, Any]) -> str:
    return (f"  {p['seconds']:6.1f}s  rx {p['rx_pps'] / 1e6:8.3f} Mpps {p['rx_bps'] / 1e9:7.3f} Gbit/s  "
            f"tx {p['tx_pps'] / 1e6:8.3f} Mpps {p['tx_bps'] / 1e9:7.3f} Gbit/s  "
            f"drops {p['drops']}  errors {p['errors']}")


def send_first(port: PortLike, queues: int, burst: int, size: int) -> int:
    """testpmd's ``--tx-first``: one burst of ``size``-byte UDP frames on each queue pair
    before forwarding starts, so that a wire that only returns what it is sent (the
    built-in device's loopback) has packets to forward. Returns how many were queued."""
    frame = np.frombuffer(udp_frame(size, port.mac), np.uint8)
    rows, lens = np.tile(frame, (burst, 1)), np.full(burst, size, np.uint32)
    return sum(int(port.tx_queue(q).tx_burst(rows, lens)) for q in range(queues))


def run(port: PortLike, mode: str = "io", *, queues: int = 1, burst: int = 32, size: int = 64,
        duration: float | None = None, pcap: str | None = None, report: Callable[[str], None] = print,
        stop: threading.Event | None = None, interval: float | None = 1.0, tx_retry: int = 10000,
        cpus: Sequence[int] | None = None, on_period: Callable[[dict[str, Any]], None] | None = None,
        tx_first: bool = False) -> Summary:
    """Forward on ``queues`` queue pairs until Ctrl-C, ``duration`` or ``stop``; return the summary.

    In io and macswap modes, a packet the tx ring cannot take is retried up to
    ``tx_retry`` times (each try reclaims what the device finished) before it
    is dropped and counted; 0 drops at once, as testpmd does without retry.
    ``cpus``: one forwarding thread per CPU (testpmd's ``--lcores``), each polling its
    share of the queue pairs in turn (:func:`assign_queues`); None: a thread per queue
    pair, where the scheduler puts it.
    Every ``interval`` seconds (None: never) the period's statistics go to ``report``
    as a line and to ``on_period`` as a dict (``seconds``, ``rx_pps``, ``tx_pps``,
    ``rx_bps``, ``tx_bps``, ``rx_packets``, ``tx_packets``, ``drops``, ``errors``, and
    ``queues`` with several); the summary goes to ``report`` at the end.
    ``pcap``: a file for what is received (rxonly, io, macswap) or sent (txonly).
    ``tx_first``: send one burst on each queue pair first (:func:`send_first`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if burst < 1:
        raise ValueError("burst must be at least 1")
    if interval is not None and interval <= 0:
        raise ValueError("interval must be positive (None: no periodic statistics)")
    if cpus is not None:
        check_cpus(cpus)
    stop = stop or threading.Event()
    writer = open_writer(pcap) if pcap else None     # .pcapng: pcapng, else classic pcap
    lock = threading.Lock()
    errors: list[BaseException] = []
    drops = [0] * queues
    threads = [threading.Thread(target=_worker, name=f"pmd-fwd-{i}", daemon=True,
                                args=(port, qs, mode, burst, size, stop, writer, lock, errors, drops,
                                      tx_retry, cpu))
               for i, (qs, cpu) in enumerate(assign_queues(queues, cpus))]
    # Ctrl-C and SIGTERM (kill, systemd, container runtimes) end the run alike:
    # workers stop, the summary is reported, the caller closes the port.
    old: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            old[signum] = signal.signal(signum, lambda *a: stop.set())
    base = port.stats()
    start = last = time.monotonic()
    prev = base
    # Without periodic statistics the main thread still wakes now and then (a signal
    # sets stop; the wait is in slices so that nothing depends on it interrupting a wait).
    wake = interval if interval is not None else 1.0
    try:
        if tx_first:
            send_first(port, queues, burst, size)
        for t in threads:
            t.start()
        while not stop.is_set():
            stop.wait(min(wake, max(0.0, start + duration - time.monotonic())) if duration else wake)
            now = time.monotonic()
            if interval is not None and now > last:
                s = port.stats()
                p = _period(queues, now, start, now - last, s, prev, base, sum(drops))
                report(_period_line(p))
                if queues > 1:
                    for q in range(queues):
                        report("          " + _queue_line(q, s, prev, now - last))
                if on_period is not None:
                    on_period(p)
                prev = s
            last = now
            if duration and now - start >= duration:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if writer is not None:
            writer.close()
    elapsed = time.monotonic() - start
    s = port.stats()
    if errors:
        raise errors[0]
    summary = Summary(mode, elapsed, s["rx_packets"] - base["rx_packets"], s["tx_packets"] - base["tx_packets"],
                      s["rx_bytes"] - base["rx_bytes"], s["tx_bytes"] - base["tx_bytes"],
                      s["rx_dropped"] - base["rx_dropped"] + sum(drops),
                      s["device_errors"] - base["device_errors"])
    report(summary.line())
    return summary
