"""What a device served over vfio-user must implement: :class:`DeviceModel`.

:class:`pmd.vfio_user.server.VfioUserServer` speaks the protocol; the device
model only answers questions about itself and does what it is told. The server
checks every message before the model sees it, so a model may rely on:

- ``index`` of ``region_*`` below ``num_regions`` of :meth:`DeviceModel.device_info`,
  and of ``irq_info``/``set_irqs`` below ``num_irqs``;
- ``region_read``/``region_write``: ``[offset, offset + size)`` inside the region's
  ``RegionSpec.size``, the region readable (``REGION_INFO_FLAG_READ``) or writable
  (``REGION_INFO_FLAG_WRITE``), ``1 <= size <= max_data_xfer_size``; the
  bytes returned by ``region_read`` must be exactly ``size`` long (else the
  client gets ``EIO``);
- ``set_irqs``: ``start + len(fds) <= count`` of that index; ``fds`` are eventfds
  received from the client, ``-1`` for "no eventfd for this vector any more";
  ``None`` means "disable every interrupt of this index" (close what you hold);
- ``dma_map``: ``size > 0``, ``[iova, iova + size)`` overlaps no current mapping,
  ``fd`` is a regular file (a memfd) at least ``fd_offset + size`` bytes long,
  ``prot`` is ``mmap.PROT_READ | mmap.PROT_WRITE`` (or one of them);
- ``dma_unmap``: ``(iova, size)`` is exactly one current mapping;
- ``reset`` only when ``device_info`` flags have ``VFIO_DEVICE_FLAGS_RESET``;
- ``client_gone`` after the client disconnected, for whatever reason (closed,
  crashed, dropped by the server for a protocol error, or the server closing):
  drop every DMA mapping and close every IRQ fd the model still holds. The spec
  lets a device keep its state for a client that reconnects; a model may also
  reset (the built-in device does: docs/vfio-user.md, section 9).

File descriptors:

- ``RegionSpec.fd`` stays the model's: the server sends a copy of it (``SCM_RIGHTS``
  duplicates it into the client) in each region-info reply and never closes it;
- ``set_irqs``: on return, the model owns every fd in ``fds`` (it keeps them,
  and closes the ones it replaces or no longer needs); if it raises, the
  server closes them all, so a model that raises must not have kept any;
- ``dma_map``: the fd stays the server's and is closed when the call returns:
  a model that maps the memory keeps the mapping (``mmap`` holds its own
  reference to the file), or ``os.dup`` s the fd.

Errors: an exception from the model becomes an error reply whose errno is the
exception's (``OSError``, :class:`pmd.errors.VfioError`), ``EINVAL`` for
``ValueError``/``TypeError``, ``ENOENT`` for ``LookupError``, ``ENOTSUP`` for
``NotImplementedError``, ``ENOMEM`` for ``MemoryError`` and ``EIO`` for anything
else (logged with its traceback). The server goes on serving.

All calls come from the server's one serving thread, one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["RegionSpec", "DeviceModel"]


@dataclass
class RegionSpec:
    """One region (BAR, config space, ...) as the device presents it.

    ``size == 0``: the device has no such region (an unimplemented BAR).
    With ``REGION_INFO_FLAG_MMAP`` in ``flags`` and ``fd >= 0``, the client may
    map ``mmap_areas`` (each ``(offset, size)`` relative to the region, offsets
    page aligned) from ``fd`` at file offset ``fd_offset + offset``; an empty
    ``mmap_areas`` then means the whole region is mappable. Everything not
    mapped is reached by REGION_READ/REGION_WRITE messages, which the model
    must serve for the whole region (mapped areas included: the spec requires
    both paths to work).
    """

    size: int
    flags: int  # VFIO_REGION_INFO_FLAG_READ | WRITE | MMAP
    mmap_areas: list[tuple[int, int]] = field(default_factory=list)  # (offset, size) sparse areas served by fd
    fd: int = -1  # backing file (memfd) for the mmappable areas
    fd_offset: int = 0  # file offset of region offset 0


class DeviceModel(Protocol):
    """The device behind a :class:`pmd.vfio_user.server.VfioUserServer` (see the module documentation)."""

    def device_info(self) -> tuple[int, int, int]:
        """``(flags, num_regions, num_irqs)``; flags are ``VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI``."""
        ...

    def region_spec(self, index: int) -> RegionSpec: ...

    def region_read(self, index: int, offset: int, size: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def irq_info(self, index: int) -> tuple[int, int]:
        """``(count, flags)``; flags are ``IRQ_INFO_EVENTFD | MASKABLE | AUTOMASKED | NORESIZE``."""
        ...

    def set_irqs(self, index: int, start: int, fds: list[int] | None) -> None:
        """``None``: disable; the model owns the fds it keeps."""
        ...

    def dma_map(self, iova: int, size: int, fd: int, fd_offset: int, prot: int) -> None: ...

    def dma_unmap(self, iova: int, size: int) -> None: ...

    def reset(self) -> None: ...

    def client_gone(self) -> None:
        """The driver disconnected: clean up DMA maps, IRQ fds."""
        ...
