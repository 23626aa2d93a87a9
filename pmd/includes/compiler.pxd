# Declarations of csrc/pmd_compiler.h.
cdef extern from "pmd_compiler.h" nogil:
    bint pmd_likely(bint x)
    bint pmd_unlikely(bint x)
