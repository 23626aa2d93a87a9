# Declarations of csrc/pmd_mmio.h: volatile register accesses.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "pmd_mmio.h" nogil:
    uint8_t pmd_read8_relaxed(const void *a)
    uint16_t pmd_read16_relaxed(const void *a)
    uint32_t pmd_read32_relaxed(const void *a)
    uint64_t pmd_read64_relaxed(const void *a)
    void pmd_write8_relaxed(uint8_t v, void *a)
    void pmd_write16_relaxed(uint16_t v, void *a)
    void pmd_write32_relaxed(uint32_t v, void *a)
    void pmd_write64_relaxed(uint64_t v, void *a)
    uint8_t pmd_read8(const void *a)
    uint16_t pmd_read16(const void *a)
    uint32_t pmd_read32(const void *a)
    uint64_t pmd_read64(const void *a)
    void pmd_write8(uint8_t v, void *a)
    void pmd_write16(uint16_t v, void *a)
    void pmd_write32(uint32_t v, void *a)
    void pmd_write64(uint64_t v, void *a)
