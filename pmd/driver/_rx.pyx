"""The driver's receive queue: used buffers into numpy arrays, and the refill.

``RxQueue`` takes what the device put in the used ring (2.7.14), validates each
entry, strips the virtio-net header (5.1.6) and hands the packet over in one of
two shapes (docs/bursts.md):

copy        ``rx_burst(out, lengths)``: packets copied into rows of a caller's
            2-D uint8 array;
zero-copy   ``rx_burst_zc(ids, lengths)``: buffer ids; the data is
            ``pool.data[id, :length]``, owned by the caller until it frees
            the ids or transmits them (:meth:`pmd.driver._tx.TxQueue.tx_burst_zc`).

Every burst ends with the **refill** (:meth:`RxQueue.refill`): a fresh pool
buffer in each free descriptor, one avail index store, a notification only if
the device asked (``Virtqueue.flush``). Arguments are validated while holding
the GIL; the per-packet work then runs in C with the GIL released. The shared
base (``_Queue``) is :mod:`pmd.driver._queue`.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from pmd.driver._pool cimport BUF_APP, BUF_FREE, NO_BUF, PacketPool
from pmd.driver._queue cimport DEFAULT_HDR_LEN, _Queue, u8_2d, u32_1d, u64_1d
from pmd.driver._virtqueue cimport (
    USED_BAD_ID, USED_BAD_LEN, USED_NOT_IN_FLIGHT, USED_OK, DescExtra, UsedCursor, Virtqueue,
    expected_head, head_word,
)
from pmd.includes.vring cimport (
    PVIRTQ_AVAIL_USED, VRING_DESC_F_WRITE, pvirtq_desc, vring_desc, vring_load16, vring_load32,
    vring_used_elem,
)
from pmd.includes.barrier cimport pmd_virtio_rmb
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.gil cimport PyThreadState, pmd_gil_init, pmd_gil_release, pmd_gil_take
from pmd.includes.virtio_net cimport virtio_net_hdr

pmd_gil_init()   # the bursts share one GIL hand-off hint (csrc/pmd_gil.h)

cnp.import_array()

cdef enum:
    ETH_HLEN = 14              # destination, source, EtherType: the shortest frame there is
    HASH_HDR_LEN = 20          # the header with hash_value and hash_report (HASH_REPORT, 5.1.6)
    DISCARD_MAX = 256          # rx_discard: ids on the stack per call


cdef inline void stamp(uint64_t *timestamps, int n) noexcept nogil:
    """One CLOCK_REALTIME reading (a vDSO call, no system call) for the ``n``
    packets of a burst, in nanoseconds since the epoch (docs/analytics.md:
    they were all in the used ring before the burst began)."""
    cdef timespec t
    cdef uint64_t ns
    cdef int k
    clock_gettime(CLOCK_REALTIME, &t)
    ns = <uint64_t>t.tv_sec * 1000000000 + <uint64_t>t.tv_nsec
    for k in range(n):
        timestamps[k] = ns


cdef struct HashOut:
    uint32_t *hashes
    uint16_t *types16
    uint8_t *types8


cdef int hashes_of(RxQueue q, object hashes, object hash_types, Py_ssize_t burst, HashOut *out) except -1:
    """Check hashes= (uint32) and hash_types= (uint16 or uint8), an entry per packet;
    their data pointers into ``out``."""
    cdef Py_ssize_t n
    cdef cnp.ndarray arr
    if q.hdr_len != HASH_HDR_LEN:
        raise ValueError(f"hashes= and hash_types= need the hash report (VIRTIO_NET_F_HASH_REPORT, a "
                         f"{HASH_HDR_LEN}-byte header); this queue's header is {q.hdr_len} bytes: start the port "
                         "with queue_pairs=2 or more on a device that offers HASH_REPORT (see port.rss)")
    out.hashes = NULL
    out.types16 = NULL
    out.types8 = NULL
    if hashes is not None:
        out.hashes = u32_1d(hashes, "hashes", True, &n)
        if n < burst:
            raise ValueError(f"hashes has {n} entries but the burst can bring {burst}; "
                             "give hashes at least one entry per packet")
    if hash_types is not None:
        if not cnp.PyArray_Check(hash_types) or cnp.PyArray_TYPE(<cnp.ndarray>hash_types) not in (
                cnp.NPY_UINT16, cnp.NPY_UINT8):
            dtype = getattr(hash_types, "dtype", type(hash_types).__name__)
            raise TypeError(f"hash_types must be a numpy array of dtype uint16 (or uint8), got {dtype}; "
                            "allocate it with np.zeros(burst, dtype=np.uint16)")
        arr = <cnp.ndarray>hash_types
        if cnp.PyArray_NDIM(arr) != 1:
            raise ValueError(f"hash_types must be 1-D, got shape {hash_types.shape}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
            raise ValueError("hash_types must be contiguous and aligned; pass np.ascontiguousarray(hash_types)")
        if not cnp.PyArray_ISWRITEABLE(arr):
            raise ValueError("hash_types is read-only; pass a writable array")
        if cnp.PyArray_DIM(arr, 0) < burst:
            raise ValueError(f"hash_types has {cnp.PyArray_DIM(arr, 0)} entries but the burst can bring {burst}; "
                             "give hash_types at least one entry per packet")
        if cnp.PyArray_TYPE(arr) == cnp.NPY_UINT16:
            out.types16 = <uint16_t *>cnp.PyArray_DATA(arr)
        else:
            out.types8 = <uint8_t *>cnp.PyArray_DATA(arr)
    return 0


cdef inline void hashes_to(RxQueue q, HashOut *h) noexcept nogil:
    """Point the queue at the arrays for one burst (after enter(): nothing raises from here)."""
    q.hash_out = h.hashes
    q.htype16_out = h.types16
    q.htype8_out = h.types8
    q.want_hash = True


cdef inline void hashes_done(RxQueue q) noexcept nogil:
    q.hash_out = NULL
    q.htype16_out = NULL
    q.htype8_out = NULL
    q.want_hash = False


# The bodies of rx_burst and rx_burst_zc, run between pmd_gil_release and
# pmd_gil_take (pmd/includes/gil.pxd): nogil, so Cython checks that they touch
# no Python object. ``h``: where the hashes go, or NULL; ``t``: the timestamps, or NULL.
cdef int take_copy(RxQueue q, char *out, Py_ssize_t cols, uint32_t *lengths, Py_ssize_t rows,
                   HashOut *h, uint64_t *t) noexcept nogil:
    if h != NULL:
        hashes_to(q, h)
    cdef int n = q.harvest(out, cols, NULL, lengths, rows)
    if h != NULL:
        hashes_done(q)
    if t != NULL and n > 0:
        stamp(t, n)
    return n


cdef int take_zc(RxQueue q, uint32_t *ids, uint32_t *lengths, Py_ssize_t burst,
                 HashOut *h, uint64_t *t) noexcept nogil:
    cdef int n = q.harvest(NULL, 0, ids, lengths, burst), k
    if h != NULL and n > 0:
        # The buffers are the caller's now, headers included: read after the harvest,
        # so the zero-copy harvest itself costs nothing when no hash is asked for.
        hashes_to(q, h)
        for k in range(n):
            q.take_hash(q.pool.buf(ids[k]) + q.buf_off, k)
        hashes_done(q)
    if t != NULL and n > 0:
        stamp(t, n)
    return n


cdef uint64_t *timestamps_of(object timestamps, Py_ssize_t burst) except NULL:
    cdef Py_ssize_t nts
    cdef uint64_t *t = u64_1d(timestamps, "timestamps", True, &nts)
    if nts < burst:
        raise ValueError(f"timestamps has {nts} entries but the burst can bring {burst}; "
                         "give timestamps at least one entry per packet")
    return t


cdef enum:
    HARVEST_COPY, HARVEST_ZC, HARVEST_DISCARD


cdef inline int split_harvest(RxQueue self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                              Py_ssize_t burst, const int mode) noexcept nogil:
    """RxQueue.harvest_split's loop, inlined once per mode (a constant there), so
    each of the three has none of the others' branches."""
    cdef uint16_t avail = self.vq.nused(), k
    if avail > burst:
        avail = <uint16_t>burst
    cdef vring_used_elem *used = self.vq.vr.used.ring
    cdef uint16_t last = self.vq.last_used_idx, mask = self.vq.mask
    cdef uint32_t size = self.vq.size, id, ln, b, nb, pkt
    cdef DescExtra *extra = self.vq.extra
    cdef DescExtra *x
    cdef uint32_t *stack = self.pool.free_stack
    cdef uint8_t *state = self.pool.state
    cdef uint32_t top = self.pool.n_free, n_buffers = self.pool.n_buffers
    cdef uint8_t owner = self.owner
    cdef uint32_t hdr_len = self.hdr_len
    # refill's chains: one descriptor, direct, one buffer's room (harvest() sends
    # buf_len < hdr_len + ETH_HLEN elsewhere, so span does not wrap)
    cdef uint64_t refilled = expected_head(self.buf_len, 1)
    cdef uint32_t span = self.buf_len - hdr_len - ETH_HLEN
    cdef uint16_t mark = self.vq.new_mark()
    cdef char *data = self.pool.base + self.pool.headroom
    cdef size_t stride = self.pool.buffer_size
    cdef uint64_t off = self.buf_off
    cdef const uint64_t *iova = self.pool.iova
    cdef vring_desc *desc = self.vq.vr.desc
    cdef uint16_t *ring = self.vq.vr.avail.ring
    cdef uint16_t avail_idx = self.vq.avail_idx
    cdef bint zc = out == NULL and ids != NULL
    cdef int got = 0
    cdef uint64_t nbytes = 0
    for k in range(avail):
        id = vring_load32(&used[last & mask].id)
        ln = vring_load32(&used[last & mask].len)
        last += 1
        if pmd_likely(id < size):
            x = &extra[id]
            b = x.cookie
            pkt = ln - hdr_len               # wraps when ln < hdr_len: fails the span check
            if pmd_likely(head_word(x) == refilled and x.mark != mark and b < n_buffers
                          and state[b] == owner and pkt - ETH_HLEN <= span):
                if mode == HARVEST_COPY:
                    if pmd_unlikely(pkt > cols):
                        memcpy(out + got * cols, data + b * stride, cols)
                        self.truncated += 1
                    else:
                        memcpy(out + got * cols, data + b * stride, pkt)
                elif zc:                    # the buffer goes to the application...
                    state[b] = BUF_APP
                    ids[got] = b
                    if pmd_unlikely(top == 0):
                        free_desc(self.vq, x, <uint16_t>id)   # ...and the pool has no other: refill() later
                        lengths[got] = pkt
                        nbytes += pkt
                        got += 1
                        continue
                    top -= 1                # ...and the pool's next takes its place
                    nb = stack[top]
                    state[nb] = owner
                    desc[id].addr = iova[nb] + off
                    x.cookie = nb
                ring[avail_idx & mask] = <uint16_t>id
                avail_idx += 1
                # not in flight until the index is published: a second used entry
                # for it in this burst is the device's error, counted as such
                x.mark = mark
                lengths[got] = pkt
                nbytes += pkt
                got += 1
                continue
        self.pool.n_free = top
        got += self.harvest_split_slow(id, ln, out, cols, ids, lengths, got, mark)
        top = self.pool.n_free
    self.vq.last_used_idx = last
    self.vq.avail_idx = avail_idx
    self.pool.n_free = top
    self.bytes += nbytes
    self.packets += got
    self.refill()
    self.vq.flush()
    return got


cdef inline int packed_harvest(RxQueue self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                               Py_ssize_t burst, const int mode) noexcept nogil:
    """RxQueue.harvest_packed's loop, inlined once per mode as split_harvest is.

    Reposting never writes a descriptor the cursor has still to read: the avail
    position only walks slots of chains already taken (2.8.1), and a reposted one
    is not the device's before publish, so the cursor's in-flight bound ends the
    walk before it. The walk is p_take's, on locals (the cursor's fields, the
    ring's), so the read barrier per descriptor does not send them to memory."""
    cdef UsedCursor c
    self.vq.p_cursor(&c)
    cdef uint32_t upos = c.pos, in_flight = c.in_flight
    cdef uint16_t want = c.want, nd
    cdef bint weak = self.vq.weak_barriers
    cdef uint16_t free_head = self.vq.free_head, id = 0
    cdef uint32_t num_free = self.vq.num_free, ln = 0, b, nb, pkt
    cdef DescExtra *extra = self.vq.extra
    cdef DescExtra *x
    cdef uint32_t *stack = self.pool.free_stack
    cdef uint8_t *state = self.pool.state
    cdef uint32_t top = self.pool.n_free, n_buffers = self.pool.n_buffers
    cdef uint8_t owner = self.owner
    cdef uint32_t hdr_len = self.hdr_len, blen = self.buf_len
    cdef uint64_t refilled = expected_head(blen, 1)
    cdef uint32_t span = blen - hdr_len - ETH_HLEN     # harvest() sends shorter buffers elsewhere
    cdef uint16_t mark = self.vq.new_mark()
    cdef char *data = self.pool.base + self.pool.headroom
    cdef size_t stride = self.pool.buffer_size
    cdef uint64_t off = self.buf_off
    cdef const uint64_t *iova = self.pool.iova
    cdef pvirtq_desc *pdesc = self.vq.pdesc
    cdef uint32_t pos = self.vq.avail_pos, size = self.vq.size, reposted = 0
    cdef uint16_t wflags = VRING_DESC_F_WRITE | self.vq.avail_wrap_flags
    cdef bint pending = self.vq.batch_pending
    cdef bint bad_len
    cdef int got = 0
    cdef Py_ssize_t seen = 0
    cdef uint64_t nbytes = 0
    while seen < burst and in_flight != 0:
        if (vring_load16(&pdesc[upos].flags) & PVIRTQ_AVAIL_USED) != want:
            break                           # not used yet on this lap
        pmd_virtio_rmb(weak)                # the flags before the id and len they cover (2.8.21.2)
        id = vring_load16(&pdesc[upos].id)
        ln = vring_load32(&pdesc[upos].len)
        if pmd_unlikely(id >= size):
            self.vq.n_bad_id += 1
            self.vq.broken = True
            break
        x = &extra[id]
        nd = x.ndescs
        if pmd_unlikely(nd == 0):
            self.vq.n_not_in_flight += 1
            self.vq.broken = True
            break
        upos += nd                          # 2.8.6: the next used descriptor is past the chain
        if upos >= size:
            upos -= size
            want ^= PVIRTQ_AVAIL_USED
        in_flight -= nd                     # the in-flight chains' ndescs sum to in_flight
        seen += 1
        b = x.cookie
        pkt = ln - hdr_len                   # wraps when ln < hdr_len: fails the span check
        if pmd_likely(head_word(x) == refilled and x.mark != mark and b < n_buffers
                      and state[b] == owner and pkt - ETH_HLEN <= span):
            nb = b                          # copy and discard: the same buffer again
            if mode == HARVEST_COPY:
                if pmd_unlikely(pkt > cols):
                    memcpy(out + got * cols, data + b * stride, cols)
                    self.truncated += 1
                else:
                    memcpy(out + got * cols, data + b * stride, pkt)
            elif mode == HARVEST_ZC:        # the buffer goes to the application...
                state[b] = BUF_APP
                ids[got] = b
                lengths[got] = pkt
                nbytes += pkt
                got += 1
                if pmd_unlikely(top == 0):  # ...and the pool has no other: refill() later
                    x.ndescs = 0
                    x.next = free_head
                    free_head = id
                    num_free += 1
                    continue
                top -= 1                    # ...and the pool's next takes its place
                nb = stack[top]
                state[nb] = owner
                x.cookie = nb
            pdesc[pos].addr = iova[nb] + off
            pdesc[pos].len = blen
            pdesc[pos].id = id
            if pending:
                pdesc[pos].flags = wflags
            else:                           # the batch's first: its flags wait for publish
                pending = True
                self.vq.batch_pos = <uint16_t>pos
                self.vq.batch_flags = wflags
            pos += 1
            if pos == size:                 # 2.8.1: past the end the wrap counter flips
                pos = 0
                wflags ^= PVIRTQ_AVAIL_USED
            reposted += 1
            x.mark = mark                   # a second used entry for it in this burst: not in flight
            if mode != HARVEST_ZC:
                lengths[got] = pkt
                nbytes += pkt
                got += 1
            continue
        if pmd_unlikely(x.mark == mark):    # reposted in this burst: as p_take treats an id not in flight
            self.vq.n_not_in_flight += 1
            self.vq.broken = True
            break
        bad_len = ln > x.writable
        if pmd_unlikely(bad_len):
            self.vq.n_bad_len += 1
        if pmd_unlikely(not_ours(x, b, state, n_buffers, owner)):
            # its ids back, no buffer freed
            self.vq.free_head = free_head
            self.vq.num_free = num_free
            self.vq.detach(id, NULL, 0)
            free_head = self.vq.free_head
            num_free = self.vq.num_free
            self.foreign_chains += 1
            continue
        x.ndescs = 0
        x.next = free_head
        free_head = id
        num_free += 1
        if pmd_unlikely(not_a_packet(self, bad_len, ln, hdr_len)):
            state[b] = BUF_FREE
            stack[top] = b
            top += 1
            continue
        if mode == HARVEST_COPY:
            if pmd_unlikely(pkt > cols):
                memcpy(out + got * cols, data + b * stride, cols)
                self.truncated += 1
            else:
                memcpy(out + got * cols, data + b * stride, pkt)
        if mode == HARVEST_ZC:
            state[b] = BUF_APP
            ids[got] = b
        else:
            state[b] = BUF_FREE
            stack[top] = b
            top += 1
        lengths[got] = pkt
        nbytes += pkt
        got += 1
    c.pos = upos
    c.want = want
    c.in_flight = in_flight
    self.vq.p_cursor_end(&c)
    self.vq.free_head = free_head
    self.vq.num_free = num_free
    self.vq.avail_idx += <uint16_t>reposted
    self.vq.avail_pos = <uint16_t>pos
    self.vq.avail_wrap_flags = wflags & PVIRTQ_AVAIL_USED
    self.vq.batch_pending = pending
    self.pool.n_free = top
    self.bytes += nbytes
    self.packets += got
    self.refill()
    self.vq.flush()
    return got


cdef inline bint not_ours(const DescExtra *x, uint32_t b, const uint8_t *state, uint32_t n_buffers,
                          uint8_t owner) noexcept nogil:
    """A used entry whose chain this queue (``owner`` in the pool's ``state``) did not
    build as it builds them: one descriptor, no indirect table, a cookie naming a
    buffer it holds (``b``, its cookie). The pool's fields as arguments: the loops keep
    them in locals."""
    return b >= n_buffers or state[b] != owner or x.ndescs != 1 or x.nind != 0


cdef inline bint not_a_packet(RxQueue self, bint bad_len, uint32_t ln, uint32_t hdr_len) noexcept nogil:
    """A used length that is no packet to hand over: past the buffer (``bad_len``,
    counted already), shorter than the header (counted as a bad length), or a runt
    without an Ethernet header (dropped, as Linux and DPDK do). Counts it dropped;
    the caller frees the buffer."""
    if pmd_unlikely(bad_len or ln < hdr_len or ln - hdr_len < ETH_HLEN):
        if not bad_len and ln < hdr_len:
            self.vq.n_bad_len += 1
        elif not bad_len:
            self.runt += 1
        self.dropped += 1
        return True
    return False


cdef inline void free_desc(Virtqueue vq, DescExtra *x, uint16_t id) noexcept nogil:
    """A one-descriptor chain's slot back on the free list."""
    x.ndescs = 0
    x.next = vq.free_head
    vq.free_head = id
    vq.num_free += 1


@cython.no_gc_clear   # __dealloc__ (the base's) unpins the memory of `vq` and `pool`
cdef class RxQueue(_Queue):
    """``RxQueue(vq, pool, hdr_len=12, strict=False)``: receive side of a port queue.

    Each descriptor is one pool buffer from ``headroom - hdr_len`` to its end;
    the device writes the header then the packet. ``fill()`` gives the device
    buffers; every burst refills what it took, with one avail index store.
    """
    # Attributes and C methods: pmd/driver/_rx.pxd.

    def __init__(self, Virtqueue vq not None, PacketPool pool not None, *, bint mergeable=False,
                 uint32_t max_packet_len=9216, **kw):
        """``mergeable``: VIRTIO_NET_F_MRG_RXBUF was negotiated (5.1.6.3.2): packets up to
        ``max_packet_len`` bytes arrive spread over several buffers, with the count
        in the first header's num_buffers. Needs the 12-byte header."""
        hdr_len = kw.get("hdr_len", DEFAULT_HDR_LEN)
        if mergeable and hdr_len not in (12, 20):
            raise ValueError("mergeable rx buffers need the 12-byte header, or the 20-byte one of "
                             "HASH_REPORT (num_buffers)")
        super().__init__(vq, pool, **kw)
        self.buf_len = pool.buffer_size - self.buf_off
        self.mergeable = mergeable
        self.mrg_max_len = max_packet_len

    @property
    def max_packet_len(self):
        """Largest packet a burst can return: one buffer's room, or ``max_packet_len``
        with mergeable buffers."""
        if self.mergeable:
            return self.mrg_max_len
        return self.buf_len - self.hdr_len

    cdef uint32_t refill(self) noexcept nogil:
        if not self.vq.packed:
            return self.refill_split()
        return self.refill_packed()

    cdef uint32_t refill_split(self) noexcept nogil:
        """refill() on a split ring as one batch: as many buffers as both the ring and
        the pool have, taken off the free stack, written as descriptors and avail
        entries (2.7.13.1-2) with every field the loop needs in locals (stores to the
        ring cannot alias them), then the ring's and the pool's state once."""
        cdef uint32_t want = self.vq.num_free, n = self.vq.num_free, i, b
        if n == 0:
            return 0
        if n > self.pool.n_free:
            n = self.pool.n_free
            self.no_buffer += 1               # the pool ran dry before the ring was full
        cdef uint32_t top = self.pool.n_free
        cdef uint32_t *stack = self.pool.free_stack
        cdef uint8_t *state = self.pool.state
        cdef const uint64_t *iova = self.pool.iova
        cdef uint8_t owner = self.owner
        cdef uint64_t off = self.buf_off
        cdef uint32_t blen = self.buf_len
        cdef DescExtra *extra = self.vq.extra
        cdef vring_desc *desc = self.vq.vr.desc
        cdef uint16_t *ring = self.vq.vr.avail.ring
        cdef uint16_t head = self.vq.free_head, avail = self.vq.avail_idx, mask = self.vq.mask
        for i in range(n):
            top -= 1
            b = stack[top]
            state[b] = owner
            desc[head].addr = iova[b] + off
            desc[head].len = blen
            desc[head].flags = VRING_DESC_F_WRITE
            extra[head].cookie = b
            extra[head].writable = blen
            extra[head].ndescs = 1
            ring[avail & mask] = head
            avail += 1
            head = extra[head].next
        self.pool.n_free = top
        self.vq.free_head = head
        self.vq.num_free = want - n
        self.vq.avail_idx = avail
        return n

    cdef uint32_t refill_packed(self) noexcept nogil:
        """refill() on a packed ring as one batch, as refill_split: each buffer one
        descriptor at the avail position with the id of a free chain slot (2.8.6,
        2.8.21.1). The batch's first descriptor keeps its old flags until publish()
        writes them (2.8.21.3); the others are written whole, unseen until then."""
        cdef uint32_t want = self.vq.num_free, n = self.vq.num_free, i, b
        if n == 0:
            return 0
        if n > self.pool.n_free:
            n = self.pool.n_free
            self.no_buffer += 1               # the pool ran dry before the ring was full
            if n == 0:
                return 0
        cdef uint32_t top = self.pool.n_free
        cdef uint32_t *stack = self.pool.free_stack
        cdef uint8_t *state = self.pool.state
        cdef const uint64_t *iova = self.pool.iova
        cdef uint8_t owner = self.owner
        cdef uint64_t off = self.buf_off
        cdef uint32_t blen = self.buf_len
        cdef DescExtra *extra = self.vq.extra
        cdef pvirtq_desc *pdesc = self.vq.pdesc
        cdef uint32_t pos = self.vq.avail_pos, size = self.vq.size
        cdef uint16_t head = self.vq.free_head, wrap_flags = self.vq.avail_wrap_flags, flags
        cdef bint pending = self.vq.batch_pending
        for i in range(n):
            top -= 1
            b = stack[top]
            state[b] = owner
            pdesc[pos].addr = iova[b] + off
            pdesc[pos].len = blen
            pdesc[pos].id = head
            flags = VRING_DESC_F_WRITE | wrap_flags
            if pending:
                pdesc[pos].flags = flags
            else:
                pending = True
                self.vq.batch_pos = <uint16_t>pos
                self.vq.batch_flags = flags
            extra[head].cookie = b
            extra[head].writable = blen
            extra[head].ndescs = 1
            head = extra[head].next
            pos += 1
            if pos == size:                   # 2.8.1: past the end the wrap counter flips
                pos = 0
                wrap_flags ^= PVIRTQ_AVAIL_USED
        self.pool.n_free = top
        self.vq.free_head = head
        self.vq.num_free = want - n
        self.vq.avail_idx += <uint16_t>n
        self.vq.avail_pos = <uint16_t>pos
        self.vq.avail_wrap_flags = wrap_flags
        self.vq.batch_pending = pending
        return n

    def fill(self):
        """Give the device every buffer the ring and the pool allow; returns how many."""
        self.check()
        cdef uint32_t n
        self.enter()
        with nogil:
            n = self.refill()
            self.vq.flush()
        self.leave()
        return n

    cdef int harvest(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                     Py_ssize_t burst) noexcept nogil:
        """Take up to ``burst`` received packets; copy them to ``out`` rows (copy
        mode), hand their buffers to the application (``ids``, zero-copy), or
        with neither free them at once (rx_discard)."""
        if self.mergeable:
            return self.harvest_mrg(out, cols, ids, lengths, burst)
        if not self.vq.in_order and not self.want_hash and self.buf_len >= self.hdr_len + ETH_HLEN:
            # (hashes asked for in copy mode: the general loop below reads them; the
            # one-pass harvests stay as they were)
            if self.vq.packed:
                return self.harvest_packed(out, cols, ids, lengths, burst)
            return self.harvest_split(out, cols, ids, lengths, burst)
        cdef uint16_t avail = self.vq.nused()
        cdef uint16_t head = 0
        cdef uint32_t length = 0, b, pkt
        cdef int r, got = 0
        cdef uint16_t k
        if avail > burst:
            avail = <uint16_t>burst
        for k in range(avail):
            r = self.vq.pop_used(&head, &length)
            if pmd_unlikely(r == USED_BAD_ID or r == USED_NOT_IN_FLIGHT):
                continue  # counted by the virtqueue; nothing of ours to reclaim
            b = self.take1(head)
            if pmd_unlikely(b == NO_BUF):
                continue  # not a buffer of this queue: counted, never freed
            if pmd_unlikely(r == USED_BAD_LEN or length < self.hdr_len):
                if r == USED_OK:
                    self.vq.n_bad_len += 1  # shorter than the header: not a packet
                self.dropped += 1
                self.pool.put(b)
                continue
            pkt = length - self.hdr_len
            if pmd_unlikely(pkt < ETH_HLEN):
                # A runt: no Ethernet header. Dropped and counted, as Linux
                # (rx_length_errors) and DPDK do; never handed to the application.
                self.runt += 1
                self.dropped += 1
                self.pool.put(b)
                continue
            if out != NULL:
                if pmd_unlikely(pkt > cols):
                    memcpy(out + got * cols, self.pool.buf(b) + self.pool.headroom, cols)
                    self.truncated += 1
                else:
                    memcpy(out + got * cols, self.pool.buf(b) + self.pool.headroom, pkt)
                if pmd_unlikely(self.want_hash):
                    self.take_hash(self.pool.buf(b) + self.buf_off, got)   # before the buffer goes back
                self.pool.put(b)
            elif ids != NULL:
                self.pool.state[b] = BUF_APP
                ids[got] = b
            else:
                self.pool.put(b)
            lengths[got] = pkt
            self.bytes += pkt
            got += 1
        self.packets += got
        self.refill()
        self.vq.flush()
        return got

    cdef int harvest_split(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                           Py_ssize_t burst) noexcept nogil:
        """harvest() on a split ring without mergeable buffers, in one pass: each used
        entry checked as pop_used and take1 check it (an id in range, of a chain in
        flight, a length within the buffer, a buffer this queue holds), then as
        harvest() treats it, with the ring's and the pool's fields in locals.

        The common case costs one branch per check, the descriptor's bookkeeping
        checked with one compare: an id in range; a one-descriptor direct chain of
        one buffer's room (refill's) not reposted in this burst; a buffer in range
        that this queue holds; a length from a header and an Ethernet header up to
        the room. Anything else
        goes to harvest_split_slow, which sorts out which rule it broke.

        A good packet's descriptor is made available again at once, with the buffer
        refill() would give it (copy mode and rx_discard: the same one, just freed;
        zero-copy: the pool's next): only its address and cookie change, so the free
        list is not walked and the length and flags refill_split wrote stay (2.7.13.1:
        the device reads them, the driver's checks use its own `writable`). Nothing of
        it is visible before flush() publishes the index (2.7.13.3), and until the
        burst ends it counts as not in flight (its mark is the burst's)."""
        if out != NULL:
            return split_harvest(self, out, cols, NULL, lengths, burst, HARVEST_COPY)
        if ids != NULL:
            return split_harvest(self, NULL, 0, ids, lengths, burst, HARVEST_ZC)
        return split_harvest(self, NULL, 0, NULL, lengths, burst, HARVEST_DISCARD)

    cdef int harvest_split_slow(self, uint32_t id, uint32_t ln, char *out, Py_ssize_t cols,
                                uint32_t *ids, uint32_t *lengths, int got, uint16_t mark) noexcept nogil:
        """One used entry harvest_split's fast path did not take, checked rule by rule
        and counted as pop_used and take1 count it; its descriptor goes back on the
        free list. A head with this burst's ``mark`` was reposted in it: not in flight.
        Returns 1 if it was a packet (at ``got``, its bytes counted), else 0."""
        if pmd_unlikely(id >= self.vq.size):
            self.vq.n_bad_id += 1
            return 0
        cdef DescExtra *x = &self.vq.extra[id]
        if pmd_unlikely(x.ndescs == 0 or x.mark == mark):
            self.vq.n_not_in_flight += 1
            return 0
        cdef bint bad_len = ln > x.writable
        if bad_len:
            self.vq.n_bad_len += 1
        cdef uint32_t b = x.cookie
        cdef uint8_t *state = self.pool.state
        if not_ours(x, b, state, self.pool.n_buffers, self.owner):
            # its descriptors back, no buffer freed
            self.vq.detach(<uint16_t>id, NULL, 0)
            self.foreign_chains += 1
            return 0
        free_desc(self.vq, x, <uint16_t>id)
        if not_a_packet(self, bad_len, ln, self.hdr_len):
            self.pool.put(b)
            return 0
        cdef uint32_t pkt = ln - self.hdr_len
        cdef char *src = self.pool.base + self.pool.headroom + b * self.pool.buffer_size
        if out != NULL:
            if pkt > cols:
                memcpy(out + got * cols, src, cols)
                self.truncated += 1
            else:
                memcpy(out + got * cols, src, pkt)
            self.pool.put(b)
        elif ids != NULL:
            state[b] = BUF_APP
            ids[got] = b
        else:
            self.pool.put(b)
        lengths[got] = pkt
        self.bytes += pkt
        return 1

    cdef int harvest_packed(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                            Py_ssize_t burst) noexcept nogil:
        """harvest() on a packed ring without mergeable buffers, in one pass as
        harvest_split: each used descriptor read and checked once by p_take (its
        flags on this lap, an id of a chain in flight), then as harvest_split
        checks it (refill's chain not reposted in this burst, a length within the
        buffer, a buffer this queue holds). A good packet's id is made available
        again at once at the avail position (2.8.21.1) with the buffer refill()
        would give it, as one batch with refill's (its first descriptor's flags
        written last, by publish: 2.8.21.3); the free list is not walked."""
        if out != NULL:
            return packed_harvest(self, out, cols, NULL, lengths, burst, HARVEST_COPY)
        if ids != NULL:
            return packed_harvest(self, NULL, 0, ids, lengths, burst, HARVEST_ZC)
        return packed_harvest(self, NULL, 0, NULL, lengths, burst, HARVEST_DISCARD)

    cdef int harvest_mrg(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                         Py_ssize_t burst) noexcept nogil:
        """harvest() with mergeable buffers (5.1.6.4.2): the first buffer's header
        says how many used entries the packet takes; they follow it in the ring.
        A packet whose buffers are not all published yet waits for the next burst.
        num_buffers is device-written: 0, more than the ring, or a packet longer
        than max_packet_len is counted and dropped.
        """
        cdef int got = 0
        if out == NULL and not self.vq.in_order:
            # zero-copy or discard: the packets of one buffer first, in one pass
            got = self.mrg_singles(ids, lengths, burst)
            if got < 0:                   # nothing else is used: no general pass
                got = -got - 1
                self.packets += got
                self.refill()
                self.vq.flush()
                return got
        cdef uint16_t avail = self.vq.nused()
        cdef uint16_t head = 0, nb, k
        cdef uint32_t length = 0, b, cookie = 0, pkt, take, handed
        cdef int r
        cdef bint ok
        cdef char *dst
        cdef const char *src
        while got < burst and avail > 0:
            if (out == NULL and self.vq.peek_used_head(&head, &length) and self.hdr_len <= length <= self.buf_len
                    and self.pool.held_by(self.vq.extra[head].cookie, self.owner)
                    and (<virtio_net_hdr *>(self.pool.buf(self.vq.extra[head].cookie)
                                            + self.buf_off)).num_buffers == 1):
                # The common packet, one buffer, without a copy (zero-copy or discard):
                # the entry is read once and taken with what was checked.
                r = self.vq.take_peeked(head, length)
                avail -= 1
                b = self.take1(head)
                if pmd_unlikely(b == NO_BUF):
                    continue
                pkt = length - self.hdr_len
                if pmd_unlikely(r != USED_OK or pkt < ETH_HLEN or pkt > self.mrg_max_len):
                    if r == USED_OK and pkt < ETH_HLEN:
                        self.runt += 1
                    self.dropped += 1
                    self.pool.put(b)
                    continue
                if ids != NULL:
                    self.pool.state[b] = BUF_APP
                    ids[got] = b
                else:
                    self.pool.put(b)
                lengths[got] = pkt
                self.bytes += pkt
                got += 1
                continue
            if (not self.vq.peek_used(&cookie, &length) or length < self.hdr_len or length > self.buf_len
                    or not self.pool.held_by(cookie, self.owner)):
                # Not a packet's first buffer we can read a header from: never
                # follow its num_buffers; pop_used / take1 count it below.
                nb = 1
            else:
                nb = (<virtio_net_hdr *>(self.pool.buf(cookie) + self.buf_off)).num_buffers
                if pmd_unlikely(nb == 0 or nb > self.vq.size):
                    self.bad_num_buffers += 1
                    nb = 0   # never followed: reclaim this one buffer, drop it
                elif nb > avail:
                    break    # the rest of this packet is not published yet
            ok = nb != 0
            if not ok:
                nb = 1
            avail -= nb
            pkt = 0
            handed = NO_BUF
            dst = NULL
            if out != NULL:
                dst = out + got * cols
            for k in range(nb):
                r = self.vq.pop_used(&head, &length)
                if pmd_unlikely(r == USED_BAD_ID or r == USED_NOT_IN_FLIGHT):
                    ok = False
                    continue
                b = self.take1(head)
                if pmd_unlikely(b == NO_BUF):
                    ok = False
                    continue
                if pmd_unlikely(r == USED_BAD_LEN or (k == 0 and length < self.hdr_len)):
                    if r == USED_OK:
                        self.vq.n_bad_len += 1
                    ok = False
                    self.pool.put(b)
                    continue
                if k == 0:
                    length -= self.hdr_len
                    src = self.pool.buf(b) + self.pool.headroom
                    if pmd_unlikely(self.want_hash and out != NULL):
                        self.take_hash(self.pool.buf(b) + self.buf_off, got)
                else:
                    src = self.pool.buf(b) + self.buf_off   # continuation: no header
                if ok and out != NULL and pkt < cols:
                    take = length if pkt + length <= cols else <uint32_t>(cols - pkt)
                    memcpy(dst + pkt, src, take)
                if ids != NULL and nb == 1 and ok:
                    handed = b           # to the application if the packet is kept
                else:
                    self.pool.put(b)
                pkt += length
            if pmd_unlikely(not ok or pkt < ETH_HLEN or pkt > self.mrg_max_len or (ids != NULL and nb > 1)):
                if handed != NO_BUF:
                    self.pool.put(handed)
                if ok and pkt < ETH_HLEN:
                    self.runt += 1
                elif ok and ids != NULL and nb > 1:
                    self.zc_multi_dropped += 1   # zero-copy returns one buffer per packet
                self.dropped += 1
                continue
            if ids != NULL:
                self.pool.state[handed] = BUF_APP
                ids[got] = handed
            elif out != NULL and pkt > cols:
                self.truncated += 1
            lengths[got] = pkt
            self.bytes += pkt
            got += 1
        self.packets += got
        self.refill()
        self.vq.flush()
        return got

    cdef int mrg_singles(self, uint32_t *ids, uint32_t *lengths, Py_ssize_t burst) noexcept nogil:
        """harvest_mrg's one pass (zero-copy or discard, not in order): the used buffers
        at the front that are whole packets (num_buffers 1, 5.1.6.4.2), each checked as
        the general loop checks it (an id in flight of a one-descriptor chain, a buffer
        this queue holds, a length within it and past the header, a packet of ETH_HLEN
        to max_packet_len bytes), with the ring's and the pool's fields in locals. It
        stops before the first one that is anything else, which the general loop reads
        again. Returns the packets taken, or -1 - that count when none is left to look at
        (burst reached, or nothing more used)."""
        cdef uint16_t free_head = self.vq.free_head, id, nb
        cdef uint32_t num_free = self.vq.num_free, ln, b, pkt
        cdef DescExtra *extra = self.vq.extra
        cdef DescExtra *x
        cdef uint32_t *stack = self.pool.free_stack
        cdef uint8_t *state = self.pool.state
        cdef uint32_t top = self.pool.n_free, n_buffers = self.pool.n_buffers
        cdef uint8_t owner = self.owner
        cdef uint32_t hdr_len = self.hdr_len, max_len = self.mrg_max_len, size = self.vq.size
        cdef char *hdrs = self.pool.base + self.buf_off
        cdef size_t stride = self.pool.buffer_size
        cdef uint64_t nbytes = 0
        cdef int got = 0
        cdef bint done = False
        cdef UsedCursor c
        cdef uint16_t flags, last, n, k
        cdef vring_used_elem *used
        cdef pvirtq_desc *pdesc
        if self.vq.packed:
            self.vq.p_cursor(&c)
            pdesc = self.vq.pdesc
            while True:
                if got >= burst or c.in_flight == 0:
                    done = True
                    break
                flags = vring_load16(&pdesc[c.pos].flags)
                if (flags & PVIRTQ_AVAIL_USED) != c.want:
                    done = True           # nothing more used (2.8.1)
                    break
                pmd_virtio_rmb(self.vq.weak_barriers)   # the flags before the id and len (2.8.21.2)
                id = vring_load16(&pdesc[c.pos].id)
                ln = vring_load32(&pdesc[c.pos].len)
                if pmd_unlikely(id >= size):
                    break
                x = &extra[id]
                b = x.cookie
                if pmd_unlikely(x.ndescs != 1 or x.nind != 0 or b >= n_buffers or state[b] != owner
                                or ln < hdr_len or ln > x.writable):
                    break
                nb = (<virtio_net_hdr *>(hdrs + b * stride)).num_buffers
                pkt = ln - hdr_len
                if nb != 1 or pkt < ETH_HLEN or pkt > max_len:
                    break
                c.pos += 1
                if c.pos == size:
                    c.pos = 0
                    c.want ^= PVIRTQ_AVAIL_USED
                c.in_flight -= 1
                x.ndescs = 0
                x.next = free_head
                free_head = id
                num_free += 1
                if ids != NULL:
                    state[b] = BUF_APP
                    ids[got] = b
                else:
                    state[b] = BUF_FREE
                    stack[top] = b
                    top += 1
                lengths[got] = pkt
                nbytes += pkt
                got += 1
            self.vq.p_cursor_end(&c)
        else:
            n = self.vq.nused()           # idx read once, checked against what is in flight
            used = self.vq.vr.used.ring
            last = self.vq.last_used_idx
            k = 0
            while True:
                if got >= burst or k == n:
                    done = True
                    break
                ln = vring_load32(&used[last & self.vq.mask].id)
                if pmd_unlikely(ln >= size):
                    break
                id = <uint16_t>ln
                ln = vring_load32(&used[last & self.vq.mask].len)
                x = &extra[id]
                b = x.cookie
                if pmd_unlikely(x.ndescs != 1 or x.nind != 0 or b >= n_buffers or state[b] != owner
                                or ln < hdr_len or ln > x.writable):
                    break
                nb = (<virtio_net_hdr *>(hdrs + b * stride)).num_buffers
                pkt = ln - hdr_len
                if nb != 1 or pkt < ETH_HLEN or pkt > max_len:
                    break
                last += 1
                k += 1
                x.ndescs = 0
                x.next = free_head
                free_head = id
                num_free += 1
                if ids != NULL:
                    state[b] = BUF_APP
                    ids[got] = b
                else:
                    state[b] = BUF_FREE
                    stack[top] = b
                    top += 1
                lengths[got] = pkt
                nbytes += pkt
                got += 1
            self.vq.last_used_idx = last
        self.vq.free_head = free_head
        self.vq.num_free = num_free
        self.pool.n_free = top
        self.bytes += nbytes
        return -1 - got if done else got

    @cython.binding(False)   # a plain builtin method: CPython calls it without the cyfunction layer
    @cython.embedsignature.format("clinic")   # so inspect.signature still reads it
    def rx_burst(self, out, lengths, *, bint truncate=False, timestamps=None, hashes=None, hash_types=None):
        """Receive up to ``len(out)`` packets into the rows of ``out`` (uint8, 2-D,
        C-contiguous); ``lengths[i]`` (uint32) gets packet i's length. Returns the
        count. Rows must hold ``max_packet_len`` bytes unless ``truncate=True``
        (then longer packets are cut to the row and ``lengths`` keeps their
        real length, like pcap's snaplen). ``timestamps`` (uint64, an entry per
        row): ``timestamps[i]`` gets the burst's CLOCK_REALTIME in nanoseconds,
        read once after the packets were taken. ``hashes`` (uint32) and ``hash_types``
        (uint16 or uint8), an entry per row, get each packet's RSS hash and its
        hash_report (``pmd.abi.virtio_net.HASH_REPORT_*``, 0: not hashed) as the
        device wrote them; they need HASH_REPORT (``port.rss``).
        """
        self.check()
        cdef Py_ssize_t rows, cols, nlen
        cdef char *o = u8_2d(out, "out", True, &rows, &cols)
        cdef uint32_t *l = u32_1d(lengths, "lengths", True, &nlen)
        if nlen < rows:
            raise ValueError(f"lengths has {nlen} entries but out has {rows} rows; "
                             "give lengths at least one entry per row")
        if cols < self.max_packet_len and not truncate:
            raise ValueError(f"out rows hold {cols} bytes but packets can be up to {self.max_packet_len}; "
                             f"use out with at least {self.max_packet_len} columns, or truncate=True")
        cdef uint64_t *t = NULL
        if timestamps is not None:
            t = timestamps_of(timestamps, rows)
        cdef HashOut h
        cdef bint hashing = hashes is not None or hash_types is not None
        if hashing:
            hashes_of(self, hashes, hash_types, rows, &h)
        if self.idle():
            return 0
        cdef int n
        self.enter()
        cdef PyThreadState *ts = pmd_gil_release()
        n = take_copy(self, o, cols, l, rows, &h if hashing else NULL, t)
        pmd_gil_take(ts)
        self.leave()
        self.report_after(n)
        return n

    @cython.binding(False)   # a plain builtin method: CPython calls it without the cyfunction layer
    @cython.embedsignature.format("clinic")   # so inspect.signature still reads it
    def rx_burst_zc(self, ids, lengths, *, timestamps=None, hashes=None, hash_types=None):
        """Receive up to ``len(ids)`` packets without copying: ``ids[i]`` (uint32) is
        a pool buffer whose data is ``pool.data[ids[i], :lengths[i]]``. The
        application owns those buffers until it gives them back with
        ``pool.free(ids, n)`` or transmits them with ``TxQueue.tx_burst_zc``.
        Returns the count. ``timestamps``, ``hashes`` and ``hash_types`` as for
        ``rx_burst``, an entry per id.
        """
        self.check()
        cdef Py_ssize_t nids, nlen
        cdef uint32_t *i = u32_1d(ids, "ids", True, &nids)
        cdef uint32_t *l = u32_1d(lengths, "lengths", True, &nlen)
        if nlen < nids:
            raise ValueError(f"lengths has {nlen} entries but ids has {nids}; give one length per id")
        cdef uint64_t *t = NULL
        if timestamps is not None:
            t = timestamps_of(timestamps, nids)
        cdef HashOut h
        cdef bint hashing = hashes is not None or hash_types is not None
        if hashing:
            hashes_of(self, hashes, hash_types, nids, &h)
        if self.idle():
            return 0
        cdef int n
        self.enter()
        cdef PyThreadState *ts = pmd_gil_release()
        n = take_zc(self, i, l, nids, &h if hashing else NULL, t)
        pmd_gil_take(ts)
        self.leave()
        self.report_after(n)       # the ids are the caller's now: never raise with them unreturned
        return n

    @cython.binding(False)   # a plain builtin method: CPython calls it without the cyfunction layer
    @cython.embedsignature.format("clinic")   # so inspect.signature still reads it
    def rx_discard(self, Py_ssize_t max_packets=32):
        """Receive up to ``max_packets`` (1 to 256) and give their buffers straight
        back to the pool: what testpmd's rxonly does (receive, count, free), in one
        call without the GIL and with no ids handed to Python. The queue's
        statistics count them. Returns the count."""
        self.check()
        if not 1 <= max_packets <= DISCARD_MAX:
            raise ValueError(f"max_packets must be 1 to {DISCARD_MAX}, got {max_packets}")
        if self.idle():
            return 0
        cdef uint32_t lens[DISCARD_MAX]
        cdef int n
        self.enter()
        cdef PyThreadState *ts = pmd_gil_release()
        n = self.harvest(NULL, 0, NULL, lens, max_packets)   # neither rows nor ids: freed at once
        pmd_gil_take(ts)
        self.leave()
        self.report_after(n)
        return n

    def stats(self):
        """The queue's counters (packets, bytes, drops, ...) and the receive side's own:
        ``no_buffer``, ``truncated``, ``runt``, ``bad_num_buffers``, ``zc_multi_dropped``."""
        s = super().stats()
        s["no_buffer"] = self.no_buffer
        s["truncated"] = self.truncated
        s["runt"] = self.runt
        s["bad_num_buffers"] = self.bad_num_buffers
        s["zc_multi_dropped"] = self.zc_multi_dropped
        return s
