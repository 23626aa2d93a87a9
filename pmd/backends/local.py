"""pmd's driver on the built-in device in one process: a :class:`DeviceAccess` over a model.

It stands above both sides (a driver's device access made of the device's model),
with :func:`pmd.backends.open_port`.

``LocalAccess(model)`` answers the device-access interface by calling the
device model directly, the way the vfio-user server would on receiving each
message: region info from ``region_spec`` (the BAR's mmap-able notify area
is mapped from the model's memfd, the rest reached by ``region_read`` /
``region_write``), ``set_irqs`` with duplicated eventfds (the model owns what
it is given, as over a socket), ``dma_map`` with the memory's fd. So

    model = VirtioNetModel()
    port = pmd.open_port(LocalAccess(model)); port.start()

runs the real transport, negotiation, queues and bursts against the device,
with no socket in between: the test of the model, and of the driver against
a device it did not write, without another process.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..driver.access import DeviceAccess, RegionMapping
from ..errors import vfio_error
from ..sim.dma import PROT_RW
from ..sim.model import VirtioNetModel
from ..abi.vfio import DeviceInfo, IrqInfo, RegionInfo, SparseArea

if TYPE_CHECKING:
    from ..driver.port import Port


class LocalAccess(DeviceAccess):
    """``LocalAccess(model, name="sim")``: device access to ``model`` in this process."""

    def __init__(self, model: VirtioNetModel, name: str = "sim") -> None:
        self.model = model
        self.name = name
        self._closed = False
        self._mappings: list[RegionMapping] = []
        self._dma: dict[int, tuple[int, int]] = {}
        self.requests = 0                 # what would have been messages

    def _check(self) -> None:
        if self._closed:
            raise vfio_error(f"{self.name} is closed", errno.EBADF)

    @property
    def device_info(self) -> DeviceInfo:
        flags, regions, irqs = self.model.device_info()
        return DeviceInfo(flags, regions, irqs)

    def region_info(self, index: int) -> RegionInfo:
        self._check()
        spec = self.model.region_spec(index)
        areas = tuple(SparseArea(o, s) for o, s in spec.mmap_areas) if spec.mmap_areas else None
        return RegionInfo(index, spec.flags, spec.fd_offset, spec.size, areas)

    def irq_info(self, index: int) -> IrqInfo:
        count, flags = self.model.irq_info(index)
        return IrqInfo(index, flags, count)

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        self._check()
        self.requests += 1
        return self.model.region_read(index, offset, size)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check()
        self.requests += 1
        self.model.region_write(index, offset, bytes(data))

    def map_region(self, index: int) -> RegionMapping:
        self._check()
        spec = self.model.region_spec(index)
        info = self.region_info(index)
        if spec.fd < 0 or not info.mmappable:
            raise vfio_error(f"{self.name}: region {index} cannot be mapped", errno.EINVAL)
        mapping = RegionMapping(index, spec.fd, spec.fd_offset, spec.size, info.mmap_areas())
        self._mappings.append(mapping)
        return mapping

    @property
    def dma_mappings(self) -> dict[int, tuple[int, int]]:
        return dict(self._dma)

    def dma_map(self, vaddr: int, iova: int, size: int, fd: int = -1, fd_offset: int = 0) -> None:
        self._check()
        self.requests += 1
        self.model.dma_map(iova, size, fd, fd_offset, PROT_RW)
        self._dma[iova] = (vaddr, size)

    def dma_unmap(self, iova: int, size: int) -> None:
        self._check()
        self.requests += 1
        self.model.dma_unmap(iova, size)
        self._dma.pop(iova, None)

    def set_irqs(self, index: int, start: int, fds: Sequence[int]) -> None:
        self._check()
        self.requests += 1
        mine = [os.dup(fd) if fd >= 0 else -1 for fd in fds]      # the model owns what it is given
        try:
            self.model.set_irqs(index, start, mine)
        except BaseException:
            for fd in mine:
                if fd >= 0:
                    os.close(fd)
            raise

    def disable_irqs(self, index: int) -> None:
        self._check()
        self.requests += 1
        self.model.set_irqs(index, 0, None)

    def unmask_irq(self, index: int, start: int = 0, count: int = 1) -> None:
        self._check()
        self.requests += 1
        unmask = getattr(self.model, "unmask_irq", None)
        if unmask is not None:          # a model that masks (INTx); the others have nothing to unmask
            unmask(index, start, count)

    def reset(self) -> None:
        self._check()
        self.model.reset()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """As a client disconnecting: the model forgets DMA maps and IRQ fds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for mapping in self._mappings:
            mapping.close()
        self._mappings.clear()
        self._dma.clear()
        self._forget_memory()
        self.model.client_gone()


def open_local_port(model: VirtioNetModel | None = None, **options: object) -> Port:
    """A :class:`pmd.Port` on ``model`` (a new :class:`VirtioNetModel` from ``options`` when
    None) in this process. Closing the port disconnects; the model stays (close it too)."""
    from . import open_port

    if model is None:
        model = VirtioNetModel(**options)  # type: ignore[arg-type]
    return open_port(LocalAccess(model), name="sim-local")


__all__ = ["LocalAccess", "open_local_port"]
