"""Capturing a port's packets to files, as tcpdump -w does (``pmd capture``, docs/capture.md).

:func:`run` receives from one rx queue, with the bursts' timestamps, into a chunk
(256 packets by buffer id, zero-copy, for pcap and pcapng; 4096 rows, copied, for
Parquet), and hands each chunk to the file when it is full or after 256 polls:
classic pcap with nanosecond
timestamps (``.pcap``), pcapng (``.pcapng``), both built in C
(:meth:`pmd.abi.pcap.PcapWriter.write_burst`), or Parquet (``.parquet``, the columns of
:func:`pmd.arrow.schema`, row groups of 65536 packets; needs pyarrow). Nothing runs in
Python per packet: one receive call per burst, one write call per chunk.

Files rotate like tcpdump's ``-C`` and ``-G``: after ``file_size`` bytes or
``file_seconds`` seconds the file is closed and the next one opened. The first file
has the name given, the next ones an index before the extension: ``cap.pcap``,
``cap1.pcap``, ``cap2.pcap``, ... (tcpdump puts the index after the whole name,
``cap.pcap1``, which no reader takes for a pcap file).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from .abi.pcap import PcapngWriter, PcapWriter

FORMATS = {".pcap": "pcap", ".pcapng": "pcapng", ".parquet": "parquet"}
MAX_SNAPLEN = 0x40000                # 262144, as tcpdump's -s 0
CHUNK = {"pcap": 1024, "pcapng": 1024, "parquet": 4096}
ROW_GROUP = 65536                    # packets per Parquet row group
# Polls of the ring per chunk at most: the clock, the stop and the file are looked at
# between chunks, so a slow trickle still reaches the file (and a stop is seen) within
# about this many polls (a dry poll is well under a microsecond).
POLLS = 256
# Ring entries pmd capture asks for by default, as pmd fwd (bench/capture.py --queue-size
# measures others: the device fills the ring while a chunk is written).
QUEUE_SIZE = 256
ZC_CHUNK = 256                       # packets per chunk in zero-copy mode (pool buffers held)


def format_of(path: str | Path) -> str:
    """``pcap``, ``pcapng`` or ``parquet`` by the file's extension, or a ValueError saying which exist."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: the file's extension says its format: .pcap (classic, nanosecond "
                         "timestamps), .pcapng or .parquet")
    return fmt


def file_name(path: str | Path, index: int) -> Path:
    """The ``index``-th file of a rotation: the name given, then the index before the extension."""
    p = Path(path)
    return p if index == 0 else p.with_name(f"{p.stem}{index}{p.suffix}")


class _PcapSink:
    def __init__(self, path: Path, snaplen: int, ng: bool) -> None:
        self._w = PcapngWriter(path, snaplen) if ng else PcapWriter(path, snaplen, nanosecond=True)

    @property
    def size(self) -> int:
        return self._w.size

    def write(self, rows: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int, ts: npt.NDArray[np.uint64],
              ids: npt.NDArray[np.uint32] | None = None) -> None:
        self._w.write_burst(rows, lengths, n, ts, ids=ids)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class _ParquetSink:
    def __init__(self, path: Path, snaplen: int) -> None:
        try:
            import pyarrow as pa  # type: ignore[import-untyped, import-not-found, unused-ignore]
            import pyarrow.parquet as pq  # type: ignore[import-untyped, import-not-found, unused-ignore]
        except ImportError:
            raise ValueError(f"{path}: Parquet needs pyarrow: pip install 'pmd[arrow]' (or write .pcap "
                             "or .pcapng, which need nothing more)") from None
        from .arrow import burst_to_record_batch, schema

        self._pa = pa
        self._batch = burst_to_record_batch
        self._path = path
        self._snaplen = snaplen
        self._pending: list[Any] = []
        self._rows = 0
        self._pending_bytes = 0
        self._w = pq.ParquetWriter(str(path), schema())

    @property
    def size(self) -> int:
        # What is on disk, and the batches a row group still waits for (their Arrow size:
        # the file gets less, compressed).
        return (self._path.stat().st_size if self._path.exists() else 0) + self._pending_bytes

    def write(self, rows: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int, ts: npt.NDArray[np.uint64],
              ids: npt.NDArray[np.uint32] | None = None) -> None:
        b = self._batch(rows, lengths, n, timestamps=ts, ids=ids, snaplen=self._snaplen)
        self._pending.append(b)
        self._rows += n
        self._pending_bytes += b.nbytes
        if self._rows >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            table = self._pa.Table.from_batches(self._pending)
            self._pending, self._rows, self._pending_bytes = [], 0, 0
            self._w.write_table(table, row_group_size=ROW_GROUP)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._w.close()


def _open_sink(path: Path, fmt: str, snaplen: int) -> _PcapSink | _ParquetSink:
    if fmt == "parquet":
        return _ParquetSink(path, snaplen)
    return _PcapSink(path, snaplen, fmt == "pcapng")


class Rotation:
    """The files of one capture: the current one, and the next when ``file_size`` bytes
    or ``file_seconds`` seconds have passed (None: never)."""

    def __init__(self, path: str | Path, *, snaplen: int = MAX_SNAPLEN, file_size: int | None = None,
                 file_seconds: float | None = None) -> None:
        self.path = Path(path)
        self.format = format_of(path)
        self.snaplen = snaplen
        self.file_size = file_size
        self.file_seconds = file_seconds
        self.files: list[Path] = []
        self.bytes = 0                   # of the files closed
        self._sink: _PcapSink | _ParquetSink | None = None
        self._opened = 0.0
        self._next()

    def _next(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.close()
            self.bytes += self.files[-1].stat().st_size
        name = file_name(self.path, len(self.files))
        self._sink = _open_sink(name, self.format, self.snaplen)
        self.files.append(name)
        self._opened = time.monotonic()

    @property
    def size(self) -> int:
        """Bytes of every file so far, the current one's pending bytes included."""
        return self.bytes + (self._sink.size if self._sink is not None else 0)

    def write(self, rows: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int, ts: npt.NDArray[np.uint64],
              ids: npt.NDArray[np.uint32] | None = None) -> None:
        """Packets ``rows[i, :lengths[i]]`` (``rows[ids[i]]``) for ``i < n``, with their timestamps."""
        if self._sink is None:
            raise ValueError(f"{self.path}: the capture is closed")
        self._sink.write(rows, lengths, n, ts, ids)
        if self.file_size is not None and self._sink.size >= self.file_size:
            self._next()

    def tick(self, now: float) -> None:
        """A new file when the current one is ``file_seconds`` old (checked when idle too)."""
        if self.file_seconds is not None and now - self._opened >= self.file_seconds:
            self._next()

    def flush(self) -> None:
        """Write what the current file's buffer holds."""
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> None:
        """Close the current file (complete: every record written)."""
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.close()
            self.bytes += self.files[-1].stat().st_size


@dataclass
class CaptureSummary:
    """What :func:`run` did: seconds, packets captured (written) and received, packets the
    port dropped, bytes written and the files, in the order they were written."""

    seconds: float
    captured: int            # packets written to the files
    received: int            # packets the port's queue received meanwhile
    dropped: int             # packets the port dropped (its rx_dropped counter)
    bytes: int               # bytes of the files
    files: list[str] = field(default_factory=list)

    @property
    def mpps(self) -> float:
        """Packets captured per second, in millions."""
        return self.captured / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The summary line ``pmd capture`` prints (``summary: captured=... files=N``)."""
        return (f"summary: captured={self.captured} received={self.received} dropped={self.dropped} "
                f"seconds={self.seconds:.2f} mpps={self.mpps:.3f} bytes={self.bytes} files={len(self.files)}")

    def as_dict(self) -> dict[str, Any]:
        """The summary as ``pmd capture --json`` prints it."""
        return {"seconds": round(self.seconds, 6), "captured": self.captured, "received": self.received,
                "dropped": self.dropped, "mpps": round(self.mpps, 6), "bytes": self.bytes, "files": self.files}


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive (None: no limit), got {value}")


def run(port: Any, path: str | Path, *, queue: int = 0, count: int | None = None, snaplen: int = MAX_SNAPLEN,
        burst: int = 64, duration: float | None = None, file_size: int | None = None,
        file_seconds: float | None = None, interval: float | None = 1.0, report: Callable[[str], None] = print,
        on_period: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None) -> CaptureSummary:
    """Capture what ``port`` (started) receives on ``queue`` into ``path`` (its extension
    says the format) until ``count`` packets, ``duration`` seconds, Ctrl-C or SIGTERM (in
    the main thread), or ``stop``; return the summary. ``snaplen``: bytes kept of each
    packet (its length on the wire is kept too). ``file_size`` / ``file_seconds``: rotate
    (see the module). Every ``interval`` seconds the rates go to ``report`` as a line and
    to ``on_period`` as a dict (``seconds``, ``captured``, ``pps``, ``received``,
    ``dropped``, ``bytes``, ``files``). The files are closed on every way out; the port is
    the caller's to close."""
    fmt = format_of(path)
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive number of packets (None: no limit), got {count}")
    if not 1 <= snaplen <= MAX_SNAPLEN:
        raise ValueError(f"snaplen must be 1 to {MAX_SNAPLEN} bytes, got {snaplen}")
    if not 1 <= burst <= CHUNK[fmt]:
        raise ValueError(f"burst must be 1 to {CHUNK[fmt]}, got {burst}")
    for name, v in (("duration", duration), ("file_size", file_size), ("file_seconds", file_seconds),
                    ("interval", interval)):
        _positive(name, v)
    rxq = port.rx_queue(queue)
    pool = getattr(rxq, "pool", None)
    chunk = CHUNK[fmt] // burst * burst
    # Zero-copy receive when every packet is one pool buffer (no mergeable chain can be
    # longer): the records are built straight from the DMA buffers, one copy instead of
    # two, and no rows to walk through the cache. The chunk's buffers are the
    # application's until written, so the pool must hold them besides the ring.
    zero_copy = (fmt != "parquet" and pool is not None and int(rxq.max_packet_len) <= int(pool.data_room)
                 and int(pool.available) // 2 >= burst)
    ids: npt.NDArray[np.uint32] | None = None
    if zero_copy:
        assert pool is not None
        chunk = min(ZC_CHUNK, int(pool.available) // 2) // burst * burst
        src = pool.data
        ids = np.zeros(chunk, np.uint32)
        receive = rxq.rx_burst_zc
        first = ids
    else:
        width = min(int(rxq.max_packet_len), snaplen)
        # rows of snaplen bytes when that is less than a packet can be: less to copy
        truncate = width < int(rxq.max_packet_len)
        src = np.zeros((chunk, width), np.uint8)
        receive = functools.partial(rxq.rx_burst, truncate=True) if truncate else rxq.rx_burst
        first = src
    lengths = np.zeros(chunk, np.uint32)
    stamps = np.zeros(chunk, np.uint64)
    # The views of a burst starting at each entry of the chunk, made once: a poll then
    # costs an index and the call, nothing else (most polls of a fast device find a few packets).
    views = [(first[i:i + burst], lengths[i:i + burst], stamps[i:i + burst]) for i in range(chunk)]
    stop = stop or threading.Event()
    old: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            old[signum] = signal.signal(signum, lambda *a: stop.set())
    out: Rotation | None = None
    rx_burst = rxq.rx_burst
    captured = 0
    base = port.stats()
    start = last = time.monotonic()
    last_captured = 0
    try:
        out = Rotation(path, snaplen=snaplen, file_size=file_size, file_seconds=file_seconds)
        end = start + duration if duration else None
        while not stop.is_set():
            # Fill the chunk: up to POLLS polls, or until it is full (or holds the count).
            target = chunk if count is None else min(chunk, count - captured)
            pos = polls = 0
            while pos < target and polls < POLLS:
                a, ln, ts = views[pos]
                if pos + burst > target:
                    a, ln, ts = a[:target - pos], ln[:target - pos], ts[:target - pos]
                pos += receive(a, ln, timestamps=ts)
                polls += 1
            if pos:
                try:
                    out.write(src, lengths, pos, stamps, ids)
                finally:
                    if ids is not None and pool is not None:
                        pool.free(ids[:pos])          # written (or failed): back to the ring
                captured += pos
            now = time.monotonic()
            if count is not None and captured >= count:
                break
            if end is not None and now >= end:
                break
            out.tick(now)
            if interval is not None and now - last >= interval:
                s = port.stats()
                p = {"seconds": round(now - start, 3), "captured": captured,
                     "pps": round((captured - last_captured) / (now - last), 3),
                     "received": s["rx_packets"] - base["rx_packets"],
                     "dropped": s["rx_dropped"] - base["rx_dropped"], "bytes": out.size, "files": len(out.files)}
                report(f"  {p['seconds']:6.1f}s  captured {p['pps'] / 1e6:8.3f} Mpps  total {captured}  "
                       f"received {p['received']}  dropped {p['dropped']}  {out.size / 1e6:.1f} MB in "
                       f"{len(out.files)} file(s)")
                if on_period is not None:
                    on_period(p)
                out.flush()          # a reader of the live file sees up to the last period
                last, last_captured = now, captured
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if out is not None:
            out.close()
    elapsed = time.monotonic() - start
    s = port.stats()
    assert out is not None               # Rotation() raised otherwise
    summary = CaptureSummary(elapsed, captured, s["rx_packets"] - base["rx_packets"],
                             s["rx_dropped"] - base["rx_dropped"], out.size, [str(f) for f in out.files])
    report(summary.line())
    return summary


def pin_this_thread(cpu: int | None) -> None:
    """Run the calling thread on ``cpu`` (Linux: 0 is the calling thread), or leave it."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
