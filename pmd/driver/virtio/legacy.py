"""The legacy virtio PCI transport (Virtio 1.2 4.1.4.8 "Legacy Interfaces: A
Note on PCI Device Layout"): a register block in I/O BAR0 of a transitional
device (device id 0x1000-0x103f), read and written with ``pread``/``pwrite`` on
the VFIO region, as DPDK's ``pci_vfio_ioport_read``/``write`` do.

Legacy differences the layers above must know: features are 32 bits (so no
VERSION_1: the virtio-net header is 10 bytes without MRG_RXBUF), the ring size
is the device's (QUEUE_NUM, read-only), the ring is one block whose page frame
number is written to QUEUE_PFN (used ring aligned to 4096), and the device
configuration starts at 20, or at 24 once MSI-X is enabled.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import DeviceError
from ...abi.virtio import NO_VECTOR
from ...abi.virtio_pci import (
    LEGACY_CONFIG_MSIX,
    LEGACY_CONFIG_NO_MSIX,
    LEGACY_GUEST_FEATURES,
    LEGACY_HOST_FEATURES,
    LEGACY_ISR,
    LEGACY_MSI_CONFIG_VECTOR,
    LEGACY_MSI_QUEUE_VECTOR,
    LEGACY_PFN_SHIFT,
    LEGACY_QUEUE_NOTIFY,
    LEGACY_QUEUE_NUM,
    LEGACY_QUEUE_PFN,
    LEGACY_QUEUE_SEL,
    LEGACY_RING_ALIGN,
    LEGACY_STATUS,
)
from .._virtqueue import Virtqueue
from ..access import DeviceAccess
from .pci_common import PciTransport
from .transport import check_queue_size

MAX_QUEUES = 64         # legacy devices do not report a count; probe up to this


class LegacyTransport(PciTransport):
    """``LegacyTransport(access)``: BAR0 must be an I/O BAR."""

    kind = "legacy"
    legacy = True
    ring_align = LEGACY_RING_ALIGN
    feature_bits = 32

    def __init__(self, access: DeviceAccess, bar: int = 0, *, owns_access: bool = True) -> None:
        if not access.is_io_bar(bar):
            raise DeviceError(f"BAR{bar} is not an I/O BAR: no legacy virtio interface here "
                              "(only transitional devices, id 0x1000-0x103f, have one)")
        info = access.region_info(bar)
        if info.size < LEGACY_CONFIG_MSIX:
            raise DeviceError(f"legacy BAR{bar} is {info.size} bytes, too small for the virtio registers")
        super().__init__(access, owns_access=owns_access)
        self.bar = bar
        self.size = info.size
        self.msix = False      # MSI-X vectors set up: the device configuration moved (4.1.4.8)

    def _r(self, offset: int, width: int) -> int:
        return int.from_bytes(self.access.region_read(self.bar, offset, width), "little")

    def _w(self, offset: int, width: int, value: int) -> None:
        self.access.region_write(self.bar, offset, value.to_bytes(width, "little"))

    def get_status(self) -> int:
        return self._r(LEGACY_STATUS, 1)

    def set_status(self, status: int) -> None:
        self._w(LEGACY_STATUS, 1, status)

    def device_features(self) -> int:
        return self._r(LEGACY_HOST_FEATURES, 4)

    def set_driver_features(self, features: int) -> None:
        if features >> 32:
            raise DeviceError("the legacy interface carries only feature bits 0-31")
        self._w(LEGACY_GUEST_FEATURES, 4, features)

    def num_queues(self) -> int:
        n = 0
        while n < MAX_QUEUES and self.queue_max_size(n):
            n += 1
        return n

    def queue_max_size(self, index: int) -> int:
        self._w(LEGACY_QUEUE_SEL, 2, index)
        return self._r(LEGACY_QUEUE_NUM, 2)

    def queue_size_fixed(self) -> bool:
        return True

    def setup_queue(self, index: int, vq: Virtqueue, vector: int = NO_VECTOR) -> None:
        num = self.queue_max_size(index)
        check_queue_size(index, vq.size, num)
        if vq.size != num:
            raise ValueError(f"legacy queue {index} has a fixed size of {num} entries; "
                             f"create it with queue_size={num}")
        if vq.align != LEGACY_RING_ALIGN:
            raise ValueError("legacy rings need the used ring aligned to 4096 bytes")
        addr = vq.desc_iova
        if addr % (1 << LEGACY_PFN_SHIFT) or addr >> (32 + LEGACY_PFN_SHIFT):
            raise DeviceError(f"queue {index}: ring address {addr:#x} cannot be given to a legacy device "
                              "(page aligned and below 2^44 required)")
        self._w(LEGACY_QUEUE_SEL, 2, index)
        if self.msix:
            self._w(LEGACY_MSI_QUEUE_VECTOR, 2, vector)
            if vector != NO_VECTOR and self._r(LEGACY_MSI_QUEUE_VECTOR, 2) != vector:
                raise DeviceError(f"queue {index}: the device refused MSI-X vector {vector}")
        self._w(LEGACY_QUEUE_PFN, 4, addr >> LEGACY_PFN_SHIFT)
        fd = getattr(self.access, "device_fd", None)
        if not isinstance(fd, int) or fd < 0:
            raise DeviceError("legacy notifications need a region file descriptor (kernel VFIO)")
        vq.set_notify_pwrite(fd, self.access.region_info(self.bar).offset + LEGACY_QUEUE_NOTIFY, index)

    def set_config_vector(self, vector: int) -> None:
        if not self.msix:
            if vector == NO_VECTOR:
                return
            raise DeviceError("MSI-X must be enabled before routing legacy config interrupts")
        self._w(LEGACY_MSI_CONFIG_VECTOR, 2, vector)
        if vector != NO_VECTOR and self._r(LEGACY_MSI_CONFIG_VECTOR, 2) != vector:
            raise DeviceError(f"the device refused MSI-X vector {vector} for configuration changes")

    def read_isr(self) -> int:
        return self._r(LEGACY_ISR, 1)

    def config_generation(self) -> int:
        return 0  # legacy devices have no generation counter

    def _config_base(self) -> int:
        return LEGACY_CONFIG_MSIX if self.msix else LEGACY_CONFIG_NO_MSIX

    def device_config_length(self) -> int:
        return self.size - self._config_base()

    def _read_config(self, offset: int, width: int) -> int:
        return self._r(self._config_base() + offset, width)

    def write_config(self, offset: int, width: int, value: int) -> None:
        if offset + width > self.device_config_length():
            raise ValueError(f"device config offset {offset} is outside the legacy config area")
        self._w(self._config_base() + offset, width, value)

    def read_config(self, fields: list[tuple[int, int]]) -> list[int]:
        # No generation: a multi-byte field may tear (4.1.4.8); read twice until equal.
        for _ in range(8):
            a = super().read_config(fields)
            if a == super().read_config(fields):
                return a
        raise DeviceError("legacy device configuration kept changing while being read")

    def set_interrupts(self, fds: Sequence[int]) -> None:
        super().set_interrupts(fds)
        # 4.1.4.8: with MSI-X enabled the vector registers appear at 20 and 22 and the
        # device configuration moves from 20 to 24. Not with MSI or INTx: the
        # vector registers do not exist then and the configuration stays at 20.
        self.msix = self.interrupt_mode() == "msix"

    def disable_interrupts(self) -> None:
        super().disable_interrupts()
        self.msix = False

    def describe(self) -> str:
        return f"legacy virtio PCI: I/O BAR{self.bar} ({self.size} bytes), MSI-X {'on' if self.msix else 'off'}"


__all__ = ["LegacyTransport"]
