"""What the modern and legacy PCI transports share: a :class:`DeviceAccess` under them.

Everything the Port needs of a device beyond the virtio registers goes through
the transport (:class:`pmd.driver.virtio.transport.Transport`); over PCI it is
the device access's (Linux keeps the same in ``virtio_pci_common.c``):

- interrupts: MSI-X vectors signalled on eventfds (``VFIO_DEVICE_SET_IRQS``);
- DMA memory: mapped through the IOMMU when VIRTIO_F_ACCESS_PLATFORM was
  negotiated, else given as physical addresses (Virtio 1.2 6.1: such a device
  bypasses the IOMMU; ``/proc/self/pagemap``);
- bus mastering, set before DRIVER_OK (without it a device such as QEMU's
  accepts every register write but never does DMA: docs/devices.md);
- the device going away (a vfio-user server that exits);
- closing the device access with the transport, when the transport owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ...abi.vfio import PCI_MSIX_IRQ_INDEX
from ..access import DeviceAccess
from ..access.pagemap import virt_to_phys
from .transport import Transport

if TYPE_CHECKING:
    from ...memory import DmaMemory

__all__ = ["PciTransport"]


def _nothing() -> None:
    pass


class PciTransport(Transport):
    """A virtio transport over a PCI device reached through ``access``.

    ``owns_access``: :meth:`close` closes the access too (the default: the
    transport was opened for it).
    """

    def __init__(self, access: DeviceAccess, *, owns_access: bool = True) -> None:
        self.access = access
        self.name = getattr(access, "address", None) or access.name
        self.owns_access = owns_access

    # ---- interrupts: MSI-X (PCI 3.0 6.8.2; Virtio 1.2 4.1.5.1.2) ----
    def interrupt_vectors(self) -> int:
        return self.access.irq_info(PCI_MSIX_IRQ_INDEX).count

    def set_interrupts(self, fds: Sequence[int]) -> None:
        self.access.set_irqs(PCI_MSIX_IRQ_INDEX, 0, fds)

    def disable_interrupts(self) -> None:
        self.access.disable_irqs(PCI_MSIX_IRQ_INDEX)

    # ---- DMA ----
    def map_memory(self, memory: DmaMemory, *, iommu: bool) -> Callable[[], None]:
        if iommu:
            # The device goes through the IOMMU: map the memory and use the IOVAs
            # the access layer picked (inside the IOMMU's valid ranges).
            self.access.map_memory(memory)
            return lambda: self.access.unmap_memory(memory)
        # Without ACCESS_PLATFORM the device uses physical addresses (6.1):
        # legacy and transitional devices bypass the IOMMU. Pages are locked
        # (DmaMemory lock=True); rings longer than a page need huge pages.
        memory.set_iova_translator(virt_to_phys)
        return _nothing

    def enable_dma(self) -> None:
        self.access.enable_bus_master()

    def on_lost(self, callback: Callable[[str], object]) -> Callable[[], None]:
        return self.access.on_lost(callback)

    # ---- lifetime ----
    def _unmap(self) -> None:
        """Release what the transport mapped of the device (its BAR windows)."""

    def close(self) -> None:
        try:
            self._unmap()
        finally:
            if self.owns_access:
                self.access.close()
