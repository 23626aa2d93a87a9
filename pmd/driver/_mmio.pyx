"""Register access for the control path: a window onto mapped device memory.

Transports read and write virtio structures (common config, ISR, device
config, notify) only through this class, so every access is one volatile
load or store of the field's own width with the barrier of the rte_read16 /
rte_write16 pattern (csrc/pmd_mmio.h). Offsets and alignment are checked
here, once, in Python-facing code: a bad offset is a ValueError, never a
stray access.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t

from pmd.includes.mmio cimport (
    pmd_read8, pmd_read16, pmd_read32, pmd_read64,
    pmd_read8_relaxed, pmd_read16_relaxed, pmd_read32_relaxed, pmd_read64_relaxed,
    pmd_write8, pmd_write16, pmd_write32, pmd_write64,
)
from pmd.includes.barrier cimport PMD_BARRIER_ARCH

from pmd.errors import QueueStateError

BARRIER_ARCH = PMD_BARRIER_ARCH.decode()


cdef class Mmio:
    """Volatile, width-exact access to ``length`` bytes of mapped memory.

    Build it from a writable buffer that owns the mapping (an ``mmap.mmap`` of
    a VFIO BAR region, a ``DmaMemory``, a ``bytearray`` in tests) with
    ``Mmio(buffer)``, or from a raw address with ``Mmio.from_address`` (the
    caller vouches for it). ``window(offset, length)`` gives a sub-range, e.g.
    the common-config structure inside a BAR.
    """

    def __cinit__(self):
        self.base = NULL
        self.has_view = False

    def __init__(self, buffer=None):
        if buffer is None:
            return  # from_address / window fill it in
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        self.base = <char *>self.view.buf
        self.length = <size_t>self.view.len
        self.owner = buffer

    @staticmethod
    def from_address(uintptr_t address, size_t length, owner=None):
        """Wrap raw mapped memory. ``owner`` is kept alive as long as this object.

        Unsafe by nature: the caller guarantees ``[address, address+length)``
        stays mapped while ``owner`` lives.
        """
        if address == 0:
            raise ValueError("Mmio address must not be NULL")
        cdef Mmio m = Mmio()
        m.base = <char *>address
        m.length = length
        m.owner = owner
        return m

    def window(self, size_t offset, size_t length):
        """A sub-window ``[offset, offset+length)``; keeps this one alive."""
        self.at(offset, 1)
        if length == 0 or offset + length > self.length:
            raise ValueError(f"window [{offset:#x}, {offset + length:#x}) does not fit in "
                             f"{self.length:#x} bytes")
        cdef Mmio m = Mmio()
        m.base = self.base + offset
        m.length = length
        m.owner = self
        return m

    cdef char *at(self, size_t offset, size_t width) except NULL:
        if self.base == NULL:
            raise QueueStateError("Mmio window is closed")
        if offset + width > self.length or offset + width < offset:
            raise ValueError(f"offset {offset:#x} + {width} bytes is outside the "
                             f"{self.length:#x}-byte window")
        if (<uintptr_t>(self.base + offset)) & (width - 1):
            raise ValueError(f"offset {offset:#x} is not aligned to the {width}-byte access")
        return self.base + offset

    @property
    def address(self):
        """Virtual address of the window's first byte."""
        if self.base == NULL:
            raise QueueStateError("Mmio window is closed")
        return <uintptr_t>self.base

    @property
    def closed(self):
        """True once :meth:`close` ran."""
        return self.base == NULL

    # Ordered accessors: load + io_rmb / io_wmb + store (rte_read16 / rte_write16).
    def read8(self, size_t offset):
        """The 8-bit register at ``offset``, then a read barrier (``rte_read8``)."""
        return pmd_read8(self.at(offset, 1))

    def read16(self, size_t offset):
        """The 16-bit register at ``offset``, then a read barrier (``rte_read16``)."""
        return pmd_read16(self.at(offset, 2))

    def read32(self, size_t offset):
        """The 32-bit register at ``offset``, then a read barrier (``rte_read32``)."""
        return pmd_read32(self.at(offset, 4))

    def read64(self, size_t offset):
        """The 64-bit register at ``offset``, then a read barrier (``rte_read64``)."""
        return pmd_read64(self.at(offset, 8))

    def write8(self, size_t offset, uint8_t value):
        """A write barrier, then ``value`` into the 8-bit register at ``offset`` (``rte_write8``)."""
        pmd_write8(value, self.at(offset, 1))

    def write16(self, size_t offset, uint16_t value):
        """A write barrier, then ``value`` into the 16-bit register at ``offset`` (``rte_write16``)."""
        pmd_write16(value, self.at(offset, 2))

    def write32(self, size_t offset, uint32_t value):
        """A write barrier, then ``value`` into the 32-bit register at ``offset`` (``rte_write32``)."""
        pmd_write32(value, self.at(offset, 4))

    def write64(self, size_t offset, uint64_t value):
        """A write barrier, then ``value`` into the 64-bit register at ``offset`` (``rte_write64``)."""
        pmd_write64(value, self.at(offset, 8))

    # Relaxed loads, for polling a register in a loop that has its own barrier.
    def read8_relaxed(self, size_t offset):
        """The 8-bit register at ``offset``, no barrier (a polling loop with its own)."""
        return pmd_read8_relaxed(self.at(offset, 1))

    def read16_relaxed(self, size_t offset):
        """The 16-bit register at ``offset``, no barrier (a polling loop with its own)."""
        return pmd_read16_relaxed(self.at(offset, 2))

    def read32_relaxed(self, size_t offset):
        """The 32-bit register at ``offset``, no barrier (a polling loop with its own)."""
        return pmd_read32_relaxed(self.at(offset, 4))

    def read64_relaxed(self, size_t offset):
        """The 64-bit register at ``offset``, no barrier (a polling loop with its own)."""
        return pmd_read64_relaxed(self.at(offset, 8))

    def close(self):
        """Stop using the window and release the buffer it came from. Idempotent."""
        self.base = NULL
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False
        self.owner = None

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.base == NULL:
            return "<Mmio closed>"
        return f"<Mmio {<uintptr_t>self.base:#x} +{self.length:#x}>"
