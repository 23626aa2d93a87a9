# The driver side of a virtqueue: split (Virtio 1.2 section 2.7) or packed (2.8).
#
# One class for both layouts, so the bursts (pmd.driver._rx, _tx) are the same
# code over either: each data-path method starts with one branch on `packed`,
# the same every call (predicted), and the packed ring's methods follow the
# split ones. Buffer ids (the handles) and their shadow records are the same.
#
# The data-path methods are `cdef inline` here, not in the .pyx, so the burst
# code in other modules compiles them in place (no call through a vtable).
# Every one is noexcept nogil and touches only the ring, the shadow arrays
# and the notify register.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.unistd cimport pwrite, write

from pmd.memory._dma cimport DmaMemory
from pmd.includes.barrier cimport pmd_virtio_mb, pmd_virtio_rmb, pmd_virtio_wmb
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.mmio cimport pmd_write16
from pmd.includes.vring cimport (
    RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_MASK, VIRTQ_DESC_F_AVAIL,
    PVIRTQ_AVAIL_USED, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY, pvirtq_desc, pvirtq_event_stale, pvirtq_event_suppress, pvirtq_need_event,
    pvirtq_position, vring, vring_avail_event, vring_desc, vring_load16, vring_load32, vring_need_event,
    vring_store16, vring_used_event, VRING_DESC_F_INDIRECT,
)

cdef enum NotifyKind:
    NOTIFY_NONE = 0      # device polls (in-process tests); only counted
    NOTIFY_MMIO16 = 1    # modern PCI: 16-bit store to the queue's notify address (4.1.5.2)
    NOTIFY_PWRITE16 = 2  # legacy PCI: 16-bit write to the I/O BAR, via the VFIO region fd
    NOTIFY_EVENTFD = 3   # a kick eventfd (vhost-user style backends)

# What pop_used found. Anything but USED_OK is a device error, counted.
cdef enum UsedResult:
    USED_OK = 0
    USED_BAD_ID = 1         # id >= queue size: nothing to reclaim
    USED_NOT_IN_FLIGHT = 2  # id is not the head of a chain we exposed: nothing to reclaim
    USED_BAD_LEN = 3        # len > device-writable bytes of the chain: reclaim, drop data

# Our own record of each descriptor, never read back from memory the device can
# write: the chain walk on reclaim follows these, not the ring (as Linux's
# desc_extra and DPDK's vq_descx do). In a packed ring the index is a buffer id:
# a chain of n descriptors takes n ids (linked by `next`), the first is the id
# the device writes back, and `ndescs` is how far the driver then skips.
# A chain put in an indirect table (VIRTIO_F_INDIRECT_DESC) takes one descriptor
# (ndescs 1) and keeps its buffers' cookies in the head's row of `ind_cookies`.
# writable, ndescs and nind are adjacent, so a burst checks all three with one
# 64-bit compare (head_word); `mark` is the burst that last reposted the head
# (Virtqueue.new_mark): a second used entry for it in that burst is not in flight.
cdef struct DescExtra:
    uint32_t cookie     # the caller's handle (a buffer id)
    uint32_t writable   # heads: device-writable bytes in the chain (bound for used.len)
    uint16_t ndescs     # heads: descriptors in the chain; 0 = not an in-flight head
    uint16_t nind       # heads: buffers in the head's indirect table; 0 = a direct chain
    uint16_t next       # next in chain, or in the free list
    uint16_t mark       # the burst mark of the last repost (0: none)


cdef inline uint64_t head_word(const DescExtra *x) noexcept nogil:
    """writable, ndescs and nind as one word, to compare with expected_head's."""
    cdef uint64_t w
    memcpy(&w, &x.writable, 8)
    return w


cdef inline uint64_t expected_head(uint32_t writable, uint16_t ndescs) noexcept nogil:
    """head_word of a direct chain of ``ndescs`` descriptors, ``writable`` bytes."""
    cdef DescExtra t
    t.writable = writable
    t.ndescs = ndescs
    t.nind = 0
    return head_word(&t)


# A burst's walk over a packed ring's used descriptors (2.8.1), in locals: where the
# next one is, its lap, and how many descriptors are still in flight (a bound no
# device can make the walk pass). p_cursor starts it, p_take steps, p_cursor_end saves it.
cdef struct UsedCursor:
    uint32_t pos
    uint16_t want       # the AVAIL|USED bits of a used descriptor on this lap
    uint32_t in_flight
    uint32_t start      # in_flight at p_cursor: what p_cursor_end counts as taken


cdef class Virtqueue:
    cdef vring vr
    cdef readonly DmaMemory memory
    cdef readonly size_t offset        # of the ring in `memory`
    cdef readonly uint32_t size
    cdef readonly uint32_t align
    cdef readonly uint16_t queue_index
    cdef uint16_t mask
    cdef uint16_t free_head
    cdef uint32_t num_free
    cdef uint16_t avail_idx            # next avail slot (free-running); the ring's idx after publish
    cdef uint16_t last_used_idx        # next used entry to read (free-running)
    cdef uint16_t kicked_avail_idx     # avail idx at the last notification decision
    cdef uint16_t avail_flags
    cdef readonly bint event_idx
    cdef readonly bint weak_barriers
    cdef readonly bint interrupts_enabled
    cdef readonly bint broken
    cdef readonly object fail_reason   # why fail() stopped the queue (str), or None
    cdef DescExtra *extra
    # packed ring (2.8): the descriptor ring and the two event suppression areas
    cdef readonly bint packed
    cdef pvirtq_desc *pdesc
    cdef pvirtq_event_suppress *driver_event     # written by the driver (interrupts)
    cdef pvirtq_event_suppress *device_event     # written by the device (notifications)
    cdef uint16_t avail_pos            # where the next descriptor goes (0..size-1)
    cdef uint16_t avail_wrap_flags     # AVAIL/USED bits of this lap: AVAIL while the wrap counter is 1
    cdef uint16_t used_pos             # where the next used descriptor is expected
    cdef uint16_t used_wrap            # the driver's used wrap counter (1 on the first lap)
    cdef uint16_t batch_pos            # the first descriptor added since the last publish...
    cdef uint16_t batch_flags          # ...and its flags, written only by publish (2.8.21.3)
    cdef bint batch_pending
    # VIRTIO_F_IN_ORDER (2.7.9, 2.8.9): buffers come back in the order they were made
    # available, ids are allocated in ring order (the free descriptors are always the
    # range after the last one added: no free list), and one used entry may end a batch.
    cdef readonly bint in_order
    cdef uint16_t io_next              # head (split) / buffer id (packed) of the oldest buffer not taken
    cdef uint16_t io_last              # the open batch's last buffer (the id its used entry named)...
    cdef uint32_t io_left              # ...the batch's descriptors not taken yet (0: no batch open)...
    cdef uint32_t io_last_len          # ...and the used len of its last buffer
    cdef uint32_t io_taken             # descriptors taken (popped) and not yet detached
    cdef uint16_t mark_now             # the mark new_mark gave last (DescExtra.mark)
    # indirect tables (2.7.5.3, 2.8.7): one per descriptor id, in `memory`, made at setup
    cdef readonly uint16_t indirect_max   # longest chain put in a table; 0 = never
    cdef readonly size_t indirect_offset  # of the tables in `memory`
    cdef uint32_t ind_stride              # bytes from one id's table to the next (a power of two)
    cdef char *ind_base                   # id 0's table
    cdef uint64_t *ind_iova               # IOVA of each id's table
    cdef uint32_t *ind_cookies            # indirect_max cookies per id
    cdef int notify_kind
    cdef char *notify_addr
    cdef int notify_fd
    cdef long notify_offset
    cdef uint16_t notify_data
    cdef object notify_owner
    cdef bint is_closed
    cdef bint owned                    # an RxQueue/TxQueue drives it: no raw Python access
    # statistics
    cdef public uint64_t n_notify
    cdef public uint64_t n_notify_suppressed
    cdef public uint64_t n_bad_id
    cdef public uint64_t n_not_in_flight
    cdef public uint64_t n_bad_len
    cdef public uint64_t n_bad_used_idx
    cdef public uint64_t n_notify_errors
    cdef public uint64_t n_io_batches   # in order: used entries that retired more than one buffer

    cdef inline int check_usable(self) except -1:
        # inline: every burst asks; the errors, in their order, in raise_unusable
        if pmd_unlikely(self.is_closed or self.broken or self.fail_reason is not None):
            return self.raise_unusable()
        return self.memory._check_open()
    cdef int raise_unusable(self) except -1
    cdef int check_raw(self) except -1
    cdef void disown_cookies(self) noexcept
    cdef int check_mapped(self) except -1
    cdef int _setup_indirect(self, uint32_t indirect_max) except -1

    # ---- adding buffers (2.7.13) ----

    cdef inline int add1(self, uint64_t addr, uint32_t length, bint device_writes,
                         uint32_t cookie) noexcept nogil:
        """Put one single-descriptor buffer in the next avail slot (not yet published).

        Returns the head, or -1 when no descriptor is free.
        """
        if pmd_unlikely(self.num_free == 0):
            return -1
        cdef uint16_t head = self.free_head
        cdef DescExtra *x = &self.extra[head]
        if self.packed:
            self.p_put(addr, length, head, VRING_DESC_F_WRITE if device_writes else 0)
            self.free_head = x.next
            self.num_free -= 1
            x.cookie = cookie
            x.writable = length if device_writes else 0
            x.ndescs = 1
            self.avail_idx += 1
            return head
        cdef vring_desc *d = &self.vr.desc[head]
        d.addr = addr
        d.len = length
        d.flags = VRING_DESC_F_WRITE if device_writes else 0
        self.free_head = x.next
        self.num_free -= 1
        x.cookie = cookie
        x.writable = length if device_writes else 0
        x.ndescs = 1
        self.vr.avail.ring[self.avail_idx & self.mask] = head
        self.avail_idx += 1
        return head

    cdef inline int add_chain(self, const uint64_t *addr, const uint32_t *length,
                              const uint32_t *cookie, uint16_t n, uint16_t n_out) noexcept nogil:
        """Put an ``n``-descriptor chain in the next avail slot (not yet published).

        The first ``n_out`` descriptors are device-readable, the rest
        device-writable: 2.7.4.2 requires readable ones before writable ones.
        Returns the head, or -1 when fewer than ``n`` descriptors are free.
        With indirect tables, a chain of 2 to ``indirect_max`` takes one
        descriptor (``add_indirect``); ``descs_for(n)`` says how many are needed.
        """
        if self.indirect_max and n >= 2 and n <= self.indirect_max:
            return self.add_indirect(addr, length, cookie, n, n_out)
        if pmd_unlikely(n == 0 or n > self.num_free or n_out > n):
            return -1
        cdef uint16_t head = self.free_head
        cdef uint16_t i = head, k
        cdef uint32_t writable = 0
        cdef vring_desc *d
        if self.packed:
            return self.p_add_chain(addr, length, cookie, n, n_out)
        for k in range(n):
            d = &self.vr.desc[i]
            d.addr = addr[k]
            d.len = length[k]
            d.flags = 0 if k < n_out else VRING_DESC_F_WRITE
            if k >= n_out:
                writable += length[k]
            self.extra[i].cookie = cookie[k]
            self.extra[i].ndescs = 0
            if k + 1 < n:
                d.flags |= VRING_DESC_F_NEXT
                d.next = self.extra[i].next
                i = self.extra[i].next
        self.free_head = self.extra[i].next
        self.num_free -= n
        self.extra[head].ndescs = n
        self.extra[head].writable = writable
        self.vr.avail.ring[self.avail_idx & self.mask] = head
        self.avail_idx += 1
        return head

    cdef inline uint32_t *indirect_cookies(self, uint16_t head) noexcept nogil:
        """The cookies of the chain in ``head``'s indirect table (``extra[head].nind`` of them)."""
        return self.ind_cookies + <size_t>head * self.indirect_max

    cdef inline uint16_t descs_for(self, uint16_t n) noexcept nogil:
        """Ring descriptors a chain of ``n`` buffers takes: one when it goes in an
        indirect table, else ``n`` (a single buffer stays direct: a table costs the
        device one more read)."""
        if self.indirect_max and n >= 2 and n <= self.indirect_max:
            return 1
        return n

    cdef inline int add_indirect(self, const uint64_t *addr, const uint32_t *length,
                                 const uint32_t *cookie, uint16_t n, uint16_t n_out) noexcept nogil:
        """add_chain through the head's own indirect table (2.7.5.3, 2.8.7): the
        ``n`` buffers go in the table, and one descriptor with INDIRECT (never with
        NEXT, 2.7.5.3.1; alone in its list, 2.8.19) points at it, ``len`` = 16 * n.
        The table is written first; the write barrier of publish() orders it, with
        the descriptor, before the avail index or the first flags the device looks
        at (2.7.13.3.1, 2.8.21.3). An id's table is rewritten only once the device
        has returned the id. Returns the head, or -1 when no descriptor is free."""
        if pmd_unlikely(self.num_free == 0 or n_out > n):
            return -1
        cdef uint16_t head = self.free_head, k
        cdef DescExtra *x = &self.extra[head]
        cdef char *table = self.ind_base + <size_t>head * self.ind_stride
        cdef uint32_t *ck = self.ind_cookies + <size_t>head * self.indirect_max
        cdef uint32_t writable = 0
        cdef vring_desc *t
        cdef pvirtq_desc *pt
        cdef vring_desc *d
        if self.packed:
            # 2.8.7: entries follow one another; WRITE is the only flag they carry
            # (2.8.19) and their id is reserved
            pt = <pvirtq_desc *>table
            for k in range(n):
                pt[k].addr = addr[k]
                pt[k].len = length[k]
                pt[k].id = 0
                pt[k].flags = VRING_DESC_F_WRITE if k >= n_out else 0
        else:
            # 2.7.5.3: entry 0 first, the rest chained by next inside the table
            t = <vring_desc *>table
            for k in range(n):
                t[k].addr = addr[k]
                t[k].len = length[k]
                t[k].flags = (VRING_DESC_F_WRITE if k >= n_out else 0) | (VRING_DESC_F_NEXT if k + 1 < n else 0)
                t[k].next = k + 1 if k + 1 < n else 0
        for k in range(n):
            ck[k] = cookie[k]
            if k >= n_out:
                writable += length[k]
        self.free_head = x.next
        self.num_free -= 1
        x.cookie = cookie[0]
        x.writable = writable
        x.ndescs = 1
        x.nind = n
        if self.packed:
            self.p_put(self.ind_iova[head], 16 * <uint32_t>n, head, VRING_DESC_F_INDIRECT)
            self.avail_idx += 1
            return head
        d = &self.vr.desc[head]
        d.addr = self.ind_iova[head]
        d.len = 16 * <uint32_t>n
        d.flags = VRING_DESC_F_INDIRECT
        self.vr.avail.ring[self.avail_idx & self.mask] = head
        self.avail_idx += 1
        return head

    cdef inline void publish(self) noexcept nogil:
        """Make every added buffer visible: one avail idx store per burst.

        Write barrier first: descriptors and ring entries must reach the
        device before the index that tells it to look (2.7.13.3.1).
        """
        pmd_virtio_wmb(self.weak_barriers)
        if self.packed:
            # 2.8.21.3: the batch becomes visible with its first descriptor's flags,
            # written after every other field of the batch
            if self.batch_pending:
                vring_store16(&self.pdesc[self.batch_pos].flags, self.batch_flags)
                self.batch_pending = False
            return
        vring_store16(&self.vr.avail.idx, self.avail_idx)

    cdef inline bint kick_prepare(self) noexcept nogil:
        """Does the device want a notification for what was published since the last one?

        Full barrier: our avail idx store must be visible before we read the
        device's suppression state, or both sides may decide to wait
        (2.7.13.4; DPDK virtqueue_kick_prepare).
        """
        cdef uint16_t old = self.kicked_avail_idx
        cdef uint16_t new = self.avail_idx
        if new == old:
            return False
        pmd_virtio_mb(self.weak_barriers)
        self.kicked_avail_idx = new
        if self.packed:
            return self.p_need_notify(<uint16_t>(new - old))
        if self.event_idx:
            # 2.7.10: notify only if avail_event is in [old, new).
            return vring_need_event(vring_load16(vring_avail_event(&self.vr)), new, old)
        return not (vring_load16(&self.vr.used.flags) & VRING_USED_F_NO_NOTIFY)

    cdef inline void notify(self) noexcept nogil:
        """Tell the device the queue has new buffers (4.1.5.2 / legacy QUEUE_NOTIFY)."""
        cdef uint64_t one = 1
        self.n_notify += 1
        if self.notify_kind == NOTIFY_MMIO16:
            pmd_write16(self.notify_data, self.notify_addr)
        elif self.notify_kind == NOTIFY_PWRITE16:
            if pwrite(self.notify_fd, &self.notify_data, 2, self.notify_offset) != 2:
                self.n_notify_errors += 1
        elif self.notify_kind == NOTIFY_EVENTFD:
            if write(self.notify_fd, &one, 8) != 8:
                self.n_notify_errors += 1

    cdef inline void flush(self) noexcept nogil:
        """publish + notify if the device asked: the end of every burst."""
        if self.avail_idx == self.kicked_avail_idx:
            return
        self.publish()
        if self.kick_prepare():
            self.notify()
        else:
            self.n_notify_suppressed += 1

    # ---- harvesting used buffers (2.7.14) ----

    cdef inline uint16_t new_mark(self) noexcept nogil:
        """A mark no head carries (DescExtra.mark), for one burst's reposts: when the
        counter wraps, every head's mark is cleared first (once per 65535 bursts)."""
        cdef uint32_t i
        self.mark_now += 1
        if pmd_unlikely(self.mark_now == 0):
            for i in range(self.size):
                self.extra[i].mark = 0
            self.mark_now = 1
        return self.mark_now

    cdef inline uint16_t nused(self) noexcept nogil:
        """Used entries ready to read; 0 (and the queue marked broken) if the
        device claims more than are in flight.

        Read barrier after loading used->idx: the entries it covers must not be
        read before it (2.7.14; DPDK virtqueue_nused).
        """
        if self.packed:
            if self.in_order:
                return self.io_p_nused()
            return self.p_nused()
        cdef uint16_t idx = vring_load16(&self.vr.used.idx)
        pmd_virtio_rmb(self.weak_barriers)
        cdef uint16_t n = idx - self.last_used_idx
        if pmd_unlikely(n > self.size - self.num_free):
            if not self.broken:
                self.n_bad_used_idx += 1
            self.broken = True
            return 0
        return n

    cdef inline int pop_used(self, uint16_t *head, uint32_t *length, bint check_len=True) noexcept nogil:
        """Read the next used entry (the caller saw nused() > 0). Validates it.

        On USED_OK and USED_BAD_LEN, ``head`` names an in-flight chain the
        caller must detach; on the others there is nothing to reclaim.
        ``check_len`` is false for transmit queues: their chains are
        device-readable only and the driver ignores len (2.7.8.1).
        """
        if self.in_order:
            return self.io_pop_used(head, length, check_len)
        if self.packed:
            return self.p_pop_used(head, length, check_len)
        cdef uint16_t slot = self.last_used_idx & self.mask
        cdef uint32_t id = vring_load32(&self.vr.used.ring[slot].id)
        cdef uint32_t ln = vring_load32(&self.vr.used.ring[slot].len)
        self.last_used_idx += 1
        if pmd_unlikely(id >= self.size):
            self.n_bad_id += 1
            return USED_BAD_ID
        if pmd_unlikely(self.extra[id].ndescs == 0):
            self.n_not_in_flight += 1
            return USED_NOT_IN_FLIGHT
        head[0] = <uint16_t>id
        length[0] = ln
        if pmd_unlikely(check_len and ln > self.extra[id].writable):
            self.n_bad_len += 1
            return USED_BAD_LEN
        return USED_OK

    cdef inline bint peek_used(self, uint32_t *cookie, uint32_t *length) noexcept nogil:
        """Look at the next used entry without taking it (the caller saw nused() > 0).

        False when it names no in-flight chain: then pop_used it to count it.
        """
        cdef uint16_t head
        if not self.peek_used_head(&head, length):
            return False
        cookie[0] = self.extra[head].cookie
        return True

    cdef inline bint peek_used_head(self, uint16_t *head, uint32_t *length) noexcept nogil:
        """Read the next used entry once without taking it (the caller saw nused() > 0):
        True when its id names an in-flight chain, then ``head`` and ``length`` are
        what the device wrote. take_peeked() takes it with those very values."""
        cdef uint16_t slot = self.last_used_idx & self.mask
        cdef uint32_t id
        if self.in_order:
            return self.io_peek(head, length)
        if self.packed:
            if not self.p_is_used(self.used_pos):
                return False
            pmd_virtio_rmb(self.weak_barriers)
            id = vring_load16(&self.pdesc[self.used_pos].id)
            length[0] = vring_load32(&self.pdesc[self.used_pos].len)
        else:
            id = vring_load32(&self.vr.used.ring[slot].id)
            length[0] = vring_load32(&self.vr.used.ring[slot].len)
        if pmd_unlikely(id >= self.size or self.extra[id].ndescs == 0):
            return False
        head[0] = <uint16_t>id
        return True

    cdef inline int take_peeked(self, uint16_t head, uint32_t length, bint check_len=True) noexcept nogil:
        """pop_used() for the entry peek_used_head() found in flight, without reading it
        again: the device cannot change between the check and the use what is read once."""
        if self.in_order:
            return self.io_take(&head, &length, check_len)
        if self.packed:
            self.p_skip(self.extra[head].ndescs)    # its chain's descriptors (2.8.6)
        else:
            self.last_used_idx += 1
        if pmd_unlikely(check_len and length > self.extra[head].writable):
            self.n_bad_len += 1
            return USED_BAD_LEN
        return USED_OK

    cdef inline uint32_t detach1(self, uint16_t head) noexcept nogil:
        """Return a single-descriptor chain to the free list; give its cookie.

        Only for heads added with add1 (ndescs == 1); see detach for chains.
        """
        cdef DescExtra *x = &self.extra[head]
        x.ndescs = 0
        if self.in_order:
            # the free range grows behind the in-flight one: no list to push onto
            self.num_free += 1
            self.io_taken -= 1
            return x.cookie
        x.next = self.free_head
        self.free_head = head
        self.num_free += 1
        return x.cookie

    cdef inline uint16_t detach(self, uint16_t head, uint32_t *cookies, uint16_t room) noexcept nogil:
        """Return a chain to the free list, walking our shadow links.

        Writes the cookies of the first ``room`` descriptors to ``cookies``.
        Returns the number of descriptors (more than ``room``: some cookies
        were not written). An indirect chain gives its table's cookies and
        frees its one descriptor; the count is of its buffers.
        """
        cdef uint16_t n = self.extra[head].ndescs
        cdef uint16_t i = head, k
        cdef uint32_t *ck
        if self.extra[head].nind:
            n = self.extra[head].nind
            ck = self.ind_cookies + <size_t>head * self.indirect_max
            for k in range(n if n < room else room):
                cookies[k] = ck[k]
            self.extra[head].nind = 0
            self.extra[head].ndescs = 0
            self.num_free += 1
            if self.in_order:
                self.io_taken -= 1          # in order: the free range grows, no list
                return n
            self.extra[head].next = self.free_head
            self.free_head = head
            return n
        for k in range(n):
            if k < room:
                cookies[k] = self.extra[i].cookie
            if k + 1 < n:
                i = self.extra[i].next
        self.extra[head].ndescs = 0
        if self.in_order:
            self.num_free += n
            self.io_taken -= n
            return n
        self.extra[i].next = self.free_head
        self.free_head = head
        self.num_free += n
        return n

    # ---- the packed ring (2.8): what the methods above branch to ----

    cdef inline void p_put(self, uint64_t addr, uint32_t length, uint16_t id, uint16_t flags) noexcept nogil:
        """Write one descriptor at the avail position and step past it (2.8.21).

        The first descriptor since the last publish keeps its old flags (the device
        stops there: not available on this lap) until publish() writes them; later
        ones are written whole, unseen until then.
        """
        cdef pvirtq_desc *d = &self.pdesc[self.avail_pos]
        d.addr = addr
        d.len = length
        d.id = id
        flags |= self.avail_wrap_flags
        if self.batch_pending:
            d.flags = flags
        else:
            self.batch_pending = True
            self.batch_pos = self.avail_pos
            self.batch_flags = flags
        self.avail_pos += 1
        if self.avail_pos == self.size:      # 2.8.1: past the end the wrap counter flips
            self.avail_pos = 0
            self.avail_wrap_flags ^= PVIRTQ_AVAIL_USED

    cdef inline int p_add_chain(self, const uint64_t *addr, const uint32_t *length,
                                const uint32_t *cookie, uint16_t n, uint16_t n_out) noexcept nogil:
        """add_chain for the packed ring: n consecutive descriptors, each with the
        chain's buffer id (the device reads it from the last, 2.8.6), NEXT on all
        but the last, readable ones first."""
        cdef uint16_t head = self.free_head
        cdef uint16_t i = head, k
        cdef uint32_t writable = 0
        cdef uint16_t flags
        for k in range(n):
            flags = 0 if k < n_out else VRING_DESC_F_WRITE
            if k >= n_out:
                writable += length[k]
            if k + 1 < n:
                flags |= VRING_DESC_F_NEXT
            self.p_put(addr[k], length[k], head, flags)
            self.extra[i].cookie = cookie[k]
            self.extra[i].ndescs = 0
            if k + 1 < n:
                i = self.extra[i].next
        self.free_head = self.extra[i].next
        self.num_free -= n
        self.extra[head].ndescs = n
        self.extra[head].writable = writable
        self.avail_idx += n
        return head

    cdef inline bint p_need_notify(self, uint16_t added) noexcept nogil:
        """The device event suppression structure (2.8.10, 2.8.21.4): ENABLE, DISABLE,
        or with EVENT_IDX the descriptor whose making available it wants to hear of.
        Read as one 32-bit access, so a new DESC never comes with an old offset."""
        cdef uint32_t event = vring_load32(<uint32_t *>self.device_event)
        cdef uint16_t off_wrap = event & 0xFFFF
        cdef uint16_t flags = (event >> 16) & RING_EVENT_FLAGS_MASK
        cdef uint32_t new, old
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return flags != RING_EVENT_FLAGS_DISABLE
        # positions over two laps (offset, plus N while the wrap counter is 0): the batch
        # moved from old to new; did it pass the descriptor asked for?
        new = pvirtq_position(self.size, self.avail_pos, (self.avail_wrap_flags & VIRTQ_DESC_F_AVAIL) != 0)
        old = (new + 2 * self.size - added) % (2 * self.size)
        if pvirtq_need_event(self.size, off_wrap, new, old):
            return True
        # An offset behind the used position asks about a descriptor the device has
        # already used: stale, so kick (an extra notification is harmless, 2.8.10).
        # QEMU's packed device leaves one after an asynchronous tx completion (docs/rings.md).
        return pvirtq_event_stale(self.size, off_wrap,
                                  pvirtq_position(self.size, self.used_pos, self.used_wrap))

    cdef inline bint p_is_used(self, uint16_t pos) noexcept nogil:
        """2.8.1: used when AVAIL and USED both equal the driver's used wrap counter."""
        cdef uint16_t flags = vring_load16(&self.pdesc[pos].flags)
        cdef uint16_t want = PVIRTQ_AVAIL_USED if self.used_wrap else 0
        return (flags & PVIRTQ_AVAIL_USED) == want

    cdef inline void p_skip(self, uint16_t ndescs) noexcept nogil:
        """Step the used position past a chain of ``ndescs`` (2.8.6), flipping the wrap counter at the end."""
        cdef uint32_t pos = <uint32_t>self.used_pos + ndescs
        if pos >= self.size:
            pos -= self.size
            self.used_wrap ^= 1
        self.used_pos = <uint16_t>pos
        self.last_used_idx += ndescs

    cdef inline uint16_t p_walk_used(self, uint32_t *pos, uint16_t *wrap) noexcept nogil:
        """Walk the used descriptors from ``pos``/``wrap`` (the used position) over the
        chains' lengths, at most what is in flight. Returns how many are used, one naming
        no in-flight buffer included (left for pop_used to refuse); ``pos``/``wrap`` end
        just past the last good chain (where the device writes next)."""
        cdef uint32_t seen = 0
        cdef uint32_t in_flight = self.size - self.num_free
        cdef uint16_t want, flags, id, n = 0
        while seen < in_flight:
            flags = vring_load16(&self.pdesc[pos[0]].flags)
            want = PVIRTQ_AVAIL_USED if wrap[0] else 0
            if (flags & PVIRTQ_AVAIL_USED) != want:
                break
            pmd_virtio_rmb(self.weak_barriers)   # the flags before the id they cover (2.8.21.2)
            n += 1
            id = vring_load16(&self.pdesc[pos[0]].id)
            if pmd_unlikely(id >= self.size or self.extra[id].ndescs == 0):
                break
            seen += self.extra[id].ndescs
            pos[0] += self.extra[id].ndescs
            if pos[0] >= self.size:
                pos[0] -= self.size
                wrap[0] ^= 1
        return n

    cdef inline uint16_t p_nused(self) noexcept nogil:
        """Used descriptors ready (p_walk_used from the used position)."""
        cdef uint32_t pos = self.used_pos
        cdef uint16_t wrap = self.used_wrap
        return self.p_walk_used(&pos, &wrap)

    cdef inline int p_pop_used(self, uint16_t *head, uint32_t *length, bint check_len) noexcept nogil:
        """pop_used for the packed ring. Each field is read once; an id out of range or
        not in flight leaves no way to know how far the next used descriptor is: the
        queue is broken (counted), as Linux and DPDK stop such a ring."""
        cdef uint16_t pos = self.used_pos
        if pmd_unlikely(not self.p_is_used(pos)):
            # nused() saw it used: the device took it back
            self.n_bad_used_idx += 1
            self.broken = True
            return USED_BAD_ID
        pmd_virtio_rmb(self.weak_barriers)
        cdef uint16_t id = vring_load16(&self.pdesc[pos].id)
        cdef uint32_t ln = vring_load32(&self.pdesc[pos].len)
        if pmd_unlikely(id >= self.size):
            self.n_bad_id += 1
            self.broken = True
            return USED_BAD_ID
        if pmd_unlikely(self.extra[id].ndescs == 0):
            self.n_not_in_flight += 1
            self.broken = True
            return USED_NOT_IN_FLIGHT
        self.p_skip(self.extra[id].ndescs)
        head[0] = id
        length[0] = ln
        if pmd_unlikely(check_len and ln > self.extra[id].writable):
            self.n_bad_len += 1
            return USED_BAD_LEN
        return USED_OK

    cdef inline void p_cursor(self, UsedCursor *c) noexcept nogil:
        c.pos = self.used_pos
        c.want = PVIRTQ_AVAIL_USED if self.used_wrap else 0
        c.in_flight = self.size - self.num_free
        c.start = c.in_flight

    cdef inline int p_take(self, UsedCursor *c, uint16_t *id, uint32_t *length) noexcept nogil:
        """The used descriptor at the cursor, checked as p_pop_used checks it, the cursor
        stepped past its chain: 1 with the chain's ``id`` and the device's ``length``
        (unchecked), 0 when none is used yet, -1 when it names no chain in flight
        (counted; the queue is broken: where the next one is cannot be known)."""
        if c.in_flight == 0:
            return 0
        cdef uint16_t flags = vring_load16(&self.pdesc[c.pos].flags)
        if (flags & PVIRTQ_AVAIL_USED) != c.want:
            return 0
        pmd_virtio_rmb(self.weak_barriers)       # the flags before the id and len they cover (2.8.21.2)
        cdef uint16_t i = vring_load16(&self.pdesc[c.pos].id)
        length[0] = vring_load32(&self.pdesc[c.pos].len)
        if pmd_unlikely(i >= self.size):
            self.n_bad_id += 1
            self.broken = True
            return -1
        cdef uint16_t nd = self.extra[i].ndescs
        if pmd_unlikely(nd == 0):
            self.n_not_in_flight += 1
            self.broken = True
            return -1
        c.pos += nd                   # 2.8.6: the next used descriptor is past the chain
        if c.pos >= self.size:
            c.pos -= self.size
            c.want ^= PVIRTQ_AVAIL_USED
        c.in_flight -= nd             # the in-flight chains' ndescs sum to in_flight
        id[0] = i
        return 1

    cdef inline void p_cursor_end(self, UsedCursor *c) noexcept nogil:
        # from the cursor, not num_free: a foreign chain's detach writes num_free mid-walk
        self.last_used_idx += <uint16_t>(c.start - c.in_flight)
        self.used_pos = <uint16_t>c.pos
        self.used_wrap = c.want != 0

    cdef inline bint any_used(self) noexcept nogil:
        """Has the device returned anything? One load, no walk, no check: for a poll that
        finds nothing (RxQueue.idle); what it sees is read and checked by the burst."""
        if self.in_order:
            return self.nused() != 0          # a batch may be open with nothing new in the ring
        if self.packed:
            return self.num_free != self.size and self.p_is_used(self.used_pos)
        return vring_load16(&self.vr.used.idx) != self.last_used_idx

    # ---- VIRTIO_F_IN_ORDER (2.7.9 split, 2.8.9 packed): what the methods above branch to ----
    #
    # The device uses buffers in the order they were made available and may write one
    # used entry for a batch: the id of the batch's last buffer, at the place of its
    # first (split: the used ring slot, advancing used->idx by the batch's size; packed:
    # the used position, then skipping the batch's descriptors). The skipped buffers
    # were used completely (their whole device-writable length). Ids are given out in
    # ring order (the shadow links are the fixed cycle 0 -> 1 -> ... -> N-1 -> 0, and the
    # descriptors' `next` fields with them, as 2.7.5 asks), so the descriptors in flight
    # and not yet taken are one run of the ring from io_next, a buffer's head is in it
    # exactly when its `ndescs` is not 0, and in a packed ring a buffer's id is its
    # position: the next batch starts where the last one ended.

    cdef inline uint16_t io_wrap(self, uint32_t i) noexcept nogil:
        """A head or position plus less than twice the queue size, back into the ring."""
        return <uint16_t>(i - self.size if i >= self.size else i)

    cdef inline uint32_t io_window(self) noexcept nogil:
        """Descriptors in flight and not taken: the run of the ring from io_next."""
        return self.size - self.num_free - self.io_taken

    cdef inline int io_fail(self, int result, uint64_t *counter) noexcept nogil:
        """A used entry that names no buffer in the run not yet taken: nothing says
        where the next entry is, so the queue stops (counted)."""
        counter[0] += 1
        self.broken = True
        return result

    cdef inline uint16_t io_count(self, uint16_t h, uint16_t last) noexcept nogil:
        """Buffers from head ``h`` to head ``last`` (both in the run not taken), walking
        our own chain lengths."""
        cdef uint16_t k = 1
        while h != last:
            h = self.io_wrap(<uint32_t>h + self.extra[h].ndescs)
            k += 1
        return k

    cdef inline int io_open(self) noexcept nogil:
        """Read the used entry at the driver's position and open the batch it ends
        (io_open_id)."""
        cdef uint32_t id
        if self.packed:
            if pmd_unlikely(not self.p_is_used(self.used_pos)):
                return self.io_fail(USED_BAD_ID, &self.n_bad_used_idx)   # nused saw it used: taken back
            pmd_virtio_rmb(self.weak_barriers)    # the flags before the id they cover (2.8.21.2)
            id = vring_load16(&self.pdesc[self.used_pos].id)
        else:
            id = vring_load32(&self.vr.used.ring[self.last_used_idx & self.mask].id)
        return self.io_open_id(id)

    cdef inline int io_open_id(self, uint32_t id) noexcept nogil:
        """Open the batch the used entry at the driver's position ends: ``id`` was read
        from it (once), its len is read here.

        Valid only if the id is the head of a buffer in the run not yet taken, all of
        its chain inside the run (2.7.9: the batch is every buffer from the oldest not
        taken to that one). Split: used->idx must cover the batch (it advances by the
        batch's size); it does when it covers the batch's descriptors, else the buffers
        are counted. Packed: the used position skips the batch's descriptors at once.
        """
        cdef uint32_t ln, d, descs, avail
        cdef uint16_t n
        if self.packed:
            ln = vring_load32(&self.pdesc[self.used_pos].len)
        else:
            ln = vring_load32(&self.vr.used.ring[self.last_used_idx & self.mask].len)
        if pmd_unlikely(id >= self.size):
            return self.io_fail(USED_BAD_ID, &self.n_bad_id)
        d = self.io_wrap(id + self.size - self.io_next)     # descriptors before it in the run
        n = self.extra[id].ndescs
        descs = d + n
        if pmd_unlikely(n == 0 or descs > self.io_window()):
            return self.io_fail(USED_NOT_IN_FLIGHT, &self.n_not_in_flight)
        if self.packed:
            self.p_skip(<uint16_t>descs)
        else:
            avail = <uint16_t>(vring_load16(&self.vr.used.idx) - self.last_used_idx)
            if pmd_unlikely(d + 1 > avail and self.io_count(self.io_next, <uint16_t>id) > avail):
                return self.io_fail(USED_BAD_ID, &self.n_bad_used_idx)
        if d:
            self.n_io_batches += 1
        self.io_last = <uint16_t>id
        self.io_left = descs
        self.io_last_len = ln
        return USED_OK

    cdef inline int io_take(self, uint16_t *head, uint32_t *length, bint check_len) noexcept nogil:
        """Take the oldest buffer of the open batch: the last one has the length the
        device wrote, the others their whole writable length (2.7.9)."""
        cdef uint16_t h = self.io_next
        cdef uint16_t n = self.extra[h].ndescs
        cdef uint32_t ln = self.io_last_len if h == self.io_last else self.extra[h].writable
        self.io_left -= n
        self.io_next = self.io_wrap(<uint32_t>h + n)
        self.io_taken += n
        if not self.packed:
            self.last_used_idx += 1
        head[0] = h
        length[0] = ln
        if pmd_unlikely(check_len and ln > self.extra[h].writable):
            self.n_bad_len += 1
            return USED_BAD_LEN
        return USED_OK

    cdef inline int io_pop_used(self, uint16_t *head, uint32_t *length, bint check_len) noexcept nogil:
        """pop_used in order: one buffer of the open batch, or of the batch the next used
        entry ends. The common entry (the device wrote one for each buffer, as for
        received packets) names the oldest buffer not taken: taken at once."""
        cdef uint32_t id, ln
        cdef uint16_t h = self.io_next, n
        cdef int r
        if pmd_unlikely(self.broken):
            return USED_BAD_ID            # counted when it broke
        if self.io_left == 0:
            if self.packed:
                if pmd_unlikely(not self.p_is_used(self.used_pos)):
                    return self.io_open()   # counts it
                pmd_virtio_rmb(self.weak_barriers)
                id = vring_load16(&self.pdesc[self.used_pos].id)
            else:
                id = vring_load32(&self.vr.used.ring[self.last_used_idx & self.mask].id)
            n = self.extra[h].ndescs
            if pmd_likely(id == h and n != 0 and n <= self.io_window()):
                if self.packed:
                    ln = vring_load32(&self.pdesc[self.used_pos].len)
                    self.p_skip(n)
                else:
                    ln = vring_load32(&self.vr.used.ring[self.last_used_idx & self.mask].len)
                    self.last_used_idx += 1
                self.io_next = self.io_wrap(<uint32_t>h + n)
                self.io_taken += n
                head[0] = h
                length[0] = ln
                if pmd_unlikely(check_len and ln > self.extra[h].writable):
                    self.n_bad_len += 1
                    return USED_BAD_LEN
                return USED_OK
            r = self.io_open_id(id)
            if r != USED_OK:
                return r
        return self.io_take(head, length, check_len)

    cdef inline bint io_peek(self, uint16_t *head, uint32_t *length) noexcept nogil:
        """peek_used_head in order: the buffer io_take would give, with its length."""
        if pmd_unlikely(self.broken):
            return False
        if self.io_left == 0 and self.io_open() != USED_OK:
            return False
        head[0] = self.io_next
        length[0] = self.io_last_len if self.io_next == self.io_last else self.extra[self.io_next].writable
        return True

    cdef inline void io_retire(self, uint16_t nbufs, uint32_t ndescs, uint16_t end) noexcept nogil:
        """The open batch (``nbufs`` buffers, ``ndescs`` descriptors, the next head
        ``end``) goes back to the free range at once, its cookies read by the caller:
        the transmit reclaim's one step."""
        self.io_left = 0
        self.io_next = end
        if not self.packed:
            self.last_used_idx += nbufs
        self.num_free += ndescs

    cdef inline uint16_t io_p_walk(self, uint32_t *pos, uint16_t *wrap) noexcept nogil:
        """Used buffers from ``pos``/``wrap`` on (packed, in order, past any open batch):
        each used descriptor there ends a batch at the buffer its id names, and the next
        batch starts just past that buffer's chain. Counts at most what is in flight and
        not yet taken; a descriptor that names no such buffer counts as one (left for
        io_open to refuse) and stops the walk; ``pos``/``wrap`` end just past the last
        good batch."""
        cdef uint32_t limit = self.io_window() - self.io_left
        cdef uint32_t seen = 0, p, d
        cdef uint16_t want, flags, id, n, nb = 0
        while seen < limit:
            flags = vring_load16(&self.pdesc[pos[0]].flags)
            want = PVIRTQ_AVAIL_USED if wrap[0] else 0
            if (flags & PVIRTQ_AVAIL_USED) != want:
                break
            pmd_virtio_rmb(self.weak_barriers)
            id = vring_load16(&self.pdesc[pos[0]].id)
            if pmd_unlikely(id >= self.size):
                return nb + 1
            d = self.io_wrap(<uint32_t>id + self.size - pos[0])    # the batch starts at pos
            n = self.extra[id].ndescs
            if pmd_unlikely(n == 0 or seen + d + n > limit):
                return nb + 1
            nb += self.io_count(<uint16_t>pos[0], id) if d else 1
            seen += d + n
            p = pos[0] + d + n
            if p >= self.size:
                p -= self.size
                wrap[0] ^= 1
            pos[0] = p
        return nb

    cdef inline uint16_t io_p_nused(self) noexcept nogil:
        """nused for an in-order packed ring: the open batch's rest, then the walk."""
        if pmd_unlikely(self.broken):
            return 0
        cdef uint32_t pos = self.used_pos
        cdef uint16_t wrap = self.used_wrap
        cdef uint16_t n = self.io_count(self.io_next, self.io_last) if self.io_left else 0
        return n + self.io_p_walk(&pos, &wrap)
