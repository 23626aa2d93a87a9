"""Feature bits, status bits and virtio-net constants (Virtio 1.2 sections 2.1, 5.1.3, 6)."""

from __future__ import annotations

# ---- device status (2.1) ----
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# ---- device-independent features (6) ----
RING_INDIRECT_DESC = 28
RING_EVENT_IDX = 29
VERSION_1 = 32
ACCESS_PLATFORM = 33
RING_PACKED = 34
IN_ORDER = 35
ORDER_PLATFORM = 36
SR_IOV = 37
NOTIFICATION_DATA = 38

# ---- virtio-net features (5.1.3) ----
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

NAMES = {
    NET_CSUM: "CSUM", NET_GUEST_CSUM: "GUEST_CSUM", NET_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS",
    NET_MTU: "MTU", NET_MAC: "MAC", NET_GUEST_TSO4: "GUEST_TSO4", NET_GUEST_TSO6: "GUEST_TSO6",
    NET_GUEST_ECN: "GUEST_ECN", NET_GUEST_UFO: "GUEST_UFO", NET_HOST_TSO4: "HOST_TSO4",
    NET_HOST_TSO6: "HOST_TSO6", NET_HOST_ECN: "HOST_ECN", NET_HOST_UFO: "HOST_UFO",
    NET_MRG_RXBUF: "MRG_RXBUF", NET_STATUS: "STATUS", NET_CTRL_VQ: "CTRL_VQ", NET_CTRL_RX: "CTRL_RX",
    NET_CTRL_VLAN: "CTRL_VLAN", NET_GUEST_ANNOUNCE: "GUEST_ANNOUNCE", NET_MQ: "MQ",
    NET_CTRL_MAC_ADDR: "CTRL_MAC_ADDR", NET_SPEED_DUPLEX: "SPEED_DUPLEX",
    RING_INDIRECT_DESC: "INDIRECT_DESC", RING_EVENT_IDX: "EVENT_IDX", VERSION_1: "VERSION_1",
    ACCESS_PLATFORM: "ACCESS_PLATFORM", RING_PACKED: "RING_PACKED", IN_ORDER: "IN_ORDER",
    ORDER_PLATFORM: "ORDER_PLATFORM", SR_IOV: "SR_IOV", NOTIFICATION_DATA: "NOTIFICATION_DATA",
}
BY_NAME = {v: k for k, v in NAMES.items()}


def bit(n: int) -> int:
    return 1 << n


def names(features: int) -> list[str]:
    """Names of the set bits, lowest first (unknown bits as 'bit N')."""
    return [NAMES.get(i, f"bit {i}") for i in range(64) if features >> i & 1]


def parse(spec: str | int | None) -> int:
    """A feature mask from an int or a comma-separated list of names ('MRG_RXBUF,EVENT_IDX')."""
    if spec is None:
        return 0
    if isinstance(spec, int):
        return spec
    mask = 0
    for word in (w.strip().upper() for w in spec.split(",")):
        if not word:
            continue
        if word not in BY_NAME:
            raise ValueError(f"unknown virtio feature {word!r}; known: {', '.join(sorted(BY_NAME))}")
        mask |= bit(BY_NAME[word])
    return mask


# ---- virtio-net device configuration (5.1.4) ----
NET_CFG_MAC = 0             # u8[6]
NET_CFG_STATUS = 6          # le16: LINK_UP=1, ANNOUNCE=2
NET_CFG_MAX_QUEUE_PAIRS = 8  # le16
NET_CFG_MTU = 10            # le16
NET_CFG_SPEED = 12          # le32, Mb/s, 0xffffffff unknown
NET_CFG_DUPLEX = 16         # u8: 0 half, 1 full, 0xff unknown
NET_S_LINK_UP = 1
NET_S_ANNOUNCE = 2

# ---- control queue (5.1.6.5) ----
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
