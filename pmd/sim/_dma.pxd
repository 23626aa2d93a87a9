# The driver memory a device may touch: up to MAX_WINDOWS ranges [iova, iova+size)
# of driver memory, each mapped at a local address. Every address the driver
# writes (ring addresses, descriptors) goes through translate() before a byte is
# touched; an address outside every window is refused.

from libc.stdint cimport uint64_t

cdef enum:
    MAX_WINDOWS = 16

# One range of driver memory the device may touch: [iova, iova+size) is at `local`.
cdef struct Window:
    uint64_t iova
    uint64_t size
    char *local


cdef class DmaWindows:
    cdef Window win[MAX_WINDOWS]
    cdef int n
    cdef int last                    # window of the last hit: buffers cluster
    cdef list owners
    cdef readonly uint64_t generation  # bumped when a window goes: popped chains are stale

    cdef inline char *translate(self, uint64_t iova, uint64_t length) noexcept nogil:
        """Local address of [iova, iova+length), or NULL unless one window holds all of it.

        ``off`` wraps past every size when ``iova`` is below the window (add() refuses
        a window that reaches 2**64), so one comparison checks both ends; with no
        window, ``win[0]`` is all zero (remove()) and holds nothing."""
        cdef int i
        cdef Window *w = &self.win[self.last]
        cdef uint64_t off = iova - w.iova
        if off <= w.size and length <= w.size - off:
            return w.local + off
        for i in range(self.n):
            w = &self.win[i]
            off = iova - w.iova
            if off <= w.size and length <= w.size - off:
                self.last = i
                return w.local + off
        return NULL
