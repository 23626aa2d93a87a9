# The driver's receive queue (pmd/driver/_rx.pyx), declared for the modules that
# drive it without Python calls (pmd/driver/_fwd.pyx: the forwarding loops).

from libc.stdint cimport uint32_t, uint64_t

from pmd.driver._queue cimport _Queue


cdef class RxQueue(_Queue):
    cdef uint32_t buf_len           # device-writable bytes per buffer
    cdef readonly bint mergeable    # VIRTIO_NET_F_MRG_RXBUF: a packet may span buffers
    cdef uint32_t mrg_max_len       # largest packet accepted when mergeable
    cdef public uint64_t no_buffer  # refills short of pool buffers
    cdef public uint64_t truncated
    cdef public uint64_t runt       # shorter than an Ethernet header: dropped
    cdef public uint64_t bad_num_buffers
    cdef public uint64_t zc_multi_dropped

    cdef uint32_t refill(self) noexcept nogil
    cdef uint32_t refill_split(self) noexcept nogil
    cdef uint32_t refill_packed(self) noexcept nogil

    cdef inline bint idle(self) noexcept:
        """Nothing received and nothing to refill: a poll that finds an empty
        ring returns without the cost of releasing and retaking the GIL."""
        return self.vq.num_free == 0 and not self.vq.any_used() and not self.vq.broken

    cdef int harvest(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                     Py_ssize_t burst) noexcept nogil
    cdef int harvest_split(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                           Py_ssize_t burst) noexcept nogil
    cdef int harvest_packed(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                            Py_ssize_t burst) noexcept nogil
    cdef int mrg_singles(self, uint32_t *ids, uint32_t *lengths, Py_ssize_t burst) noexcept nogil
    cdef int harvest_mrg(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                         Py_ssize_t burst) noexcept nogil
