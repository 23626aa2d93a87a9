"""Capture files: pmd's classic pcap and pcapng writers and its reader, against dpkt's.

Each direction is checked field by field: pmd writes and dpkt reads, dpkt writes
and pmd reads (timestamps as integer nanoseconds, bytes, original lengths), and
the reader's clear errors on files that are cut short or not Ethernet.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess

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


# ---------------------------------------------------------------------------- bursts, in C

def _mixed_frames() -> list[bytes]:
    """Real packets (dpkt builds them) of several kinds and sizes, for readers that parse them."""
    eth = dict(src=bytes.fromhex("020000000001"), dst=bytes.fromhex("020000000002"))
    out = []
    for i in range(12):
        if i % 3 == 0:
            l4: dpkt.Packet = dpkt.udp.UDP(sport=1000 + i, dport=53, data=bytes(i * 37))
            l4.ulen = 8 + len(l4.data)
            ip: dpkt.Packet = dpkt.ip.IP(src=bytes([10, 0, 0, i]), dst=bytes([10, 0, 1, 1]), p=17, data=l4)
            frame = dpkt.ethernet.Ethernet(type=0x0800, data=ip, **eth)
        elif i % 3 == 1:
            l4 = dpkt.tcp.TCP(sport=40000 + i, dport=443, flags=0x18, data=bytes(i * 101))
            ip = dpkt.ip.IP(src=bytes([192, 168, 0, i]), dst=bytes([192, 168, 9, 9]), p=6, data=l4)
            frame = dpkt.ethernet.Ethernet(type=0x0800, data=ip, **eth)
        else:
            l4 = dpkt.udp.UDP(sport=5000 + i, dport=5353, data=bytes(i * 11))
            l4.ulen = 8 + len(l4.data)
            ip = dpkt.ip6.IP6(src=bytes(15) + bytes([i]), dst=bytes.fromhex("fe80" + "00" * 13 + "01"), nxt=17,
                              hlim=64, data=l4, plen=len(bytes(l4)))
            frame = dpkt.ethernet.Ethernet(type=0x86DD, data=ip, **eth)
        out.append(bytes(frame))
    return out


def _rows(frames: list[bytes], width: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.zeros((len(frames), width), np.uint8)
    for i, f in enumerate(frames):
        rows[i, :min(len(f), width)] = np.frombuffer(f[:width], np.uint8)
    return rows, np.array([len(f) for f in frames], np.uint32)


@pytest.mark.parametrize("kind", ["pcap-us", "pcap-ns", "pcapng"])
def test_write_burst_is_byte_for_byte_what_write_makes_packet_by_packet(tmp_path, kind):
    frames = _mixed_frames()
    rows, lengths = _rows(frames, 1514)
    # quarter seconds: exact in the float seconds write() takes, so both paths see one time
    ts = np.array([1_700_000_000_000_000_000 + 250_000_000 * i for i in range(len(frames))], np.uint64)

    def writer(path):
        return PcapngWriter(path, snaplen=300) if kind == "pcapng" else PcapWriter(path, 300, kind == "pcap-ns")

    with writer(tmp_path / "one") as w:
        for f, t in zip(frames, ts):
            if kind == "pcapng":
                w.write(f, ts_ns=int(t))
            else:
                w.write(f, ts=int(t) // 10**9 + (int(t) % 10**9) / 1e9)
    with writer(tmp_path / "burst") as w:
        w.write_burst(rows, lengths, 5, ts[:5])
        w.write_burst(rows[5:], lengths[5:], ts_ns=ts[5:])
        assert w.packets == len(frames) and w.size == (tmp_path / "one").stat().st_size
    assert (tmp_path / "burst").read_bytes() == (tmp_path / "one").read_bytes()


def test_write_burst_by_ids_reads_rows_of_the_pool_shape(tmp_path):
    frames = _mixed_frames()
    data, lengths = _rows(frames, 2048)
    ids = np.array([7, 2, 2, 11], np.uint32)
    with PcapngWriter(tmp_path / "z.pcapng") as w:
        w.write_burst(data, lengths[ids], len(ids), ts_ns=5, ids=ids)
    assert list(read_packets(tmp_path / "z.pcapng")) == [(5, frames[i], len(frames[i])) for i in ids]


def test_write_burst_refuses_bad_arguments_with_what_to_pass(tmp_path):
    rows, lengths = _rows(_mixed_frames(), 1514)
    with PcapWriter(tmp_path / "e.pcap") as w:
        with pytest.raises(TypeError, match="uint32"):
            w.write_burst(rows, lengths.astype(np.int64))
        with pytest.raises(ValueError, match="n must be 0 to 12"):
            w.write_burst(rows, lengths, 13)
        with pytest.raises(ValueError, match="one per packet"):
            w.write_burst(rows, lengths, 12, np.zeros(3, np.uint64))
        with pytest.raises(ValueError, match=r"ids\[0\] is 99"):
            w.write_burst(rows, lengths, 1, ids=np.array([99], np.uint32))
        with pytest.raises(TypeError, match="2-D uint8"):
            w.write_burst(rows.ravel(), lengths)
    with pytest.raises(ValueError, match="closed"):
        w.write_burst(rows, lengths)
    assert list(read_packets(tmp_path / "e.pcap")) == []          # nothing of a refused burst was written


def test_a_megabyte_of_bursts_goes_out_in_pieces_and_all_of_it_arrives(tmp_path):
    frames = _mixed_frames()
    rows, lengths = _rows(frames, 1514)
    with PcapWriter(tmp_path / "big.pcap", nanosecond=True) as w:
        for k in range(700):                 # about 2.8 MB: the buffer is written out twice on the way
            w.write_burst(rows, lengths, ts_ns=k)
        assert w.size > 2 * w.BUFFER
    got = list(read_packets(tmp_path / "big.pcap"))
    assert len(got) == 700 * len(frames)
    assert [g[1] for g in got[-len(frames):]] == frames and got[-1][0] == 699


needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None,
                                  reason="tshark is not installed (apt-get install tshark; scripts/test.sh does)")


def _tshark(path, *fields: str) -> list[list[str]]:
    args = ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for f in fields:
        args += ["-e", f]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split("|") for line in r.stdout.splitlines()]


def _expected_fields(frames: list[bytes], ts: list[int], snaplen: int) -> list[list[str]]:
    out = []
    for f, t in zip(frames, ts):
        e = dpkt.ethernet.Ethernet(f)
        ip, l4 = e.data, e.data.data
        v4 = isinstance(ip, dpkt.ip.IP)
        out.append([str(len(f)), str(min(len(f), snaplen)), f"{t // 10**9}.{t % 10**9:09d}",
                    socket.inet_ntop(socket.AF_INET, ip.src) if v4 else "",
                    socket.inet_ntop(socket.AF_INET6, ip.dst) if not v4 else "",
                    str(l4.sport) if isinstance(l4, dpkt.tcp.TCP) else "",
                    str(l4.dport) if isinstance(l4, dpkt.udp.UDP) else ""])
    return out


@needs_tshark
@pytest.mark.parametrize("name", ["n.pcap", "n.pcapng"])
def test_tshark_reads_pmd_bursts_field_by_field(tmp_path, name):
    frames = _mixed_frames()
    rows, lengths = _rows(frames, 1514)
    ts = [1_750_000_000_000_000_000 + 123_456_789 * i for i in range(len(frames))]
    with open_writer(tmp_path / name, snaplen=1514, nanosecond=True) as w:
        w.write_burst(rows, lengths, ts_ns=np.array(ts, np.uint64))
    got = _tshark(tmp_path / name, "frame.len", "frame.cap_len", "frame.time_epoch", "ip.src", "ipv6.dst",
                  "tcp.srcport", "udp.dstport")
    assert got == _expected_fields(frames, ts, 1514)
    # and the bytes, as tshark saw them, are the frames sent
    r = subprocess.run(["tshark", "-r", str(tmp_path / name), "-T", "json", "-x"], capture_output=True, text=True,
                       timeout=60)
    assert [bytes.fromhex(p["_source"]["layers"]["frame_raw"][0]) for p in json.loads(r.stdout)] == frames


@needs_tshark
def test_tshark_sees_the_snaplen_of_a_narrow_burst(tmp_path):
    frames = _mixed_frames()
    rows, lengths = _rows(frames, 128)                 # a truncating receive: rows of 128 bytes
    with PcapngWriter(tmp_path / "s.pcapng", snaplen=96) as w:
        w.write_burst(rows, lengths, ts_ns=7)
    got = _tshark(tmp_path / "s.pcapng", "frame.len", "frame.cap_len")
    assert got == [[str(len(f)), str(min(len(f), 96))] for f in frames]
