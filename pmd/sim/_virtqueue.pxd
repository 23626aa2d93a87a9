# The device side of a virtqueue, split (2.7) or packed (2.8): what a virtio
# device does with the rings.
#
# Every value here was written by the driver and is untrusted: ring indices,
# descriptor indices, chain links, addresses and lengths are all checked before
# a byte is touched, and each descriptor field is read exactly once.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pmd.includes.barrier cimport pmd_virtio_rmb
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.vring cimport (
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, pvirtq_desc,
    PVIRTQ_AVAIL_USED, pvirtq_event_suppress, vring, vring_desc, vring_load16, vring_load32,
    vring_load64, vring_store16, vring_store32,
)
from pmd.sim._dma cimport DmaWindows

# One descriptor of a popped chain, translated.
cdef struct Seg:
    char *ptr
    uint32_t len
    uint8_t write

# Why pop() refused a chain (the last one is kept for the error report).
cdef enum BadDesc:
    BAD_NONE = 0
    BAD_AVAIL_IDX = 1     # avail idx moved by more than the queue size
    BAD_HEAD = 2          # head index >= queue size
    BAD_NEXT = 3          # next index >= queue size
    BAD_LOOP = 4          # chain longer than the queue: a loop
    BAD_ADDR = 5          # address/length outside every DMA window
    BAD_INDIRECT = 6      # VRING_DESC_F_INDIRECT, not negotiated
    BAD_ORDER = 7         # device-readable after device-writable (2.7.4.2)
    BAD_SHORT = 8         # a packet shorter than the virtio-net header
    BAD_TOO_LONG = 9      # the chain's readable or writable bytes overflow 32 bits
    # packed ring (2.8) only
    BAD_ID = 10           # buffer id >= queue size
    BAD_ID_BUSY = 11      # buffer id already in flight (popped, not yet used)
    BAD_NOT_AVAIL = 12    # a descriptor after NEXT is not marked available (2.8.6)
    # indirect tables (VIRTIO_F_INDIRECT_DESC negotiated; 2.7.5.3, 2.8.7)
    BAD_INDIRECT_LEN = 13     # table length 0 or not a multiple of 16
    BAD_INDIRECT_TOO_BIG = 14 # more entries (with the descriptors before it) than the queue size
    BAD_INDIRECT_ADDR = 15    # table outside every DMA window
    BAD_INDIRECT_NEXT = 16    # INDIRECT with NEXT (split), or in a list linked by NEXT (packed)
    BAD_NESTED_INDIRECT = 17  # INDIRECT on an entry of a table (split; 2.7.5.3.1)
    BAD_INDIRECT_IDX = 18     # a next inside a table >= its entries (split)
    BAD_INDIRECT_LOOP = 19    # a chain inside a table longer than the table (split)


cdef class DeviceQueue:
    cdef vring vr
    cdef readonly DmaWindows windows
    cdef readonly uint32_t size
    cdef uint16_t mask
    cdef uint16_t last_avail_idx     # next avail entry to read (free-running)
    cdef uint16_t shadow_avail_idx   # avail->idx as last read: re-read only when caught up
    cdef uint16_t used_idx           # next used slot (free-running); the ring's idx after publish
    cdef uint16_t signalled_used     # used idx at the last interrupt decision
    cdef uint16_t used_flags
    cdef readonly bint event_idx
    cdef readonly bint weak_barriers
    cdef readonly bint broken
    cdef readonly bint indirect      # VIRTIO_F_INDIRECT_DESC negotiated: tables are followed
    # packed ring (2.8): chosen once, at creation; every data-path method
    # starts with one branch on it
    cdef readonly bint packed
    cdef pvirtq_desc *pdesc
    cdef pvirtq_event_suppress *driver_event   # the driver writes: our interrupts
    cdef pvirtq_event_suppress *device_event   # we write: the driver's notifications
    cdef uint16_t avail_pos          # next descriptor to read, with its wrap counter
    cdef bint avail_wrap
    cdef uint16_t avail_want         # AVAIL|USED bits of an available descriptor on this lap (2.8.1)
    cdef uint16_t used_pos           # next used descriptor to write, with its wrap counter
    cdef bint used_wrap
    cdef uint16_t used_mark          # AVAIL|USED bits a used descriptor gets on this lap (2.8.1)
    cdef uint32_t signalled_pos      # pvirtq_position of used at the last interrupt decision
    cdef uint16_t *id_count          # per buffer id: descriptors in its chain, 0 = not in flight
    cdef uint16_t batch_first        # slot of the first used descriptor not yet published
    cdef uint16_t batch_flags        # and the flags it will get
    cdef uint32_t batch_n            # used descriptors written since the last publish
    # VIRTIO_F_IN_ORDER (2.7.9, 2.8.9): buffers used completely are not written one by
    # one; the batch gets one used entry, with the id of its last buffer, at its first's place
    cdef readonly bint in_order
    cdef uint16_t io_n               # buffers held back in the open batch
    cdef uint16_t io_id              # its last buffer, and that one's length
    cdef uint32_t io_len
    cdef uint32_t io_skip            # packed: the batch's descriptors
    cdef public uint64_t n_used_entries   # used entries (split) / descriptors (packed) written
    cdef Seg *segs                   # the chain popped last
    cdef public uint16_t nsegs
    cdef public uint16_t head
    cdef public uint32_t out_len     # device-readable bytes in it
    cdef public uint32_t in_len      # device-writable bytes in it
    cdef int irq_fd
    cdef int last_bad
    cdef list memories               # DmaMemory regions pinned while the queue is open
    cdef object mem0                 # memories[0] or None: the usual one, checked without a loop
    cdef bint is_closed
    cdef int busy                    # device bursts running without the GIL right now
    cdef uint64_t pop_generation     # windows.generation when the last chain was popped
    cdef public uint64_t n_popped
    cdef public uint64_t n_bad_desc
    cdef public uint64_t n_interrupts
    cdef public uint64_t n_interrupts_suppressed
    cdef public uint64_t n_dropped
    cdef public uint64_t n_too_long  # pop_chain: more readable bytes than the caller's bound

    cdef int _init_split(self, DmaWindows windows, uint32_t size, uint64_t desc_iova, uint64_t avail_iova,
                         uint64_t used_iova) except -1
    cdef int _init_packed(self, DmaWindows windows, uint32_t size, uint64_t desc_iova, uint64_t driver_iova,
                          uint64_t device_iova) except -1
    cdef void _unpin(self) noexcept
    cdef int check(self) except -1
    cdef int enter(self) except -1
    cdef void leave(self) noexcept
    cdef int _pop_general(self) noexcept nogil
    cdef uint16_t pending(self) noexcept nogil
    cdef int _refuse(self, uint16_t head, int why) noexcept nogil
    cdef int _add_seg(self, uint64_t addr, uint32_t ln, bint write, bint *seen_write,
                      uint64_t *out_len, uint64_t *in_len) noexcept nogil
    cdef int _walk_table(self, uint64_t addr, uint32_t ln, uint16_t flags, bint *seen_write,
                         uint64_t *out_len, uint64_t *in_len) noexcept nogil
    cdef void _bad(self, int why) noexcept nogil
    cdef void unpop(self) noexcept nogil
    cdef void _push_general(self, uint16_t head, uint32_t length) noexcept nogil
    cdef void _push_in_order(self, uint16_t head, uint32_t length, bint whole) noexcept nogil
    cdef void _io_close(self) noexcept nogil
    cdef void publish(self) noexcept nogil
    cdef bint need_interrupt(self) noexcept nogil
    cdef void interrupt(self) noexcept nogil
    cdef void flush(self) noexcept nogil
    cdef uint32_t write_in(self, uint32_t skip, const char *src, uint32_t n) noexcept nogil
    cdef uint32_t read_out(self, uint32_t skip, char *dst, uint32_t n) noexcept nogil
    # the packed ring's halves of the methods above
    cdef int _pop_packed(self) noexcept nogil
    cdef uint16_t _pending_packed(self) noexcept nogil
    cdef void _publish_packed(self) noexcept nogil
    cdef bint _need_interrupt_packed(self) noexcept nogil

    # pop() and push() are `cdef inline` here, not in the .pyx, so the burst loops of
    # _rx.pxd, _tx.pyx and _turns.pyx take the usual chain, one descriptor on a split
    # ring (2.7.5) or a packed one (2.8.6), with no call through the vtable (a packed
    # pop through it cost about 50 instructions of frame set-up alone); anything else,
    # and the first split pop of a burst (which reads avail->idx), is the general path
    # of _virtqueue.pyx.

    cdef inline void _flip_avail(self) noexcept nogil:
        """The driver's ring wrapped: its wrap counter, and what an available descriptor looks like."""
        self.avail_wrap = not self.avail_wrap
        self.avail_want ^= PVIRTQ_AVAIL_USED

    cdef inline int _popped_one(self, char *p, uint32_t ln, uint16_t flags) noexcept nogil:
        """A chain of one descriptor (``p``, ``ln``, ``flags`` as read and checked) into
        ``segs``: what every pop path ends with for it. Returns 1 (popped)."""
        self.segs[0].ptr = p
        self.segs[0].len = ln
        if flags & VRING_DESC_F_WRITE:
            self.segs[0].write = 1
            self.out_len = 0
            self.in_len = ln
        else:
            self.segs[0].write = 0
            self.out_len = ln
            self.in_len = 0
        self.nsegs = 1
        self.n_popped += 1
        return 1

    cdef inline int pop(self) noexcept nogil:
        """Take the next available chain into ``segs``: 1 done, 0 none, -1 refused.

        A refused chain is counted; if its head was valid it is returned to the
        driver at once with length 0, so the driver can reclaim its buffers.
        """
        cdef uint16_t head, flags, pos
        cdef uint32_t ln
        cdef char *p = NULL
        cdef vring_desc *d
        cdef pvirtq_desc *pd
        if self.packed:
            if pmd_likely(not self.broken):
                pos = self.avail_pos
                pd = &self.pdesc[pos]
                flags = vring_load16(&pd.flags)
                if (flags & PVIRTQ_AVAIL_USED) != self.avail_want:
                    return 0
                # flags first, after the driver's write barrier (2.8.21.1): then the rest
                pmd_virtio_rmb(self.weak_barriers)
                if pmd_likely((flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT)) == 0):
                    # a list of one descriptor: the id in range and not in flight, the
                    # buffer inside a window; anything else takes the walk, which refuses it
                    ln = vring_load32(&pd.len)
                    head = vring_load16(&pd.id)
                    if ln != 0:
                        p = self.windows.translate(vring_load64(&pd.addr), ln)
                    if pmd_likely(head < self.size and self.id_count[head] == 0 and (p != NULL or ln == 0)):
                        pos += 1
                        if pos == self.size:
                            pos = 0
                            self._flip_avail()
                        self.avail_pos = pos
                        self.id_count[head] = 1
                        self.head = head
                        return self._popped_one(p, ln, flags)
            return self._pop_packed()
        if pmd_likely(self.shadow_avail_idx != self.last_avail_idx and not self.broken):
            # an entry under the avail idx already read (and read after it, 2.7.13.3)
            head = vring_load16(&self.vr.avail.ring[self.last_avail_idx & self.mask])
            if pmd_likely(head < self.size):
                d = &self.vr.desc[head]
                flags = vring_load16(&d.flags)
                if pmd_likely((flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT)) == 0):
                    ln = vring_load32(&d.len)
                    if ln != 0:
                        p = self.windows.translate(vring_load64(&d.addr), ln)
                    if pmd_likely(p != NULL or ln == 0):
                        self.last_avail_idx += 1
                        self.head = head
                        return self._popped_one(p, ln, flags)
        # nothing taken: the general path reads the entry again and refuses it the usual way
        return self._pop_general()

    cdef inline void push(self, uint16_t head, uint32_t length) noexcept nogil:
        """Write one used entry (not yet published)."""
        cdef uint16_t slot, n
        if pmd_likely(not self.in_order):
            if not self.packed:
                slot = self.used_idx & self.mask
                vring_store32(&self.vr.used.ring[slot].id, head)
                vring_store32(&self.vr.used.ring[slot].len, length)
                self.used_idx += 1
                self.n_used_entries += 1
                return
            # the chain's length was kept at pop: skip that many slots (2.8.6)
            if pmd_likely(head < self.size and self.id_count[head] != 0):
                n = self.id_count[head]
                self.id_count[head] = 0
                self._push_packed(head, length, n)
                return
        self._push_general(head, length)

    cdef inline void _push_packed(self, uint16_t id, uint32_t length, uint16_t skip) noexcept nogil:
        """Write a used descriptor at ``used_pos`` and skip ``skip`` slots (1 to size).

        2.8.1: used is AVAIL == USED == the device's wrap counter; 2.8.3: WRITE
        says the device wrote into the buffer, and only then does len count
        (2.8.4). The first descriptor of a batch gets its flags at publish(),
        after all the others (2.8.9): the driver sees the batch whole or not at all.
        """
        cdef pvirtq_desc *d = &self.pdesc[self.used_pos]
        cdef uint16_t flags = self.used_mark
        if length:
            flags |= VRING_DESC_F_WRITE
        vring_store16(&d.id, id)
        vring_store32(&d.len, length)
        if self.batch_n == 0:
            self.batch_first = self.used_pos
            self.batch_flags = flags
        else:
            vring_store16(&d.flags, flags)
        self.batch_n += 1
        self.n_used_entries += 1
        cdef uint32_t pos = <uint32_t>self.used_pos + skip
        if pos >= self.size:
            pos -= self.size
            self.used_wrap = not self.used_wrap
            self.used_mark ^= PVIRTQ_AVAIL_USED
        self.used_pos = <uint16_t>pos


cdef inline vring_desc *split_single(const uint16_t *ring, vring_desc *desc, uint16_t slot, uint16_t size,
                                     uint16_t way, uint16_t *head) noexcept nogil:
    """The descriptor that a split ring's avail entry at ``slot`` names, when it is a
    chain of one descriptor going the way wanted (``way``: 0 device-readable,
    VRING_DESC_F_WRITE device-writable) and its id is in range (2.7.5, 2.7.13): the
    one-loop paths' check, with the ring's fields in the caller's locals. NULL for
    anything else, which those paths leave untouched for pop() to take or refuse."""
    cdef uint16_t h = vring_load16(&ring[slot])
    if pmd_unlikely(h >= size):
        return NULL
    cdef vring_desc *d = &desc[h]
    if pmd_unlikely((vring_load16(&d.flags) & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE))
                    != way):
        return NULL
    head[0] = h
    return d


cdef inline pvirtq_desc *packed_single(DeviceQueue q, uint16_t way, uint16_t *id) noexcept nogil:
    """The descriptor at a packed ring's ``avail_pos``, when the driver has made it
    available on this lap (2.8.1) as a list of one descriptor going the way wanted
    (``way``: 0 device-readable, VRING_DESC_F_WRITE device-writable), its buffer id in
    range and not in flight (2.8.6): the one-loop paths' check, the packed twin of
    split_single. NULL for anything else, left untouched for pop() to take or refuse.
    Nothing moves: packed_advance() takes it."""
    cdef pvirtq_desc *pd = &q.pdesc[q.avail_pos]
    cdef uint16_t flags = vring_load16(&pd.flags)
    if (flags & PVIRTQ_AVAIL_USED) != q.avail_want:
        return NULL
    pmd_virtio_rmb(q.weak_barriers)      # flags first, then the rest (2.8.21.1)
    if pmd_unlikely((flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE)) != way):
        return NULL
    cdef uint16_t h = vring_load16(&pd.id)
    if pmd_unlikely(h >= q.size or q.id_count[h] != 0):
        return NULL
    id[0] = h
    return pd


cdef inline void packed_advance(DeviceQueue q) noexcept nogil:
    """Past the descriptor packed_single() returned, flipping the lap at the ring's end."""
    q.avail_pos += 1
    if q.avail_pos == q.size:
        q.avail_pos = 0
        q._flip_avail()
