"""Packet capture files: classic pcap (the libpcap format tcpdump, tshark, scapy
and dpkt read) and pcapng (what tshark and dumpcap write by default).

Classic pcap: a 24-byte global header (magic 0xa1b2c3d4 for microseconds,
0xa1b23c4d for nanoseconds, version 2.4, snaplen, link type 1 = Ethernet),
then per packet a 16-byte record header (seconds, fraction, captured length,
original length) and the bytes. Written in native byte order, as libpcap does,
with either magic (``PcapWriter(..., nanosecond=True)``); read in either order. Used by ``pmd fwd --pcap FILE`` and the built-in device's pcap wire.

pcapng (draft-ietf-opsawg-pcapng): blocks of ``type, total length, body,
total length``, each padded to 32 bits. :class:`PcapngWriter` writes a Section
Header Block, one Interface Description Block (Ethernet, ``if_tsresol`` 9:
nanoseconds) and an Enhanced Packet Block per packet. :func:`read_packets`
reads both formats (pcapng: any byte order, several interfaces, each with its
own time resolution; blocks it does not need are skipped) and gives integer
nanoseconds.

A burst (``write_burst``: the rows ``rx_burst`` fills, or ``pool.data`` by buffer
ids) is turned into records in C (:mod:`pmd.abi._records`) inside the writer's
buffer, which goes to the file a quarter megabyte at a time: no Python per packet.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import numpy.typing as npt

from . import _records

MAGIC = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
PCAPNG_SHB = 0x0A0D0D0A       # Section Header Block (also the file's first four bytes)
PCAPNG_IDB = 0x00000001       # Interface Description Block
PCAPNG_SPB = 0x00000003       # Simple Packet Block
PCAPNG_EPB = 0x00000006       # Enhanced Packet Block
PCAPNG_BYTE_ORDER = 0x1A2B3C4D
_OPT_IF_TSRESOL = 9
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


def _check_snaplen(snaplen: int) -> None:
    if not 1 <= snaplen <= 0x40000:
        raise ValueError("snaplen must be 1 to 262144 bytes")


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class _Writer:
    """What both writers share: the file, a buffer the bursts' records are built in (one
    ``write`` per quarter megabyte, not per packet or per burst), counts, and closing."""

    # Writes of a quarter megabyte cost the least a byte here (tmpfs: about 4 GB/s, where
    # 64 KiB writes reach half that), and a buffer that size stays in the cache
    # (a megabyte pushes out the rings and the pool's buffers between two writes).
    BUFFER = 1 << 18

    def __init__(self, path: str | Path, snaplen: int) -> None:
        _check_snaplen(snaplen)
        self.path = Path(path)
        self.snaplen = snaplen
        self.packets = 0
        self.size = 0                       # bytes of the file, pending ones included
        self._buf = np.empty(self.BUFFER, np.uint8)
        self._pos = 0
        self._f: BinaryIO = open(self.path, "wb", buffering=0)   # unbuffered: _buf is the buffer

    def _put(self, data: bytes) -> None:
        """Bytes after everything before them (headers, a single packet)."""
        self._flush()
        self._write_all(memoryview(data))
        self.size += len(data)

    def _write_all(self, view: memoryview) -> None:
        while view:                         # a raw write may take only part
            done = self._f.write(view)
            view = view[done or 0:]

    def _flush(self) -> None:
        if self._pos:
            pos, self._pos = self._pos, 0
            self._write_all(memoryview(self._buf.data)[:pos])

    def _emit(self, build: Any, rows: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int | None,
              **kw: Any) -> None:
        """The records of a burst into the buffer; when they do not fit, the buffer goes to
        the file first (and grows if one burst is larger than it)."""
        end = build(self._buf, self._pos, rows, lengths, n, **kw)
        if end < 0:
            self._flush()
            if -end > len(self._buf):
                self._buf = np.empty(-end, np.uint8)
            end = build(self._buf, 0, rows, lengths, n, **kw)
        self.size += end - self._pos
        self._pos = end

    def flush(self) -> None:
        """Write what the bursts left in the buffer (``close`` does too)."""
        if self._f.closed:
            raise ValueError(f"{self.path}: the writer is closed")
        self._flush()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._f.closed

    def close(self) -> None:
        """Write what the buffer holds and close the file; idempotent."""
        if self._f.closed:
            return
        try:
            self._flush()
        finally:
            self._f.close()

    def _burst_args(self, rows: npt.NDArray[np.uint8], n: int | None) -> None:
        if self._f.closed:
            raise ValueError(f"{self.path}: the writer is closed")
        if not isinstance(rows, np.ndarray) or rows.ndim != 2:
            raise TypeError("rows must be a 2-D uint8 array (packets, bytes), as rx_burst fills")


class PcapWriter(_Writer):
    """``PcapWriter(path, snaplen=65535, nanosecond=False)``: a classic pcap file, native
    byte order, microsecond timestamps (magic 0xa1b2c3d4) or nanosecond ones with
    ``nanosecond`` (0xa1b23c4d, which tcpdump, tshark and dpkt read too);
    ``write(frame)`` or ``write_burst(rows, lengths)``."""

    def __init__(self, path: str | Path, snaplen: int = 65535, nanosecond: bool = False) -> None:
        super().__init__(path, snaplen)
        self.nanosecond = nanosecond
        try:
            self._put(_GLOBAL.pack(MAGIC_NS if nanosecond else MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        except BaseException:
            self._f.close()
            raise

    def write(self, frame: bytes | memoryview | npt.NDArray[np.uint8], ts: float | None = None,
              orig_len: int | None = None) -> None:
        """One packet record: ``frame``'s bytes (at most the snaplen), ``ts`` in seconds
        (default now), ``orig_len`` its length on the wire (default ``len(frame)``)."""
        data = bytes(frame)
        t = time.time() if ts is None else ts
        sec = int(t)
        frac = int((t - sec) * (1e9 if self.nanosecond else 1e6))
        cap = data[: self.snaplen]
        self._put(_RECORD.pack(sec, frac, len(cap), len(data) if orig_len is None else orig_len) + cap)
        self.packets += 1

    def write_burst(self, rows: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int | None = None,
                    ts_ns: int | npt.NDArray[np.uint64] | None = None, *,
                    ids: npt.NDArray[np.uint32] | None = None) -> None:
        """Packets ``rows[i, :lengths[i]]`` for ``i < n`` (default every row; with ``ids``,
        ``rows[ids[i]]``: ``pool.data`` and what ``rx_burst_zc`` gave), in C, into the buffer.
        ``ts_ns``: nanoseconds, one for the burst (default now) or one per packet (what
        ``rx_burst(..., timestamps=)`` fills). Rows narrower than a packet (a truncating
        receive) keep its original length, as pcap's snaplen does."""
        self._burst_args(rows, n)
        count = len(ids if ids is not None else rows) if n is None else n
        self._emit(_records.pcap_records, rows, lengths, n, ids=ids,
                   ts_ns=time.time_ns() if ts_ns is None else ts_ns, snaplen=self.snaplen, nanosecond=self.nanosecond)
        self.packets += count if n is not None else min(count, len(lengths))

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PcapngWriter(_Writer):
    """``PcapngWriter(path, snaplen=65535)``: a pcapng file with one Ethernet interface
    whose timestamps are nanoseconds (``if_tsresol`` 9); ``write(frame, ts_ns=None)``
    or ``write_burst(rows, lengths, n, ts_ns=None)``."""

    def __init__(self, path: str | Path, snaplen: int = 65535) -> None:
        super().__init__(path, snaplen)
        try:
            # SHB: byte-order magic, version 1.0, section length unknown (-1), no options
            shb = struct.pack("=IHHq", PCAPNG_BYTE_ORDER, 1, 0, -1)
            # IDB: link type, reserved, snaplen; if_tsresol = 9 (10^-9 s), then opt_endofopt
            opts = struct.pack("=HHB3x", _OPT_IF_TSRESOL, 1, 9) + struct.pack("=HH", 0, 0)
            self._put(self._block(PCAPNG_SHB, shb)
                      + self._block(PCAPNG_IDB, struct.pack("=HHI", LINKTYPE_ETHERNET, 0, snaplen) + opts))
        except BaseException:
            self._f.close()
            raise

    @staticmethod
    def _block(kind: int, body: bytes) -> bytes:
        total = 12 + len(body)
        return struct.pack("=II", kind, total) + body + struct.pack("=I", total)

    def _epb(self, ts_ns: int, data: bytes, orig: int) -> bytes:
        cap = len(data)
        total = 32 + _pad4(cap)
        return (struct.pack("=IIIIIII", PCAPNG_EPB, total, 0, (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF,
                            cap, orig) + data + bytes(_pad4(cap) - cap) + struct.pack("=I", total))

    def write(self, frame: bytes | memoryview | npt.NDArray[np.uint8], ts_ns: int | None = None,
              orig_len: int | None = None) -> None:
        """One Enhanced Packet Block: ``frame``'s bytes (at most the snaplen), ``ts_ns`` in
        nanoseconds (default now), ``orig_len`` its length on the wire (default ``len(frame)``)."""
        data = bytes(frame)
        t = time.time_ns() if ts_ns is None else ts_ns
        cap = data[: self.snaplen]
        self._put(self._epb(t, cap, len(data) if orig_len is None else orig_len))
        self.packets += 1

    def write_burst(self, rows: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int | None = None,
                    ts_ns: int | npt.NDArray[np.uint64] | None = None, *,
                    ids: npt.NDArray[np.uint32] | None = None) -> None:
        """As :meth:`PcapWriter.write_burst`: one Enhanced Packet Block per packet, in C."""
        self._burst_args(rows, n)
        count = len(ids if ids is not None else rows) if n is None else n
        self._emit(_records.pcapng_blocks, rows, lengths, n, ids=ids,
                   ts_ns=time.time_ns() if ts_ns is None else ts_ns, snaplen=self.snaplen)
        self.packets += count if n is not None else min(count, len(lengths))

    def __enter__(self) -> "PcapngWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_writer(path: str | Path, snaplen: int = 65535, nanosecond: bool = False) -> PcapWriter | PcapngWriter:
    """A writer by the file's name: ``.pcapng`` for pcapng, anything else classic pcap
    (with ``nanosecond``: nanosecond timestamps)."""
    return PcapngWriter(path, snaplen) if str(path).endswith(".pcapng") else PcapWriter(path, snaplen, nanosecond)


def read_packets(path: str | Path) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(timestamp in integer nanoseconds, captured bytes, original length)`` for
    each packet of a classic pcap (microsecond or nanosecond) or pcapng file. Only
    Ethernet is accepted. Clear errors for anything else and for a file cut short."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise ValueError(f"{path}: too short for a pcap or pcapng header")
        if struct.unpack("<I", head)[0] == PCAPNG_SHB:
            yield from _read_pcapng(path, f, head)
        else:
            yield from _read_classic(path, f, head)


def _read_classic(path: str | Path, f: BinaryIO, first: bytes) -> Iterator[tuple[int, bytes, int]]:
    head = first + f.read(20)
    if len(head) < 24:
        raise ValueError(f"{path}: too short for a pcap header")
    magic = struct.unpack("<I", head[:4])[0]
    if magic in (MAGIC, MAGIC_NS):
        order = "<"
    elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
        order = ">"
    else:
        raise ValueError(f"{path}: not a pcap or pcapng file (magic {magic:#010x})")
    scale = 1 if magic in (MAGIC_NS, 0x4D3CB2A1) else 1000
    rec = struct.Struct(order + "IIII")
    linktype = struct.unpack(order + "I", head[20:24])[0]
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: link type {linktype}, only Ethernet (1) is supported")
    while True:
        h = f.read(16)
        if not h:
            return
        if len(h) < 16:
            raise ValueError(f"{path}: truncated record header")
        sec, frac, cap, orig = rec.unpack(h)
        data = f.read(cap)
        if len(data) < cap:
            raise ValueError(f"{path}: truncated packet ({len(data)} of {cap} bytes)")
        yield sec * 1_000_000_000 + frac * scale, data, orig


def _tsresol(order: str, opts: bytes) -> tuple[int, int]:
    """(units per second numerator, denominator) of an IDB's if_tsresol (default 10^-6)."""
    i = 0
    while i + 4 <= len(opts):
        code, ln = struct.unpack(order + "HH", opts[i:i + 4])
        if code == 0:
            break
        if code == _OPT_IF_TSRESOL and ln >= 1:
            v = opts[i + 4]
            return (2 ** (v & 0x7F), 1) if v & 0x80 else (10 ** v, 1)
        i += 4 + _pad4(ln)
    return 10 ** 6, 1


def _read_pcapng(path: str | Path, f: BinaryIO, first: bytes) -> Iterator[tuple[int, bytes, int]]:
    order = "<"
    ifaces: list[tuple[int, int]] = []      # per interface: (link type, units per second)
    kind_raw: bytes | None = first
    while True:
        if kind_raw is None:
            kind_raw = f.read(4)
            if not kind_raw:
                return
        if len(kind_raw) < 4:
            raise ValueError(f"{path}: truncated block header")
        rest = f.read(4)
        if len(rest) < 4:
            raise ValueError(f"{path}: truncated block header")
        if struct.unpack("<I", kind_raw)[0] == PCAPNG_SHB:
            # the byte-order magic, the first field of the body, says how to read the rest
            bom = f.read(4)
            if len(bom) < 4:
                raise ValueError(f"{path}: truncated section header")
            if struct.unpack("<I", bom)[0] == PCAPNG_BYTE_ORDER:
                order = "<"
            elif struct.unpack(">I", bom)[0] == PCAPNG_BYTE_ORDER:
                order = ">"
            else:
                raise ValueError(f"{path}: bad pcapng byte-order magic {bom.hex()}")
            total = struct.unpack(order + "I", rest)[0]
            if total < 28 or total % 4:
                raise ValueError(f"{path}: bad section header length {total}")
            body = bom + f.read(total - 16)
            if len(body) < total - 12 or len(f.read(4)) < 4:
                raise ValueError(f"{path}: truncated section header")
            ifaces = []                       # interfaces are numbered per section
            kind_raw = None
            continue
        kind = struct.unpack(order + "I", kind_raw)[0]
        total = struct.unpack(order + "I", rest)[0]
        if total < 12 or total % 4:
            raise ValueError(f"{path}: bad block length {total} (block type {kind:#x})")
        body = f.read(total - 12)
        trailer = f.read(4)
        if len(body) < total - 12 or len(trailer) < 4:
            raise ValueError(f"{path}: truncated block (type {kind:#x})")
        kind_raw = None
        if kind == PCAPNG_IDB:
            if len(body) < 8:
                raise ValueError(f"{path}: interface description too short")
            linktype = struct.unpack(order + "H", body[:2])[0]
            num, _den = _tsresol(order, body[8:])
            ifaces.append((linktype, num))
        elif kind == PCAPNG_EPB:
            if len(body) < 20:
                raise ValueError(f"{path}: enhanced packet block too short")
            iface, hi, lo, cap, orig = struct.unpack(order + "IIIII", body[:20])
            if iface >= len(ifaces):
                raise ValueError(f"{path}: packet on interface {iface}, which is not described")
            linktype, per_sec = ifaces[iface]
            if linktype != LINKTYPE_ETHERNET:
                raise ValueError(f"{path}: link type {linktype}, only Ethernet (1) is supported")
            if 20 + cap > len(body):
                raise ValueError(f"{path}: packet of {cap} bytes in a block of {len(body) - 20}")
            units = hi << 32 | lo
            yield units * 1_000_000_000 // per_sec, body[20:20 + cap], orig
        elif kind == PCAPNG_SPB:
            if len(body) < 4 or not ifaces:
                raise ValueError(f"{path}: simple packet block without an interface")
            orig = struct.unpack(order + "I", body[:4])[0]
            cap = min(orig, len(body) - 4)
            yield 0, body[4:4 + cap], orig     # a simple packet has no timestamp
        # any other block (statistics, name resolution, custom) is skipped


def read_pcap(path: str | Path) -> Iterator[tuple[float, bytes, int]]:
    """Yield ``(timestamp in seconds, captured bytes, original length)`` for each packet
    of a classic pcap or pcapng file (:func:`read_packets` gives integer nanoseconds)."""
    for ts, data, orig in read_packets(path):
        yield ts / 1e9, data, orig
