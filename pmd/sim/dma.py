"""The driver's DMA memory as the device sees it: file mappings behind IOVAs.

A vfio-user client hands the server each DMA range as ``(iova, size, fd,
fd_offset)``; the device maps the file (``MAP_SHARED``, so it sees the
driver's stores) and registers ``[iova, iova + size)`` with a
:class:`pmd.sim._dma.DmaWindows`, which the Cython ring code uses to turn every
address the driver writes into a local pointer, or to refuse it.

The mappings are raw ``mmap``/``munmap`` calls (:mod:`pmd.memory.raw`) rather
than Python ``mmap`` objects: a window's address must stay valid until it is
removed, and unmapping must happen exactly when the device says so, whatever
views exist.
The caller makes sure no ring code runs while a mapping goes (the engine is
paused around :meth:`DmaMap.unmap`).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from ..memory.raw import mmap_raw, munmap_raw
from ..memory.seals import require_sealed
from ._dma import DmaWindows

PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


@dataclass
class DmaMapping:
    """One DMA range: ``[iova, iova + size)`` mapped at ``address`` (``length`` bytes mapped from
    the page-aligned file offset below ``fd_offset``; ``address + skew`` is the IOVA's byte)."""

    iova: int
    size: int
    address: int
    length: int
    skew: int

    @property
    def local(self) -> int:
        return self.address + self.skew


class DmaMap:
    """The set of DMA mappings of one device and the :class:`DmaWindows` the rings use."""

    def __init__(self) -> None:
        self.windows = DmaWindows()
        self.mappings: dict[int, DmaMapping] = {}

    def __len__(self) -> int:
        return len(self.mappings)

    def map(self, iova: int, size: int, fd: int, fd_offset: int, prot: int) -> DmaMapping:
        """Map ``size`` bytes of ``fd`` at ``fd_offset`` for IOVA ``iova``.

        Refuses (``OSError`` with an errno) a range that is empty, wraps past 2^64,
        overlaps a current one, is not readable and writable (the device writes
        received packets and used rings wherever the driver points it), or has no fd;
        and a file that is not sealed against shrinking (``EPERM``) or is shorter
        than ``fd_offset + size`` (``EINVAL``): the driver could truncate it under
        the mapping and kill the device with SIGBUS (:func:`pmd.memory.seals.require_sealed`).
        """
        if size <= 0 or iova < 0 or iova + size > 1 << 64 or fd_offset < 0:
            raise OSError(errno.EINVAL, f"bad DMA range iova={iova:#x} size={size:#x} offset={fd_offset:#x}")
        if fd < 0:
            raise OSError(errno.EINVAL, "the built-in device needs a file descriptor for every DMA range "
                                        "(it maps the driver's memory; it does not do DMA by messages)")
        if prot & PROT_RW != PROT_RW:
            raise OSError(errno.EINVAL, f"DMA range at {iova:#x} is not readable and writable (prot {prot}); "
                                        "the device writes received packets and used rings into it")
        for m in self.mappings.values():
            if iova < m.iova + m.size and m.iova < iova + size:
                raise OSError(errno.EEXIST, f"DMA range {iova:#x}+{size:#x} overlaps {m.iova:#x}+{m.size:#x}")
        require_sealed(fd, fd_offset + size, f"the file of DMA range {iova:#x}+{size:#x}")
        # The file's page size: a hugetlbfs memfd (the driver's DmaMemory with huge pages)
        # is mapped and unmapped in whole huge pages, and munmap of a shorter length
        # fails (EINVAL), which would leave the mapping behind. fstat gives it as st_blksize.
        page = max(mmap.PAGESIZE, _file_page_size(fd))
        skew = fd_offset % page
        length = (skew + size + page - 1) // page * page
        try:
            address = mmap_raw(0, length, PROT_RW, mmap.MAP_SHARED, fd, fd_offset - skew)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot map DMA range {iova:#x}+{size:#x} from fd {fd} offset "
                                     f"{fd_offset:#x}: {exc.strerror}") from None
        mapping = DmaMapping(iova, size, address, length, skew)
        try:
            self.windows.add(iova, size, mapping.local, mapping)
        except BaseException:
            munmap_raw(mapping.address, length)
            raise
        self.mappings[iova] = mapping
        return mapping

    def find(self, iova: int, size: int) -> DmaMapping | None:
        return next((m for m in self.mappings.values()
                     if m.iova <= iova and iova + size <= m.iova + m.size), None)

    def unmap(self, iova: int, size: int | None = None) -> None:
        """Forget and unmap the mapping at ``iova`` (``size``, when given, must match)."""
        mapping = self.mappings.get(iova)
        if mapping is None or (size is not None and size != mapping.size):
            raise OSError(errno.ENOENT, f"no DMA mapping {iova:#x}+{(size or 0):#x}")
        self.windows.remove(iova)
        del self.mappings[iova]
        munmap_raw(mapping.address, mapping.length)

    def clear(self) -> None:
        for iova in list(self.mappings):
            self.unmap(iova)

    def read(self, iova: int, size: int) -> bytes:
        """Bytes of driver memory (tests, the control queue)."""
        local = self.windows.local_address(iova, size)
        if local is None:
            raise OSError(errno.EFAULT, f"{iova:#x}+{size:#x} is not inside one DMA mapping")
        return ctypes.string_at(local, size)


def _file_page_size(fd: int) -> int:
    """The page size a mapping of ``fd`` is made of (hugetlbfs: its huge page size)."""
    try:
        size = os.fstat(fd).st_blksize
    except OSError:
        return mmap.PAGESIZE
    # a power of two, at most 1 GiB (the largest huge page); anything else: ordinary pages
    return size if 0 < size <= 1 << 30 and size & (size - 1) == 0 else mmap.PAGESIZE


__all__ = ["DmaMap", "DmaMapping", "PROT_RW"]
