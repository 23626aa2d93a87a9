"""What the modern and legacy PCI transports share: a :class:`DeviceAccess` under them.

Everything the Port needs of a device beyond the virtio registers goes through
the transport (:class:`pmd.driver.virtio.transport.Transport`); over PCI it is
the device access's (Linux keeps the same in ``virtio_pci_common.c``):

- interrupts: MSI-X vectors, else one MSI or INTx interrupt, signalled on eventfds
  (``VFIO_DEVICE_SET_IRQS``); INTx is unmasked again after each ISR read;
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

from ...abi.vfio import PCI_INTX_IRQ_INDEX, PCI_MSI_IRQ_INDEX, PCI_MSIX_IRQ_INDEX, IrqInfo
from ...errors import DeviceError
from ..access import DeviceAccess
from ..access.pagemap import virt_to_phys
from .transport import Transport

if TYPE_CHECKING:
    from ...memory import DmaMemory

__all__ = ["PciTransport"]


_IRQ_ORDER = (("msix", PCI_MSIX_IRQ_INDEX), ("msi", PCI_MSI_IRQ_INDEX), ("intx", PCI_INTX_IRQ_INDEX))


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
        self._irq_choice: tuple[str, int, IrqInfo | None] | None = None

    # ---- interrupts: MSI-X, else MSI, else INTx (PCI 3.0 6.8; Virtio 1.2 4.1.5.1.2, 4.1.4.5) ----
    def _interrupts(self) -> tuple[str, int, IrqInfo | None]:
        """(mode, VFIO IRQ index, its info): the first index that has interrupts with
        eventfds, in DPDK's order. A device without an MSI-X capability (QEMU's
        ``vectors=0``) reports count 0 for the MSI-X index. Asked once: it does not change."""
        if self._irq_choice is None:
            choice: tuple[str, int, IrqInfo | None] = ("none", -1, None)
            num = self.access.device_info.num_irqs
            for mode, index in _IRQ_ORDER:
                if index >= num:
                    continue
                info = self.access.irq_info(index)
                if info.count > 0 and info.eventfd:
                    choice = (mode, index, info)
                    break
            self._irq_choice = choice
        return self._irq_choice

    def interrupt_mode(self) -> str:
        return self._interrupts()[0]

    def interrupt_vectors(self) -> int:
        mode, _index, info = self._interrupts()
        if mode == "msix":
            assert info is not None
            return info.count
        # MSI and INTx: one interrupt. Virtio has no registers to route sources to
        # MSI vectors, so even a multi-message MSI is used as one (as Linux does).
        return 0 if mode == "none" else 1

    def set_interrupts(self, fds: Sequence[int]) -> None:
        mode, index, _info = self._interrupts()
        if mode == "none":
            raise DeviceError(f"{self.name}: the device signals no interrupts (no MSI-X, MSI or INTx "
                              "with eventfds): poll it")
        if mode != "msix" and len(fds) != 1:
            raise DeviceError(f"{self.name}: {mode} is one interrupt for every source, not {len(fds)} "
                              "vectors: give one eventfd and read the ISR status for the cause")
        self.access.set_irqs(index, 0, fds)

    def disable_interrupts(self) -> None:
        mode, index, _info = self._interrupts()
        if mode != "none":
            self.access.disable_irqs(index)

    def unmask_interrupt(self) -> None:
        mode, index, info = self._interrupts()
        # INTx is level-triggered: VFIO masks it when it fires (AUTOMASKED), so that
        # the host does not take it again and again until the driver has read ISR.
        if mode == "intx" and info is not None and (info.automasked or info.maskable):
            self.access.unmask_irq(index, 0, 1)

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
