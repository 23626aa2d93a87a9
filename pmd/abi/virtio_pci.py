"""Virtio over PCI (Virtio 1.2 section 4.1): the structures the capabilities point to.

The vendor capabilities themselves are part of the configuration space and are
parsed with it (:mod:`pmd.abi.pci`: ``VirtioPciCap``, the ``VIRTIO_PCI_CAP_*``
types). Here is what lives in the BARs they name, as both sides use it:

- the common configuration (4.1.4.3), as ONE table of fields (offset, width,
  read-write or read-only for the driver) from which the register offsets and
  the structure's byte layout are derived; tests/test_layout.py holds it against
  ``struct virtio_pci_common_cfg`` of csrc/pmd_virtio_pci.h;
- the ISR status bits (4.1.4.5);
- the legacy register block of a transitional device's I/O BAR0 (4.1.4.8);
- which capability of each type a driver uses (:func:`select_virtio_structures`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigSpaceError
from .pci import (
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    ConfigSpace,
    VirtioPciCap,
)
from .virtio import Field

__all__ = [
    "COMMON_CFG", "COMMON_CFG_LEN", "COMMON_CFG_STRUCT", "COMMON_CFG_BY_OFFSET",
    "DEVICE_FEATURE_SELECT", "DEVICE_FEATURE", "DRIVER_FEATURE_SELECT", "DRIVER_FEATURE",
    "CONFIG_MSIX_VECTOR", "NUM_QUEUES", "DEVICE_STATUS", "CONFIG_GENERATION", "QUEUE_SELECT",
    "QUEUE_SIZE", "QUEUE_MSIX_VECTOR", "QUEUE_ENABLE", "QUEUE_NOTIFY_OFF", "QUEUE_DESC",
    "QUEUE_DRIVER", "QUEUE_DEVICE",
    "ISR_QUEUE", "ISR_CONFIG",
    "LEGACY_HOST_FEATURES", "LEGACY_GUEST_FEATURES", "LEGACY_QUEUE_PFN", "LEGACY_QUEUE_NUM",
    "LEGACY_QUEUE_SEL", "LEGACY_QUEUE_NOTIFY", "LEGACY_STATUS", "LEGACY_ISR",
    "LEGACY_MSI_CONFIG_VECTOR", "LEGACY_MSI_QUEUE_VECTOR", "LEGACY_CONFIG_NO_MSIX",
    "LEGACY_CONFIG_MSIX", "LEGACY_PFN_SHIFT", "LEGACY_RING_ALIGN",
    "VirtioStructures", "select_virtio_structures",
]

# ---- struct virtio_pci_common_cfg (4.1.4.3): every field at its own width (4.1.3.1) ----
COMMON_CFG = (
    # about the whole device
    Field("device_feature_select", 0x00, 4, "rw"),
    Field("device_feature", 0x04, 4, "ro"),
    Field("driver_feature_select", 0x08, 4, "rw"),
    Field("driver_feature", 0x0C, 4, "rw"),
    Field("config_msix_vector", 0x10, 2, "rw"),    # NO_VECTOR: none
    Field("num_queues", 0x12, 2, "ro"),
    Field("device_status", 0x14, 1, "rw"),
    Field("config_generation", 0x15, 1, "ro"),
    # about the queue in queue_select
    Field("queue_select", 0x16, 2, "rw"),
    Field("queue_size", 0x18, 2, "rw"),            # a power of 2 (split rings)
    Field("queue_msix_vector", 0x1A, 2, "rw"),
    Field("queue_enable", 0x1C, 2, "rw"),
    Field("queue_notify_off", 0x1E, 2, "ro"),
    Field("queue_desc", 0x20, 8, "rw"),
    Field("queue_driver", 0x28, 8, "rw"),          # the available ring
    Field("queue_device", 0x30, 8, "rw"),          # the used ring
)
COMMON_CFG_LEN = COMMON_CFG[-1].offset + COMMON_CFG[-1].width     # 0x38
COMMON_CFG_BY_OFFSET = {f.offset: f for f in COMMON_CFG}
#: the whole structure as one little-endian record, fields in table order (no padding)
COMMON_CFG_STRUCT = struct.Struct("<" + "".join({1: "B", 2: "H", 4: "I", 8: "Q"}[f.width] for f in COMMON_CFG))

_AT = {f.name: f.offset for f in COMMON_CFG}
DEVICE_FEATURE_SELECT = _AT["device_feature_select"]
DEVICE_FEATURE = _AT["device_feature"]
DRIVER_FEATURE_SELECT = _AT["driver_feature_select"]
DRIVER_FEATURE = _AT["driver_feature"]
CONFIG_MSIX_VECTOR = _AT["config_msix_vector"]
NUM_QUEUES = _AT["num_queues"]
DEVICE_STATUS = _AT["device_status"]
CONFIG_GENERATION = _AT["config_generation"]
QUEUE_SELECT = _AT["queue_select"]
QUEUE_SIZE = _AT["queue_size"]
QUEUE_MSIX_VECTOR = _AT["queue_msix_vector"]
QUEUE_ENABLE = _AT["queue_enable"]
QUEUE_NOTIFY_OFF = _AT["queue_notify_off"]
QUEUE_DESC = _AT["queue_desc"]
QUEUE_DRIVER = _AT["queue_driver"]
QUEUE_DEVICE = _AT["queue_device"]

# ---- ISR status (4.1.4.5): one byte, cleared by the read ----
ISR_QUEUE = 1 << 0      # a used buffer notification
ISR_CONFIG = 1 << 1     # a configuration change

# ---- the legacy register block in I/O BAR0 (4.1.4.8): offset, width and access ----
LEGACY_HOST_FEATURES = 0        # le32 ro
LEGACY_GUEST_FEATURES = 4       # le32 rw
LEGACY_QUEUE_PFN = 8            # le32 rw: ring address >> LEGACY_PFN_SHIFT
LEGACY_QUEUE_NUM = 12           # le16 ro: ring size
LEGACY_QUEUE_SEL = 14           # le16 rw
LEGACY_QUEUE_NOTIFY = 16        # le16 rw
LEGACY_STATUS = 18              # u8 rw
LEGACY_ISR = 19                 # u8 ro, clears on read
LEGACY_MSI_CONFIG_VECTOR = 20   # le16 rw, only while MSI-X is enabled
LEGACY_MSI_QUEUE_VECTOR = 22    # le16 rw, only while MSI-X is enabled
LEGACY_CONFIG_NO_MSIX = 20      # where the device configuration starts without MSI-X
LEGACY_CONFIG_MSIX = 24         # ... and with it
LEGACY_PFN_SHIFT = 12           # VIRTIO_PCI_QUEUE_ADDR_SHIFT
LEGACY_RING_ALIGN = 4096        # VIRTIO_PCI_VRING_ALIGN: the used ring of a legacy queue


# ---- choosing the structures (4.1.4) ----

# Minimum length and offset alignment of each structure, as Linux's
# vp_modern_probe() passes them to vp_modern_map_capability(): common config
# is at least the 0x38 bytes every field up to queue_device takes (4.1.4.3).
_VIRTIO_MINLEN_ALIGN = {VIRTIO_PCI_CAP_COMMON_CFG: (COMMON_CFG_LEN, 4),
                        VIRTIO_PCI_CAP_NOTIFY_CFG: (2, 2),
                        VIRTIO_PCI_CAP_ISR_CFG: (1, 1),
                        VIRTIO_PCI_CAP_DEVICE_CFG: (0, 4)}


@dataclass(frozen=True)
class VirtioStructures:
    """The virtio structures a driver uses: the first usable capability of each type."""

    common: VirtioPciCap | None
    notify: VirtioPciCap | None
    isr: VirtioPciCap | None
    device: VirtioPciCap | None  # optional: not every device type has config
    pci_cfg: VirtioPciCap | None

    @property
    def missing(self) -> tuple[str, ...]:
        """Required structures that are absent (Linux needs common, notify and ISR)."""
        return tuple(name for name in ("common", "notify", "isr") if getattr(self, name) is None)

    @property
    def modern(self) -> bool:
        return not self.missing


def select_virtio_structures(config: ConfigSpace,
                             bar_sizes: Mapping[int, int] | None = None) -> VirtioStructures:
    """Pick the structures the way Linux's ``virtio_pci_find_capability()`` does.

    For each cfg_type the first capability in list order wins (Virtio 1.2
    4.1.4: "the driver SHOULD use the first instance"), skipping those whose
    ``bar`` is reserved (> 5, which 4.1.4 says to ignore) or does not name a
    memory BAR (an I/O BAR, or the upper half of a 64-bit one). When
    ``bar_sizes`` is given (from VFIO region info or sysfs ``resource``), a BAR
    of size 0 is skipped too, as Linux checks ``pci_resource_len``. A chosen
    structure that is shorter or less aligned than Linux accepts raises
    ``ConfigSpaceError``. The PCI config access capability is reported as found:
    its bar/offset/length are a window the driver writes (4.1.4.9).
    """
    chosen: dict[int, VirtioPciCap] = {}
    for cap in config.virtio_caps:
        if cap.cfg_type in chosen:
            continue
        if cap.cfg_type == VIRTIO_PCI_CAP_PCI_CFG:
            chosen[cap.cfg_type] = cap
            continue
        if cap.cfg_type not in _VIRTIO_MINLEN_ALIGN or not cap.bar_valid:
            continue
        bar = config.bar(cap.bar)
        if bar is None or not bar.memory:
            continue
        if bar_sizes is not None and not bar_sizes.get(cap.bar):
            continue
        chosen[cap.cfg_type] = cap
    for cfg_type, cap in chosen.items():
        if cfg_type not in _VIRTIO_MINLEN_ALIGN:
            continue
        minlen, align = _VIRTIO_MINLEN_ALIGN[cfg_type]
        if cap.length < minlen:
            raise ConfigSpaceError(f"virtio {cap.cfg_name} capability at {cap.pos:#x}: length "
                                   f"{cap.length:#x} < {minlen:#x}")
        if cap.offset % align:
            raise ConfigSpaceError(f"virtio {cap.cfg_name} capability at {cap.pos:#x}: offset "
                                   f"{cap.offset:#x} is not {align}-byte aligned")
        if bar_sizes is not None and cap.offset + cap.length > bar_sizes[cap.bar]:
            raise ConfigSpaceError(
                f"virtio {cap.cfg_name} capability at {cap.pos:#x}: BAR{cap.bar} + "
                f"{cap.offset:#x} len {cap.length:#x} runs past the BAR "
                f"({bar_sizes[cap.bar]:#x} bytes)")
    return VirtioStructures(common=chosen.get(VIRTIO_PCI_CAP_COMMON_CFG),
                            notify=chosen.get(VIRTIO_PCI_CAP_NOTIFY_CFG),
                            isr=chosen.get(VIRTIO_PCI_CAP_ISR_CFG),
                            device=chosen.get(VIRTIO_PCI_CAP_DEVICE_CFG),
                            pci_cfg=chosen.get(VIRTIO_PCI_CAP_PCI_CFG))
