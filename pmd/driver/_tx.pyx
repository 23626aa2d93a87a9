"""The driver's transmit queue: numpy arrays into the avail ring, and the reclaim.

``TxQueue`` puts each packet behind a zeroed virtio-net header (5.1.6) in a
pool buffer and exposes the chains with one avail index store per burst,
notifying only if the device asked (2.7.13). Two shapes (docs/bursts.md):

copy        ``tx_burst(packets, lengths)``: rows of a caller's array copied
            into pool buffers (a chain of up to 32 for a long packet);
zero-copy   ``tx_burst_zc(ids, lengths)``: pool buffers sent as they are
            (from ``pool.alloc`` or :meth:`pmd.driver._rx.RxQueue.rx_burst_zc`).

Every burst starts with the **reclaim** (:meth:`TxQueue.reclaim_used`): the
buffers of chains the device has used go back to the pool. Arguments are read
once and validated (a packet array while holding the GIL, ids and lengths in the
pass that sends them); the per-packet work runs in C with the GIL released. The shared base (``_Queue``) is :mod:`pmd.driver._queue`.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from pmd.driver._pool cimport BUF_APP, BUF_FREE, NO_BUF, PacketPool
from pmd.driver._queue cimport DEFAULT_HDR_LEN, MAX_TX_SEGS, _Queue, u8_2d, u32_1d, zero_hdr
from pmd.driver._virtqueue cimport (
    USED_BAD_ID, USED_NOT_IN_FLIGHT, USED_OK, DescExtra, UsedCursor, Virtqueue, expected_head, head_word,
)
from pmd.includes.vring cimport (
    PVIRTQ_AVAIL_USED, pvirtq_desc, vring_desc, vring_load32, vring_used_elem,
)
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.gil cimport PyThreadState, pmd_gil_init, pmd_gil_release, pmd_gil_take

from pmd.errors import PoolError

pmd_gil_init()   # the bursts share one GIL hand-off hint (csrc/pmd_gil.h)

cnp.import_array()

#: the longest chain tx_burst builds for one packet (header + data buffers): what a
#: transmit queue's indirect tables must hold (Virtqueue(indirect_max=...))
MAX_TX_CHAIN = MAX_TX_SEGS


cdef inline uint16_t split_put(vring_desc *desc, DescExtra *extra, uint16_t head, uint64_t addr,
                               uint32_t length, uint32_t b) noexcept nogil:
    """One device-readable descriptor for buffer ``b`` at ``head`` (2.7.13.1), its record
    a one-descriptor direct chain; returns the next free head."""
    desc[head].addr = addr
    desc[head].len = length
    desc[head].flags = 0
    cdef DescExtra *x = &extra[head]
    x.cookie = b
    x.writable = 0
    x.ndescs = 1
    return x.next


cdef inline bint refused(uint32_t b, uint32_t ln, const uint8_t *state, uint32_t n_buffers,
                         uint32_t room) noexcept nogil:
    """A tx_burst_zc entry that cannot be sent: an id not of this pool, a buffer the
    application does not own (free, or queued: listed twice), a length not 1 to ``room``."""
    return b >= n_buffers or state[b] != BUF_APP or ln - 1 >= room


cdef inline void bad_entry(uint32_t *bad, uint32_t b, uint32_t ln, const uint8_t *state,
                           uint32_t n_buffers) noexcept nogil:
    """What _zc_error needs of a refused entry, before its claims are undone: the id,
    the length, and the id's state then (BUF_APP for a bad length; n_buffers and up
    for an id out of range)."""
    bad[0] = b
    bad[1] = ln
    bad[2] = state[b] if b < n_buffers else 256


cdef inline Py_ssize_t split_claim_send(TxQueue self, const uint32_t *d, const uint32_t *l, Py_ssize_t nids,
                                        uint32_t room, uint32_t *bad, const uint32_t hdr_len) noexcept nogil:
    """TxQueue.claim_send_split's loop, inlined for the usual header (``hdr_len`` a
    constant there: its zeros are two stores) and for any other."""
    cdef Py_ssize_t i, n = nids
    if n > self.vq.num_free:
        n = self.vq.num_free
        self.ring_full += 1
    cdef uint32_t b, ln, n_buffers = self.pool.n_buffers
    cdef uint8_t *state = self.pool.state
    cdef uint8_t owner = self.owner
    cdef uint64_t nbytes = 0, off = self.buf_off
    cdef const uint64_t *iova = self.pool.iova
    cdef char *hdrs = self.pool.base + self.buf_off
    cdef size_t stride = self.pool.buffer_size
    cdef DescExtra *extra = self.vq.extra
    cdef vring_desc *desc = self.vq.vr.desc
    cdef uint16_t *ring = self.vq.vr.avail.ring
    cdef uint16_t head = self.vq.free_head, avail = self.vq.avail_idx, mask = self.vq.mask
    for i in range(n):
        b = d[i]
        ln = l[i]
        if pmd_unlikely(refused(b, ln, state, n_buffers, room)):
            bad_entry(bad, b, ln, state, n_buffers)
            self.unclaim_heads(i)
            return -1 - i
        state[b] = owner
        zero_hdr(hdrs + b * stride, hdr_len)
        ring[avail & mask] = head
        avail += 1
        head = split_put(desc, extra, head, iova[b] + off, hdr_len + ln, b)
        nbytes += ln
    for i in range(n, nids):        # checked, not claimed: no room in the ring
        b = d[i]
        ln = l[i]
        if pmd_unlikely(refused(b, ln, state, n_buffers, room)):
            bad_entry(bad, b, ln, state, n_buffers)
            self.unclaim_heads(n)
            return -1 - i
    self.vq.free_head = head
    self.vq.num_free -= <uint32_t>n
    self.vq.avail_idx = avail
    self.packets += <uint64_t>n
    self.bytes += nbytes
    return n


@cython.no_gc_clear   # __dealloc__ (the base's) unpins the memory of `vq` and `pool`
cdef class TxQueue(_Queue):
    """``TxQueue(vq, pool, hdr_len=12, strict=False)``: transmit side of a port queue.

    A packet is one descriptor (header in the headroom, then data) when it
    fits a buffer's data room; copy mode chains more buffers for longer ones.
    Completed buffers go back to the pool at the start of each burst.
    """
    # Attributes and C methods: pmd/driver/_tx.pxd.

    def __cinit__(self):
        self.s_ids = NULL
        self.s_lens = NULL

    def __init__(self, Virtqueue vq not None, PacketPool pool not None, **kw):
        super().__init__(vq, pool, **kw)
        # No burst can queue more packets than the ring has descriptors.
        self.s_ids = <uint32_t *>malloc(sizeof(uint32_t) * vq.size)
        self.s_lens = <uint32_t *>malloc(sizeof(uint32_t) * vq.size)
        if self.s_ids == NULL or self.s_lens == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.s_ids)
        free(self.s_lens)

    @property
    def max_packet_len(self):
        """Largest packet ``tx_burst`` sends (a chain of up to 32 buffers)."""
        return self.pool.data_room + (MAX_TX_SEGS - 1) * self.pool.buffer_size

    cdef uint32_t reclaim_used(self) noexcept nogil:
        if self.vq.in_order:
            return self.reclaim_in_order()
        if not self.vq.packed:
            return self.reclaim_split()
        return self.reclaim_packed()

    cdef uint32_t reclaim_packed(self) noexcept nogil:
        """reclaim_used() on a packed ring, in one pass as reclaim_split: each used
        descriptor read and checked once by p_take (its flags on this lap, an id of a
        chain in flight), a one-buffer chain this queue holds freed with the ring's and
        the pool's fields in locals; a longer chain (or an indirect one) takes the
        general path. The device's len is not read: a transmit chain is device-readable
        (2.8.4 leaves it unset without WRITE)."""
        cdef UsedCursor c
        self.vq.p_cursor(&c)
        if c.in_flight == 0:
            return 0
        cdef uint16_t free_head = self.vq.free_head, id = 0
        cdef uint32_t num_free = self.vq.num_free, ln = 0, b, freed = 0
        cdef DescExtra *extra = self.vq.extra
        cdef DescExtra *x
        cdef uint32_t *stack = self.pool.free_stack
        cdef uint8_t *state = self.pool.state
        cdef uint32_t top = self.pool.n_free, n_buffers = self.pool.n_buffers
        cdef uint8_t owner = self.owner
        while self.vq.p_take(&c, &id, &ln) == 1:
            x = &extra[id]
            if pmd_likely(x.ndescs == 1 and x.nind == 0):
                b = x.cookie
                x.ndescs = 0
                x.next = free_head
                free_head = id
                num_free += 1
                if pmd_likely(b < n_buffers and state[b] == owner):
                    state[b] = BUF_FREE
                    stack[top] = b
                    top += 1
                    freed += 1
                else:
                    self.foreign_chains += 1      # not this queue's buffer: never freed
                continue
            # a longer chain: the general path, on the state written back
            self.vq.free_head = free_head
            self.vq.num_free = num_free
            self.pool.n_free = top
            freed += self.put_chain(id)
            free_head = self.vq.free_head
            num_free = self.vq.num_free
            top = self.pool.n_free
        self.vq.p_cursor_end(&c)
        self.vq.free_head = free_head
        self.vq.num_free = num_free
        self.pool.n_free = top
        return freed

    cdef uint32_t reclaim_split(self) noexcept nogil:
        """reclaim_used() on a split ring: every used entry is checked as pop_used and
        take1 check it (an id in range, of a chain in flight, whose buffer this queue
        holds), with the ring's and the pool's fields in locals and written back once;
        a chain of several descriptors (or an indirect one) takes the general path.
        The device's len is not read: a transmit chain is device-readable (2.7.8.1)."""
        cdef uint16_t n = self.vq.nused(), k
        if n == 0:
            return 0
        cdef vring_used_elem *used = self.vq.vr.used.ring
        cdef uint16_t last = self.vq.last_used_idx, mask = self.vq.mask, free_head = self.vq.free_head
        cdef uint32_t size = self.vq.size, num_free = self.vq.num_free, id, b, freed = 0
        cdef DescExtra *extra = self.vq.extra
        cdef DescExtra *x
        cdef uint32_t *stack = self.pool.free_stack
        cdef uint8_t *state = self.pool.state
        cdef uint32_t top = self.pool.n_free, n_buffers = self.pool.n_buffers
        cdef uint8_t owner = self.owner
        cdef uint64_t sent = expected_head(0, 1)
        for k in range(n):
            id = vring_load32(&used[last & mask].id)
            last += 1
            if pmd_unlikely(id >= size):
                self.vq.n_bad_id += 1
                continue
            x = &extra[id]
            if pmd_likely(head_word(x) == sent):   # send's chain: one direct device-readable descriptor
                b = x.cookie
                x.ndescs = 0
                x.next = free_head
                free_head = <uint16_t>id
                num_free += 1
                if pmd_likely(b < n_buffers and state[b] == owner):
                    state[b] = BUF_FREE
                    stack[top] = b
                    top += 1
                    freed += 1
                else:
                    self.foreign_chains += 1      # not this queue's buffer: never freed
                continue
            if pmd_unlikely(x.ndescs == 0):
                self.vq.n_not_in_flight += 1
                continue
            # a longer chain: the general path, on the state written back
            self.vq.last_used_idx = last
            self.vq.free_head = free_head
            self.vq.num_free = num_free
            self.pool.n_free = top
            freed += self.put_chain(<uint16_t>id)
            free_head = self.vq.free_head
            num_free = self.vq.num_free
            top = self.pool.n_free
        self.vq.last_used_idx = last
        self.vq.free_head = free_head
        self.vq.num_free = num_free
        self.pool.n_free = top
        return freed

    cdef uint32_t reclaim_in_order(self) noexcept nogil:
        """reclaim_used with VIRTIO_F_IN_ORDER (2.7.9, 2.8.9): each used entry retires every
        buffer up to the one it names (checked by io_open against our own records), and
        the whole batch goes back in one step: its buffers to the pool, its descriptors
        to the free range with one count, no free list and no per-buffer pop."""
        cdef uint16_t n = self.vq.nused(), k, h, last, nd, m
        cdef uint32_t freed = 0, descs, b, mine
        cdef uint32_t *ck
        cdef bint end
        while n > 0:
            if self.vq.io_left == 0 and self.vq.io_open() != USED_OK:
                break                 # counted; the queue is stopped
            h = self.vq.io_next
            last = self.vq.io_last
            descs = 0
            k = 0
            end = False
            while not end:
                end = h == last
                nd = self.vq.extra[h].ndescs
                self.vq.extra[h].ndescs = 0
                if pmd_unlikely(self.vq.extra[h].nind != 0):
                    # one descriptor, its buffers in the head's indirect table (2.7.5.3)
                    mine = 0
                    ck = self.vq.indirect_cookies(h)
                    for m in range(self.vq.extra[h].nind):
                        if pmd_likely(self.pool.held_by(ck[m], self.owner)):
                            self.pool.put(ck[m])
                            mine += 1
                    if pmd_unlikely(mine != self.vq.extra[h].nind):
                        self.foreign_chains += 1
                    self.vq.extra[h].nind = 0
                    freed += mine
                elif pmd_likely(nd == 1):
                    b = self.vq.extra[h].cookie
                    if pmd_likely(self.pool.held_by(b, self.owner)):
                        self.pool.put(b)
                        freed += 1
                    else:
                        self.foreign_chains += 1
                else:
                    mine = 0
                    for m in range(nd):
                        b = self.vq.extra[self.vq.io_wrap(<uint32_t>h + m)].cookie
                        if pmd_likely(self.pool.held_by(b, self.owner)):
                            self.pool.put(b)
                            mine += 1
                    if pmd_unlikely(mine != nd):
                        self.foreign_chains += 1      # not all this queue's buffers: never freed
                    freed += mine
                descs += nd
                k += 1
                h = self.vq.io_wrap(<uint32_t>h + nd)
            self.vq.io_retire(k, descs, h)
            n = n - k if n > k else 0
        return freed

    def reclaim(self):
        """Give buffers the device has finished with back to the pool; returns how many."""
        self.check()
        cdef uint32_t n
        self.enter()
        cdef PyThreadState *ts = pmd_gil_release()
        n = self.reclaim_used()
        pmd_gil_take(ts)
        self.leave()
        self.report()
        return n

    @property
    def in_flight(self):
        """Descriptors the device has not completed yet."""
        return self.vq.in_flight

    cdef int send_copy(self, const char *pkts, Py_ssize_t cols, const uint32_t *lengths,
                       Py_ssize_t burst) noexcept nogil:
        cdef uint64_t addr[MAX_TX_SEGS]
        cdef uint32_t lens[MAX_TX_SEGS]
        cdef uint32_t ids[MAX_TX_SEGS]
        cdef uint32_t room = self.pool.buffer_size - self.pool.headroom, ln, done, take
        cdef uint32_t nseg, k, b
        cdef const char *src
        cdef char *dst
        cdef Py_ssize_t i, sent = 0
        self.reclaim_used()
        for i in range(burst):
            ln = lengths[i]
            src = pkts + i * cols
            if pmd_likely(ln <= room):
                nseg = 1
            else:
                nseg = 1 + (ln - room + self.pool.buffer_size - 1) // self.pool.buffer_size
            # an indirect chain takes one descriptor (2.7.5.3): the ring holds more packets
            if pmd_unlikely(self.vq.descs_for(<uint16_t>nseg) > self.vq.num_free or nseg > self.pool.n_free):
                self.ring_full += 1
                break
            if pmd_likely(nseg == 1):
                b = self.pool.get(self.owner)
                dst = self.pool.buf(b) + self.buf_off
                zero_hdr(dst, self.hdr_len)
                memcpy(dst + self.hdr_len, src, ln)
                self.vq.add1(self.pool.iova[b] + self.buf_off, self.hdr_len + ln, False, b)
            else:
                # Header + first part in the first buffer, the rest in whole buffers.
                done = 0
                for k in range(nseg):
                    ids[k] = self.pool.get(self.owner)
                    if k == 0:
                        dst = self.pool.buf(ids[k]) + self.buf_off
                        zero_hdr(dst, self.hdr_len)
                        memcpy(dst + self.hdr_len, src, room)
                        addr[k] = self.pool.iova[ids[k]] + self.buf_off
                        lens[k] = self.hdr_len + room
                        done = room
                    else:
                        take = ln - done
                        if take > self.pool.buffer_size:
                            take = self.pool.buffer_size
                        memcpy(self.pool.buf(ids[k]), src + done, take)
                        addr[k] = self.pool.iova[ids[k]]
                        lens[k] = take
                        done += take
                self.vq.add_chain(addr, lens, ids, <uint16_t>nseg, <uint16_t>nseg)
            self.bytes += ln
            sent += 1
        self.packets += sent
        self.vq.flush()
        return <int>sent

    @cython.binding(False)   # a plain builtin method: CPython calls it without the cyfunction layer
    @cython.embedsignature.format("clinic")   # so inspect.signature still reads it
    def tx_burst(self, packets, lengths):
        """Transmit ``packets[i, :lengths[i]]`` for each row of ``packets`` (uint8,
        2-D, C-contiguous; ``lengths`` uint32). Data is copied into pool buffers.
        Returns how many were queued: fewer than the rows when the ring or the
        pool is full (send the rest again later). One call looks at no more rows
        than the ring has entries.
        """
        self.check()
        cdef Py_ssize_t rows, cols, nlen, i
        cdef const char *p = u8_2d(packets, "packets", False, &rows, &cols)
        cdef uint32_t *l = u32_1d(lengths, "lengths", False, &nlen)
        if nlen < rows:
            raise ValueError(f"lengths has {nlen} entries but packets has {rows} rows; "
                             "give one length per row")
        cdef bint capped = rows > self.vq.size
        if capped:
            rows = self.vq.size
        cdef uint32_t maxlen = self.max_packet_len, ln
        cdef uint32_t limit = maxlen if <Py_ssize_t>maxlen < cols else <uint32_t>cols
        cdef uint32_t *s_lens = self.s_lens
        for i in range(rows):
            ln = l[i]               # read once: the copy is checked and used
            if pmd_unlikely(ln == 0 or ln > limit):
                raise ValueError(f"lengths[{i}] = {ln}: a packet must be 1 to "
                                 f"{limit} bytes (row width {cols}, queue limit {maxlen})")
            s_lens[i] = ln
        cdef int n
        self.enter()
        cdef PyThreadState *ts = pmd_gil_release()
        n = self.send_copy(p, cols, self.s_lens, rows)
        pmd_gil_take(ts)
        self.leave()
        if capped and n == rows:
            self.ring_full += 1     # a whole ring's worth went: the rest did not fit
        self.report()
        return n

    cdef int send_zc(self, const uint32_t *ids, const uint32_t *lengths, Py_ssize_t burst) noexcept nogil:
        cdef Py_ssize_t i
        cdef uint32_t b
        cdef uint64_t nbytes = 0
        self.reclaim_used()
        if not self.vq.packed:
            return self.send_zc_split(ids, lengths, burst)
        return self.send_zc_packed(ids, lengths, burst)

    cdef int send_zc_split(self, const uint32_t *ids, const uint32_t *lengths, Py_ssize_t burst) noexcept nogil:
        """send_zc's loop on a split ring (ids and lengths already checked and claimed):
        one descriptor and one avail entry per buffer (2.7.13.1-2), the ring's fields
        in locals and written back once; what the ring has no room for is left."""
        cdef Py_ssize_t i, n = burst
        if n > self.vq.num_free:
            n = self.vq.num_free
            self.ring_full += 1
        cdef uint32_t b, ln, hdr_len = self.hdr_len
        cdef uint64_t nbytes = 0, off = self.buf_off
        cdef const uint64_t *iova = self.pool.iova
        cdef char *hdrs = self.pool.base + self.buf_off
        cdef size_t stride = self.pool.buffer_size
        cdef DescExtra *extra = self.vq.extra
        cdef vring_desc *desc = self.vq.vr.desc
        cdef uint16_t *ring = self.vq.vr.avail.ring
        cdef uint16_t head = self.vq.free_head, avail = self.vq.avail_idx, mask = self.vq.mask
        for i in range(n):
            b = ids[i]
            ln = lengths[i]
            zero_hdr(hdrs + b * stride, hdr_len)
            ring[avail & mask] = head
            avail += 1
            head = split_put(desc, extra, head, iova[b] + off, hdr_len + ln, b)
            nbytes += ln
        self.vq.free_head = head
        self.vq.num_free -= <uint32_t>n
        self.vq.avail_idx = avail
        self.packets += <uint64_t>n
        self.bytes += nbytes
        return <int>n

    cdef int send_zc_packed(self, const uint32_t *ids, const uint32_t *lengths, Py_ssize_t burst) noexcept nogil:
        """send_zc's loop on a packed ring, as send_zc_split: one descriptor per buffer at
        the avail position with the id of a free chain slot (2.8.6, 2.8.21.1), the batch's
        first descriptor's flags left to publish() (2.8.21.3), the ring's fields in locals."""
        cdef Py_ssize_t i, n = burst
        if n > self.vq.num_free:
            n = self.vq.num_free
            self.ring_full += 1
        cdef uint32_t b, ln, hdr_len = self.hdr_len
        cdef uint64_t nbytes = 0, off = self.buf_off
        cdef const uint64_t *iova = self.pool.iova
        cdef char *hdrs = self.pool.base + self.buf_off
        cdef size_t stride = self.pool.buffer_size
        cdef DescExtra *extra = self.vq.extra
        cdef pvirtq_desc *pdesc = self.vq.pdesc
        cdef uint32_t pos = self.vq.avail_pos, size = self.vq.size
        cdef uint16_t head = self.vq.free_head, wrap_flags = self.vq.avail_wrap_flags
        cdef bint pending = self.vq.batch_pending
        for i in range(n):
            b = ids[i]
            ln = lengths[i]
            zero_hdr(hdrs + b * stride, hdr_len)
            pdesc[pos].addr = iova[b] + off
            pdesc[pos].len = hdr_len + ln
            pdesc[pos].id = head
            if pending:
                pdesc[pos].flags = wrap_flags
            else:
                pending = True
                self.vq.batch_pos = <uint16_t>pos
                self.vq.batch_flags = wrap_flags
            extra[head].cookie = b
            extra[head].writable = 0
            extra[head].ndescs = 1
            head = extra[head].next
            pos += 1
            if pos == size:                   # 2.8.1: past the end the wrap counter flips
                pos = 0
                wrap_flags ^= PVIRTQ_AVAIL_USED
            nbytes += ln
        self.vq.free_head = head
        self.vq.num_free -= <uint32_t>n
        self.vq.avail_idx += <uint16_t>n
        self.vq.avail_pos = <uint16_t>pos
        self.vq.avail_wrap_flags = wrap_flags
        self.vq.batch_pending = pending
        self.packets += <uint64_t>n
        self.bytes += nbytes
        return <int>n

    cdef int send_pool(self, uint32_t length, Py_ssize_t burst) noexcept nogil:
        """Transmit up to ``burst`` buffers taken straight from the pool, ``length``
        bytes each, as they are (txonly: the frame is already in every free
        buffer), then publish. Returns how many went: fewer when the ring is full
        (counted in ring_full) or the pool is empty. The buffers are claimed off the
        free stack in one step, then sent by the zero-copy loop of the ring's layout."""
        cdef Py_ssize_t n = burst, i
        cdef int sent
        self.reclaim_used()
        if n > self.vq.num_free:
            n = self.vq.num_free
            if n <= self.pool.n_free:
                self.ring_full += 1       # the ring ran out first, as it would one add at a time
        if n > self.pool.n_free:
            n = self.pool.n_free
        cdef uint32_t top = self.pool.n_free, b
        cdef uint32_t *stack = self.pool.free_stack
        cdef uint8_t *state = self.pool.state
        cdef uint8_t owner = self.owner
        cdef uint32_t *s_ids = self.s_ids
        cdef uint32_t *s_lens = self.s_lens
        for i in range(n):
            top -= 1
            b = stack[top]
            state[b] = owner
            s_ids[i] = b
            s_lens[i] = length
        self.pool.n_free = top
        if self.vq.packed:
            sent = self.send_zc_packed(s_ids, s_lens, n)
        else:
            sent = self.send_zc_split(s_ids, s_lens, n)
        self.vq.flush()
        return sent

    cdef object _zc_error(self, Py_ssize_t i, uint32_t b, uint32_t ln, uint32_t st):
        """The exception for entry i of tx_burst_zc, refused with its id in state ``st``."""
        cdef PacketPool pool = self.pool
        if b >= pool.n_buffers:
            return PoolError(f"ids[{i}] = {b} does not belong to this pool (ids 0..{pool.n_buffers - 1})")
        if st != BUF_APP:
            return PoolError(f"ids[{i}] = {b} is not owned by the application "
                             f"({'free' if st == BUF_FREE else 'already queued'}): "
                             "transmit only buffers from pool.alloc or rx_burst_zc, once")
        return ValueError(f"lengths[{i}] = {ln}: a zero-copy packet must be 1 to "
                          f"{pool.buffer_size - pool.headroom} bytes (the pool's data room)")

    cdef void _unclaim(self, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
        cdef Py_ssize_t j
        for j in range(start, end):
            self.pool.state[self.s_ids[j]] = BUF_APP

    @cython.binding(False)   # a plain builtin method: CPython calls it without the cyfunction layer
    @cython.embedsignature.format("clinic")   # so inspect.signature still reads it
    def tx_burst_zc(self, ids, lengths):
        """Transmit pool buffers as they are: ``pool.data[ids[i], :lengths[i]]``.

        The application must own each id (from ``pool.alloc`` or ``rx_burst_zc``),
        each at most once; ownership passes to the queue, and the buffer returns
        to the pool when the device is done. Returns how many were queued; the
        rest (ring full, or beyond the ring's size: one call looks at no more)
        still belong to the application.
        """
        self.check()
        cdef Py_ssize_t nids, nlen, i
        cdef uint32_t *d = u32_1d(ids, "ids", False, &nids)
        cdef uint32_t *l = u32_1d(lengths, "lengths", False, &nlen)
        if nlen < nids:
            raise ValueError(f"lengths has {nlen} entries but ids has {nids}; give one length per id")
        cdef bint capped = nids > self.vq.size
        if capped:
            nids = self.vq.size
        cdef PacketPool pool = self.pool
        cdef uint32_t room = pool.buffer_size - pool.headroom
        cdef uint32_t bad[3]
        cdef Py_ssize_t n
        # The pool's turn first: the states are the pool's, shared with the pair's
        # receive queue, which may be in a burst in another thread. The arrays are
        # the caller's (kept alive by the call) and may change meanwhile: each id
        # and length is read once, and the value checked is the value used.
        self.enter()
        cdef PyThreadState *ts = pmd_gil_release()
        n = self.claim_send(d, l, nids, room, bad)
        if n >= 0:
            self.vq.flush()
        pmd_gil_take(ts)
        self.leave()
        if n < 0:
            raise self._zc_error(-1 - n, bad[0], bad[1], bad[2])
        if capped and n == nids:
            self.ring_full += 1
        self.report()
        return n

    cdef Py_ssize_t claim_send(self, const uint32_t *d, const uint32_t *l, Py_ssize_t nids,
                               uint32_t room, uint32_t *bad) noexcept nogil:
        """tx_burst_zc's work, after the reclaim: each of the first ``nids`` ids
        checked (a buffer of this pool the application owns, at most once, with a
        length of 1 to ``room``) and claimed for this queue, then sent. Returns how
        many went, or ``-1 - i`` when entry i is bad (its id and length in ``bad``):
        then nothing went and every claim is undone."""
        self.reclaim_used()
        if not self.vq.packed:
            return self.claim_send_split(d, l, nids, room, bad)
        cdef Py_ssize_t i
        cdef uint32_t b, ln, n_buffers = self.pool.n_buffers
        cdef uint8_t *state = self.pool.state
        cdef uint8_t owner = self.owner
        for i in range(nids):
            b = d[i]
            ln = l[i]
            if pmd_unlikely(refused(b, ln, state, n_buffers, room)):
                bad_entry(bad, b, ln, state, n_buffers)
                self._unclaim(0, i)
                return -1 - i
            state[b] = owner
            self.s_ids[i] = b
            self.s_lens[i] = ln
        cdef int n = self.send_zc_packed(self.s_ids, self.s_lens, nids)
        self._unclaim(n, nids)   # not sent: still the application's
        return n

    cdef Py_ssize_t claim_send_split(self, const uint32_t *d, const uint32_t *l, Py_ssize_t nids,
                                     uint32_t room, uint32_t *bad) noexcept nogil:
        """claim_send on a split ring, in one pass: each buffer checked, claimed and
        put in a descriptor and an avail entry (2.7.13.1-2) as send_zc_split does.
        Nothing is visible to the device before flush() (2.7.13.3), so a bad entry
        undoes the claims and leaves the ring's fields as they were. The ids the
        ring has no room for are checked, not claimed: they stay the caller's."""
        if self.hdr_len == DEFAULT_HDR_LEN:
            return split_claim_send(self, d, l, nids, room, bad, DEFAULT_HDR_LEN)
        return split_claim_send(self, d, l, nids, room, bad, self.hdr_len)

    cdef void unclaim_heads(self, Py_ssize_t k) noexcept nogil:
        """Undo claim_send_split's first ``k`` claims: the buffers back to the
        application, the heads (from the free list's start, in its order) free again."""
        cdef uint16_t head = self.vq.free_head
        cdef DescExtra *x
        cdef Py_ssize_t j
        for j in range(k):
            x = &self.vq.extra[head]
            self.pool.state[x.cookie] = BUF_APP
            x.ndescs = 0
            head = x.next

    def stats(self):
        """The queue's counters (packets, bytes, drops, ...) and ``ring_full``: times a burst
        found the ring or the pool full and sent fewer packets than it was given."""
        s = super().stats()
        s["ring_full"] = self.ring_full
        return s
