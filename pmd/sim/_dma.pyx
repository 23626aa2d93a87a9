"""The driver memory a device may touch: IOVA windows onto local mappings.

A device is given IOVAs in descriptors and ring addresses; each must fall
inside one range the driver made available (vfio-user ``DMA_MAP``, or a
:class:`pmd.DmaMemory` in this process), and is translated to a local pointer
by the inline ``DmaWindows.translate`` (_dma.pxd) or refused. The Python side,
which maps the driver's files, is :class:`pmd.sim.dma.DmaMap`.
"""

cimport cython
from libc.stdint cimport uint64_t, uintptr_t

from pmd.memory._dma cimport DmaMemory

@cython.no_gc_clear   # __dealloc__ unpins the DmaMemory owners
cdef class DmaWindows:
    """The driver memory a device may access: up to 16 ``(iova, size) -> local`` ranges."""

    def __cinit__(self):
        self.n = 0
        self.owners = []

    def __dealloc__(self):
        for owner in self.owners:
            if isinstance(owner, DmaMemory):
                (<DmaMemory>owner).unpin()

    def add(self, uint64_t iova, uint64_t size, uintptr_t local, owner=None):
        """Map ``[iova, iova+size)`` to the local address ``local`` (kept alive by ``owner``;
        a ``DmaMemory`` owner stays mapped while the window exists, even if closed)."""
        if self.n == MAX_WINDOWS:
            raise ValueError(f"at most {MAX_WINDOWS} DMA windows")
        if size == 0 or local == 0 or iova + size < iova:
            raise ValueError(f"bad DMA window iova={iova:#x} size={size:#x}")
        if isinstance(owner, DmaMemory):
            (<DmaMemory>owner).pin()
        self.win[self.n].iova = iova
        self.win[self.n].size = size
        self.win[self.n].local = <char *>local
        self.n += 1
        self.owners.append(owner)

    def add_memory(self, DmaMemory memory not None):
        """In-process device: the whole of ``memory`` at its IOVAs (which must be contiguous)."""
        if not memory.iova_contiguous:
            raise ValueError("add_memory needs contiguous IOVAs; add each range with add()")
        self.add(memory.iova_of(0), memory.size, <uintptr_t>memory.base, memory)

    def remove(self, uint64_t iova):
        """Forget the window starting at ``iova`` (DMA_UNMAP)."""
        cdef int i
        for i in range(self.n):
            if self.win[i].iova == iova:
                owner = self.owners[i]
                self.win[i] = self.win[self.n - 1]
                self.owners[i] = self.owners[self.n - 1]
                self.owners.pop()
                self.n -= 1
                self.win[self.n].iova = 0       # translate() may look at win[0] with n == 0
                self.win[self.n].size = 0
                self.win[self.n].local = NULL
                self.last = 0
                self.generation += 1
                if isinstance(owner, DmaMemory):
                    (<DmaMemory>owner).unpin()
                return
        raise KeyError(f"no DMA window at {iova:#x}")

    def clear(self):
        """Forget every window."""
        while self.n:
            self.remove(self.win[self.n - 1].iova)

    def local_address(self, uint64_t iova, uint64_t length=1):
        """Where ``[iova, iova+length)`` is mapped locally, or None."""
        cdef char *p = self.translate(iova, length)
        return None if p == NULL else <uintptr_t>p

    def __len__(self):
        return self.n
