"""DMA memory: one shared, locked region that the device reaches by DMA.

The region comes from memfd_create (hugetlb pages when the system has them),
is mapped MAP_SHARED so the same pages can be handed to another process by
fd (a vfio-user device, a vhost-user backend), and is locked so the pages
stay put while a device may be writing them. The memfd is sealed against
shrinking and growing (and against further seals) before anyone can see the
fd: a peer that truncated it would kill every process mapping it with SIGBUS
(see pmd.memory.seals). Queues and pools carve their pieces out of it with a bump
allocator; the region is freed whole.

Addresses: the device sees IOVAs, never our virtual addresses. Each page has
an IOVA in a table filled by a translator (identity by default: kernel VFIO
type1 maps IOVA = virtual address; no-IOMMU mode plugs in physical addresses
from /proc/self/pagemap; vfio-user may pick any IOVA).
"""

import logging
import os

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.errno cimport errno
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport strerror

from pmd.errors import PmdError, QueueStateError
from pmd.memory.seals import SEALS as _SEALS, seal_memfd, seals_of

log = logging.getLogger("pmd.memory")


cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char *name, unsigned int flags)
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int mlock(const void *addr, size_t len)
    int munlock(const void *addr, size_t len)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED
        MAP_POPULATE
        MFD_CLOEXEC
        MFD_HUGETLB
        MFD_ALLOW_SEALING

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    int close(int fd)

# 2 MiB pages: the size DPDK uses and x86-64's smallest huge page.
MFD_HUGE_2MB = 21 << 26
DEFAULT_HUGEPAGE_SIZE = 2 << 20


def _free_hugepages():
    """Free 2 MiB huge pages in the system's pool (0 when none are reserved)."""
    try:
        with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


cdef class DmaMemory:
    """A region of DMA-able memory.

    ``DmaMemory(size, hugepages=None, lock=True, name="pmd-dma")``

    - ``size`` is rounded up to the page size.
    - ``hugepages``: ``None`` uses them when enough free 2 MiB pages exist
      and falls back to 4 KiB pages with a logged reason; ``True`` requires
      them; ``False`` never uses them.
    - ``lock``: lock the pages in RAM (``mlock``). Failing to lock raises
      with the remedy; pass ``lock=False`` where no device DMAs into the
      memory without an IOMMU pinning it (vfio-user, tests).

    The region is zero-filled (new memfd pages are zero by definition).
    ``fd`` stays open until ``close()`` so the memory can be shared; it is
    sealed (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``, memfd_create(2))
    before it is mapped, so its size is fixed for good (``sealed``).
    """

    def __cinit__(self):
        self.fd = -1
        self.base = NULL
        self.page_iova = NULL

    def __init__(self, size_t size, hugepages=None, bint lock=True, str name="pmd-dma"):
        if size == 0:
            raise ValueError("DmaMemory size must be positive (bytes)")
        self.name = name
        want_huge = hugepages
        if want_huge is None:
            want_huge = _free_hugepages() * DEFAULT_HUGEPAGE_SIZE >= size
            if not want_huge:
                log.info("DmaMemory %s: using 4 KiB pages: fewer than %d free 2 MiB huge pages "
                         "(reserve them with: echo N > /proc/sys/vm/nr_hugepages)",
                         name, (size + DEFAULT_HUGEPAGE_SIZE - 1) // DEFAULT_HUGEPAGE_SIZE)
        if want_huge:
            try:
                self._map(size, True)
            except OSError as e:
                if hugepages:
                    raise PmdError(f"cannot allocate {size} bytes of 2 MiB huge pages: {e}; "
                                   "reserve pages with: echo N > /proc/sys/vm/nr_hugepages, "
                                   "or pass hugepages=False") from e
                log.warning("DmaMemory %s: huge pages failed (%s); falling back to 4 KiB pages", name, e)
                self._map(size, False)
        else:
            self._map(size, False)
        self.locked = False
        if lock:
            if mlock(self.base, self.size) != 0:
                err = errno
                self._unmap()
                raise PmdError(f"cannot lock {self.size} bytes of DMA memory: {strerror(err).decode()}; "
                               "raise the limit (ulimit -l, or run as root / with CAP_IPC_LOCK) "
                               "or pass lock=False when no device DMAs without an IOMMU")
            self.locked = True
        self.set_iova_translator(None)

    cdef _map(self, size_t size, bint huge):
        cdef unsigned int flags = MFD_CLOEXEC | MFD_ALLOW_SEALING
        cdef size_t page = DEFAULT_HUGEPAGE_SIZE if huge else <size_t>os.sysconf("SC_PAGE_SIZE")
        if huge:
            flags |= MFD_HUGETLB | MFD_HUGE_2MB
        size = (size + page - 1) & ~(page - 1)
        bname = self.name.encode()
        cdef int fd = memfd_create(bname, flags)
        if fd < 0:
            raise OSError(errno, f"memfd_create: {strerror(errno).decode()}")
        if ftruncate(fd, <long>size) != 0:
            err = errno
            close(fd)
            raise OSError(err, f"ftruncate({size}): {strerror(err).decode()}")
        try:
            seal_memfd(fd)      # before the fd can be shared: the size never changes again
        except OSError:
            close(fd)
            raise
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)
        if p == MAP_FAILED:
            err = errno
            close(fd)
            raise OSError(err, f"mmap({size}): {strerror(err).decode()}")
        self.fd = fd
        self.base = <char *>p
        self.size = size
        self.page_size = page
        self.page_shift = page.bit_length() - 1
        self.hugepages = huge
        self.used = 0
        self.page_iova = <uint64_t *>malloc(sizeof(uint64_t) * (size >> self.page_shift))
        if self.page_iova == NULL:
            self._unmap()
            raise MemoryError()

    cdef _unmap(self):
        if self.base != NULL:
            if self.locked:
                munlock(self.base, self.size)
            munmap(self.base, self.size)
            self.base = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.page_iova != NULL:
            free(self.page_iova)
            self.page_iova = NULL

    def __dealloc__(self):
        self._unmap()

    cdef int _raise_closed(self) except -1:
        raise QueueStateError(f"DmaMemory {self.name!r} is closed")

    @property
    def address(self):
        """Virtual address of the first byte."""
        self._check_open()
        return <uintptr_t>self.base

    @property
    def closed(self):
        """True once :meth:`close` ran (or while it runs)."""
        return self.base == NULL or self.closing

    @property
    def sealed(self):
        """Whether the memfd carries pmd's seals (it cannot shrink, grow or take other seals)."""
        self._check_open()
        return seals_of(self.fd) & _SEALS == _SEALS

    @property
    def allocated(self):
        """Bytes handed out by ``alloc``."""
        return self.used

    def set_iova_translator(self, translator):
        """Set how a virtual address becomes the address the device uses.

        ``translator(page_vaddr) -> iova`` is called once per page now (not on
        the data path); ``None`` means IOVA = virtual address. Set it before
        creating queues and pools in this memory.
        """
        self._check_open()
        cdef size_t i, n = self.size >> self.page_shift
        cdef uint64_t va, iova
        cdef bint contiguous = True
        for i in range(n):
            va = <uintptr_t>self.base + (i << self.page_shift)
            if translator is None:
                iova = va
            else:
                iova = translator(va)
                if iova & (self.page_size - 1):
                    raise ValueError(f"IOVA translator returned {iova:#x} for page {va:#x}: "
                                     f"not aligned to the page size {self.page_size}")
            self.page_iova[i] = iova
            if i and self.page_iova[i] != self.page_iova[i - 1] + self.page_size:
                contiguous = False
        self.translator = translator
        self.iova_contiguous = contiguous

    def iova(self, size_t offset):
        """IOVA of the byte at ``offset``."""
        self._check_open()
        if offset >= self.size:
            raise ValueError(f"offset {offset} is outside the {self.size}-byte region")
        return self.iova_of(offset)

    cdef bint range_iova_contiguous(self, size_t offset, size_t length) noexcept:
        cdef size_t first = offset >> self.page_shift
        cdef size_t last = (offset + length - 1) >> self.page_shift
        cdef size_t i
        for i in range(first, last):
            if self.page_iova[i + 1] != self.page_iova[i] + self.page_size:
                return False
        return True

    def alloc(self, size_t size, size_t align=64):
        """Reserve ``size`` bytes aligned to ``align`` (a power of two); return the offset.

        Memory is never given back piecewise; it goes with the region.
        """
        self._check_open()
        if align == 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, got {align}")
        cdef size_t off = (self.used + align - 1) & ~(align - 1)
        if size == 0 or off + size > self.size:
            raise MemoryError(f"DmaMemory {self.name!r}: cannot allocate {size} bytes "
                              f"({self.size - self.used} of {self.size} left); create a larger region")
        self.used = off + size
        return off

    def view(self, size_t offset=0, length=None):
        """Bytes ``[offset, offset+length)`` as a writable uint8 numpy array (no copy).
        The array keeps the pages mapped while it lives (see ``close``)."""
        import numpy as np
        self._check_open()
        cdef size_t n = self.size - offset if length is None else length
        if offset > self.size or n > self.size - offset:
            raise ValueError(f"view [{offset}, {offset + n}) is outside the {self.size}-byte region")
        return np.frombuffer(self, dtype=np.uint8, count=n, offset=offset)

    def __getbuffer__(self, Py_buffer *view, int flags):
        self._check_open()
        PyBuffer_FillInfo(view, self, self.base, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1
        self._unmap_if_unused()

    # Pins: objects that use raw pointers into the region without the GIL
    # (RxQueue/TxQueue, DmaWindows, DeviceQueue) pin it while they may, as numpy
    # views do through the buffer exports. close() then only marks the region
    # closing; the pages go with the last pin or view, never under a burst.
    cdef int pin(self) except -1:
        self._check_open()
        self.n_pins += 1
        return 0

    cdef void unpin(self) noexcept:
        self.n_pins -= 1
        self._unmap_if_unused()

    cdef void _unmap_if_unused(self) noexcept:
        if self.closing and self.exports == 0 and self.n_pins == 0:
            self._unmap()

    @property
    def pins(self):
        """Objects (burst and device queues, DMA windows) that keep the pages mapped."""
        return self.n_pins

    def close(self):
        """Release the region. Idempotent.

        If numpy views of it, or burst queues, device queues or DMA windows
        built on it, are still alive, the pages stay mapped until the last of
        them is gone (or closed), so nothing ever points at unmapped memory;
        the region is unusable for new work at once.
        """
        if self.base == NULL:
            return
        self.closing = True
        self._unmap_if_unused()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"{self.used}/{self.size} bytes used"
        kind = "2 MiB pages" if self.hugepages else f"{self.page_size} B pages"
        return f"<DmaMemory {self.name!r} {kind}, {state}>"
