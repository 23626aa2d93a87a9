"""Packet buffer pool: fixed-size buffers in DMA memory, an O(1) free stack.

Layout of one buffer (``buffer_size`` bytes, 2 KiB by default)::

    0                 headroom - hdr_len   headroom                buffer_size
    +---------------------+----------------+-------------------------+
    |  (unused headroom)  | virtio_net_hdr |  packet data (data room) |
    +---------------------+----------------+-------------------------+

The device reads or writes header + data as one descriptor starting at
``headroom - hdr_len``; applications see only the data, at ``headroom``. The
whole pool is one 2-D numpy array (``array``: ids x buffer_size) and its data
part another (``data``: ids x data room), both views of the DMA memory, never
copies.

Ownership is tracked per buffer (free / application / queue), so a buffer
given back twice, or an id the application does not own, is refused with a
clear error instead of corrupting the free stack.

A pool's free stack is used by one thread at a time, with no atomics: each
burst and each pool method takes a turn (``take_turn``, with the GIL), and a
burst of another thread on the same pool waits for it. So the receive and the
transmit queue of one pair may run in threads of their own and stay correct,
taking turns; for bursts in parallel, give each thread its own queue pair (and
so its own pool).
"""

import numpy as np

cimport numpy as cnp
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, calloc
from libc.string cimport memcpy

cdef extern from "<sched.h>" nogil:
    int sched_yield()

from posix.unistd cimport usleep

from pmd.memory._dma cimport DmaMemory
from pmd.errors import PoolError, QueueStateError

DEFAULT_BUFFER_SIZE = 2048
DEFAULT_HEADROOM = 64
MAX_HDR_LEN = 12

cnp.import_array()


cdef inline bint _u32_in_place(object a, bint writable):
    """A numpy array of ids that free and alloc_into may read or write through its
    data pointer: 1-D, uint32 in native byte order, C-contiguous and aligned (as
    u32_1d in pmd/driver/_queue.pxd requires of the bursts' arrays), and writable
    if asked. Anything else takes the converting path."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_TYPE(arr) == cnp.NPY_UINT32 and cnp.PyArray_NDIM(arr) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
            and cnp.PyArray_ISNOTSWAPPED(arr) and (not writable or cnp.PyArray_ISWRITEABLE(arr)))


cdef class PacketPool:
    """``PacketPool(memory, n_buffers, buffer_size=2048, headroom=64)``

    ``buffer_size`` must be a multiple of 64; ``headroom`` a multiple of 8 of
    at least 12 (the virtio-net header), leaving at least 64 bytes of data room.
    """

    def __cinit__(self):
        self.iova = NULL
        self.free_stack = NULL
        self.state = NULL

    def __init__(self, DmaMemory memory not None, uint32_t n_buffers,
                 uint32_t buffer_size=DEFAULT_BUFFER_SIZE, uint32_t headroom=DEFAULT_HEADROOM):
        memory._check_open()
        if n_buffers == 0:
            raise ValueError("n_buffers must be at least 1")
        if buffer_size == 0 or buffer_size % 64:
            raise ValueError(f"buffer_size must be a positive multiple of 64, got {buffer_size}")
        if headroom < MAX_HDR_LEN or headroom % 8 or headroom + 64 > buffer_size:
            raise ValueError(f"headroom must be a multiple of 8, at least {MAX_HDR_LEN} (the virtio-net "
                             f"header) and leave 64 bytes of data in a {buffer_size}-byte buffer; got {headroom}")
        # A buffer must be one range of IOVAs. With a translation that is not
        # contiguous (physical addresses), buffers must not straddle pages.
        straddles = memory.page_size % buffer_size != 0
        if straddles and not memory.iova_contiguous:
            raise ValueError(f"buffer_size {buffer_size} does not divide the page size {memory.page_size} "
                             "and this memory's IOVAs are not contiguous (physical addresses): use a "
                             "buffer size that divides the page size, or huge pages")
        cdef size_t total = <size_t>n_buffers * buffer_size
        self.offset = memory.alloc(total, memory.page_size if not straddles else 64)
        self.memory = memory
        self.n_buffers = n_buffers
        self.buffer_size = buffer_size
        self.headroom = headroom
        self.base = memory.base + self.offset
        self.iova = <uint64_t *>malloc(sizeof(uint64_t) * n_buffers)
        self.free_stack = <uint32_t *>malloc(sizeof(uint32_t) * n_buffers)
        self.state = <uint8_t *>calloc(n_buffers, sizeof(uint8_t))
        if self.iova == NULL or self.free_stack == NULL or self.state == NULL:
            raise MemoryError()
        cdef uint32_t i
        cdef size_t off
        for i in range(n_buffers):
            off = self.offset + <size_t>i * buffer_size
            if straddles and not memory.range_iova_contiguous(off, buffer_size):
                raise ValueError(f"buffer {i} spans pages whose IOVAs are not contiguous")
            self.iova[i] = memory.iova_of(off)
            # Stack top = lowest id, so a fresh pool hands out 0, 1, 2, ...
            self.free_stack[i] = n_buffers - 1 - i
        self.n_free = n_buffers
        self.next_owner = BUF_QUEUE

    def __dealloc__(self):
        free(self.iova)
        free(self.free_stack)
        free(self.state)

    cdef int new_owner(self) except -1:
        """A tag for one more queue drawing from this pool."""
        self.check_open()
        if self.next_owner > 255:
            raise PoolError(f"at most {256 - BUF_QUEUE} queues can draw from one pool; "
                            "create another pool")
        self.next_owner += 1
        return self.next_owner - 1

    cdef int wait_turn(self, uint32_t ticket) except -1:
        # Another thread holds the turn (or asked first): bursts are microseconds,
        # so yield first, then sleep (a loop that holds both queues of a pair for a
        # long run, pmd.fwd, would otherwise keep this thread spinning on a core).
        # No signal check: a ticket must be served, and the wait ends with a burst.
        cdef int tries = 0
        while self.now_serving != ticket:
            with nogil:
                if tries < 200:
                    sched_yield()
                else:
                    usleep(50)
            tries += 1
        return 0

    cdef int raise_closed(self) except -1:
        raise QueueStateError("PacketPool is closed")

    @property
    def data_room(self):
        """Bytes of packet data one buffer holds (after the headroom)."""
        return self.buffer_size - self.headroom

    @property
    def available(self):
        """Buffers on the free stack."""
        return self.n_free

    @property
    def array(self):
        """All buffers as a ``(n_buffers, buffer_size)`` uint8 array (a view, no copy)."""
        self.check_open()
        return np.frombuffer(self.memory, dtype=np.uint8, count=<Py_ssize_t>self.n_buffers * self.buffer_size,
                             offset=self.offset).reshape(self.n_buffers, self.buffer_size)

    @property
    def data(self):
        """Packet data of all buffers, ``(n_buffers, data_room)`` (a view): row ``i`` is buffer ``i``."""
        return self.array[:, self.headroom:]

    def iova_of(self, uint32_t buffer_id):
        """IOVA of the first byte of a buffer."""
        self._check_id(buffer_id)
        return self.iova[buffer_id]

    def state_of(self, uint32_t buffer_id):
        """'free', 'app' or 'queue'."""
        self._check_id(buffer_id)
        return ("free", "app")[self.state[buffer_id]] if self.state[buffer_id] < BUF_QUEUE else "queue"

    def _check_id(self, long long buffer_id):
        if buffer_id < 0 or buffer_id >= self.n_buffers:
            raise PoolError(f"buffer id {buffer_id} does not belong to this pool (ids are 0..{self.n_buffers - 1})")

    def alloc(self, n=None):
        """Take one buffer (returns its id) or ``n`` (returns a uint32 array of ids).

        Raises ``PoolError`` when the pool has fewer free buffers than asked;
        nothing is taken then.
        """
        self.check_open()
        cdef uint32_t count = 1 if n is None else n
        out = np.empty(count, dtype=np.uint32) if n is not None else None
        cdef uint32_t[::1] ids
        cdef uint32_t i
        self.take_turn()
        try:
            self.check_open()             # again: waiting for the turn let other threads run
            if count > self.n_free:
                raise PoolError(f"pool exhausted: {count} buffers asked, {self.n_free} of "
                                f"{self.n_buffers} free; free buffers or create a larger pool")
            if n is None:
                return self.get(BUF_APP)
            ids = out
            for i in range(count):
                ids[i] = self.get(BUF_APP)
        finally:
            self.end_turn()
        return out

    def alloc_into(self, out):
        """Take ``len(out)`` buffers into ``out``, a writable C-contiguous uint32 array
        (no new array: a sender's loop reuses one).

        Raises ``PoolError`` when the pool has fewer free buffers; nothing is taken then.
        """
        self.check_open()
        cdef uint32_t[::1] view
        cdef uint32_t *p
        cdef Py_ssize_t count
        if _u32_in_place(out, True):
            p = <uint32_t *>cnp.PyArray_DATA(<cnp.ndarray>out)     # in place: no buffer to acquire
            count = cnp.PyArray_DIM(<cnp.ndarray>out, 0)
        else:
            view = out                    # anything else: the buffer protocol's checks and errors
            p = &view[0] if view.shape[0] else NULL
            count = view.shape[0]
        cdef Py_ssize_t i
        cdef uint32_t top, b
        self.take_turn()
        try:
            self.check_open()
            if count > self.n_free:
                raise PoolError(f"pool exhausted: {count} buffers asked, {self.n_free} of "
                                f"{self.n_buffers} free; free buffers or create a larger pool")
            top = self.n_free
            for i in range(count):        # get() without its empty check: counted above
                top -= 1
                b = self.free_stack[top]
                self.state[b] = BUF_APP
                p[i] = b
            self.n_free = top
        finally:
            self.end_turn()

    def free(self, ids, Py_ssize_t n=-1):
        """Give buffers back: one id, or an array/sequence of ids (its first ``n``
        when given, as ``free(ids, n)`` after ``n = rx_burst_zc(ids, lens)``).

        Every id is checked (it belongs to the pool, the application owns it, it
        appears once); on any error nothing is freed. A C-contiguous aligned uint32
        array, what ``rx_burst_zc`` fills, is read in place: no conversion, each id
        read once.
        """
        self.check_open()
        cdef cnp.ndarray a
        if _u32_in_place(ids, False):
            a = <cnp.ndarray>ids
            wide = None
        else:
            arr = np.asarray(ids)
            if arr.ndim == 0:
                arr = arr.reshape(1)
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise TypeError(f"buffer ids must be integers in a 1-D array, got {arr.dtype} with shape {arr.shape}")
            wide = arr.astype(np.int64)
            # out of range -> n_buffers, which the check below refuses (the message shows the id given)
            a = np.where((wide >= 0) & (wide < self.n_buffers), wide, self.n_buffers).astype(np.uint32)
        cdef Py_ssize_t size = cnp.PyArray_DIM(a, 0)
        if n < 0:
            n = size
        elif n > size:
            raise ValueError(f"n={n} but only {size} ids were given")
        cdef const uint32_t *v = <const uint32_t *>cnp.PyArray_DATA(a)
        cdef uint8_t seen = 0
        cdef Py_ssize_t bad
        self.take_turn()
        try:
            self.check_open()
            bad = self._free_ids(v, n, &seen)
        finally:
            self.end_turn()
        if bad >= 0:
            raise self._free_error(v, bad, seen, wide)

    cdef Py_ssize_t _free_ids(self, const uint32_t *v, Py_ssize_t n, uint8_t *seen) noexcept:
        """Free v[0..n), each id read once: checked, then pushed. At the first
        one the application does not own, undo the pushes, put its state in
        ``seen`` and return its index; -1 when all were freed."""
        cdef Py_ssize_t i
        cdef uint32_t b
        for i in range(n):
            b = v[i]
            if b >= self.n_buffers or self.state[b] != BUF_APP:
                seen[0] = self.state[b] if b < self.n_buffers else BUF_FREE
                self._unpush(i)
                return i
            self.put(b)
        return -1

    cdef void _unpush(self, Py_ssize_t k) noexcept:
        """Take back the last ``k`` buffers pushed in this turn (the application's again)."""
        cdef Py_ssize_t j
        for j in range(k):
            self.n_free -= 1
            self.state[self.free_stack[self.n_free]] = BUF_APP

    cdef object _free_error(self, const uint32_t *v, Py_ssize_t i, uint8_t seen, object wide):
        cdef uint32_t b = v[i]
        cdef Py_ssize_t k
        if b >= self.n_buffers:
            given = int(wide[i]) if wide is not None else b
            return PoolError(f"buffer id {given} does not belong to this pool (ids are 0..{self.n_buffers - 1})")
        if seen == BUF_FREE:
            for k in range(i):
                if v[k] == b:
                    return PoolError(f"buffer {b} is listed twice in this call (ids[{k}] and "
                                     f"ids[{i}]); give each id once. Nothing was freed")
            return PoolError(f"double free: buffer {b} is already free")
        return PoolError(f"buffer {b} is owned by a queue, not the application; "
                         "it comes back to the pool when the device is done with it")

    def swap_macs(self, const uint32_t[::1] ids, Py_ssize_t n=-1):
        """Swap the destination and source MAC addresses of the first ``n`` packets
        (all of ``ids`` by default): testpmd's macswap, one call per burst instead of
        three numpy fancy-index copies (a few microseconds a burst, which a forwarding
        loop of one circulating burst pays on every round trip).

        Each id is read once and must be a buffer the application holds (from
        ``rx_burst_zc`` or ``alloc``); the first one that is not raises ``PoolError``,
        after the packets before it were swapped.
        """
        self.check_open()
        if n < 0 or n > ids.shape[0]:
            n = ids.shape[0]
        self.take_turn()
        try:
            self.check_open()
            self._swap_checked(ids, n)
        finally:
            self.end_turn()

    cdef int _swap_checked(self, const uint32_t[::1] ids, Py_ssize_t n) except -1:
        cdef Py_ssize_t i
        cdef uint32_t b
        cdef char *p
        cdef char t[6]
        for i in range(n):
            b = ids[i]
            if b >= self.n_buffers or self.state[b] != BUF_APP:
                raise PoolError(f"buffer {b} (ids[{i}]) is not one the application holds "
                                f"({self.state_of(b) if b < self.n_buffers else 'not in this pool'}); "
                                "swap the MACs of packets from rx_burst_zc or alloc")
            p = self.buf(b) + self.headroom
            memcpy(t, p, 6)
            memcpy(p, p + 6, 6)
            memcpy(p + 6, t, 6)
        return 0

    def close(self):
        """Stop using the pool. The memory stays with its ``DmaMemory`` (queues
        drawing from the pool keep it mapped until they are closed)."""
        self.closed = True

    def __repr__(self):
        return (f"<PacketPool {self.n_buffers} x {self.buffer_size} B, headroom {self.headroom}, "
                f"{self.n_free} free>")
