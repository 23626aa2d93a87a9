# Declarations of csrc/pmd_gil.h: the GIL released around a burst only when
# another thread could take it. Between the two calls only calls of
# ``noexcept nogil`` functions with C arguments may run (Cython cannot check
# that code as it checks a ``with nogil:`` block; tests/test_burst.py reads the
# generated C instead).
from cpython.pystate cimport PyThreadState

cdef extern from "pmd_gil.h":
    const int PMD_GIL_ALWAYS_KEPT    # the debug build (PMD_DEBUG=1): bursts never release it
    int pmd_gil_init() except -1        # once per module that bursts: shares the hand-off hint
    bint pmd_gil_alone() noexcept
    PyThreadState *pmd_gil_release() noexcept
    void pmd_gil_take(PyThreadState *ts) noexcept
    unsigned long long pmd_gil_spun_handed() noexcept
    unsigned long long pmd_gil_spun_out() noexcept
