"""What every virtio device speaks, whatever its type and transport (Virtio 1.2).

The device status bits (2.1), the device-independent feature bits (6) and the
MSI-X "no vector" value (4.1.4.3), under the spec's names without their
``VIRTIO_`` prefixes. One definition each: the driver, the built-in device, the
vhost-user codec and the CLI all read them here, and tests/test_layout.py holds
them against csrc/pmd_virtio_pci.h. The virtio-net vocabulary built on this is
:mod:`pmd.abi.virtio_net`.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "STATUS_ACKNOWLEDGE",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FEATURES_OK",
    "STATUS_DEVICE_NEEDS_RESET",
    "STATUS_FAILED",
    "RING_INDIRECT_DESC",
    "RING_EVENT_IDX",
    "VERSION_1",
    "ACCESS_PLATFORM",
    "RING_PACKED",
    "IN_ORDER",
    "ORDER_PLATFORM",
    "SR_IOV",
    "NOTIFICATION_DATA",
    "FEATURE_NAMES",
    "NO_VECTOR",
    "Field",
    "bit",
]

# ---- device status (2.1) ----
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# ---- device-independent feature bits (6) ----
RING_INDIRECT_DESC = 28
RING_EVENT_IDX = 29
VERSION_1 = 32
ACCESS_PLATFORM = 33
RING_PACKED = 34
IN_ORDER = 35
ORDER_PLATFORM = 36
SR_IOV = 37
NOTIFICATION_DATA = 38

#: bit number -> the spec's name without VIRTIO_F_ (INDIRECT_DESC, EVENT_IDX keep theirs)
FEATURE_NAMES = {
    RING_INDIRECT_DESC: "INDIRECT_DESC", RING_EVENT_IDX: "EVENT_IDX", VERSION_1: "VERSION_1",
    ACCESS_PLATFORM: "ACCESS_PLATFORM", RING_PACKED: "RING_PACKED", IN_ORDER: "IN_ORDER",
    ORDER_PLATFORM: "ORDER_PLATFORM", SR_IOV: "SR_IOV", NOTIFICATION_DATA: "NOTIFICATION_DATA",
}

#: VIRTIO_MSI_NO_VECTOR (4.1.4.3): a queue or the configuration signals no MSI-X vector;
#: also what a device reads back when it refused the vector it was given
NO_VECTOR = 0xFFFF


def bit(n: int) -> int:
    """The mask of feature bit ``n``."""
    return 1 << n


class Field(NamedTuple):
    """One field of a structure the spec lays out: offset and width in bytes, and who
    may write it (``"rw"``, or ``"ro"``: read-only for the driver) where the spec says."""

    name: str
    offset: int
    width: int
    access: str = "ro"
