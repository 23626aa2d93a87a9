"""Choosing the IOVA at which the device sees a piece of DMA memory (an IOMMU's address space).

With an IOMMU, DPDK's VA mode gives the device the memory's own virtual
address; QEMU's emulated IOMMU has 39 address bits, too few for the
``0x7f...`` addresses mmap returns, so then the lowest free IOVA inside the
IOMMU's valid ranges is used instead (:func:`choose_iova`).
"""

from __future__ import annotations

import errno as _errno
import mmap as _mmap
from collections.abc import Sequence

from ...errors import vfio_error

__all__ = ["IOVA_SPACE", "choose_iova"]

#: the whole 64-bit IOVA space, for a transport that does not restrict IOVAs
IOVA_SPACE: tuple[tuple[int, int], ...] = ((0, (1 << 64) - 1),)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _format_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"[{a:#x}, {b:#x}]" for a, b in ranges) or "none"


def choose_iova(
    size: int,
    ranges: Sequence[tuple[int, int]] | None,
    taken: Sequence[tuple[int, int]] = (),
    *,
    align: int = _mmap.PAGESIZE,
    identity: int | None = None,
) -> int:
    """The IOVA at which to map ``size`` bytes of DMA memory.

    ``ranges`` are the inclusive ``(first, last)`` IOVA ranges the IOMMU can
    translate (``VFIO_IOMMU_GET_INFO``'s IOVA-range capability); ``None`` means
    any 64-bit IOVA. ``taken`` are ``(iova, size)`` of what is already mapped.

    - ``identity`` (the memory's virtual address) is returned when
      ``[identity, identity + size)`` lies inside one range and overlaps nothing
      taken: IOVA = virtual address, as DPDK's VA mode does;
    - otherwise the lowest multiple of ``align`` that is not 0 (a device or a
      driver may read 0 as "no address"), lies with the whole size inside one
      range, and overlaps nothing taken.

    No room anywhere raises :class:`VfioError` (``ENOSPC``) naming the ranges.
    """
    if size <= 0:
        raise ValueError(f"IOVA size must be positive, not {size}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"IOVA alignment must be a power of two, not {align}")
    spaces = sorted(IOVA_SPACE if ranges is None else ranges)
    busy = sorted((iova, iova + n) for iova, n in taken if n > 0)

    def clash(first: int, end: int) -> tuple[int, int] | None:
        return next(((a, b) for a, b in busy if a < end and first < b), None)

    if identity is not None and identity >= 0:
        inside = any(lo <= identity and identity + size - 1 <= hi for lo, hi in spaces)
        if inside and clash(identity, identity + size) is None:
            return identity
    for lo, hi in spaces:
        candidate = _align_up(max(lo, align), align)
        while candidate + size - 1 <= hi:
            other = clash(candidate, candidate + size)
            if other is None:
                return candidate
            candidate = _align_up(other[1], align)
    raise vfio_error(
        f"no free IOVA range of {size:#x} bytes aligned to {align:#x} inside the IOVA ranges the IOMMU "
        f"can address ({_format_ranges(spaces)}); already mapped: "
        f"{', '.join(f'{a:#x}+{b - a:#x}' for a, b in busy) or 'nothing'}. Map less memory or unmap some first",
        _errno.ENOSPC,
    )
