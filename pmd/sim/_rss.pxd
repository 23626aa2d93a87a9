# The built-in device's RSS state (Virtio 1.2 5.1.6.5.7): what RSS_CONFIG or
# HASH_CONFIG set, and the per-packet classification the engine's steered
# receive calls without the GIL.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

from pmd.includes.rss cimport PMD_RSS_INPUT_MAX, PMD_RSS_KEY_MAX, pmd_rss_input

cdef enum:
    RSS_TABLE_MAX = 128      # rss_max_indirection_table_length (5.1.4.1: at least 128)


cdef class RssState:
    cdef readonly bint active          # hash types set: packets are hashed
    cdef readonly bint redirect        # RSS_CONFIG: the table chooses the queue
    cdef readonly uint32_t hash_types
    cdef readonly uint16_t unclassified_queue
    cdef readonly uint32_t table_len
    cdef readonly uint32_t key_len
    cdef uint16_t _table[RSS_TABLE_MAX]
    cdef uint8_t _key[PMD_RSS_KEY_MAX]
    # the key's Toeplitz contribution of each byte value at each input position,
    # made once per configuration: a packet's hash is then one XOR per input byte
    cdef uint32_t lut[PMD_RSS_INPUT_MAX][256]

    cdef void _fill_lut(self) noexcept

    cdef inline uint16_t classify(self, const uint8_t *frame, uint32_t length, uint16_t source,
                                  uint32_t *hash, uint16_t *report) noexcept nogil:
        """The rx queue of one packet (5.1.6.5.7.2): the table entry at ``hash & mask``,
        ``unclassified_queue`` when not hashed; ``source`` (the pair the wire gave it
        to) without RSS_CONFIG. Sets the hash and its report (0, NONE if not hashed)."""
        cdef uint8_t inp[PMD_RSS_INPUT_MAX]
        cdef uint32_t n = pmd_rss_input(frame, length, self.hash_types, inp, report)
        cdef uint32_t h = 0, i
        for i in range(n):
            h ^= self.lut[i][inp[i]]
        hash[0] = h
        if not self.redirect:
            return source
        if n == 0:
            return self.unclassified_queue
        return self._table[h & (self.table_len - 1)]
