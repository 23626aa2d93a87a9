# Declarations of csrc/pmd_rss.h: the RSS hash input of a packet and the Toeplitz
# hash (Virtio 1.2 5.1.6.4.3).
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "pmd_rss.h" nogil:
    enum:
        PMD_RSS_INPUT_MAX
        PMD_RSS_KEY_MAX

    uint32_t pmd_toeplitz(const uint8_t *key, uint32_t key_len, const uint8_t *data, uint32_t n)
    uint32_t pmd_rss_input(const uint8_t *frame, uint32_t len, uint32_t types, uint8_t *out,
                           uint16_t *report)
