/* pmd_barrier.h: the memory barriers of the driver, one helper per kind.
 *
 * Two audiences, two families (the split DPDK makes with rte_smp_* / rte_io_*):
 *
 *   smp_*  order our stores and loads as seen by another CPU. Used when the
 *          "device" is software on another core (the built-in device, QEMU,
 *          a vhost backend): VIRTIO_F_ORDER_PLATFORM not negotiated, Virtio 1.2
 *          section 6.1 lets the driver use the weaker barriers.
 *   io_*   order them as seen by a real bus master (a device doing DMA) and
 *          for MMIO register accesses (the rte_read16 / rte_write16 pattern).
 *
 * x86-64 is TSO: loads are not reordered with older loads, stores not with
 * older stores, and uncached MMIO is strongly ordered. So every read or write
 * barrier is only a compiler barrier there (as in DPDK and Linux); only a full
 * barrier (store then load, e.g. "publish avail idx, then read the device's
 * NO_NOTIFY flag") needs an instruction. A locked add to the stack is as strong
 * as mfence for ordinary memory and cheaper; mfence is kept for io_mb because it
 * also orders against non-temporal and write-combining accesses.
 *
 * arm64 is weakly ordered: dmb with the inner-shareable domain (ish) for other
 * CPUs, outer-shareable (osh) for devices; ld/st variants when only loads or
 * only stores need ordering.
 */
#ifndef PMD_BARRIER_H
#define PMD_BARRIER_H

#include "pmd_compiler.h"

/* Stop the compiler from moving memory accesses across this point. */
#define pmd_compiler_barrier() __asm__ __volatile__("" : : : "memory")

#if defined(__x86_64__) || defined(__i386__)

PMD_ALWAYS_INLINE void pmd_smp_mb(void)
{
    /* Store-load ordering needs a serialising instruction even on TSO. */
    __asm__ __volatile__("lock addl $0, -128(%%rsp)" : : : "memory", "cc");
}
PMD_ALWAYS_INLINE void pmd_smp_rmb(void) { pmd_compiler_barrier(); }
PMD_ALWAYS_INLINE void pmd_smp_wmb(void) { pmd_compiler_barrier(); }

PMD_ALWAYS_INLINE void pmd_io_mb(void)  { __asm__ __volatile__("mfence" : : : "memory"); }
PMD_ALWAYS_INLINE void pmd_io_rmb(void) { pmd_compiler_barrier(); }
PMD_ALWAYS_INLINE void pmd_io_wmb(void) { pmd_compiler_barrier(); }

#define PMD_BARRIER_ARCH "x86-64 (TSO: rmb/wmb are compiler barriers)"

#elif defined(__aarch64__)

PMD_ALWAYS_INLINE void pmd_smp_mb(void)  { __asm__ __volatile__("dmb ish"   : : : "memory"); }
PMD_ALWAYS_INLINE void pmd_smp_rmb(void) { __asm__ __volatile__("dmb ishld" : : : "memory"); }
PMD_ALWAYS_INLINE void pmd_smp_wmb(void) { __asm__ __volatile__("dmb ishst" : : : "memory"); }

PMD_ALWAYS_INLINE void pmd_io_mb(void)  { __asm__ __volatile__("dmb osh"   : : : "memory"); }
PMD_ALWAYS_INLINE void pmd_io_rmb(void) { __asm__ __volatile__("dmb oshld" : : : "memory"); }
PMD_ALWAYS_INLINE void pmd_io_wmb(void) { __asm__ __volatile__("dmb oshst" : : : "memory"); }

#define PMD_BARRIER_ARCH "arm64 (dmb ish for CPUs, dmb osh for devices)"

#else
#error "pmd: barriers are defined for x86-64 and arm64 only"
#endif

/* The virtqueue's barriers (Virtio 1.2 section 2.7.13 and 6.1): "weak" when
 * the device is another CPU, I/O-strength when VIRTIO_F_ORDER_PLATFORM says the
 * device is real hardware. The flag is per queue and constant, so the branch
 * is predicted perfectly. This is DPDK's virtio_wmb(weak_barriers). */
PMD_ALWAYS_INLINE void pmd_virtio_mb(int weak)  { if (weak) pmd_smp_mb();  else pmd_io_mb(); }
PMD_ALWAYS_INLINE void pmd_virtio_rmb(int weak) { if (weak) pmd_smp_rmb(); else pmd_io_rmb(); }
PMD_ALWAYS_INLINE void pmd_virtio_wmb(int weak) { if (weak) pmd_smp_wmb(); else pmd_io_wmb(); }

#endif /* PMD_BARRIER_H */
