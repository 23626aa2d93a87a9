"""The modern virtio PCI transport (Virtio 1.2 4.1.4): structures found through
vendor capabilities, living in memory BARs, reached only through ``pmd.Mmio``.

Queue setup follows DPDK's ``modern_setup_queue``: select the queue, size it,
give the three ring addresses (IOVAs) as 32-bit halves, compute the notify
address from ``queue_notify_off`` times ``notify_off_multiplier``, route its
MSI-X vector (read back to catch a refusal), then enable it.
"""

from __future__ import annotations

from typing import Union

from ...errors import DeviceError
from ...abi.pci import ConfigSpace
from ...abi.virtio import NO_VECTOR
from ...abi.virtio_pci import (
    COMMON_CFG_LEN,
    CONFIG_GENERATION,
    CONFIG_MSIX_VECTOR,
    DEVICE_FEATURE,
    DEVICE_FEATURE_SELECT,
    DEVICE_STATUS,
    DRIVER_FEATURE,
    DRIVER_FEATURE_SELECT,
    NUM_QUEUES,
    QUEUE_DESC,
    QUEUE_DEVICE,
    QUEUE_DRIVER,
    QUEUE_ENABLE,
    QUEUE_MSIX_VECTOR,
    QUEUE_NOTIFY_OFF,
    QUEUE_SELECT,
    QUEUE_SIZE,
    VirtioStructures,
    select_virtio_structures,
)
from .._mmio import Mmio
from .._virtqueue import Virtqueue
from ..access import DeviceAccess, RegionMapping
from .pci_common import PciTransport
from .transport import check_queue_size


class RegionRegisters:
    """Registers reached by region read/write requests instead of a mapping.

    For a structure the device does not let us map (a vfio-user device keeps
    its common configuration message-only: writing queue_select changes what
    queue_size shows, so every access must reach the device). Same methods as
    :class:`pmd.Mmio`, one request per access at the field's width.
    """

    def __init__(self, access: DeviceAccess, region: int, offset: int, length: int) -> None:
        self.access = access
        self.region = region
        self.base = offset
        self.length = length

    def _at(self, offset: int, width: int) -> int:
        if offset < 0 or offset + width > self.length or offset % width:
            raise ValueError(f"{width}-byte register at {offset:#x} is outside the {self.length:#x}-byte "
                             "structure or misaligned")
        return self.base + offset

    def _read(self, offset: int, width: int) -> int:
        return int.from_bytes(self.access.region_read(self.region, self._at(offset, width), width), "little")

    def _write(self, offset: int, width: int, value: int) -> None:
        self.access.region_write(self.region, self._at(offset, width), value.to_bytes(width, "little"))

    def read8(self, offset: int) -> int: return self._read(offset, 1)
    def read16(self, offset: int) -> int: return self._read(offset, 2)
    def read32(self, offset: int) -> int: return self._read(offset, 4)
    def write8(self, offset: int, value: int) -> None: self._write(offset, 1, value)
    def write16(self, offset: int, value: int) -> None: self._write(offset, 2, value)
    def write32(self, offset: int, value: int) -> None: self._write(offset, 4, value)


Registers = Union[Mmio, RegionRegisters]


class ModernTransport(PciTransport):
    """``ModernTransport(access, config)``: maps the BARs holding the virtio structures."""

    kind = "modern"
    ring_align = 4096
    feature_bits = 64

    def __init__(self, access: DeviceAccess, config: ConfigSpace, *, owns_access: bool = True) -> None:
        super().__init__(access, owns_access=owns_access)
        sizes = {i: access.region_info(i).size for i in range(6)}
        structs: VirtioStructures = select_virtio_structures(config, sizes)
        common, notify, isr, device = structs.common, structs.notify, structs.isr, structs.device
        if common is None or notify is None or isr is None or device is None:
            missing = [n for n in ("common", "notify", "isr", "device") if getattr(structs, n) is None]
            raise DeviceError(f"not a modern virtio device: no usable {', '.join(missing)} capability "
                              "(Virtio 1.2 4.1.4); a transitional device can be driven through the legacy "
                              "interface instead (legacy=True)")
        self.structs = structs
        self._maps: dict[int, RegionMapping] = {}
        try:
            self.common = self._window(common.bar, common.offset, COMMON_CFG_LEN)
            self.isr = self._window(isr.bar, isr.offset, 1)
            self.device = self._window(device.bar, device.offset, device.length)
            self.notify = self._window(notify.bar, notify.offset, notify.length)
        except BaseException:
            self._unmap()
            raise
        self.notify_multiplier: int = notify.notify_off_multiplier or 0
        self._device_length = device.length

    def _window(self, bar: int, offset: int, length: int) -> Registers:
        """The structure at ``BAR bar + offset``: a mapped window when the device lets
        us map that part of the BAR (kernel VFIO: all of it), else registers
        reached by region requests (a message-only area of a vfio-user device)."""
        if self.access.is_io_bar(bar):
            raise DeviceError(f"virtio structure in BAR{bar}, an I/O BAR: modern structures must be "
                              "in memory BARs (4.1.4.1)")
        info = self.access.region_info(bar)
        if offset + length > info.size:
            raise DeviceError(f"virtio structure at BAR{bar}+{offset:#x} ({length:#x} bytes) runs past "
                              f"the {info.size:#x}-byte BAR")
        if not any(a.offset <= offset and offset + length <= a.end for a in info.mmap_areas()):
            return RegionRegisters(self.access, bar, offset, length)
        if bar not in self._maps:
            self._maps[bar] = self.access.map_region(bar)
        return self._maps[bar].mmio(offset, length)

    # ---- status and features ----
    def get_status(self) -> int:
        return int(self.common.read8(DEVICE_STATUS))

    def set_status(self, status: int) -> None:
        self.common.write8(DEVICE_STATUS, status)

    def device_features(self) -> int:
        self.common.write32(DEVICE_FEATURE_SELECT, 0)
        lo = self.common.read32(DEVICE_FEATURE)
        self.common.write32(DEVICE_FEATURE_SELECT, 1)
        hi = self.common.read32(DEVICE_FEATURE)
        return int(lo) | int(hi) << 32

    def set_driver_features(self, features: int) -> None:
        self.common.write32(DRIVER_FEATURE_SELECT, 0)
        self.common.write32(DRIVER_FEATURE, features & 0xFFFFFFFF)
        self.common.write32(DRIVER_FEATURE_SELECT, 1)
        self.common.write32(DRIVER_FEATURE, features >> 32)

    # ---- queues ----
    def num_queues(self) -> int:
        return int(self.common.read16(NUM_QUEUES))

    def queue_max_size(self, index: int) -> int:
        if index >= self.num_queues():
            return 0
        self.common.write16(QUEUE_SELECT, index)
        return int(self.common.read16(QUEUE_SIZE))

    def queue_size_fixed(self) -> bool:
        return False

    def setup_queue(self, index: int, vq: Virtqueue, vector: int = NO_VECTOR) -> None:
        check_queue_size(index, vq.size, self.queue_max_size(index))
        c = self.common
        c.write16(QUEUE_SELECT, index)
        c.write16(QUEUE_SIZE, vq.size)
        for reg, addr in ((QUEUE_DESC, vq.desc_iova), (QUEUE_DRIVER, vq.avail_iova),
                          (QUEUE_DEVICE, vq.used_iova)):
            # 64-bit fields as two 32-bit halves, low first (4.1.3.1 allows it; some devices need it).
            c.write32(reg, addr & 0xFFFFFFFF)
            c.write32(reg + 4, addr >> 32)
        notify_off = int(c.read16(QUEUE_NOTIFY_OFF)) * self.notify_multiplier
        if notify_off + 2 > self.notify.length:
            raise DeviceError(f"queue {index}: notify offset {notify_off:#x} is outside the "
                              f"{self.notify.length:#x}-byte notify structure")
        if isinstance(self.notify, Mmio):
            vq.set_notify_mmio(self.notify, notify_off, index)
        else:
            # A message-only notify area cannot be written from the data path:
            # the device polls its rings instead (the built-in device does).
            vq.set_notify_none()
        if vector != NO_VECTOR:
            c.write16(QUEUE_MSIX_VECTOR, vector)
            if c.read16(QUEUE_MSIX_VECTOR) != vector:
                raise DeviceError(f"queue {index}: the device refused MSI-X vector {vector} "
                                  "(reads back 0xffff); use fewer interrupt vectors")
        c.write16(QUEUE_ENABLE, 1)

    def disable_queue_vector(self, index: int) -> None:
        self.common.write16(QUEUE_SELECT, index)
        self.common.write16(QUEUE_MSIX_VECTOR, NO_VECTOR)

    # ---- interrupts and config ----
    def set_config_vector(self, vector: int) -> None:
        self.common.write16(CONFIG_MSIX_VECTOR, vector)
        if vector != NO_VECTOR and self.common.read16(CONFIG_MSIX_VECTOR) != vector:
            raise DeviceError(f"the device refused MSI-X vector {vector} for configuration changes")

    def read_isr(self) -> int:
        return int(self.isr.read8(0))

    def config_generation(self) -> int:
        return int(self.common.read8(CONFIG_GENERATION))

    def device_config_length(self) -> int:
        return self._device_length

    def _read_config(self, offset: int, width: int) -> int:
        return int({1: self.device.read8, 2: self.device.read16, 4: self.device.read32}[width](offset))

    def write_config(self, offset: int, width: int, value: int) -> None:
        {1: self.device.write8, 2: self.device.write16, 4: self.device.write32}[width](offset, value)

    def _unmap(self) -> None:
        for mapping in self._maps.values():
            mapping.close()
        self._maps.clear()

    def describe(self) -> str:
        s = self.structs
        assert s.common and s.notify and s.isr and s.device
        return (f"modern virtio PCI: common BAR{s.common.bar}+{s.common.offset:#x}, "
                f"notify BAR{s.notify.bar}+{s.notify.offset:#x} (x{self.notify_multiplier}), "
                f"ISR BAR{s.isr.bar}+{s.isr.offset:#x}, device BAR{s.device.bar}+{s.device.offset:#x}")
