"""Bursts as Arrow record batches, and a live port as a ``pyarrow.RecordBatchReader``
(docs/analytics.md).

:func:`burst_to_record_batch` turns the packets of a burst (the rows ``rx_burst``
fills, or ``pool.data`` with the ids ``rx_burst_zc`` gave) into one
``pyarrow.RecordBatch``: ``timestamp``, ``length``, every :class:`pmd.parse.HeaderParser`
column and ``data``, the captured bytes. :func:`record_batch_reader` reads a port's
queue as a stream of such batches, which DuckDB, Polars and pandas (``to_pandas()``)
take as they are. Nothing per packet runs in Python: the parse and the gather of the
bytes into one buffer are C loops, and every numeric column is the numpy array the
parser filled, handed to Arrow without a copy.

pyarrow is an optional dependency (``pip install 'pmd[arrow]'``): it is imported by
this module, and ``import pmd`` never imports this module.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt

from .abi import _records
from .parse import COLUMNS, HeaderParser

try:
    import pyarrow as pa  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError as _missing:  # pragma: no cover - the test extra installs it
    raise ImportError("pmd.arrow needs pyarrow: pip install 'pmd[arrow]' (or pip install pyarrow)") from _missing

__all__ = ["schema", "burst_to_record_batch", "record_batches", "record_batch_reader", "DEFAULT_BATCH"]

# Rows per record batch of a reader: large enough that the per-batch cost (the Python
# calls, Arrow's objects) is small next to the packets', small enough to yield often.
DEFAULT_BATCH = 4096

_ARROW_TYPES = {"uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(), "uint64": pa.uint64()}


def _field_type(dtype: str, width: int) -> Any:
    # IPv6 addresses are 16 bytes a row: fixed-size binary, as the wire has them.
    return pa.binary(width) if width > 1 else _ARROW_TYPES[dtype]


_SCHEMA = pa.schema(
    [pa.field("timestamp", pa.timestamp("ns", tz="UTC"), nullable=False),
     pa.field("length", pa.uint32(), nullable=False)]
    + [pa.field(name, _field_type(dtype, width), nullable=False) for name, dtype, width in COLUMNS]
    + [pa.field("data", pa.binary(), nullable=False)],
    metadata={"pmd": "packets: timestamp (received, ns since the epoch), length (on the wire), the "
                     "pmd.parse columns (docs/analytics.md), data (the captured bytes)"})


def schema() -> Any:
    """The schema of every batch: ``timestamp`` (``timestamp[ns, UTC]``: when the burst was
    received), ``length`` (uint32, the packet's length on the wire), the columns of
    :data:`pmd.parse.COLUMNS` in their order (MACs as uint64, IPv6 addresses as
    ``fixed_size_binary(16)``), and ``data`` (binary: the captured bytes, at most the
    snaplen and the row width)."""
    return _SCHEMA


def _primitive(a: npt.NDArray[Any]) -> Any:
    # pa.array of a contiguous numeric array without nulls wraps its memory: no copy.
    return pa.array(a)


def _timestamps(ts: int | npt.NDArray[np.uint64] | None, n: int) -> npt.NDArray[np.uint64]:
    if ts is None:
        return np.full(n, time.time_ns(), np.uint64)
    if isinstance(ts, (int, np.integer)):
        if not 0 <= int(ts) < 2 ** 63:
            raise ValueError(f"timestamps must be nanoseconds since the epoch, got {ts}")
        return np.full(n, int(ts), np.uint64)
    if not isinstance(ts, np.ndarray) or ts.dtype != np.uint64 or ts.ndim != 1:
        raise TypeError("timestamps must be an int (one for the burst) or a 1-D uint64 array of nanoseconds "
                        "(rx_burst(..., timestamps=ts) fills one)")
    if len(ts) < n:
        raise ValueError(f"timestamps has {len(ts)} entries for {n} packets: give one per packet")
    return ts[:n].copy()          # the caller refills its array with the next burst


def burst_to_record_batch(data: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int | None = None, *,
                          timestamps: int | npt.NDArray[np.uint64] | None = None,
                          ids: npt.NDArray[np.uint32] | None = None, snaplen: int = 65535) -> Any:
    """Packets ``data[i, :lengths[i]]`` for ``i < n`` (default every row; with ``ids``,
    ``data[ids[i]]``, the zero-copy shape) as a ``pyarrow.RecordBatch`` of :func:`schema`.

    ``timestamps``: nanoseconds since the epoch, one per packet (the array
    ``rx_burst(..., timestamps=)`` fills) or one int for the burst (default: now).
    ``data`` keeps at most ``snaplen`` bytes of each packet (and no more than its row
    holds); ``length`` is always the length on the wire. The batch owns its memory:
    nothing in it is a view of ``data``, ``lengths`` or ``timestamps``, so the caller
    may receive the next burst into them at once.
    """
    offsets, values = _records.binary_column(data, lengths, n, ids=ids, snaplen=snaplen)   # checks everything
    k = len(offsets) - 1
    parser = HeaderParser(max(k, 1))      # fresh columns: they belong to this batch alone
    if ids is not None:
        parser.parse_ids_into(data, ids, lengths, k)
    else:
        parser.parse_into(data, lengths, k)
    ts = _timestamps(timestamps, k)
    arrays: list[Any] = [
        pa.Array.from_buffers(pa.timestamp("ns", tz="UTC"), k, [None, pa.py_buffer(ts)]),
        _primitive(lengths[:k].copy()),
    ]
    for name, _dtype, width in COLUMNS:
        col = parser.columns[name][:k]
        if width > 1:
            arrays.append(pa.Array.from_buffers(pa.binary(width), k, [None, pa.py_buffer(np.ascontiguousarray(col))]))
        else:
            arrays.append(_primitive(col))
    arrays.append(pa.Array.from_buffers(pa.binary(), k, [None, pa.py_buffer(offsets), pa.py_buffer(values)]))
    return pa.RecordBatch.from_arrays(arrays, schema=_SCHEMA)


def _check_positive(name: str, value: float | None, *, integer: bool = False) -> None:
    if value is None:
        return
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive (None: no limit), got {value}")


def record_batches(rxq: Any, *, batch: int = DEFAULT_BATCH, burst: int = 32, max_packets: int | None = None,
                   timeout: float | None = None, linger: float = 0.25, snaplen: int = 65535,
                   stop: threading.Event | None = None) -> Iterator[Any]:
    """Record batches of the packets ``rxq`` (an :class:`pmd.RxQueue`, or anything with
    its ``rx_burst`` and ``max_packet_len``) receives: see :func:`record_batch_reader`.
    The arguments are checked here, before the first batch is asked for."""
    _check_positive("batch", batch, integer=True)
    _check_positive("burst", burst, integer=True)
    _check_positive("max_packets", max_packets, integer=True)
    _check_positive("timeout", timeout)
    _check_positive("linger", linger)
    if not 1 <= snaplen <= 0x40000:
        raise ValueError(f"snaplen must be 1 to 262144 bytes, got {snaplen}")
    return _batches(rxq, batch, burst, max_packets, timeout, linger, snaplen, stop)


def _batches(rxq: Any, batch: int, burst: int, max_packets: int | None, timeout: float | None, linger: float,
             snaplen: int, stop: threading.Event | None) -> Iterator[Any]:
    width = min(int(rxq.max_packet_len), snaplen)
    truncate = width < int(rxq.max_packet_len)       # rows of snaplen bytes: less to copy
    rows = np.zeros((batch, width), np.uint8)
    lengths = np.zeros(batch, np.uint32)
    stamps = np.zeros(batch, np.uint64)
    rx_burst = rxq.rx_burst
    end = None if timeout is None else time.monotonic() + timeout
    left = max_packets
    while left is None or left > 0:
        want = batch if left is None else min(batch, left)
        pos = 0
        first = time.monotonic()
        while pos < want:
            k = min(burst, want - pos)
            got = rx_burst(rows[pos:pos + k], lengths[pos:pos + k], truncate=truncate,
                           timestamps=stamps[pos:pos + k])
            pos += got
            if got < k:
                # A short burst: the ring is empty now. Yield what there is once it has
                # waited ``linger`` (a live stream must not sit on a few packets), and
                # check the deadline and the stop here, not per packet.
                now = time.monotonic()
                if (end is not None and now >= end) or (stop is not None and stop.is_set()):
                    break
                if pos and now - first >= linger:
                    break
        if pos:
            yield burst_to_record_batch(rows, lengths, pos, timestamps=stamps, snaplen=snaplen)
            if left is not None:
                left -= pos
        now = time.monotonic()
        if (end is not None and now >= end) or (stop is not None and stop.is_set()):
            return


def record_batch_reader(port: Any, queue: int = 0, *, batch: int = DEFAULT_BATCH, burst: int = 32,
                        max_packets: int | None = None, timeout: float | None = None, linger: float = 0.25,
                        snaplen: int = 65535, stop: threading.Event | None = None) -> Any:
    """A ``pyarrow.RecordBatchReader`` over the packets ``port`` receives on ``queue``
    (a started :class:`pmd.Port`), batches of :func:`schema`.

    Each batch holds up to ``batch`` packets, received ``burst`` at a time in copy mode
    with their timestamps; a batch is yielded when full, or when the ring has run dry
    and its first packet has waited ``linger`` seconds. The stream ends after
    ``max_packets`` packets, ``timeout`` seconds, or once ``stop`` is set (checked
    whenever the ring is empty); with none of them it goes on while it is read. The
    reader polls the queue in the thread that reads it, and does not own the port:
    close the port when done (a ``with open_port(...)`` block does).

    DuckDB: ``duckdb.sql("SELECT dst_port, count(*) FROM reader GROUP BY 1")``; pandas:
    ``reader.read_pandas()``; Polars: ``polars.from_arrow(reader.read_all())``.
    """
    rxq = port.rx_queue(queue)
    return pa.RecordBatchReader.from_batches(
        _SCHEMA, record_batches(rxq, batch=batch, burst=burst, max_packets=max_packets, timeout=timeout,
                                linger=linger, snaplen=snaplen, stop=stop))
