# The driver's receive queue (pmd/driver/_rx.pyx), declared for the modules that
# drive it without Python calls (pmd/driver/_fwd.pyx: the forwarding loops).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

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
    # During one burst that asked for them (hashes=, hash_types=): where the hash and
    # the report of packet k go (the 20-byte header's hash_value, hash_report, 5.1.6);
    # NULL otherwise. hash_types may be uint16 (t16) or uint8 (t8).
    cdef uint32_t *hash_out
    cdef uint16_t *htype16_out
    cdef uint8_t *htype8_out
    cdef bint want_hash

    cdef inline void take_hash(self, const char *hdr, int k) noexcept nogil:
        """Packet k's hash fields from its header (device-written values, handed over as they are)."""
        cdef uint32_t h
        cdef uint16_t t
        memcpy(&h, hdr + 12, 4)
        memcpy(&t, hdr + 16, 2)
        if self.hash_out != NULL:
            self.hash_out[k] = h
        if self.htype16_out != NULL:
            self.htype16_out[k] = t
        elif self.htype8_out != NULL:
            self.htype8_out[k] = <uint8_t>t if t <= 0xFF else 0xFF

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
    cdef int harvest_split_slow(self, uint32_t id, uint32_t ln, char *out, Py_ssize_t cols,
                                uint32_t *ids, uint32_t *lengths, int got, uint16_t mark) noexcept nogil
    cdef int harvest_packed(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                            Py_ssize_t burst) noexcept nogil
    cdef int mrg_singles(self, uint32_t *ids, uint32_t *lengths, Py_ssize_t burst) noexcept nogil
    cdef int harvest_mrg(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                         Py_ssize_t burst) noexcept nogil
