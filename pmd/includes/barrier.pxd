# Declarations of csrc/pmd_barrier.h: each barrier's reason is in the header.
cdef extern from "pmd_barrier.h" nogil:
    const char *PMD_BARRIER_ARCH
    void pmd_compiler_barrier()
    void pmd_smp_mb()
    void pmd_smp_rmb()
    void pmd_smp_wmb()
    void pmd_io_mb()
    void pmd_io_rmb()
    void pmd_io_wmb()
    void pmd_virtio_mb(int weak)
    void pmd_virtio_rmb(int weak)
    void pmd_virtio_wmb(int weak)
