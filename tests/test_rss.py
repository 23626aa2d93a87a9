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
