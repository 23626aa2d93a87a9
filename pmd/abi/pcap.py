"""Classic pcap files (the libpcap format tcpdump, tshark, scapy and dpkt read).

Layout: a 24-byte global header (magic 0xa1b2c3d4, version 2.4, snaplen,
link type 1 = Ethernet), then per packet a 16-byte record header
(seconds, microseconds, captured length, original length) and the bytes.
Written in native byte order, as libpcap does; read in either. Used by
``pmd fwd --pcap FILE`` and by the built-in device's pcap wire.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


class PcapWriter:
    """``PcapWriter(path, snaplen=65535)``; ``write(frame)`` or ``write_burst(rows, lengths)``."""

    def __init__(self, path: str | Path, snaplen: int = 65535) -> None:
        if not 1 <= snaplen <= 0x40000:
            raise ValueError("snaplen must be 1 to 262144 bytes")
        self.path = Path(path)
        self.snaplen = snaplen
        self.packets = 0
        self._f: BinaryIO = open(self.path, "wb")
        self._f.write(_GLOBAL.pack(MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))

    def write(self, frame: bytes | memoryview | npt.NDArray[np.uint8], ts: float | None = None,
              orig_len: int | None = None) -> None:
        data = bytes(frame)
        t = time.time() if ts is None else ts
        sec = int(t)
        cap = data[: self.snaplen]
        self._f.write(_RECORD.pack(sec, int((t - sec) * 1e6), len(cap),
                                   len(data) if orig_len is None else orig_len))
        self._f.write(cap)
        self.packets += 1

    def write_burst(self, rows: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int) -> None:
        """Packets ``rows[i, :lengths[i]]`` for ``i < n``, one timestamp for the burst.
        Rows may be narrower than a packet (a truncating receive): the original
        length is kept, as pcap's snaplen does."""
        t = time.time()
        sec, usec = int(t), int((t - int(t)) * 1e6)
        width = rows.shape[1]
        out = bytearray()
        for i in range(n):
            orig = int(lengths[i])
            cap = min(orig, width, self.snaplen)
            out += _RECORD.pack(sec, usec, cap, orig)
            out += rows[i, :cap].tobytes()
        self._f.write(out)
        self.packets += n

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pcap(path: str | Path) -> Iterator[tuple[float, bytes, int]]:
    """Yield ``(timestamp, captured bytes, original length)`` for each record.
    Clear errors for a file that is not pcap or is cut short."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise ValueError(f"{path}: too short for a pcap header")
        magic = struct.unpack("<I", head[:4])[0]
        if magic in (MAGIC, 0xA1B23C4D):
            order = "<"
        elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
            order = ">"
        else:
            raise ValueError(f"{path}: not a pcap file (magic {magic:#010x}); pcapng is not supported")
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
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
            yield sec + frac / (1e9 if nano else 1e6), data, orig
