"""The virtio-net vocabulary (Virtio 1.2 section 5.1): what driver and device agree on.

Feature bits (5.1.3) and their names, the virtio-net header (5.1.6), the device
configuration layout (5.1.4), the control queue's classes, commands and acks
(5.1.6.5) and the queue numbering (5.1.2). The driver negotiates, reads and
sends with these; the built-in device offers, lays out and answers with the
same ones. Feature names cover the device-independent bits too
(:mod:`pmd.abi.virtio`), so one mask can be written as ``"MRG_RXBUF,EVENT_IDX"``.
"""

from __future__ import annotations

from .virtio import FEATURE_NAMES as _DEVICE_INDEPENDENT_NAMES, VERSION_1, Field, bit

__all__ = [
    "NET_CSUM", "NET_GUEST_CSUM", "NET_CTRL_GUEST_OFFLOADS", "NET_MTU", "NET_MAC", "NET_GUEST_TSO4",
    "NET_GUEST_TSO6", "NET_GUEST_ECN", "NET_GUEST_UFO", "NET_HOST_TSO4", "NET_HOST_TSO6", "NET_HOST_ECN",
    "NET_HOST_UFO", "NET_MRG_RXBUF", "NET_STATUS", "NET_CTRL_VQ", "NET_CTRL_RX", "NET_CTRL_VLAN",
    "NET_GUEST_ANNOUNCE", "NET_MQ", "NET_CTRL_MAC_ADDR", "NET_SPEED_DUPLEX",
    "FEATURE_NAMES", "FEATURES_BY_NAME", "feature_names", "parse_features",
    "NET_HDR", "NET_HDR_LEN", "NET_HDR_LEN_LEGACY", "hdr_len_for",
    "NET_CONFIG", "NET_CFG_MAC", "NET_CFG_STATUS", "NET_CFG_MAX_QUEUE_PAIRS", "NET_CFG_MTU",
    "NET_CFG_SPEED", "NET_CFG_DUPLEX", "NET_CFG_LENGTH", "NET_S_LINK_UP", "NET_S_ANNOUNCE",
    "MAX_QUEUE_PAIRS", "MIN_MTU", "SPEED_UNKNOWN", "DUPLEX_UNKNOWN",
    "CTRL_RX", "CTRL_RX_PROMISC", "CTRL_RX_ALLMULTI", "CTRL_MAC", "CTRL_MAC_TABLE_SET",
    "CTRL_MAC_ADDR_SET", "CTRL_MQ", "CTRL_MQ_VQ_PAIRS_SET", "CTRL_OK", "CTRL_ERR", "NEEDS_CTRL_VQ",
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
NET_SPEED_DUPLEX = 63

#: bit number -> name (VIRTIO_NET_F_ and VIRTIO_F_ left off), for every bit pmd knows
FEATURE_NAMES = {
    NET_CSUM: "CSUM", NET_GUEST_CSUM: "GUEST_CSUM", NET_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS",
    NET_MTU: "MTU", NET_MAC: "MAC", NET_GUEST_TSO4: "GUEST_TSO4", NET_GUEST_TSO6: "GUEST_TSO6",
    NET_GUEST_ECN: "GUEST_ECN", NET_GUEST_UFO: "GUEST_UFO", NET_HOST_TSO4: "HOST_TSO4",
    NET_HOST_TSO6: "HOST_TSO6", NET_HOST_ECN: "HOST_ECN", NET_HOST_UFO: "HOST_UFO",
    NET_MRG_RXBUF: "MRG_RXBUF", NET_STATUS: "STATUS", NET_CTRL_VQ: "CTRL_VQ", NET_CTRL_RX: "CTRL_RX",
    NET_CTRL_VLAN: "CTRL_VLAN", NET_GUEST_ANNOUNCE: "GUEST_ANNOUNCE", NET_MQ: "MQ",
    NET_CTRL_MAC_ADDR: "CTRL_MAC_ADDR", NET_SPEED_DUPLEX: "SPEED_DUPLEX",
    **_DEVICE_INDEPENDENT_NAMES,
}
FEATURES_BY_NAME = {v: k for k, v in FEATURE_NAMES.items()}
# the names of pmd.abi.virtio's constants, which keep the legacy VIRTIO_RING_F_ prefix
_ALIASES = {"RING_INDIRECT_DESC": "INDIRECT_DESC", "RING_EVENT_IDX": "EVENT_IDX"}

#: 5.1.3.1: the features that need the control queue (a device offers them only with
#: CTRL_VQ, a driver accepts them only with it)
NEEDS_CTRL_VQ = (bit(NET_CTRL_RX) | bit(NET_CTRL_VLAN) | bit(NET_GUEST_ANNOUNCE) | bit(NET_MQ)
                 | bit(NET_CTRL_MAC_ADDR))


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


def hdr_len_for(features: int) -> int:
    """virtio-net header length (5.1.6): 12 with VERSION_1 or MRG_RXBUF, else 10."""
    return NET_HDR_LEN if features & (bit(VERSION_1) | bit(NET_MRG_RXBUF)) else NET_HDR_LEN_LEGACY


# ---- the device configuration (5.1.4); each field valid only with its feature ----
NET_CONFIG = (
    Field("mac", 0, 6),                    # MAC
    Field("status", 6, 2),                 # STATUS: NET_S_LINK_UP, NET_S_ANNOUNCE
    Field("max_virtqueue_pairs", 8, 2),    # MQ
    Field("mtu", 10, 2),                   # MTU
    Field("speed", 12, 4),                 # SPEED_DUPLEX: Mb/s, SPEED_UNKNOWN
    Field("duplex", 16, 1),                # SPEED_DUPLEX: 0 half, 1 full, DUPLEX_UNKNOWN
)
_CFG = {f.name: f.offset for f in NET_CONFIG}
NET_CFG_MAC = _CFG["mac"]
NET_CFG_STATUS = _CFG["status"]
NET_CFG_MAX_QUEUE_PAIRS = _CFG["max_virtqueue_pairs"]
NET_CFG_MTU = _CFG["mtu"]
NET_CFG_SPEED = _CFG["speed"]
NET_CFG_DUPLEX = _CFG["duplex"]
NET_CFG_LENGTH = NET_CONFIG[-1].offset + NET_CONFIG[-1].width
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
CTRL_OK = 0
CTRL_ERR = 1


# ---- queue numbering (5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN, controlq ----
def rx_queue_index(pair: int) -> int:
    return 2 * pair


def tx_queue_index(pair: int) -> int:
    return 2 * pair + 1


def ctrl_queue_index(features: int, max_pairs: int) -> int:
    """The control queue follows the last pair the device has, or pair 1 without MQ."""
    return 2 * max_pairs if features & bit(NET_MQ) else 2
