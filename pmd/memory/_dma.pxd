from libc.stdint cimport uint64_t


cdef class DmaMemory:
    cdef readonly int fd
    cdef char *base
    cdef readonly size_t size
    cdef readonly size_t page_size
    cdef readonly bint hugepages
    cdef readonly bint locked
    cdef readonly str name
    cdef size_t page_shift
    cdef size_t used
    cdef uint64_t *page_iova      # IOVA of each page, for the cold path and the pool
    cdef readonly bint iova_contiguous
    cdef int exports              # live buffer exports (numpy views)
    cdef int n_pins               # live objects holding raw pointers into the region
    cdef bint closing
    cdef object translator
    cdef object __weakref__

    cdef inline uint64_t iova_of(self, size_t offset) noexcept nogil:
        return self.page_iova[offset >> self.page_shift] + (offset & (self.page_size - 1))

    cdef _map(self, size_t size, bint huge)
    cdef _unmap(self)
    cdef inline int _check_open(self) except -1:
        # inline: every burst asks, through its queue and pool
        if self.base == NULL or self.closing:
            return self._raise_closed()
        return 0
    cdef int _raise_closed(self) except -1
    cdef int pin(self) except -1
    cdef void unpin(self) noexcept
    cdef void _unmap_if_unused(self) noexcept
    cdef bint range_iova_contiguous(self, size_t offset, size_t length) noexcept
