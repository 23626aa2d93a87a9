"""RSS and hash report (Virtio 1.2 5.1.6.4.3, 5.1.6.5.7): the hash, the device, the driver.

The Toeplitz vectors are Microsoft's, from "Verifying the RSS Hash Calculation"
(Windows Driver Kit documentation, NDIS receive side scaling): the 40-byte key
below, each row's hash over the IP addresses alone and over addresses and ports.
"""

from __future__ import annotations

import socket
import struct

import pytest

from pmd.abi import virtio_net as N
from pmd.abi._rss import rss_hash, rss_input, toeplitz_hash

# Microsoft's verification key (also DPDK's and Linux's test key).
MS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c"
                       "6a42b73bbeac01fa")

# (destination, destination port, source, source port, IPv4/IPv6 hash, with TCP ports)
MS_IPV4 = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323E8FC2, 0x51CCC178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xD718262A, 0xC626B0EA),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xD2D0A5DE, 0x5C2B394A),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xAFC7327F),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5D1809C5, 0x10E828A2),
]
MS_IPV6 = [
    ("3ffe:2501:200:3::1", 1766, "3ffe:2501:200:1fff::7", 2794, 0x2CC18CD5, 0x40207D3D),
    ("ff02::1", 4739, "3ffe:501:8::260:97ff:fe40:efab", 14230, 0x0F0C461C, 0xDDE51BBF),
    ("fe80::200:f8ff:fe21:67cf", 38024, "3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, 0x4B61E985, 0x02D1FEEF),
]

ALL_TYPES = (N.HASH_TYPE_IPv4 | N.HASH_TYPE_TCPv4 | N.HASH_TYPE_UDPv4 | N.HASH_TYPE_IPv6
             | N.HASH_TYPE_TCPv6 | N.HASH_TYPE_UDPv6)


def _addr(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def frame(src: str, dst: str, proto: int = 6, sport: int = 0, dport: int = 0, *, frag: int = 0,
          vlan: bool = False) -> bytes:
    """An Ethernet frame with an IPv4 or IPv6 header and 20 bytes of TCP/UDP header."""
    eth = bytes(6) + bytes.fromhex("020000000001")
    if vlan:
        eth += b"\x81\x00\x00\x05"
    l4 = struct.pack(">HHI", sport, dport, 0) + bytes(12)
    if ":" in src:
        ip = struct.pack(">IHBB", 6 << 28, len(l4), proto, 64) + _addr(src) + _addr(dst)
        return eth + b"\x86\xdd" + ip + l4
    ip = struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(l4), 0, frag, 64, proto, 0) + _addr(src) + _addr(dst)
    return eth + b"\x08\x00" + ip + l4


@pytest.mark.parametrize("dst,dport,src,sport,ip_hash,tcp_hash", MS_IPV4)
def test_toeplitz_microsoft_ipv4_vectors(dst, dport, src, sport, ip_hash, tcp_hash):
    addrs = _addr(src) + _addr(dst)
    assert toeplitz_hash(MS_KEY, addrs) == ip_hash
    assert toeplitz_hash(MS_KEY, addrs + struct.pack(">HH", sport, dport)) == tcp_hash


@pytest.mark.parametrize("dst,dport,src,sport,ip_hash,tcp_hash", MS_IPV6)
def test_toeplitz_microsoft_ipv6_vectors(dst, dport, src, sport, ip_hash, tcp_hash):
    addrs = _addr(src) + _addr(dst)
    assert toeplitz_hash(MS_KEY, addrs) == ip_hash
    assert toeplitz_hash(MS_KEY, addrs + struct.pack(">HH", sport, dport)) == tcp_hash


@pytest.mark.parametrize("dst,dport,src,sport,ip_hash,tcp_hash", MS_IPV4 + MS_IPV6)
def test_hash_of_a_tcp_frame_is_the_microsoft_value(dst, dport, src, sport, ip_hash, tcp_hash):
    # 5.1.6.4.3.2/3: TCP enabled: addresses and ports; only IP enabled: addresses
    f = frame(src, dst, 6, sport, dport)
    v6 = ":" in src
    assert rss_hash(f, MS_KEY, ALL_TYPES) == (tcp_hash, N.HASH_REPORT_TCPv6 if v6 else N.HASH_REPORT_TCPv4)
    ip_only = N.HASH_TYPE_IPv6 if v6 else N.HASH_TYPE_IPv4
    assert rss_hash(f, MS_KEY, ip_only) == (ip_hash, N.HASH_REPORT_IPv6 if v6 else N.HASH_REPORT_IPv4)


def test_udp_is_hashed_with_ports_only_when_udp_is_enabled():
    f = frame("66.9.149.187", "161.142.100.80", 17, 2794, 1766)
    assert rss_hash(f, MS_KEY, ALL_TYPES) == (0x51CCC178, N.HASH_REPORT_UDPv4)
    assert rss_hash(f, MS_KEY, N.HASH_TYPE_IPv4 | N.HASH_TYPE_TCPv4) == (0x323E8FC2, N.HASH_REPORT_IPv4)


def test_packet_with_no_enabled_type_is_not_hashed():
    # 5.1.6.4.3.2: "Else the device does not calculate the hash"
    f = frame("66.9.149.187", "161.142.100.80", 6, 2794, 1766)
    assert rss_hash(f, MS_KEY, N.HASH_TYPE_IPv6 | N.HASH_TYPE_TCPv6) == (0, N.HASH_REPORT_NONE)
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert rss_hash(arp, MS_KEY, ALL_TYPES) == (0, N.HASH_REPORT_NONE)


def test_ipv4_fragment_is_hashed_on_addresses_only():
    f = frame("66.9.149.187", "161.142.100.80", 6, 2794, 1766, frag=0x2000)   # more fragments
    assert rss_hash(f, MS_KEY, ALL_TYPES) == (0x323E8FC2, N.HASH_REPORT_IPv4)


def test_vlan_tagged_frame_is_hashed_past_the_tag():
    f = frame("66.9.149.187", "161.142.100.80", 6, 2794, 1766, vlan=True)
    assert rss_hash(f, MS_KEY, ALL_TYPES) == (0x51CCC178, N.HASH_REPORT_TCPv4)


def test_ipv6_extension_headers_are_skipped():
    # 5.1.6.4.3.4: without the _EX types, skip extension headers and hash as without them.
    # A hop-by-hop options header (next header 0), 8 bytes, then TCP.
    src, dst = "3ffe:2501:200:1fff::7", "3ffe:2501:200:3::1"
    hbh = bytes([6, 0]) + bytes(6)
    eth = bytes(6) + bytes.fromhex("020000000001") + b"\x86\xdd"
    l4 = struct.pack(">HHI", 2794, 1766, 0) + bytes(12)
    ip = struct.pack(">IHBB", 6 << 28, len(hbh) + len(l4), 0, 64) + _addr(src) + _addr(dst)
    assert rss_hash(eth + ip + hbh + l4, MS_KEY, ALL_TYPES) == (0x40207D3D, N.HASH_REPORT_TCPv6)


@pytest.mark.parametrize("cut", [0, 5, 13, 14, 20, 33, 34, 37, 38, 40])
def test_truncated_frame_is_never_read_past_its_end(cut):
    # Shorter than its headers: less classified (addresses only, or none), never a crash.
    f = frame("66.9.149.187", "161.142.100.80", 6, 2794, 1766)[:cut]
    data, report = rss_input(f, ALL_TYPES)
    # 14 Ethernet + 20 IPv4 bytes give the addresses, 4 more the ports
    want = N.HASH_REPORT_TCPv4 if cut >= 38 else N.HASH_REPORT_IPv4 if cut >= 34 else N.HASH_REPORT_NONE
    assert report == want
    assert len(data) == {N.HASH_REPORT_TCPv4: 12, N.HASH_REPORT_IPv4: 8, N.HASH_REPORT_NONE: 0}[report]


def test_toeplitz_hash_refuses_a_key_too_short_for_its_input():
    with pytest.raises(ValueError, match="key needs at least 16"):
        toeplitz_hash(MS_KEY[:8], bytes(12))


# ---- the built-in device and the driver together (in one process, LocalAccess) ----

import time  # noqa: E402

import numpy as np  # noqa: E402

import pmd  # noqa: E402
from pmd.abi import virtio as V  # noqa: E402
from pmd.backends.local import LocalAccess  # noqa: E402
from pmd.driver.port import DEFAULT_RSS_KEY  # noqa: E402
from pmd.errors import DeviceError, PmdError  # noqa: E402
from pmd.sim.model import SimOptions, VirtioNetModel  # noqa: E402
from pmd.sim.wires import GEN_PAYLOAD, GeneratorWire, LoopbackWire  # noqa: E402

PAIRS = 4


@pytest.fixture(params=["", "MRG_RXBUF"], ids=["mergeable", "one-buffer"])
def rss_port(request):
    """A port with four queue pairs on the built-in device, loopback wire: what is sent on
    transmit queue 0 comes back through the device's steering. With and without mergeable
    buffers: the driver reads the hash in either harvest."""
    model = VirtioNetModel(queue_pairs=PAIRS, wire=LoopbackWire())
    port = pmd.open_port(LocalAccess(model), name="sim", disable=request.param)
    port.start(queue_pairs=PAIRS)
    yield port, model
    port.close()
    model.close()


class Flow:
    """A packet and, computed here from its fields (not from the frame), its expected hash."""

    def __init__(self, src: str, dst: str, proto: int, sport: int, dport: int) -> None:
        self.frame = frame(src, dst, proto, sport, dport)
        self.v6 = ":" in src
        self.input = _addr(src) + _addr(dst) + struct.pack(">HH", sport, dport)
        self.report = {(False, 6): N.HASH_REPORT_TCPv4, (False, 17): N.HASH_REPORT_UDPv4,
                       (True, 6): N.HASH_REPORT_TCPv6, (True, 17): N.HASH_REPORT_UDPv6}[self.v6, proto]

    def hash(self, key: bytes) -> int:
        return toeplitz_hash(key, self.input)


def flows(n: int = 240) -> list[Flow]:
    out = []
    for i in range(n):
        proto = 6 if i % 3 else 17
        if i % 4 == 3:
            out.append(Flow(f"2001:db8::{i:x}", "2001:db8:1::1", proto, 1024 + i, 443))
        else:
            out.append(Flow(f"10.{i % 5}.{i % 7}.{i % 251}", "192.0.2.1", proto, 1024 + i, 80))
    return out


def send(port, frames: list[bytes]) -> None:
    rows = np.zeros((len(frames), 128), np.uint8)
    lens = np.zeros(len(frames), np.uint32)
    for i, f in enumerate(frames):
        rows[i, :len(f)] = np.frombuffer(f, np.uint8)
        lens[i] = len(f)
    sent, deadline = 0, time.monotonic() + 5
    while sent < len(frames) and time.monotonic() < deadline:
        sent += port.tx_burst(rows[sent:sent + 32], lens[sent:sent + 32])
        time.sleep(0)
    assert sent == len(frames)


def receive_all(port, want: int, *, zero_copy: bool = False, timeout: float = 5.0):
    """Every packet on every queue: (queue, frame bytes, hash, hash type) in arrival order."""
    got = []
    out = np.zeros((64, 2048), np.uint8)
    ids = np.zeros(64, np.uint32)
    lens = np.zeros(64, np.uint32)
    hashes = np.zeros(64, np.uint32)
    types = np.zeros(64, np.uint16)
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for q in range(port.queue_pairs):
            if zero_copy:
                n = port.rx_burst_zc(ids, lens, q, hashes=hashes, hash_types=types)
                data = port.pool(q).data
                got += [(q, data[ids[i], :lens[i]].tobytes(), int(hashes[i]), int(types[i])) for i in range(n)]
                port.pool(q).free(ids[:n])
            else:
                n = port.rx_burst(out, lens, q, hashes=hashes, hash_types=types)
                got += [(q, out[i, :lens[i]].tobytes(), int(hashes[i]), int(types[i])) for i in range(n)]
        time.sleep(0)
    return got


def test_device_offers_rss_and_hash_report_only_with_several_queue_pairs():
    rss = V.bit(N.NET_RSS) | V.bit(N.NET_HASH_REPORT)
    assert SimOptions(queue_pairs=1).offered & rss == 0
    assert SimOptions(queue_pairs=2).offered & rss == rss
    assert SimOptions(queue_pairs=2, features_off="CTRL_VQ").offered & rss == 0    # 5.1.3.1


def test_device_configuration_has_the_rss_limits():
    # 5.1.4.1: rss_max_key_size >= 40, rss_max_indirection_table_length >= 128
    model = VirtioNetModel(queue_pairs=2)
    try:
        cfg = model._device_config()
        assert cfg[N.NET_CFG_RSS_MAX_KEY_SIZE] == 40
        assert struct.unpack_from("<H", cfg, N.NET_CFG_RSS_MAX_TABLE_LENGTH)[0] == 128
        assert struct.unpack_from("<I", cfg, N.NET_CFG_SUPPORTED_HASH_TYPES)[0] == ALL_TYPES
    finally:
        model.close()


def test_port_with_several_queues_negotiates_rss_and_configures_it_at_start(rss_port):
    port, model = rss_port
    assert port.features & V.bit(N.NET_RSS) and port.features & V.bit(N.NET_HASH_REPORT)
    assert port.hdr_len == 20
    info = port.info()["rss"]
    assert info["steering"] and info["hash_report"] and info["entries"] == 128
    assert info["table"] == [i % PAIRS for i in range(128)] and info["key"] == DEFAULT_RSS_KEY
    assert model.engine.rss.redirect and model.engine.rss.table == info["table"]


def test_each_packet_arrives_on_the_queue_its_toeplitz_hash_names(rss_port):
    # 5.1.6.5.7.2: queue = indirection_table[hash & mask]; 5.1.6.4.4: hash_value, hash_report
    port, _ = rss_port
    fl = flows()
    send(port, [f.frame for f in fl])
    got = receive_all(port, len(fl))
    assert len(got) == len(fl)
    by_frame = {f.frame: f for f in fl}
    table = port.rss["table"]
    for q, data, h, t in got:
        f = by_frame[data]
        assert h == f.hash(DEFAULT_RSS_KEY) and t == f.report
        assert q == table[h & (len(table) - 1)]
    assert {q for q, *_ in got} == set(range(PAIRS))          # spread over every queue


def test_zero_copy_receive_reports_the_same_hashes(rss_port):
    port, _ = rss_port
    fl = flows(64)
    send(port, [f.frame for f in fl])
    got = receive_all(port, len(fl), zero_copy=True)
    by_frame = {f.frame: f for f in fl}
    assert sorted((by_frame[d].hash(DEFAULT_RSS_KEY), by_frame[d].report) for _, d, _, _ in got) == \
        sorted((h, t) for _, _, h, t in got)
    assert len(got) == 64


def test_packet_that_is_not_hashed_goes_to_the_unclassified_queue(rss_port):
    port, _ = rss_port
    table = [0] * 128
    # unclassified_queue 2 (5.1.6.5.7.2: "the device directs the packet to ... unclassified_queue")
    port.ctrl_command(N.CTRL_MQ, N.CTRL_MQ_RSS_CONFIG, N.rss_config(ALL_TYPES, table, 2, PAIRS, DEFAULT_RSS_KEY))
    arp = bytes(6) + bytes.fromhex("020000000001") + b"\x08\x06" + bytes(46)
    send(port, [arp] * 3)
    got = receive_all(port, 3)
    assert [(q, h, t) for q, _, h, t in got] == [(2, 0, N.HASH_REPORT_NONE)] * 3


def test_set_rss_table_moves_every_flow(rss_port):
    port, _ = rss_port
    port.set_rss(table=[3] * 64)
    fl = flows(40)
    send(port, [f.frame for f in fl])
    got = receive_all(port, len(fl))
    assert len(got) == 40 and {q for q, *_ in got} == {3}
    assert port.rss["entries"] == 64


def test_set_rss_key_and_hash_types_change_the_hash(rss_port):
    port, _ = rss_port
    key = bytes(range(1, 41))
    port.set_rss(key=key, hash_types="IPv4,IPv6")
    fl = flows(24)
    send(port, [f.frame for f in fl])
    got = receive_all(port, len(fl))
    by_frame = {f.frame: f for f in fl}
    for q, data, h, t in got:
        f = by_frame[data]
        n_addr = 32 if f.v6 else 8      # addresses only: 5.1.6.4.3.2 "Else if ... IPv4 is set"
        assert h == toeplitz_hash(key, f.input[:n_addr])
        assert t == (N.HASH_REPORT_IPv6 if f.v6 else N.HASH_REPORT_IPv4)
        assert q == port.rss["table"][h & 127]


def test_set_rss_refuses_what_the_device_cannot_take(rss_port):
    port, _ = rss_port
    with pytest.raises(ValueError, match="1 to 40"):
        port.set_rss(key=bytes(41))
    with pytest.raises(ValueError, match="power of two"):
        port.set_rss(table=[0, 1, 2])
    with pytest.raises(ValueError, match="power of two"):
        port.set_rss(table=[0] * 256)
    with pytest.raises(ValueError, match="not an rx queue"):
        port.set_rss(table=[0, PAIRS])
    with pytest.raises(ValueError, match="not supported"):
        port.set_rss(hash_types="IP_EX")
    with pytest.raises(ValueError, match="unknown hash type"):
        port.set_rss(hash_types="SCTP")
    with pytest.raises(TypeError, match="bytes"):
        port.set_rss(key="abc")
    assert port.rss["table"] == [i % PAIRS for i in range(128)]     # nothing changed


def test_hash_arrays_are_checked_with_a_remedy(rss_port):
    port, _ = rss_port
    out, lens = np.zeros((8, 2048), np.uint8), np.zeros(8, np.uint32)
    with pytest.raises(TypeError, match="uint32"):
        port.rx_burst(out, lens, hashes=np.zeros(8, np.uint64))
    with pytest.raises(ValueError, match="at least one entry per packet"):
        port.rx_burst(out, lens, hashes=np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match="1-D"):
        port.rx_burst(out, lens, hash_types=np.zeros((8, 1), np.uint16))
    with pytest.raises(TypeError, match="uint16"):
        port.rx_burst(out, lens, hash_types=np.zeros(8, np.int32))
    with pytest.raises(ValueError, match="at least one entry per packet"):
        port.rx_burst_zc(np.zeros(8, np.uint32), lens, hash_types=np.zeros(2, np.uint16))
    ro = np.zeros(8, np.uint32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        port.rx_burst(out, lens, hashes=ro)


def test_hash_types_may_be_uint8(rss_port):
    port, _ = rss_port
    fl = flows(8)
    send(port, [f.frame for f in fl])
    out, lens, types = np.zeros((64, 2048), np.uint8), np.zeros(64, np.uint32), np.zeros(64, np.uint8)
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 8 and time.monotonic() < deadline:
        for q in range(PAIRS):
            n = port.rx_burst(out, lens, q, hash_types=types)
            seen += [int(types[i]) for i in range(n)]
    assert sorted(seen) == sorted(f.report for f in fl)


def test_hashes_need_the_hash_report():
    model = VirtioNetModel(queue_pairs=2, wire=LoopbackWire())
    port = pmd.open_port(LocalAccess(model), name="sim")
    try:
        port.start(queue_pairs=1)            # one queue: RSS and HASH_REPORT are not taken
        assert port.hdr_len == 12 and port.rss is None
        with pytest.raises(ValueError, match="HASH_REPORT"):
            port.rx_burst(np.zeros((8, 2048), np.uint8), np.zeros(8, np.uint32), hashes=np.zeros(8, np.uint32))
        with pytest.raises(PmdError, match="not negotiated"):
            port.set_rss(table=[0])
    finally:
        port.close()
        model.close()


def test_driver_that_disables_rss_still_works_with_everything_on_queue_0():
    model = VirtioNetModel(queue_pairs=2, wire=LoopbackWire())
    port = pmd.open_port(LocalAccess(model), name="sim", disable="RSS,HASH_REPORT")
    try:
        port.start(queue_pairs=2)
        assert not port.features & (V.bit(N.NET_RSS) | V.bit(N.NET_HASH_REPORT))
        assert port.hdr_len == 12 and port.rss is None and not model.engine.rss.active
        fl = flows(48)
        send(port, [f.frame for f in fl])
        out, lens = np.zeros((64, 2048), np.uint8), np.zeros(64, np.uint32)
        got = [0, 0]
        deadline = time.monotonic() + 5
        while sum(got) < 48 and time.monotonic() < deadline:
            for q in (0, 1):
                got[q] += port.rx_burst(out, lens, q)
            time.sleep(0)
        assert got == [48, 0]          # automatic steering: back on the pair they were sent on
    finally:
        port.close()
        model.close()


def test_hash_report_without_rss_is_configured_with_hash_config():
    # A device offering HASH_REPORT but not RSS (5.1.6.5.6.4): the hash is reported, not steered.
    model = VirtioNetModel(queue_pairs=2, wire=LoopbackWire())
    port = pmd.open_port(LocalAccess(model), name="sim", disable="RSS")
    try:
        port.start(queue_pairs=2)
        assert port.hdr_len == 20 and not port.rss["steering"]
        assert model.engine.rss.active and not model.engine.rss.redirect
        fl = flows(32)
        send(port, [f.frame for f in fl])
        got = receive_all(port, 32)
        by_frame = {f.frame: f for f in fl}
        assert all(q == 0 and h == by_frame[d].hash(DEFAULT_RSS_KEY) and t == by_frame[d].report
                   for q, d, h, t in got) and len(got) == 32
        with pytest.raises(PmdError, match="VIRTIO_NET_F_RSS"):
            port.set_rss(table=[0, 1])
    finally:
        port.close()
        model.close()


def test_generator_flows_are_spread_by_the_hash_of_their_tuple():
    # The generator's flow f: 198.18.0.1:(1024 + f) -> 198.18.0.2:9, UDP.
    model = VirtioNetModel(queue_pairs=2, wire=GeneratorWire(flows=16))
    port = pmd.open_port(LocalAccess(model), name="sim")
    try:
        port.start(queue_pairs=2)
        out, lens = np.zeros((64, 2048), np.uint8), np.zeros(64, np.uint32)
        hashes, types = np.zeros(64, np.uint32), np.zeros(64, np.uint16)
        # Packets delivered before RSS_CONFIG was taken were steered automatically: drain them
        for q in (0, 1):
            while port.rx_burst(out, lens, q):
                pass
        per_queue = [0, 0]
        deadline = time.monotonic() + 5
        while min(per_queue) < 200 and time.monotonic() < deadline:
            for q in (0, 1):
                n = port.rx_burst(out, lens, q, hashes=hashes, hash_types=types)
                for i in range(n):
                    f = int.from_bytes(out[i, GEN_PAYLOAD + 4:GEN_PAYLOAD + 8].tobytes(), "little")
                    tup = _addr("198.18.0.1") + _addr("198.18.0.2") + struct.pack(">HH", 1024 + f, 9)
                    h = toeplitz_hash(DEFAULT_RSS_KEY, tup)
                    assert (hashes[i], types[i]) == (h, N.HASH_REPORT_UDPv4)
                    assert q == port.rss["table"][h & 127]
                per_queue[q] += n
            time.sleep(0)
        assert min(per_queue) >= 200, per_queue
    finally:
        port.close()
        model.close()


# ---- the device's checks of RSS_CONFIG and HASH_CONFIG (every value is the driver's) ----

@pytest.fixture
def raw_port():
    """Four queue pairs, RSS on; commands sent as raw bytes through the control queue."""
    model = VirtioNetModel(queue_pairs=PAIRS, wire=LoopbackWire())
    port = pmd.open_port(LocalAccess(model), name="sim")
    port.start(queue_pairs=PAIRS)
    yield port, model
    port.close()
    model.close()


def _rss_cmd(port, data: bytes) -> None:
    port.ctrl_command(N.CTRL_MQ, N.CTRL_MQ_RSS_CONFIG, data)


def _hash_cmd(port, data: bytes) -> None:
    port.ctrl_command(N.CTRL_MQ, N.CTRL_MQ_HASH_CONFIG, data)


def _refused(port, model, send_it, data: bytes) -> None:
    """The device answers VIRTIO_NET_ERR, keeps its configuration, and still steers."""
    before = (model.engine.rss.table, model.engine.rss.key, model.engine.rss.hash_types)
    with pytest.raises(DeviceError, match="refused"):
        send_it(port, data)
    assert (model.engine.rss.table, model.engine.rss.key, model.engine.rss.hash_types) == before
    fl = flows(8)
    send(port, [f.frame for f in fl])
    assert len(receive_all(port, 8)) == 8


GOOD = N.rss_config(ALL_TYPES, [0, 1, 2, 3] * 32, 0, PAIRS, DEFAULT_RSS_KEY)


def test_a_good_rss_config_is_taken(raw_port):
    port, model = raw_port
    _rss_cmd(port, N.rss_config(N.HASH_TYPE_IPv4, [3, 2], 1, 2, b"k" * 40))
    rss = model.engine.rss
    assert (rss.table, rss.key, rss.hash_types, rss.unclassified_queue) == ([3, 2], b"k" * 40, 1, 1)
    assert model.engine.active_pairs == 4                 # the queues it names are in use


def test_rss_config_short_command_is_refused(raw_port):
    port, model = raw_port
    for cut in (0, 1, 4, 7, 8, 9, 100, len(GOOD) - 41, len(GOOD) - 1):
        _refused(port, model, _rss_cmd, GOOD[:cut])


def test_rss_config_with_bytes_after_the_key_is_refused(raw_port):
    port, model = raw_port
    _refused(port, model, _rss_cmd, GOOD + b"\0")


def test_rss_config_key_longer_than_rss_max_key_size_is_refused(raw_port):
    port, model = raw_port
    _refused(port, model, _rss_cmd, N.rss_config(ALL_TYPES, [0, 1], 0, PAIRS, bytes(41)))
    _refused(port, model, _rss_cmd, N.rss_config(ALL_TYPES, [0, 1], 0, PAIRS, bytes(255)))


def test_rss_config_table_length_not_a_power_of_two_is_refused(raw_port):
    port, model = raw_port
    for n in (3, 6, 100):
        _refused(port, model, _rss_cmd, N.rss_config(ALL_TYPES, [0] * n, 0, PAIRS, DEFAULT_RSS_KEY))


def test_rss_config_table_longer_than_the_maximum_is_refused(raw_port):
    port, model = raw_port
    _refused(port, model, _rss_cmd, N.rss_config(ALL_TYPES, [0] * 256, 0, PAIRS, DEFAULT_RSS_KEY))
    # the largest mask: 65536 entries claimed by a short command
    _refused(port, model, _rss_cmd, struct.pack("<IHH", ALL_TYPES, 0xFFFF, 0) + bytes(64))


def test_rss_config_queue_beyond_the_queues_is_refused(raw_port):
    port, model = raw_port
    for q in (PAIRS, 0x7FFF, 0x8000, 0xFFFF):           # 0x8000: the reserved bit 15
        _refused(port, model, _rss_cmd, N.rss_config(ALL_TYPES, [0, q], 0, PAIRS, DEFAULT_RSS_KEY))


def test_rss_config_unclassified_queue_beyond_the_queues_is_refused(raw_port):
    port, model = raw_port
    _refused(port, model, _rss_cmd, N.rss_config(ALL_TYPES, [0, 1], PAIRS, PAIRS, DEFAULT_RSS_KEY))


def test_rss_config_max_tx_vq_out_of_range_is_refused(raw_port):
    port, model = raw_port
    for m in (0, PAIRS + 1):
        _refused(port, model, _rss_cmd, N.rss_config(ALL_TYPES, [0, 1], 0, m, DEFAULT_RSS_KEY))


def test_rss_config_unsupported_hash_type_is_refused(raw_port):
    port, model = raw_port
    for t in (N.HASH_TYPE_IP_EX, N.HASH_TYPE_TCP_EX, 1 << 31):
        _refused(port, model, _rss_cmd, N.rss_config(t | N.HASH_TYPE_IPv4, [0, 1], 0, PAIRS, DEFAULT_RSS_KEY))


def test_hash_config_short_command_is_refused(raw_port):
    port, model = raw_port
    good = N.hash_config(ALL_TYPES, DEFAULT_RSS_KEY)
    for cut in (0, 3, 12, len(good) - 1):
        _refused(port, model, _hash_cmd, good[:cut])
    _refused(port, model, _hash_cmd, good + b"\0")


def test_hash_config_key_longer_than_rss_max_key_size_is_refused(raw_port):
    port, model = raw_port
    _refused(port, model, _hash_cmd, N.hash_config(ALL_TYPES, bytes(41)))


def test_hash_config_reserved_not_zero_is_refused(raw_port):
    port, model = raw_port
    data = bytearray(N.hash_config(ALL_TYPES, DEFAULT_RSS_KEY))
    data[6] = 1                                         # 5.1.6.5.6.4: "reserved MUST contain zeroes"
    _refused(port, model, _hash_cmd, bytes(data))


def test_rss_config_without_rss_negotiated_is_refused():
    model = VirtioNetModel(queue_pairs=2, wire=LoopbackWire())
    port = pmd.open_port(LocalAccess(model), name="sim", disable="RSS")
    try:
        port.start(queue_pairs=2)
        with pytest.raises(DeviceError, match="refused"):
            _rss_cmd(port, N.rss_config(ALL_TYPES, [0, 1], 0, 2, DEFAULT_RSS_KEY))
        assert not model.engine.rss.redirect
    finally:
        port.close()
        model.close()


def test_vq_pairs_set_after_rss_config_goes_back_to_automatic_steering(raw_port):
    # 5.1.6.5.6: "the resulting device configuration is defined by the last command"
    port, model = raw_port
    port.ctrl_command(N.CTRL_MQ, N.CTRL_MQ_VQ_PAIRS_SET, (2).to_bytes(2, "little"))
    assert not model.engine.rss.redirect and model.engine.rss.hash_types == ALL_TYPES
    fl = flows(16)
    send(port, [f.frame for f in fl])
    got = receive_all(port, 16)
    assert {q for q, *_ in got} == {0} and all(h == by.hash(DEFAULT_RSS_KEY) for (_, _, h, _), by in
                                               zip(sorted(got, key=lambda g: g[1]),
                                                   sorted(fl, key=lambda f: f.frame)))


def test_random_rss_commands_never_break_the_device(raw_port):
    import random

    port, model = raw_port
    rnd = random.Random(12)
    for i in range(300):
        base = bytearray(GOOD if i % 2 else N.hash_config(ALL_TYPES, DEFAULT_RSS_KEY))
        for _ in range(rnd.randint(1, 4)):                 # flip bytes, cut or grow
            op = rnd.random()
            if op < 0.6 and base:
                base[rnd.randrange(len(base))] = rnd.randrange(256)
            elif op < 0.8:
                del base[rnd.randrange(len(base) + 1):]
            else:
                base += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        try:
            (_rss_cmd if i % 2 else _hash_cmd)(port, bytes(base))
        except DeviceError as e:
            assert "refused" in str(e)
    assert model.engine.running and model.engine.error is None
    port.set_rss(table=[0, 1, 2, 3])                    # and a good one is still taken
    fl = flows(16)
    send(port, [f.frame for f in fl])
    assert len(receive_all(port, 16)) == 16


# ---- pmd fwd: the generator's flows over several queues ----

@pytest.mark.parametrize("flows_n", [2, 8])
def test_fwd_with_two_queues_and_several_flows_uses_both_queues(flows_n):
    # pmd fwd --queues 2 --flows N on the built-in device in its own process: RSS spreads
    # the flows (with the default key, flows 0 and 1 hash to queues 0 and 1 of two).
    from pmd import fwd

    with pmd.open_port("sim", wire="generator", rate=0, flows=flows_n, queue_pairs=2) as p:
        p.start(queue_pairs=2)
        assert p.rss is not None and p.rss["steering"]
        summary = fwd.run(p, "rxonly", queues=2, duration=0.8, report=lambda line: None)
        per_queue = [p.rx_queue(q).stats()["packets"] for q in (0, 1)]
    assert summary.rx_packets > 0
    assert min(per_queue) > 0.2 * max(per_queue), per_queue


# ---- QEMU's own RSS, in the guest (tests/vm/harness.py --rss) ----
#
# QEMU's virtio-net-pci with mq=on,rss=on,hash=on on a two-queue tap, bound to vfio-pci.
# The tap's ingress is redirected to its egress, so what pmd sends on transmit queue 0
# comes back through QEMU's receive path, where QEMU (not pmd) hashes and steers it.

import os  # noqa: E402

RSS_DEVICE = os.environ.get("PMD_VFIO_RSS_DEVICE")
QEMU_WAIT = 30.0          # seconds for a burst to come back under TCG


@pytest.mark.vfio
@pytest.mark.skipif(not RSS_DEVICE, reason="PMD_VFIO_RSS_DEVICE is not set: runs in the QEMU guest "
                    "(tests/vm/harness.py --rss: virtio-net-pci,rss=on,hash=on on a looped-back multi-queue tap)")
class TestQemuRss:
    """The driver against QEMU's RSS and hash report (Virtio 1.2 5.1.6.4.3, 5.1.6.5.7).

    QEMU's ``_EX`` hash types take precedence over the plain ones in its choice, and pmd
    does not compute them, so these tests enable the plain types only (:data:`ALL_TYPES`).
    """

    @pytest.fixture
    def qport(self):
        port = pmd.open_port(RSS_DEVICE)
        try:
            port.start(queue_pairs=2)
            port.set_rss(hash_types=ALL_TYPES)
            yield port
        finally:
            port.close()

    @staticmethod
    def ours(port, fl: list, *, zero_copy: bool = False) -> list:
        """Send ``fl`` on queue 0 and take back what returns, only the frames we sent."""
        send(port, [f.frame for f in fl])
        sent = {f.frame for f in fl}
        got = receive_all(port, len(fl), zero_copy=zero_copy, timeout=QEMU_WAIT)
        return [g for g in got if g[1] in sent]

    def test_qemu_offers_rss_and_hash_report_and_the_port_takes_them(self, qport):
        assert qport.features & V.bit(N.NET_RSS) and qport.features & V.bit(N.NET_HASH_REPORT)
        assert qport.hdr_len == 20 and qport.queue_pairs == 2
        rss = qport.rss
        assert rss["steering"] and rss["hash_report"] and rss["entries"] == 128
        assert rss["table"] == [i % 2 for i in range(128)]

    def test_each_packet_arrives_on_the_queue_qemus_hash_names_with_that_hash(self, qport):
        # 5.1.6.5.7.2: queue = indirection_table[hash & mask]; 5.1.6.4.4: hash_value, hash_report
        fl = flows(96)
        got = self.ours(qport, fl)
        assert len(got) == len(fl), f"{len(got)} of {len(fl)} frames came back"
        by_frame = {f.frame: f for f in fl}
        table = qport.rss["table"]
        for q, data, h, t in got:
            f = by_frame[data]
            assert (h, t) == (f.hash(DEFAULT_RSS_KEY), f.report), data.hex()
            assert q == table[h & (len(table) - 1)]
        assert {q for q, *_ in got} == {0, 1}

    def test_zero_copy_receive_reads_qemus_hashes_too(self, qport):
        fl = flows(32)
        got = self.ours(qport, fl, zero_copy=True)
        by_frame = {f.frame: f for f in fl}
        assert len(got) == 32
        assert all((h, t) == (by_frame[d].hash(DEFAULT_RSS_KEY), by_frame[d].report) for _, d, h, t in got)

    def test_a_new_table_moves_every_flow_in_qemu(self, qport):
        qport.set_rss(table=[1] * 64)
        got = self.ours(qport, flows(24))
        assert len(got) == 24 and {q for q, *_ in got} == {1}

    def test_a_new_key_changes_qemus_hash(self, qport):
        key = bytes(range(1, 41))
        qport.set_rss(key=key)
        fl = flows(24)
        got = self.ours(qport, fl)
        by_frame = {f.frame: f for f in fl}
        assert len(got) == 24
        assert all(h == by_frame[d].hash(key) != by_frame[d].hash(DEFAULT_RSS_KEY) for _, d, h, _ in got)

    def test_a_frame_of_no_enabled_type_goes_to_qemus_unclassified_queue(self, qport):
        qport.ctrl_command(N.CTRL_MQ, N.CTRL_MQ_RSS_CONFIG, N.rss_config(ALL_TYPES, [0] * 128, 1, 2, DEFAULT_RSS_KEY))
        arp = bytes(6) + bytes.fromhex("020000000001") + b"\x08\x06" + bytes(46)
        send(qport, [arp] * 3)
        got = [g for g in receive_all(qport, 3, timeout=QEMU_WAIT) if g[1] == arp]
        assert [(q, h, t) for q, _, h, t in got] == [(1, 0, N.HASH_REPORT_NONE)] * 3

    def test_with_the_ex_types_on_qemu_reports_them_for_ipv6_with_the_plain_hash(self, qport):
        # QEMU prefers TCP_EX/UDP_EX; without extension headers their input is the plain one
        ex = ALL_TYPES | N.HASH_TYPE_IP_EX | N.HASH_TYPE_TCP_EX | N.HASH_TYPE_UDP_EX
        qport.set_rss(hash_types=ex)
        fl = flows(24)
        got = self.ours(qport, fl)
        by_frame = {f.frame: f for f in fl}
        ex_report = {N.HASH_REPORT_TCPv6: N.HASH_REPORT_TCPv6_EX, N.HASH_REPORT_UDPv6: N.HASH_REPORT_UDPv6_EX}
        assert len(got) == 24 and any(by_frame[d].v6 for _, d, _, _ in got)
        for _, d, h, t in got:
            f = by_frame[d]
            assert h == f.hash(DEFAULT_RSS_KEY) and t == ex_report.get(f.report, f.report)
