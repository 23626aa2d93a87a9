# What the driver's rx and tx queues share (pmd/driver/_rx.pyx, pmd/driver/_tx.pyx):
# the virtqueue and the pool, the header length, the statistics, the burst fence
# and the checks of the caller's arrays.
#
# The methods and functions every burst calls are `cdef inline` here, not in
# _queue.pyx, so the rx and tx modules compile them in place: the split into
# modules costs no call (as _virtqueue.pxd does for the ring).

cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

from pmd.driver._pool cimport NO_BUF, PacketPool
from pmd.driver._virtqueue cimport Virtqueue
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely

cdef enum:
    DEFAULT_HDR_LEN = 12  # the virtio-net header with num_buffers (5.1.6)
    MAX_TX_SEGS = 32      # longest chain a copy-mode transmit builds for one packet


cdef class _Queue:
    cdef readonly Virtqueue vq
    cdef readonly PacketPool pool
    cdef readonly uint32_t hdr_len
    cdef uint32_t buf_off          # where header + data start in a buffer
    cdef public bint strict        # raise DeviceError on bad used entries (else count and log)
    cdef bint is_closed            # no new burst may start (fence or close)
    cdef bint pinned               # holds pins on the ring's and the pool's memory
    cdef int busy                  # bursts running without the GIL right now
    cdef uint8_t owner             # this queue's tag in the pool's state array
    cdef uint64_t seen_bad         # device errors already reported
    cdef bint report_owed          # a burst that handed out packets owes its error to the next call
    cdef public uint64_t packets
    cdef public uint64_t bytes
    cdef public uint64_t dropped
    cdef public uint64_t foreign_chains

    cdef void _unpin(self) noexcept
    cdef int raise_closed(self) except -1
    cdef uint64_t device_errors(self) noexcept
    cdef int report(self) except -1
    cdef int report_after(self, int handed) except -1
    cdef uint32_t put_chain(self, uint16_t head) noexcept nogil
    cdef _release_all(self)

    cdef inline int check(self) except -1:
        if pmd_unlikely(self.is_closed):
            return self.raise_closed()
        if pmd_unlikely(self.report_owed):
            self.report_owed = False
            self.report()
        self.vq.check_usable()
        return self.pool.check_open()

    cdef inline int enter(self) except -1:
        """The last step before the GIL is released (or kept: pmd/includes/gil.pxd),
        after every check: from here until ``leave`` the queue is busy and ``fence`` waits, and this thread
        has the pool's turn (a burst of the pair's other queue in another thread
        waits for it). Nothing between the closed check and the mark lets
        another thread run (GIL held), except a wait for the turn, after which
        everything is checked again."""
        if pmd_unlikely(self.is_closed):
            self.check()
        if pmd_unlikely(self.pool.take_turn()):
            try:
                self.check()            # closed, stopped or unmapped while we waited?
            except BaseException:
                self.pool.end_turn()
                raise
        self.busy += 1
        return 0

    cdef inline void leave(self) noexcept:
        self.busy -= 1
        self.pool.end_turn()

    cdef inline uint32_t take1(self, uint16_t head) noexcept nogil:
        """Detach a one-buffer chain the device completed; its buffer id, or
        NO_BUF (counted) when the chain is not one this queue built: a buffer
        is freed only by the queue that holds it."""
        cdef uint32_t b = self.vq.extra[head].cookie
        if pmd_unlikely(not self.pool.held_by(b, self.owner) or self.vq.extra[head].ndescs != 1
                        or self.vq.extra[head].nind != 0):
            self.vq.detach(head, NULL, 0)       # all its descriptors, and no buffer
            self.foreign_chains += 1
            return NO_BUF
        return self.vq.detach1(head)


cdef inline void zero_hdr(char *hdr, uint32_t hdr_len) noexcept nogil:
    """Zero a transmit header (5.1.6: no offloads asked). Constant sizes, so the
    compiler stores the zeros itself: a call to memset per packet costs more."""
    if pmd_likely(hdr_len == DEFAULT_HDR_LEN):
        memset(hdr, 0, DEFAULT_HDR_LEN)
    else:
        memset(hdr, 0, 10)
        if hdr_len > DEFAULT_HDR_LEN:
            memset(hdr + 10, 0, 10)     # HASH_REPORT's 20 bytes: the hash fields zero too (5.1.6)


# ---- argument checks (GIL held): clear errors before any C work ----

cdef inline char *u8_2d(object a, str name, bint writable, Py_ssize_t *rows, Py_ssize_t *cols) except NULL:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array of dtype uint8 and shape (burst, bytes), "
                        f"got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT8:
        raise TypeError(f"{name} must have dtype uint8, got {arr.dtype}; "
                        f"allocate it with np.zeros((burst, bytes), dtype=np.uint8)")
    if cnp.PyArray_NDIM(arr) != 2:
        raise ValueError(f"{name} must be 2-D (burst, bytes), got shape {(<object>a).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name})")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only; pass a writable array")
    rows[0] = cnp.PyArray_DIM(arr, 0)
    cols[0] = cnp.PyArray_DIM(arr, 1)
    if rows[0] and cols[0] == 0:
        raise ValueError(f"{name} rows have no room (shape {(<object>a).shape})")
    return <char *>cnp.PyArray_DATA(arr)


cdef inline uint32_t *u32_1d(object a, str name, bint writable, Py_ssize_t *n) except NULL:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array of dtype uint32, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT32:
        raise TypeError(f"{name} must have dtype uint32, got {arr.dtype}; "
                        f"allocate it with np.zeros(burst, dtype=np.uint32)")
    if cnp.PyArray_NDIM(arr) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {(<object>a).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be contiguous and aligned; pass np.ascontiguousarray({name})")
    if not cnp.PyArray_ISNOTSWAPPED(arr):
        raise ValueError(f"{name} is uint32 in the other byte order ({arr.dtype.str}); "
                         f"pass {name}.astype(np.uint32)")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only; pass a writable array")
    n[0] = cnp.PyArray_DIM(arr, 0)
    return <uint32_t *>cnp.PyArray_DATA(arr)


cdef inline uint64_t *u64_1d(object a, str name, bint writable, Py_ssize_t *n) except NULL:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array of dtype uint64, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT64:
        raise TypeError(f"{name} must have dtype uint64, got {arr.dtype}; "
                        f"allocate it with np.zeros(burst, dtype=np.uint64)")
    if cnp.PyArray_NDIM(arr) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {(<object>a).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be contiguous and aligned; pass np.ascontiguousarray({name})")
    if not cnp.PyArray_ISNOTSWAPPED(arr):
        raise ValueError(f"{name} is uint64 in the other byte order ({arr.dtype.str}); "
                         f"pass {name}.astype(np.uint64)")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only; pass a writable array")
    n[0] = cnp.PyArray_DIM(arr, 0)
    return <uint64_t *>cnp.PyArray_DATA(arr)
