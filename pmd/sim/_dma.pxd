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
        """Local address of [iova, iova+length), or NULL unless one window holds all of it."""
        cdef int i
        cdef Window *w = &self.win[self.last]
        if self.n and iova >= w.iova and iova - w.iova <= w.size and length <= w.size - (iova - w.iova):
            return w.local + (iova - w.iova)
        for i in range(self.n):
            w = &self.win[i]
            if iova >= w.iova and iova - w.iova <= w.size and length <= w.size - (iova - w.iova):
                self.last = i
                return w.local + (iova - w.iova)
        return NULL
