"""Ethernet helpers both sides use: MAC addresses and a test frame (IEEE 802.3, RFC 791, RFC 768).

A virtio-net driver and device exchange Ethernet frames without FCS; these are
the few things about them pmd needs by name: parsing and printing a MAC, a
locally administered address of the driver's own (Virtio 1.2 5.1.5 lets it pick
one when the device has none), and an IPv4/UDP frame for generators and
forwarding modes.
"""

from __future__ import annotations

import os

__all__ = ["ETH_HLEN", "ETH_ALEN", "BROADCAST", "parse_mac", "format_mac", "random_mac", "udp_frame"]

ETH_ALEN = 6        # bytes of a MAC address
ETH_HLEN = 14       # destination, source, EtherType: the shortest frame there is
BROADCAST = b"\xff" * ETH_ALEN


def random_mac() -> bytes:
    """A locally administered unicast address (the driver's own when the device has none, 5.1.5)."""
    b = bytearray(os.urandom(ETH_ALEN))
    b[0] = (b[0] & 0xFE) | 0x02
    return bytes(b)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{x:02x}" for x in mac)


def parse_mac(text: str | bytes) -> bytes:
    """Six bytes from ``xx:xx:xx:xx:xx:xx`` (or the bytes themselves)."""
    if isinstance(text, bytes):
        if len(text) != ETH_ALEN:
            raise ValueError(f"a MAC address is 6 bytes, got {len(text)}")
        return text
    parts = text.split(":")
    if len(parts) != ETH_ALEN:
        raise ValueError(f"bad MAC address {text!r}; expected xx:xx:xx:xx:xx:xx")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}; expected xx:xx:xx:xx:xx:xx") from None


def udp_frame(size: int, src: bytes, dst: bytes = BROADCAST) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``size`` bytes (60-9014) from ``src`` to ``dst``."""
    if not 60 <= size <= 9014:
        raise ValueError("packet size must be 60 to 9014 bytes")
    ip_len = size - ETH_HLEN
    ip = bytearray(20)
    ip[0], ip[8], ip[9] = 0x45, 64, 17
    ip[2:4] = ip_len.to_bytes(2, "big")
    ip[12:16], ip[16:20] = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])   # RFC 2544 test range
    csum = sum(int.from_bytes(ip[i:i + 2], "big") for i in range(0, 20, 2))
    csum = (csum & 0xFFFF) + (csum >> 16)
    ip[10:12] = (~csum & 0xFFFF).to_bytes(2, "big")
    udp = (9).to_bytes(2, "big") + (9).to_bytes(2, "big") + (ip_len - 20).to_bytes(2, "big") + b"\0\0"
    return dst + src + b"\x08\x00" + bytes(ip) + udp + bytes(size - 42)
