# The driver's transmit queue (pmd/driver/_tx.pyx), declared for the modules that
# drive it without Python calls (pmd/driver/_fwd.pyx: the forwarding loops).

from libc.stdint cimport uint32_t, uint64_t

from pmd.driver._queue cimport _Queue


cdef class TxQueue(_Queue):
    cdef public uint64_t ring_full
    # The caller's lengths (tx_burst) or ids and lengths (tx_burst_zc on a packed
    # ring, send_pool), read once, checked, and used from there: an array in
    # shared memory may change meanwhile.
    cdef uint32_t *s_ids
    cdef uint32_t *s_lens

    cdef uint32_t reclaim_used(self) noexcept nogil
    cdef uint32_t reclaim_in_order(self) noexcept nogil
    cdef uint32_t reclaim_split(self) noexcept nogil
    cdef uint32_t reclaim_packed(self) noexcept nogil
    cdef int send_copy(self, const char *pkts, Py_ssize_t cols, const uint32_t *lengths,
                       Py_ssize_t burst) noexcept nogil
    cdef int send_zc(self, const uint32_t *ids, const uint32_t *lengths, Py_ssize_t burst) noexcept nogil
    cdef int send_zc_split(self, const uint32_t *ids, const uint32_t *lengths, Py_ssize_t burst) noexcept nogil
    cdef int send_zc_packed(self, const uint32_t *ids, const uint32_t *lengths, Py_ssize_t burst) noexcept nogil
    cdef int send_pool(self, uint32_t length, Py_ssize_t burst) noexcept nogil
    cdef object _zc_error(self, Py_ssize_t i, uint32_t b, uint32_t ln, uint32_t st)
    cdef void _unclaim(self, Py_ssize_t start, Py_ssize_t end) noexcept nogil
    cdef Py_ssize_t claim_send(self, const uint32_t *d, const uint32_t *l, Py_ssize_t nids,
                               uint32_t room, uint32_t *bad) noexcept nogil
    cdef Py_ssize_t claim_send_split(self, const uint32_t *d, const uint32_t *l, Py_ssize_t nids,
                                     uint32_t room, uint32_t *bad) noexcept nogil
    cdef void unclaim_heads(self, Py_ssize_t k) noexcept nogil
