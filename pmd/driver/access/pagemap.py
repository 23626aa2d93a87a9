"""Physical addresses of this process's pages, for devices that bypass the IOMMU.

A device driven without an IOMMU (vfio's no-IOMMU mode), or one that did not
negotiate VIRTIO_F_ACCESS_PLATFORM (Virtio 1.2 6.1: it uses physical addresses),
must be given the physical address of each page: ``/proc/self/pagemap`` has one
u64 per virtual page (Linux Documentation/admin-guide/mm/pagemap.rst): bits 0-54
the page frame number, bit 62 swapped, bit 63 present. Since Linux 4.0 the PFN
reads as 0 without CAP_SYS_ADMIN. The pages must be locked and touched first.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct

from ...errors import vfio_error

__all__ = ["PAGEMAP_PFN_MASK", "PAGEMAP_SWAPPED", "PAGEMAP_PRESENT", "pagemap_entry_to_phys", "virt_to_phys"]

PAGEMAP_PFN_MASK = (1 << 55) - 1
PAGEMAP_SWAPPED = 1 << 62
PAGEMAP_PRESENT = 1 << 63


def pagemap_entry_to_phys(entry: int, vaddr: int, page_size: int = mmap.PAGESIZE) -> int:
    """Physical address of ``vaddr`` from its pagemap ``entry``."""
    if not entry & PAGEMAP_PRESENT:
        state = "swapped out" if entry & PAGEMAP_SWAPPED else "not present"
        raise vfio_error(
            f"page of virtual address {vaddr:#x} is {state}: lock the memory (mlock) and touch it "
            "before asking for its physical address",
            errno.EFAULT,
        )
    pfn = entry & PAGEMAP_PFN_MASK
    if pfn == 0:
        raise vfio_error(
            f"/proc/self/pagemap hides page frame numbers (PFN 0 for {vaddr:#x}): physical addresses "
            "need root (CAP_SYS_ADMIN); run as root for no-IOMMU mode",
            errno.EPERM,
        )
    return pfn * page_size + vaddr % page_size


def virt_to_phys(vaddr: int, pagemap: str = "/proc/self/pagemap") -> int:
    """Physical address of ``vaddr`` in this process (the page must be present, i.e. locked and touched)."""
    page = mmap.PAGESIZE
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise vfio_error(f"cannot open {pagemap}: {exc.strerror}", exc.errno) from exc
    try:
        raw = os.pread(fd, 8, vaddr // page * 8)
    except OSError as exc:
        raise vfio_error(f"cannot read {pagemap} for {vaddr:#x}: {exc.strerror}", exc.errno) from exc
    finally:
        os.close(fd)
    if len(raw) != 8:
        raise vfio_error(f"short read from {pagemap} for virtual address {vaddr:#x}", errno.EIO)
    (entry,) = struct.unpack("=Q", raw)
    return pagemap_entry_to_phys(entry, vaddr, page)
