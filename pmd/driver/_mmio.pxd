cdef class Mmio:
    cdef char *base
    cdef readonly size_t length
    cdef Py_buffer view
    cdef bint has_view
    cdef object owner
    cdef object __weakref__

    cdef char *at(self, size_t offset, size_t width) except NULL
