/* pmd_mmio.h: volatile loads and stores of device registers.
 *
 * The only place in pmd where device memory is dereferenced. The pattern is
 * DPDK's rte_io.h:
 *
 *   relaxed read  = one volatile load of exactly that width
 *   read          = relaxed read, then io_rmb (later loads, e.g. of DMA
 *                   memory the register told us about, stay after it)
 *   relaxed write = one volatile store of exactly that width
 *   write         = io_wmb, then relaxed write (earlier stores, e.g. ring
 *                   entries, reach the device before the register does)
 *
 * "volatile" makes the compiler emit exactly one access of exactly that width
 * (PCI registers may have side effects on read and must not be split, merged
 * or cached in a register). Callers guarantee natural alignment; the Cython
 * Mmio class checks it.
 */
#ifndef PMD_MMIO_H
#define PMD_MMIO_H

#include "pmd_barrier.h"

PMD_ALWAYS_INLINE uint8_t  pmd_read8_relaxed(const volatile void *a)  { return *(const volatile uint8_t  *)a; }
PMD_ALWAYS_INLINE uint16_t pmd_read16_relaxed(const volatile void *a) { return *(const volatile uint16_t *)a; }
PMD_ALWAYS_INLINE uint32_t pmd_read32_relaxed(const volatile void *a) { return *(const volatile uint32_t *)a; }
PMD_ALWAYS_INLINE uint64_t pmd_read64_relaxed(const volatile void *a) { return *(const volatile uint64_t *)a; }

PMD_ALWAYS_INLINE void pmd_write8_relaxed(uint8_t v, volatile void *a)   { *(volatile uint8_t  *)a = v; }
PMD_ALWAYS_INLINE void pmd_write16_relaxed(uint16_t v, volatile void *a) { *(volatile uint16_t *)a = v; }
PMD_ALWAYS_INLINE void pmd_write32_relaxed(uint32_t v, volatile void *a) { *(volatile uint32_t *)a = v; }
PMD_ALWAYS_INLINE void pmd_write64_relaxed(uint64_t v, volatile void *a) { *(volatile uint64_t *)a = v; }

PMD_ALWAYS_INLINE uint8_t  pmd_read8(const volatile void *a)  { uint8_t  v = pmd_read8_relaxed(a);  pmd_io_rmb(); return v; }
PMD_ALWAYS_INLINE uint16_t pmd_read16(const volatile void *a) { uint16_t v = pmd_read16_relaxed(a); pmd_io_rmb(); return v; }
PMD_ALWAYS_INLINE uint32_t pmd_read32(const volatile void *a) { uint32_t v = pmd_read32_relaxed(a); pmd_io_rmb(); return v; }
PMD_ALWAYS_INLINE uint64_t pmd_read64(const volatile void *a) { uint64_t v = pmd_read64_relaxed(a); pmd_io_rmb(); return v; }

PMD_ALWAYS_INLINE void pmd_write8(uint8_t v, volatile void *a)   { pmd_io_wmb(); pmd_write8_relaxed(v, a); }
PMD_ALWAYS_INLINE void pmd_write16(uint16_t v, volatile void *a) { pmd_io_wmb(); pmd_write16_relaxed(v, a); }
PMD_ALWAYS_INLINE void pmd_write32(uint32_t v, volatile void *a) { pmd_io_wmb(); pmd_write32_relaxed(v, a); }
PMD_ALWAYS_INLINE void pmd_write64(uint64_t v, volatile void *a) { pmd_io_wmb(); pmd_write64_relaxed(v, a); }

#endif /* PMD_MMIO_H */
