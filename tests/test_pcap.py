"""Capture files: pmd's classic pcap and pcapng writers and its reader, against dpkt's.

Each direction is checked field by field: pmd writes and dpkt reads, dpkt writes
and pmd reads (timestamps as integer nanoseconds, bytes, original lengths), and
the reader's clear errors on files that are cut short or not Ethernet.
"""

from __future__ import annotations

import struct

import dpkt
import numpy as np
import pytest

from pmd.abi.pcap import (PCAPNG_EPB, PcapngWriter, PcapWriter, open_writer, read_packets, read_pcap)

FRAMES = [bytes(range(60)), bytes([0xAB]) * 1514, bytes(range(200))[:97]]
TS_NS = [1_700_000_000_123_456_789, 1_700_000_000_123_456_790, 1_800_000_000_000_000_001]


def test_pmd_pcapng_is_read_by_dpkt_with_nanosecond_timestamps(tmp_path):
    path = tmp_path / "x.pcapng"
    with PcapngWriter(path, snaplen=1000) as w:
        for f, t in zip(FRAMES, TS_NS):
            w.write(f, ts_ns=t)
    with open(path, "rb") as fh:
        got = list(dpkt.pcapng.Reader(fh))
    assert [bytes(b) for _t, b in got] == [f[:1000] for f in FRAMES]
    assert [round(t * 1e9) for t, _b in got] == pytest.approx(TS_NS, abs=300)   # dpkt's float
    assert list(read_packets(path)) == [(t, f[:1000], len(f)) for f, t in zip(FRAMES, TS_NS)]


def test_pcapng_burst_keeps_the_original_length_of_a_narrow_row(tmp_path):
    rows = np.arange(3 * 64, dtype=np.uint8).reshape(3, 64)
    lengths = np.array([60, 64, 1500], np.uint32)       # the last row is narrower than its packet
    path = tmp_path / "b.pcapng"
    with PcapngWriter(path) as w:
        w.write_burst(rows, lengths, 3, ts_ns=42)
    got = list(read_packets(path))
    assert [(t, len(d), o) for t, d, o in got] == [(42, 60, 60), (42, 64, 64), (42, 64, 1500)]
    assert got[2][1] == rows[2].tobytes()


def test_dpkt_pcapng_is_read_by_pmd(tmp_path):
    path = tmp_path / "d.pcapng"
    with open(path, "wb") as fh:
        w = dpkt.pcapng.Writer(fh)                      # microsecond resolution, dpkt's default
        for f, t in zip(FRAMES, (1.5, 2.25, 3.000001)):
            w.writepkt(f, ts=t)
    got = list(read_packets(path))
    assert [d for _t, d, _o in got] == FRAMES
    assert [t for t, _d, _o in got] == [1_500_000_000, 2_250_000_000, 3_000_001_000]
    assert [round(t, 6) for t, _d, _o in read_pcap(path)] == [1.5, 2.25, 3.000001]


def test_classic_pcap_micro_and_nanosecond_files_give_integer_nanoseconds(tmp_path):
    micro = tmp_path / "u.pcap"
    with PcapWriter(micro) as w:
        w.write(FRAMES[0], ts=12.5)
    assert list(read_packets(micro)) == [(12_500_000_000, FRAMES[0], 60)]
    nano = tmp_path / "n.pcap"
    with open(nano, "wb") as fh:
        w2 = dpkt.pcap.Writer(fh, nano=True)
        w2.writepkt(FRAMES[1], ts=7.000000123)
    (t, data, orig), = read_packets(nano)
    assert data == FRAMES[1] and orig == 1514 and abs(t - 7_000_000_123) < 1000


def test_open_writer_chooses_the_format_by_name(tmp_path):
    for name, magic in (("a.pcapng", struct.pack("<I", 0x0A0D0D0A)), ("a.pcap", struct.pack("=I", 0xA1B2C3D4))):
        with open_writer(tmp_path / name) as w:
            w.write(FRAMES[0])
        assert (tmp_path / name).read_bytes()[:4] == magic
        assert [d for _t, d, _o in read_packets(tmp_path / name)] == [FRAMES[0]]


def test_pcapng_blocks_pmd_does_not_need_are_skipped(tmp_path):
    path = tmp_path / "s.pcapng"
    with PcapngWriter(path) as w:
        w.write(FRAMES[0], ts_ns=1)
        # a custom block (type 0x00000BAD, 8 bytes of body) between two packets
        w._f.write(struct.pack("=II", 0xBAD, 20) + b"12345678" + struct.pack("=I", 20))
        w.write(FRAMES[2], ts_ns=2)
    assert [(t, d) for t, d, _o in read_packets(path)] == [(1, FRAMES[0]), (2, FRAMES[2])]


def test_reader_errors_say_what_is_wrong(tmp_path):
    good = tmp_path / "g.pcapng"
    with PcapngWriter(good) as w:
        w.write(FRAMES[1], ts_ns=1)
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated block"):
        list(read_packets(cut))
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"\x00" * 24)
    with pytest.raises(ValueError, match="not a pcap or pcapng file"):
        list(read_packets(junk))
    short = tmp_path / "short"
    short.write_bytes(b"\x0a\x0d")
    with pytest.raises(ValueError, match="too short"):
        list(read_packets(short))
    # a packet on an interface no Interface Description Block described
    orphan = tmp_path / "o.pcapng"
    data = bytearray(good.read_bytes())
    epb = data.index(struct.pack("=I", PCAPNG_EPB))
    data[epb + 8:epb + 12] = struct.pack("=I", 3)
    orphan.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="interface 3"):
        list(read_packets(orphan))
    # an interface that is not Ethernet
    wifi = tmp_path / "w.pcapng"
    with open(wifi, "wb") as fh:
        dpkt.pcapng.Writer(fh, linktype=105).writepkt(b"\x00" * 30, ts=1.0)
    with pytest.raises(ValueError, match="only Ethernet"):
        list(read_packets(wifi))
