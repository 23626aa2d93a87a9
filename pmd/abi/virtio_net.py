"""The virtio-net vocabulary (Virtio 1.2 section 5.1): what driver and device agree on.

Feature bits (5.1.3) and their names, the virtio-net header (5.1.6), the device
configuration layout (5.1.4), the control queue's classes, commands and acks
(5.1.6.5) and the queue numbering (5.1.2). The driver negotiates, reads and
sends with these; the built-in device offers, lays out and answers with the
same ones. Feature names cover the device-independent bits too
(:mod:`pmd.abi.virtio`), so one mask can be written as ``"MRG_RXBUF,EVENT_IDX"``.
"""

from __future__ import annotations

import struct

from .virtio import FEATURE_NAMES as _DEVICE_INDEPENDENT_NAMES, VERSION_1, Field, bit

__all__ = [
    "NET_CSUM", "NET_GUEST_CSUM", "NET_CTRL_GUEST_OFFLOADS", "NET_MTU", "NET_MAC", "NET_GUEST_TSO4",
    "NET_GUEST_TSO6", "NET_GUEST_ECN", "NET_GUEST_UFO", "NET_HOST_TSO4", "NET_HOST_TSO6", "NET_HOST_ECN",
    "NET_HOST_UFO", "NET_MRG_RXBUF", "NET_STATUS", "NET_CTRL_VQ", "NET_CTRL_RX", "NET_CTRL_VLAN",
    "NET_GUEST_ANNOUNCE", "NET_MQ", "NET_CTRL_MAC_ADDR", "NET_HASH_REPORT", "NET_RSS", "NET_SPEED_DUPLEX",
    "FEATURE_NAMES", "FEATURES_BY_NAME", "feature_names", "parse_features",
    "NET_HDR", "NET_HDR_LEN", "NET_HDR_LEN_LEGACY", "NET_HDR_LEN_HASH", "NET_HDR_HASH", "NET_HDR_HASH_VALUE",
    "NET_HDR_HASH_REPORT", "hdr_len_for",
    "NET_CONFIG", "NET_CFG_MAC", "NET_CFG_STATUS", "NET_CFG_MAX_QUEUE_PAIRS", "NET_CFG_MTU",
    "NET_CFG_SPEED", "NET_CFG_DUPLEX", "NET_CFG_RSS_MAX_KEY_SIZE", "NET_CFG_RSS_MAX_TABLE_LENGTH",
    "NET_CFG_SUPPORTED_HASH_TYPES", "NET_CFG_LENGTH", "NET_CFG_LENGTH_RSS", "NET_S_LINK_UP", "NET_S_ANNOUNCE",
    "MAX_QUEUE_PAIRS", "MIN_MTU", "SPEED_UNKNOWN", "DUPLEX_UNKNOWN",
    "CTRL_RX", "CTRL_RX_PROMISC", "CTRL_RX_ALLMULTI", "CTRL_MAC", "CTRL_MAC_TABLE_SET",
    "CTRL_MAC_ADDR_SET", "CTRL_MQ", "CTRL_MQ_VQ_PAIRS_SET", "CTRL_MQ_RSS_CONFIG", "CTRL_MQ_HASH_CONFIG",
    "CTRL_OK", "CTRL_ERR", "NEEDS_CTRL_VQ",
    "HASH_TYPE_IPv4", "HASH_TYPE_TCPv4", "HASH_TYPE_UDPv4", "HASH_TYPE_IPv6", "HASH_TYPE_TCPv6",
    "HASH_TYPE_UDPv6", "HASH_TYPE_IP_EX", "HASH_TYPE_TCP_EX", "HASH_TYPE_UDP_EX", "HASH_TYPES_NAMES",
    "HASH_REPORT_NONE", "HASH_REPORT_IPv4", "HASH_REPORT_TCPv4", "HASH_REPORT_UDPv4", "HASH_REPORT_IPv6",
    "HASH_REPORT_TCPv6", "HASH_REPORT_UDPv6", "HASH_REPORT_IPv6_EX", "HASH_REPORT_TCPv6_EX",
    "HASH_REPORT_UDPv6_EX", "RSS_MIN_KEY_SIZE", "RSS_MIN_TABLE_LENGTH", "hash_type_names",
    "parse_hash_types", "rss_config", "hash_config",
    "rx_queue_index", "tx_queue_index", "ctrl_queue_index",
]

# ---- feature bits (5.1.3) ----
NET_CSUM = 0
NET_GUEST_CSUM = 1
NET_CTRL_GUEST_OFFLOADS = 2
NET_MTU = 3
NET_MAC = 5
NET_GUEST_TSO4 = 7
NET_GUEST_TSO6 = 8
NET_GUEST_ECN = 9
NET_GUEST_UFO = 10
NET_HOST_TSO4 = 11
NET_HOST_TSO6 = 12
NET_HOST_ECN = 13
NET_HOST_UFO = 14
NET_MRG_RXBUF = 15
NET_STATUS = 16
NET_CTRL_VQ = 17
NET_CTRL_RX = 18
NET_CTRL_VLAN = 19
NET_GUEST_ANNOUNCE = 21
NET_MQ = 22
NET_CTRL_MAC_ADDR = 23
NET_HASH_REPORT = 57        # per-packet hash value and type in the header (5.1.6.4.3)
NET_RSS = 60                # receive-side scaling: Toeplitz hash, key, indirection table (5.1.6.5.7)
NET_SPEED_DUPLEX = 63

#: bit number -> name (VIRTIO_NET_F_ and VIRTIO_F_ left off), for every bit pmd knows
FEATURE_NAMES = {
    NET_CSUM: "CSUM", NET_GUEST_CSUM: "GUEST_CSUM", NET_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS",
    NET_MTU: "MTU", NET_MAC: "MAC", NET_GUEST_TSO4: "GUEST_TSO4", NET_GUEST_TSO6: "GUEST_TSO6",
    NET_GUEST_ECN: "GUEST_ECN", NET_GUEST_UFO: "GUEST_UFO", NET_HOST_TSO4: "HOST_TSO4",
    NET_HOST_TSO6: "HOST_TSO6", NET_HOST_ECN: "HOST_ECN", NET_HOST_UFO: "HOST_UFO",
    NET_MRG_RXBUF: "MRG_RXBUF", NET_STATUS: "STATUS", NET_CTRL_VQ: "CTRL_VQ", NET_CTRL_RX: "CTRL_RX",
    NET_CTRL_VLAN: "CTRL_VLAN", NET_GUEST_ANNOUNCE: "GUEST_ANNOUNCE", NET_MQ: "MQ",
    NET_CTRL_MAC_ADDR: "CTRL_MAC_ADDR", NET_HASH_REPORT: "HASH_REPORT", NET_RSS: "RSS",
    NET_SPEED_DUPLEX: "SPEED_DUPLEX",
    **_DEVICE_INDEPENDENT_NAMES,
}
FEATURES_BY_NAME = {v: k for k, v in FEATURE_NAMES.items()}
# the names of pmd.abi.virtio's constants, which keep the legacy VIRTIO_RING_F_ prefix
_ALIASES = {"RING_INDIRECT_DESC": "INDIRECT_DESC", "RING_EVENT_IDX": "EVENT_IDX"}

#: 5.1.3.1: the features that need the control queue (a device offers them only with
#: CTRL_VQ, a driver accepts them only with it)
#: (HASH_REPORT: "SHOULD NOT ... without CTRL_VQ", 5.1.4.2: its commands come by the control queue)
NEEDS_CTRL_VQ = (bit(NET_CTRL_RX) | bit(NET_CTRL_VLAN) | bit(NET_GUEST_ANNOUNCE) | bit(NET_MQ)
                 | bit(NET_CTRL_MAC_ADDR) | bit(NET_RSS) | bit(NET_HASH_REPORT))


def feature_names(features: int) -> list[str]:
    """Names of the set bits, lowest first (unknown bits as 'bit N')."""
    return [FEATURE_NAMES.get(i, f"bit {i}") for i in range(64) if features >> i & 1]


def parse_features(spec: str | int | None) -> int:
    """A feature mask from an int or a comma-separated list of names ('MRG_RXBUF,EVENT_IDX')."""
    if spec is None:
        return 0
    if isinstance(spec, int):
        return spec
    mask = 0
    for word in (w.strip().upper() for w in spec.split(",")):
        if not word:
            continue
        word = _ALIASES.get(word, word)
        if word not in FEATURES_BY_NAME:
            raise ValueError(f"unknown virtio feature {word!r}; known: {', '.join(sorted(FEATURES_BY_NAME))}")
        mask |= bit(FEATURES_BY_NAME[word])
    return mask


# ---- the virtio-net header (5.1.6), in front of every packet ----
NET_HDR = (
    Field("flags", 0, 1), Field("gso_type", 1, 1), Field("hdr_len", 2, 2), Field("gso_size", 4, 2),
    Field("csum_start", 6, 2), Field("csum_offset", 8, 2), Field("num_buffers", 10, 2),
)
NET_HDR_LEN = 12            # with num_buffers
NET_HDR_LEN_LEGACY = 10     # without it: a legacy device that did not negotiate MRG_RXBUF
#: with HASH_REPORT the header has le32 hash_value, le16 hash_report, le16 padding after
#: num_buffers (5.1.6, struct virtio_net_hdr_v1_hash), in both directions
NET_HDR_HASH = (Field("hash_value", 12, 4), Field("hash_report", 16, 2), Field("padding", 18, 2))
NET_HDR_LEN_HASH = 20
NET_HDR_HASH_VALUE = 12
NET_HDR_HASH_REPORT = 16


def hdr_len_for(features: int) -> int:
    """virtio-net header length (5.1.6): 20 with HASH_REPORT, 12 with VERSION_1 or
    MRG_RXBUF, else 10."""
    if features & bit(NET_HASH_REPORT):
        return NET_HDR_LEN_HASH
    return NET_HDR_LEN if features & (bit(VERSION_1) | bit(NET_MRG_RXBUF)) else NET_HDR_LEN_LEGACY


# ---- the device configuration (5.1.4); each field valid only with its feature ----
NET_CONFIG = (
    Field("mac", 0, 6),                    # MAC
    Field("status", 6, 2),                 # STATUS: NET_S_LINK_UP, NET_S_ANNOUNCE
    Field("max_virtqueue_pairs", 8, 2),    # MQ
    Field("mtu", 10, 2),                   # MTU
    Field("speed", 12, 4),                 # SPEED_DUPLEX: Mb/s, SPEED_UNKNOWN
    Field("duplex", 16, 1),                # SPEED_DUPLEX: 0 half, 1 full, DUPLEX_UNKNOWN
    Field("rss_max_key_size", 17, 1),      # RSS or HASH_REPORT: at least 40 (5.1.4.1)
    Field("rss_max_indirection_table_length", 18, 2),   # RSS: at least 128 (5.1.4.1)
    Field("supported_hash_types", 20, 4),  # RSS or HASH_REPORT: HASH_TYPE_* bits
)
_CFG = {f.name: f.offset for f in NET_CONFIG}
NET_CFG_MAC = _CFG["mac"]
NET_CFG_STATUS = _CFG["status"]
NET_CFG_MAX_QUEUE_PAIRS = _CFG["max_virtqueue_pairs"]
NET_CFG_MTU = _CFG["mtu"]
NET_CFG_SPEED = _CFG["speed"]
NET_CFG_DUPLEX = _CFG["duplex"]
NET_CFG_RSS_MAX_KEY_SIZE = _CFG["rss_max_key_size"]
NET_CFG_RSS_MAX_TABLE_LENGTH = _CFG["rss_max_indirection_table_length"]
NET_CFG_SUPPORTED_HASH_TYPES = _CFG["supported_hash_types"]
#: up to duplex: what a device without RSS and HASH_REPORT has (a vhost-user back-end is asked for no more)
NET_CFG_LENGTH = NET_CFG_DUPLEX + 1
NET_CFG_LENGTH_RSS = NET_CONFIG[-1].offset + NET_CONFIG[-1].width
NET_S_LINK_UP = 1
NET_S_ANNOUNCE = 2
MAX_QUEUE_PAIRS = 0x8000    # 5.1.4.1: max_virtqueue_pairs is 1 to 0x8000
MIN_MTU = 68                # 5.1.4.1: a device offering MTU reports at least 68
SPEED_UNKNOWN = 0xFFFFFFFF
DUPLEX_UNKNOWN = 0xFF

# ---- the control queue (5.1.6.5) ----
CTRL_RX = 0
CTRL_RX_PROMISC = 0
CTRL_RX_ALLMULTI = 1
CTRL_MAC = 1
CTRL_MAC_TABLE_SET = 0
CTRL_MAC_ADDR_SET = 1
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
CTRL_MQ_RSS_CONFIG = 1      # struct virtio_net_rss_config (5.1.6.5.7.1)
CTRL_MQ_HASH_CONFIG = 2     # struct virtio_net_hash_config (5.1.6.5.6.4)
CTRL_OK = 0
CTRL_ERR = 1

# ---- hash types and reports (5.1.6.4.3.1, 5.1.6.4.4) ----
HASH_TYPE_IPv4 = 1 << 0
HASH_TYPE_TCPv4 = 1 << 1
HASH_TYPE_UDPv4 = 1 << 2
HASH_TYPE_IPv6 = 1 << 3     # IPv6 without extension headers (and with them, skipped, unless _EX)
HASH_TYPE_TCPv6 = 1 << 4
HASH_TYPE_UDPv6 = 1 << 5
HASH_TYPE_IP_EX = 1 << 6    # the _EX types take addresses from the home-address and routing headers
HASH_TYPE_TCP_EX = 1 << 7
HASH_TYPE_UDP_EX = 1 << 8
HASH_TYPES_NAMES = {
    HASH_TYPE_IPv4: "IPv4", HASH_TYPE_TCPv4: "TCPv4", HASH_TYPE_UDPv4: "UDPv4", HASH_TYPE_IPv6: "IPv6",
    HASH_TYPE_TCPv6: "TCPv6", HASH_TYPE_UDPv6: "UDPv6", HASH_TYPE_IP_EX: "IP_EX", HASH_TYPE_TCP_EX: "TCP_EX",
    HASH_TYPE_UDP_EX: "UDP_EX",
}
# hash_report values: HASH_TYPE_X == 1 << (HASH_REPORT_X - 1)
HASH_REPORT_NONE = 0
HASH_REPORT_IPv4 = 1
HASH_REPORT_TCPv4 = 2
HASH_REPORT_UDPv4 = 3
HASH_REPORT_IPv6 = 4
HASH_REPORT_TCPv6 = 5
HASH_REPORT_UDPv6 = 6
HASH_REPORT_IPv6_EX = 7
HASH_REPORT_TCPv6_EX = 8
HASH_REPORT_UDPv6_EX = 9
RSS_MIN_KEY_SIZE = 40       # 5.1.4.1: a device offering RSS or HASH_REPORT has rss_max_key_size >= 40
RSS_MIN_TABLE_LENGTH = 128  # 5.1.4.1: and with RSS rss_max_indirection_table_length >= 128


def hash_type_names(types: int) -> list[str]:
    """Names of the HASH_TYPE_ bits set in ``types`` (unknown bits as 'bit N')."""
    return [HASH_TYPES_NAMES.get(1 << i, f"bit {i}") for i in range(32) if types >> i & 1]


def parse_hash_types(spec: str | int) -> int:
    """A HASH_TYPE_ mask from an int or names ("IPv4,TCPv4"; case does not matter)."""
    if isinstance(spec, int):
        if not 0 <= spec < 1 << 32:
            raise ValueError(f"hash types must be a 32-bit mask, got {spec:#x}")
        return spec
    by_name = {v.upper(): k for k, v in HASH_TYPES_NAMES.items()}
    mask = 0
    for word in (w.strip().upper() for w in spec.split(",")):
        if not word:
            continue
        if word not in by_name:
            raise ValueError(f"unknown hash type {word!r}; known: {', '.join(HASH_TYPES_NAMES.values())}")
        mask |= by_name[word]
    return mask


def rss_config(hash_types: int, table: list[int] | tuple[int, ...], unclassified_queue: int, max_tx_vq: int,
               key: bytes) -> bytes:
    """struct virtio_net_rss_config (5.1.6.5.7.1): le32 hash_types, le16 indirection_table_mask,
    le16 unclassified_queue, le16 indirection_table[mask + 1], le16 max_tx_vq, u8 hash_key_length,
    u8 hash_key_data[]. Queue ids are receive queue numbers (receiveq1 is 0: bits 1-16 of the
    virtqueue index). No checks: the caller (the driver's port) checked the values."""
    out = bytearray(struct.pack("<IHH", hash_types, len(table) - 1, unclassified_queue))
    out += struct.pack(f"<{len(table)}H", *table)
    out += struct.pack("<HB", max_tx_vq, len(key)) + bytes(key)
    return bytes(out)


def hash_config(hash_types: int, key: bytes) -> bytes:
    """struct virtio_net_hash_config (5.1.6.5.6.4): le32 hash_types, le16 reserved[4] (zero),
    u8 hash_key_length, u8 hash_key_data[]: virtio_net_rss_config's layout without the table."""
    return struct.pack("<I8xB", hash_types, len(key)) + bytes(key)


# ---- queue numbering (5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN, controlq ----
def rx_queue_index(pair: int) -> int:
    return 2 * pair


def tx_queue_index(pair: int) -> int:
    return 2 * pair + 1


def ctrl_queue_index(features: int, max_pairs: int) -> int:
    """The control queue follows the last pair the device has, or pair 1 without MQ
    and RSS (5.1.2: N = 1 if neither is negotiated, else max_virtqueue_pairs)."""
    return 2 * max_pairs if features & (bit(NET_MQ) | bit(NET_RSS)) else 2
