from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from pmd.includes.compiler cimport pmd_unlikely
from pmd.memory._dma cimport DmaMemory

# Who holds a buffer. A buffer id is valid for an operation only in the right state.
cdef enum BufState:
    BUF_FREE = 0    # on the pool's free stack
    BUF_APP = 1     # handed to the application (rx zero-copy, alloc)
    BUF_QUEUE = 2   # owned by a queue / the device: each queue has its own
                    # tag from BUF_QUEUE to 255 (new_owner), so a queue only
                    # ever frees buffers it holds itself

cdef enum:
    NO_BUF = 0xffffffff


cdef class PacketPool:
    cdef readonly DmaMemory memory
    cdef readonly uint32_t n_buffers
    cdef readonly uint32_t buffer_size
    cdef readonly uint32_t headroom
    cdef char *base                 # first byte of buffer 0
    cdef uint64_t *iova             # IOVA of each buffer's first byte
    cdef uint32_t *free_stack       # ids of free buffers, top at n_free - 1
    cdef uint32_t n_free
    cdef uint8_t *state             # BufState per buffer
    cdef readonly size_t offset     # of buffer 0 in the memory region
    cdef bint closed
    cdef uint32_t next_owner        # the next queue's tag
    # Turns: the free stack and the states are plain memory with no atomics, so
    # only one thread may use them at a time. A burst (or a pool method) takes a
    # turn with the GIL held; another thread's burst on the same pool (the other
    # queue of a pair, in a thread of its own) waits for it. Turns are served in
    # the order they were asked for (tickets), so a thread bursting in a loop
    # cannot starve another (a port closing a queue, the pair's other queue).
    cdef int users                  # turns held now, all by one thread (nested: a forwarding loop)
    cdef unsigned long user_thread  # that thread (PyThread_get_thread_ident)
    cdef uint32_t next_ticket       # the ticket the next turn asked for gets
    cdef uint32_t now_serving       # the ticket whose turn it is

    cdef inline int take_turn(self) except -1:
        """With the GIL: use the free stack from this thread until ``end_turn``.
        Waits (GIL released) while another thread holds a turn or asked first;
        nested turns of one thread just count. Returns 1 when it waited, so the
        caller checks again what may have changed meanwhile (a queue closed, a
        port stopped)."""
        cdef unsigned long me = PyThread_get_thread_ident()
        if self.users != 0 and self.user_thread == me:
            self.users += 1
            return 0
        cdef uint32_t ticket = self.next_ticket
        self.next_ticket += 1
        cdef int waited = 0
        if ticket != self.now_serving:
            self.wait_turn(ticket)
            waited = 1
        self.users = 1
        self.user_thread = me
        return waited

    cdef inline void end_turn(self) noexcept:
        self.users -= 1
        if self.users == 0:
            self.now_serving += 1       # the next ticket's turn

    cdef int wait_turn(self, uint32_t ticket) except -1

    cdef inline uint32_t get(self, uint8_t new_state) noexcept nogil:
        """Take a free buffer (O(1)); NO_BUF when the pool is empty."""
        if self.n_free == 0:
            return NO_BUF
        self.n_free -= 1
        cdef uint32_t i = self.free_stack[self.n_free]
        self.state[i] = new_state
        return i

    cdef inline void put(self, uint32_t i) noexcept nogil:
        """Return a buffer whose state the caller has checked (O(1))."""
        self.state[i] = BUF_FREE
        self.free_stack[self.n_free] = i
        self.n_free += 1

    cdef inline char *buf(self, uint32_t i) noexcept nogil:
        return self.base + <size_t>i * self.buffer_size

    cdef inline bint held_by(self, uint32_t i, uint8_t owner) noexcept nogil:
        """Is ``i`` a buffer of this pool that queue ``owner`` holds? Checked
        before every put of a cookie that came back from a ring."""
        return i < self.n_buffers and self.state[i] == owner

    cdef int new_owner(self) except -1
    cdef inline int check_open(self) except -1:
        if pmd_unlikely(self.closed):
            return self.raise_closed()
        return self.memory._check_open()
    cdef int raise_closed(self) except -1
    cdef Py_ssize_t _free_ids(self, const uint32_t *v, Py_ssize_t n, uint8_t *seen) noexcept
    cdef void _unpush(self, Py_ssize_t k) noexcept
    cdef object _free_error(self, const uint32_t *v, Py_ssize_t i, uint8_t seen, object wide)
    cdef int _swap_checked(self, const uint32_t[::1] ids, Py_ssize_t n) except -1
