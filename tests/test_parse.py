"""pmd.parse: headers of a burst into numpy columns (docs/analytics.md).

One test per rule (each header kind, VLAN tags, IPv4 options, what is
TRUNCATED and what MALFORMED), the proof that nothing past a packet's length
or its row is read (a guard page right after the last byte, and poison bytes
that must not change any column), and a hypothesis test that compares every
column with dpkt's parse of the same random packets.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Any

import dpkt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmd.parse import COLUMNS, FRAGMENT, MALFORMED, SNAPPED, TRUNCATED, HeaderParser, parse

DST = bytes.fromhex("0a1b2c3d4e5f")
SRC = bytes.fromhex("020000000001")
IP_A, IP_B = bytes([192, 168, 1, 2]), bytes([10, 0, 0, 254])
IP6_A = bytes(range(16))
IP6_B = bytes(range(0xF0, 0x100))


# ---- building frames by hand (every field where a test puts it) ----

def eth(ethertype: int, body: bytes, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Ethernet II with ``tags`` as (TPID, TCI) from the outside in."""
    out = DST + SRC
    for tpid, tci in tags:
        out += struct.pack("!HH", tpid, tci)
    return out + struct.pack("!H", ethertype) + body


def ipv4(proto: int, body: bytes, *, ttl: int = 64, options: bytes = b"", ihl: int | None = None,
         total: int | None = None, frag: int = 0, version: int = 4) -> bytes:
    hl = 5 + len(options) // 4 if ihl is None else ihl
    tot = 20 + len(options) + len(body) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", (version << 4) | hl, 0, tot, 1, frag, ttl, proto, 0, IP_A, IP_B)
    return hdr + options + body


def ipv6(nxt: int, body: bytes, *, hlim: int = 7, plen: int | None = None, version: int = 6) -> bytes:
    n = len(body) if plen is None else plen
    return struct.pack("!IHBB16s16s", version << 28, n, nxt, hlim, IP6_A, IP6_B) + body


def tcp(payload: bytes = b"", *, sport: int = 1234, dport: int = 80, flags: int = 0x18,
        options: bytes = b"", off: int | None = None) -> bytes:
    doff = 5 + len(options) // 4 if off is None else off
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 2, doff << 4, flags, 65535, 0, 0) + options + payload


def udp(payload: bytes = b"", *, sport: int = 53, dport: int = 5353, ulen: int | None = None) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload) if ulen is None else ulen, 0) + payload


def icmp(typ: int, code: int, rest: bytes = b"\x00\x01\x00\x02") -> bytes:
    return struct.pack("!BBH", typ, code, 0) + rest


def one(frame: bytes, length: int | None = None, width: int | None = None) -> dict[str, Any]:
    """Parse one frame; the row of each column as a Python value."""
    w = len(frame) if width is None else width
    data = np.zeros((1, max(w, 1)), np.uint8)
    data[0, :min(w, len(frame))] = np.frombuffer(frame[:w], np.uint8)
    lengths = np.array([len(frame) if length is None else length], np.uint32)
    cols = parse(data, lengths)
    return {k: (bytes(v[0]) if v.ndim == 2 else int(v[0])) for k, v in cols.items()}


def test_columns_have_the_documented_names_and_dtypes():
    cols = parse(np.zeros((3, 64), np.uint8), np.full(3, 64, np.uint32))
    assert list(cols) == [name for name, _, _ in COLUMNS]
    for name, dtype, width in COLUMNS:
        assert cols[name].dtype == np.dtype(dtype), name
        assert cols[name].shape == ((3, width) if width > 1 else (3,)), name


# ---- Ethernet and VLAN tags ----

def test_macs_are_the_big_endian_value_of_their_six_bytes():
    r = one(eth(0x0806, bytes(28)))
    assert r["dst_mac"] == 0x0A1B2C3D4E5F and r["src_mac"] == 0x020000000001
    assert r["ethertype"] == 0x0806 and r["ip_version"] == 0 and r["flags"] == 0
    assert r["payload_offset"] == 14 and r["payload_length"] == 28


@pytest.mark.parametrize("tags", [(), ((0x8100, 0x2064),), ((0x88A8, 0x0123), (0x8100, 0x0456)),
                                  ((0x8100, 0x0FFF), (0x8100, 0x0001))])
def test_vlan_zero_one_or_two_tags_outer_id_and_inner_ethertype(tags):
    r = one(eth(0x0800, ipv4(17, udp(b"x")), tags))
    assert r["vlan_count"] == len(tags)
    assert r["vlan_id"] == (tags[0][1] & 0x0FFF if tags else 0)
    assert r["ethertype"] == 0x0800 and r["ip_version"] == 4 and r["dst_port"] == 5353
    assert r["payload_offset"] == 14 + 4 * len(tags) + 28 and r["payload_length"] == 1
    assert r["flags"] == 0


def test_a_third_tag_is_not_followed_its_tpid_is_the_ethertype():
    r = one(eth(0x0800, bytes(20), ((0x8100, 1), (0x8100, 2), (0x8100, 3))))
    assert r["vlan_count"] == 2 and r["ethertype"] == 0x8100 and r["ip_version"] == 0
    assert r["payload_offset"] == 22


def test_a_frame_shorter_than_the_ethernet_header_is_truncated():
    for k in range(14):
        r = one(eth(0x0800, b"")[:k])
        assert r["flags"] == TRUNCATED and r["dst_mac"] == 0 and r["payload_offset"] == 0, k


def test_a_vlan_tag_cut_short_is_truncated():
    frame = eth(0x0800, ipv4(6, tcp()), ((0x8100, 5),))
    r = one(frame[:16])
    assert r["flags"] & TRUNCATED and r["vlan_count"] == 0 and r["payload_offset"] == 14


# ---- IPv4 ----

def test_ipv4_fields_addresses_as_host_order_values():
    r = one(eth(0x0800, ipv4(6, tcp(b"abc"), ttl=33)))
    assert r["ip_version"] == 4 and r["protocol"] == 6 and r["ttl"] == 33
    assert r["ip_src"] == 0xC0A80102 and r["ip_dst"] == 0x0A0000FE
    assert r["ip6_src"] == bytes(16) and r["flags"] == 0


def test_ipv4_options_are_skipped_by_ihl():
    r = one(eth(0x0800, ipv4(17, udp(b"hello"), options=b"\x01" * 12)))
    assert r["src_port"] == 53 and r["payload_offset"] == 14 + 32 + 8 and r["payload_length"] == 5


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_ihl_below_5_is_malformed(ihl):
    r = one(eth(0x0800, ipv4(6, tcp(), ihl=ihl)))
    assert r["flags"] == MALFORMED and r["ip_version"] == 4 and r["ip_src"] == 0 and r["src_port"] == 0
    assert r["payload_offset"] == 14


def test_ipv4_with_another_version_is_malformed():
    assert one(eth(0x0800, ipv4(6, tcp(), version=6)))["flags"] == MALFORMED


def test_ipv4_total_length_shorter_than_its_header_is_malformed():
    assert one(eth(0x0800, ipv4(6, tcp(), options=bytes(8), total=24)))["flags"] == MALFORMED


def test_ipv4_options_beyond_the_frame_are_truncated():
    frame = eth(0x0800, ipv4(6, b"", options=bytes(20)))
    r = one(frame[:14 + 30])
    assert r["flags"] & TRUNCATED and r["ip_src"] == 0


def test_ipv4_total_length_beyond_the_frame_is_truncated():
    r = one(eth(0x0800, ipv4(6, tcp(b"12345678"), total=20 + 20 + 100)))
    assert r["flags"] == TRUNCATED and r["src_port"] == 1234
    assert r["payload_offset"] == 54 and r["payload_length"] == 8   # what the frame holds


def test_ethernet_padding_after_the_ip_packet_is_not_payload():
    frame = eth(0x0800, ipv4(17, udp(b"ab"))) + bytes(16)   # padded to the 60-byte minimum
    r = one(frame)
    assert r["flags"] == 0 and r["payload_length"] == 2


def test_a_first_fragment_is_parsed_a_later_one_has_no_l4_header():
    first = one(eth(0x0800, ipv4(6, tcp(b"x"), frag=0x2000)))   # MF, offset 0
    assert first["flags"] == FRAGMENT and first["src_port"] == 1234
    later = one(eth(0x0800, ipv4(6, tcp(b"x"), frag=0x0010)))   # offset 16 x 8 bytes
    assert later["flags"] == FRAGMENT and later["src_port"] == 0 and later["protocol"] == 6
    assert later["payload_offset"] == 34 and later["payload_length"] == 21


# ---- L4 ----

def test_tcp_ports_flags_and_options_skipped_by_data_offset():
    r = one(eth(0x0800, ipv4(6, tcp(b"data", sport=40000, dport=443, flags=0xC2, options=bytes(12)))))
    assert (r["src_port"], r["dst_port"], r["tcp_flags"]) == (40000, 443, 0xC2)
    assert r["payload_offset"] == 14 + 20 + 32 and r["payload_length"] == 4 and r["flags"] == 0


@pytest.mark.parametrize("off", [0, 4])
def test_tcp_data_offset_below_5_is_malformed(off):
    r = one(eth(0x0800, ipv4(6, tcp(b"data", off=off))))
    assert r["flags"] == MALFORMED and r["src_port"] == 1234 and r["payload_offset"] == 34


def test_an_l4_header_longer_than_the_ip_packet_is_malformed():
    body = tcp(b"")
    r = one(eth(0x0800, ipv4(6, body, total=20 + 10)) + bytes(30))
    assert r["flags"] == MALFORMED and r["src_port"] == 0


def test_tcp_options_beyond_the_frame_are_truncated():
    frame = eth(0x0800, ipv4(6, tcp(options=bytes(20))))
    r = one(frame[:-4])
    assert r["flags"] & TRUNCATED and r["src_port"] == 1234 and r["payload_offset"] == 34


def test_udp_ports_and_a_bad_udp_length_is_malformed():
    ok = one(eth(0x0800, ipv4(17, udp(b"abcd", sport=1, dport=2))))
    assert (ok["src_port"], ok["dst_port"], ok["flags"], ok["payload_length"]) == (1, 2, 0, 4)
    assert one(eth(0x0800, ipv4(17, udp(b"abcd", ulen=7))))["flags"] == MALFORMED
    assert one(eth(0x0800, ipv4(17, udp(b"abcd", ulen=13))))["flags"] == MALFORMED


def test_icmp_type_and_code_over_ipv4_and_icmpv6_over_ipv6():
    r4 = one(eth(0x0800, ipv4(1, icmp(8, 0))))
    assert (r4["icmp_type"], r4["icmp_code"], r4["payload_offset"], r4["payload_length"]) == (8, 0, 38, 4)
    r6 = one(eth(0x86DD, ipv6(58, icmp(135, 0, bytes(20)))))
    assert (r6["icmp_type"], r6["icmp_code"], r6["payload_offset"], r6["payload_length"]) == (135, 0, 58, 20)
    # ICMPv6's number over IPv4 (and ICMP's over IPv6) is no ICMP header pmd reads
    assert one(eth(0x0800, ipv4(58, icmp(135, 0))))["icmp_type"] == 0
    assert one(eth(0x86DD, ipv6(1, icmp(8, 0))))["icmp_type"] == 0


def test_an_unknown_protocol_leaves_the_payload_after_the_ip_header():
    r = one(eth(0x0800, ipv4(47, bytes(24))))
    assert r["protocol"] == 47 and r["payload_offset"] == 34 and r["payload_length"] == 24 and r["flags"] == 0


# ---- IPv6 ----

def test_ipv6_fixed_header_fields():
    r = one(eth(0x86DD, ipv6(6, tcp(b"xyz", dport=22), hlim=3)))
    assert r["ip_version"] == 6 and r["protocol"] == 6 and r["ttl"] == 3
    assert r["ip6_src"] == IP6_A and r["ip6_dst"] == IP6_B and r["ip_src"] == 0
    assert r["dst_port"] == 22 and r["payload_offset"] == 74 and r["payload_length"] == 3


def test_ipv6_extension_headers_are_not_followed():
    hop_by_hop = bytes([6, 0]) + bytes(6)
    r = one(eth(0x86DD, ipv6(0, hop_by_hop + tcp())))
    assert r["protocol"] == 0 and r["src_port"] == 0 and r["payload_offset"] == 54 and r["flags"] == 0


def test_ipv6_with_another_version_is_malformed_and_payload_length_beyond_is_truncated():
    assert one(eth(0x86DD, ipv6(6, tcp(), version=4)))["flags"] == MALFORMED
    r = one(eth(0x86DD, ipv6(17, udp(b"ab"), plen=100)))
    assert r["flags"] == TRUNCATED
    assert r["src_port"] == 53


def test_ipv6_cut_inside_its_header_is_truncated():
    frame = eth(0x86DD, ipv6(17, udp()))
    r = one(frame[:14 + 39])
    assert r["flags"] == TRUNCATED and r["ip_version"] == 6 and r["ip6_src"] == bytes(16)


# ---- never past the length or the row ----

FULL = eth(0x0800, ipv4(6, tcp(b"payload!", options=bytes(4)), options=bytes(8)))
HEADERS_END = 14 + 28 + 24


@pytest.mark.parametrize("cut_by", ["length", "row"])
def test_truncation_at_every_byte_offset_reads_nothing_past_it(cut_by):
    """Each prefix of a TCP/IPv4 packet ends right before a page no one may read
    (PROT_NONE): a read past the prefix would crash. Cut by the length, the
    bytes after it are there but must change nothing."""
    page = mmap.PAGESIZE
    mem = mmap.mmap(-1, 2 * page)
    buf = np.frombuffer(mem, np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    addr = buf.ctypes.data
    assert libc.mprotect(ctypes.c_void_p(addr + page), page, 0) == 0
    try:
        reference = one(FULL)
        assert reference["flags"] == 0 and reference["payload_offset"] == HEADERS_END
        for k in range(len(FULL) + 1):
            row = buf[page - max(k, 1):page]
            row[:] = 0
            row[:k] = np.frombuffer(FULL[:k], np.uint8)
            data = row.reshape(1, -1)
            length = np.array([k if cut_by == "length" else len(FULL)], np.uint32)
            r = {n: (bytes(v[0]) if v.ndim == 2 else int(v[0])) for n, v in parse(data, length).items()}
            # Cut by the length, the frame is shorter than its IP length says; cut by
            # the row (a snaplen), only a cut header is TRUNCATED, and SNAPPED says so.
            cut_short = k < len(FULL) if cut_by == "length" else k < HEADERS_END
            assert bool(r["flags"] & TRUNCATED) == cut_short, k
            assert (r["flags"] & SNAPPED != 0) == (cut_by == "row" and k < len(FULL)), k
            assert r["payload_offset"] <= max(k, 0), k
            if k >= HEADERS_END:
                same = {n: v for n, v in r.items() if n not in ("flags", "payload_length")}
                assert same == {n: v for n, v in reference.items() if n not in ("flags", "payload_length")}, k
    finally:
        libc.mprotect(ctypes.c_void_p(addr + page), page, 3)   # numpy views may outlive the test


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=120), st.integers(0, 140), st.integers(1, 140),
       st.sampled_from([0x0800, 0x86DD, 0x8100, 0x88A8, 0x0806]))
def test_random_bytes_poison_after_the_readable_part_changes_nothing(body, length, width, ethertype):
    frame = eth(ethertype, body)
    avail = min(length, width)
    outs = []
    for poison in (0x00, 0xFF, 0x45):
        data = np.full((1, width), poison, np.uint8)
        k = min(avail, len(frame))
        data[0, :k] = np.frombuffer(frame[:k], np.uint8)
        outs.append({n: v.copy() for n, v in parse(data, np.array([length], np.uint32)).items()})
    for other in outs[1:]:
        if avail <= len(frame):
            assert all(np.array_equal(outs[0][n], other[n]) for n in outs[0]), (outs[0], other)
    assert outs[0]["payload_offset"][0] <= avail


# ---- the zero-copy shape and the arguments ----

def test_parse_ids_reads_rows_by_buffer_id_in_a_strided_array():
    frames = [eth(0x0800, ipv4(17, udp(bytes(i)))) for i in range(5)]
    pool = np.zeros((8, 2048), np.uint8)
    data = pool[:, 64:]                      # the shape of pool.data: rows not C-contiguous
    ids = np.array([6, 1, 3, 0, 7], np.uint32)
    lengths = np.array([len(f) for f in frames], np.uint32)
    for b, f in zip(ids, frames):
        data[b, :len(f)] = np.frombuffer(f, np.uint8)
    got = HeaderParser(2).parse_ids(data, ids, lengths)
    assert list(got["payload_length"]) == list(range(5))
    copy = np.zeros((5, 128), np.uint8)
    for i, f in enumerate(frames):
        copy[i, :len(f)] = np.frombuffer(f, np.uint8)
    ref = parse(copy, lengths)
    assert all(np.array_equal(got[n], ref[n]) for n in ref)
    with pytest.raises(ValueError, match=r"ids\[1\] is 8"):
        HeaderParser().parse_ids(data, np.array([0, 8], np.uint32), lengths)


def test_the_parser_reuses_its_arrays_and_grows_when_asked_for_more():
    p = HeaderParser(4)
    cols = p.columns
    frame = np.frombuffer(eth(0x0800, ipv4(17, udp())), np.uint8)
    data = np.tile(frame, (4, 1))
    assert p.parse_into(data, np.full(4, len(frame), np.uint32), 3) == 3
    assert p.columns is cols and p.columns["dst_port"][2] == 5353 and p.columns["dst_port"][3] == 0
    big = np.tile(frame, (10, 1))
    assert len(p.parse(big, np.full(10, len(frame), np.uint32))["flags"]) == 10
    assert p.capacity == 10


def test_bad_arguments_say_what_to_pass():
    p = HeaderParser()
    ok_len = np.full(2, 60, np.uint32)
    with pytest.raises(TypeError, match="uint8"):
        p.parse_into(np.zeros((2, 64), np.uint16), ok_len)
    with pytest.raises(TypeError, match="2-D"):
        p.parse_into(np.zeros(64, np.uint8), ok_len)
    with pytest.raises(TypeError, match="uint32"):
        p.parse_into(np.zeros((2, 64), np.uint8), np.full(2, 60, np.int64))
    with pytest.raises(ValueError, match="strides"):
        p.parse_into(np.zeros((2, 64), np.uint8)[:, ::2], ok_len)
    with pytest.raises(ValueError, match="n must be 0 to 2"):
        p.parse_into(np.zeros((3, 64), np.uint8), ok_len, 3)
    with pytest.raises(ValueError, match="capacity"):
        HeaderParser(0)


# ---- against dpkt, on random packets ----

@st.composite
def packets(draw: Any) -> tuple[bytes, dict[str, Any]]:
    """A random well-formed frame, and what was put where (for the truncation checks)."""
    n_tags = draw(st.integers(0, 2))
    tags = tuple((0x8100 if i else draw(st.sampled_from([0x8100, 0x88A8])), draw(st.integers(0, 0xFFFF)))
                 for i in range(n_tags))
    l3 = draw(st.sampled_from(["ipv4", "ipv6", "arp"]))
    payload = draw(st.binary(max_size=64))
    l4_kind = draw(st.sampled_from(["tcp", "udp", "icmp", "other"]))
    if l4_kind == "tcp":
        opts = bytes(4 * draw(st.integers(0, 10)))
        body = tcp(payload, sport=draw(st.integers(0, 0xFFFF)), dport=draw(st.integers(0, 0xFFFF)),
                   flags=draw(st.integers(0, 0xFF)), options=opts)
        l4_len = 20 + len(opts)
    elif l4_kind == "udp":
        body, l4_len = udp(payload, sport=draw(st.integers(0, 0xFFFF)), dport=draw(st.integers(0, 0xFFFF))), 8
    elif l4_kind == "icmp":
        body, l4_len = icmp(draw(st.integers(0, 255)), draw(st.integers(0, 255)), payload), 4
    else:
        body, l4_len = payload, 0
    proto = {"tcp": 6, "udp": 17, "icmp": 1 if l3 == "ipv4" else 58,
             "other": draw(st.sampled_from([200, 253, 254]))}[l4_kind]
    if l3 == "ipv4":
        opts4 = bytes([1]) * (4 * draw(st.integers(0, 10)))
        ip = ipv4(proto, body, ttl=draw(st.integers(0, 255)), options=opts4)
        frame = eth(0x0800, ip, tags)
        l3_len = 20 + len(opts4)
    elif l3 == "ipv6":
        ip = ipv6(proto, body, hlim=draw(st.integers(0, 255)))
        frame, l3_len = eth(0x86DD, ip, tags), 40
    else:
        frame, l3_len, l4_len, ip = eth(0x0806, body, tags), 0, 0, body
    # (IPv6 payload length 0 is a jumbogram's to dpkt, which then takes the padding as payload)
    padding = bytes(draw(st.integers(0, 20)) if l3 != "ipv6" or body else 0)
    l2_len = 14 + 4 * n_tags
    info = {"headers_end": l2_len + l3_len + l4_len, "ip_end": l2_len + len(ip) if l3 != "arp" else 0}
    return frame + padding, info


def dpkt_columns(frame: bytes) -> dict[str, Any]:
    """Every column, as dpkt parses the frame."""
    e = dpkt.ethernet.Ethernet(frame)
    tags = getattr(e, "vlan_tags", [])
    c: dict[str, Any] = {name: 0 for name, _, _ in COLUMNS}
    c["ip6_src"] = c["ip6_dst"] = bytes(16)
    c.update(dst_mac=int.from_bytes(e.dst, "big"), src_mac=int.from_bytes(e.src, "big"),
             vlan_count=len(tags), vlan_id=tags[0].id if tags else 0,
             ethertype=tags[-1].type if tags else e.type)
    l2 = 14 + 4 * len(tags)
    ip = e.data
    if isinstance(ip, dpkt.ip.IP):
        c.update(ip_version=4, ip_src=int.from_bytes(ip.src, "big"), ip_dst=int.from_bytes(ip.dst, "big"),
                 protocol=ip.p, ttl=ip.ttl)
        off, ip_len = l2 + ip.hl * 4, ip.len
    elif isinstance(ip, dpkt.ip6.IP6):
        c.update(ip_version=6, ip6_src=ip.src, ip6_dst=ip.dst, protocol=ip.nxt, ttl=ip.hlim)
        off, ip_len = l2 + 40, 40 + ip.plen
    else:
        c.update(payload_offset=l2, payload_length=len(frame) - l2)
        return c
    l4 = ip.data
    if isinstance(l4, dpkt.tcp.TCP):
        c.update(src_port=l4.sport, dst_port=l4.dport, tcp_flags=l4.flags)
        off += l4.off * 4
        c["payload_length"] = len(l4.data)
    elif isinstance(l4, dpkt.udp.UDP):
        c.update(src_port=l4.sport, dst_port=l4.dport)
        off += 8
        c["payload_length"] = len(l4.data)
    elif isinstance(l4, (dpkt.icmp.ICMP, dpkt.icmp6.ICMP6)):
        c.update(icmp_type=l4.type, icmp_code=l4.code)
        off += 4
        c["payload_length"] = len(l4) - 4
    else:
        assert isinstance(l4, bytes)    # a protocol dpkt does not parse either
        c["payload_length"] = len(l4)
    assert c["payload_length"] == l2 + ip_len - off
    c["payload_offset"] = off
    return c


@settings(max_examples=300, deadline=None)
@given(st.lists(packets(), min_size=1, max_size=12), st.data())
def test_every_column_matches_dpkt_on_random_packets(burst, data):
    width = max(len(f) for f, _ in burst) + data.draw(st.integers(0, 8))
    rows = np.zeros((len(burst), width), np.uint8)
    for i, (f, _) in enumerate(burst):
        rows[i, :len(f)] = np.frombuffer(f, np.uint8)
    cuts = [data.draw(st.integers(0, len(f))) if data.draw(st.booleans()) else len(f) for f, _ in burst]
    lengths = np.array(cuts, np.uint32)
    got = HeaderParser(4).parse(rows, lengths)
    for i, ((frame, info), cut) in enumerate(zip(burst, cuts)):
        row = {n: (bytes(v[i]) if v.ndim == 2 else int(v[i])) for n, v in got.items()}
        want = dpkt_columns(frame)
        if cut == len(frame):
            assert row == want, (i, frame.hex())
            continue
        truncated = cut < info["headers_end"] or cut < info["ip_end"]
        assert bool(row["flags"] & TRUNCATED) == truncated, (i, cut, frame.hex())
        if cut >= info["headers_end"]:
            assert {n: v for n, v in row.items() if n not in ("flags", "payload_length")} == \
                   {n: v for n, v in want.items() if n not in ("flags", "payload_length")}, (i, cut)
