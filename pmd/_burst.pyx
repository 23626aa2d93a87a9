"""rx/tx bursts between virtqueues and numpy arrays, without the GIL.

Two shapes each way (docs/bursts.md):

copy        ``rx_burst(out, lengths)``: packets copied into rows of a caller's
            2-D uint8 array; ``tx_burst(packets, lengths)`` copies rows out.
zero-copy   ``rx_burst_zc(ids, lengths)``: buffer ids; the data is
            ``pool.data[id, :length]``, owned by the caller until it frees
            the ids or transmits them with ``tx_burst_zc(ids, lengths)``.

Arguments are validated while holding the GIL (type, dtype, shape,
contiguity, lengths, buffer ownership); the per-packet work then runs in C
with the GIL released. The 12-byte virtio-net header (5.1.6) is handled here:
zeroed on transmit, stripped on receive.
"""

import logging

cimport cython
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.unistd cimport usleep

from pmd._memory cimport DmaMemory
from pmd._pool cimport BUF_APP, BUF_FREE, NO_BUF, PacketPool
from pmd._virtqueue cimport (
    USED_BAD_ID, USED_BAD_LEN, USED_NOT_IN_FLIGHT, USED_OK, Virtqueue,
)
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.virtio_net cimport virtio_net_hdr

from pmd.errors import DeviceError, PoolError, QueueStateError

cnp.import_array()

log = logging.getLogger("pmd.burst")

DEF_HDR_LEN = 12

cdef enum:
    MAX_TX_SEGS = 32     # longest chain a copy-mode transmit builds for one packet
    ETH_HLEN = 14        # destination, source, EtherType: the shortest frame there is


# ---- argument checks (GIL held): clear errors before any C work ----

cdef char *_u8_2d(object a, str name, bint writable, Py_ssize_t *rows, Py_ssize_t *cols) except NULL:
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


cdef uint32_t *_u32_1d(object a, str name, bint writable, Py_ssize_t *n) except NULL:
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
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only; pass a writable array")
    n[0] = cnp.PyArray_DIM(arr, 0)
    return <uint32_t *>cnp.PyArray_DATA(arr)


cdef enum:
    DISCARD_MAX = 256          # rx_discard: ids on the stack per call

@cython.no_gc_clear   # __dealloc__ unpins the memory of `vq` and `pool`
cdef class _Queue:
    """What rx and tx queues share: the virtqueue, the pool, the header, the stats."""
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
    cdef public uint64_t packets
    cdef public uint64_t bytes
    cdef public uint64_t dropped
    cdef public uint64_t foreign_chains

    def __init__(self, Virtqueue vq not None, PacketPool pool not None, *, uint32_t hdr_len=DEF_HDR_LEN,
                 bint strict=False):
        if hdr_len not in (10, 12):
            raise ValueError(f"hdr_len must be 12 (VERSION_1) or 10 (legacy without MRG_RXBUF), got {hdr_len}")
        if hdr_len > pool.headroom:
            raise ValueError(f"pool headroom {pool.headroom} cannot hold the {hdr_len}-byte header")
        if vq.owned:
            raise QueueStateError(f"virtqueue {vq.queue_index} already belongs to a queue; "
                                  "give each RxQueue/TxQueue a virtqueue of its own")
        vq.check_usable()
        self.owner = <uint8_t>pool.new_owner()
        # The bursts reach ring and buffers through raw pointers without the
        # GIL: the pages stay mapped until this queue is closed or gone.
        vq.memory.pin()
        try:
            pool.memory.pin()
        except BaseException:
            vq.memory.unpin()
            raise
        self.pinned = True
        vq.owned = True
        vq.disown_cookies()     # chains in flight now are not ours: counted, never freed
        self.vq = vq
        self.pool = pool
        self.hdr_len = hdr_len
        self.buf_off = pool.headroom - hdr_len
        self.strict = strict

    def __dealloc__(self):
        self._unpin()

    cdef void _unpin(self) noexcept:
        if self.pinned:
            self.pinned = False
            self.vq.memory.unpin()
            self.pool.memory.unpin()

    cdef inline void check(self) except *:
        if pmd_unlikely(self.is_closed):
            raise QueueStateError(f"{type(self).__name__} {self.vq.queue_index} is closed; "
                                  "open the port / create the queue again")
        self.vq.check_usable()
        self.pool.check_open()

    cdef inline int enter(self) except -1:
        """The last step before ``with nogil:``, after every check: from here
        until ``leave`` the queue is busy and ``fence`` waits. Nothing between
        the closed check and the mark lets another thread run (GIL held)."""
        if pmd_unlikely(self.is_closed):
            self.check()
        self.busy += 1
        return 0

    cdef inline void leave(self) noexcept:
        self.busy -= 1

    cdef uint64_t device_errors(self) noexcept:
        return self.vq.n_bad_id + self.vq.n_not_in_flight + self.vq.n_bad_len

    cdef int report(self) except -1:
        """After a burst: tell about bad used entries the device wrote during it."""
        cdef uint64_t bad = self.device_errors()
        if pmd_likely(bad == self.seen_bad) and not self.vq.broken:
            return 0
        new = bad - self.seen_bad
        self.seen_bad = bad
        stats = self.vq.stats()
        msg = (f"{type(self).__name__} {self.vq.queue_index}: device wrote {new} bad used "
               f"entr{'y' if new == 1 else 'ies'} (totals: id out of range {stats['bad_used_id']}, "
               f"not in flight {stats['used_not_in_flight']}, length too large {stats['bad_used_len']}); "
               "they were counted and skipped")
        if self.vq.broken:
            self.vq.check_usable()
        if self.strict:
            raise DeviceError(msg)
        log.warning(msg)
        return 0

    cdef inline uint32_t take1(self, uint16_t head) noexcept nogil:
        """Detach a one-buffer chain the device completed; its buffer id, or
        NO_BUF (counted) when the chain is not one this queue built: a buffer
        is freed only by the queue that holds it."""
        cdef uint32_t b = self.vq.extra[head].cookie
        if pmd_unlikely(not self.pool.held_by(b, self.owner) or self.vq.extra[head].ndescs != 1):
            self.vq.detach(head, NULL, 0)       # all its descriptors, and no buffer
            self.foreign_chains += 1
            return NO_BUF
        return self.vq.detach1(head)

    cdef uint32_t put_chain(self, uint16_t head) noexcept nogil:
        """Detach a chain and free its buffers; returns how many were freed."""
        cdef uint32_t cookies[MAX_TX_SEGS]
        cdef uint16_t n = self.vq.detach(head, cookies, MAX_TX_SEGS), k
        cdef uint32_t freed = 0
        if pmd_unlikely(n > MAX_TX_SEGS):
            self.foreign_chains += 1     # longer than any chain a burst builds
            return 0
        for k in range(n):
            if pmd_likely(self.pool.held_by(cookies[k], self.owner)):
                self.pool.put(cookies[k])
                freed += 1
        if pmd_unlikely(freed != n):
            self.foreign_chains += 1
        return freed

    def stats(self):
        """Packets, bytes and drops of this queue, with its virtqueue's counters."""
        s = {"packets": self.packets, "bytes": self.bytes, "dropped": self.dropped,
             "foreign_chains": self.foreign_chains}
        s.update(self.vq.stats())
        return s

    def fence(self):
        """Refuse every later burst (QueueStateError "closed") and wait until a
        burst another thread is running now has returned. Buffers stay where they
        are: reset the device, then ``close()``. Safe from any thread."""
        self.is_closed = True
        while self.busy:
            with nogil:
                usleep(50)

    def close(self):
        """Stop using the queue (after the device was reset); buffers it held go back
        to the pool. Waits for a burst in progress in another thread (``fence``)."""
        self.fence()
        if not self.pinned:
            return
        self._release_all()
        self.vq.close()
        self._unpin()

    cdef _release_all(self):
        # Every descriptor still in flight holds pool buffers: give them back.
        cdef uint32_t i
        for i in range(self.vq.size):
            if self.vq.extra[i].ndescs:
                self.put_chain(<uint16_t>i)

    @property
    def closed(self):
        return self.is_closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@cython.no_gc_clear
cdef class RxQueue(_Queue):
    """``RxQueue(vq, pool, hdr_len=12, strict=False)``: receive side of a port queue.

    Each descriptor is one pool buffer from ``headroom - hdr_len`` to its end;
    the device writes the header then the packet. ``fill()`` gives the device
    buffers; every burst refills what it took, with one avail index store.
    """
    cdef uint32_t buf_len           # device-writable bytes per buffer
    cdef readonly bint mergeable    # VIRTIO_NET_F_MRG_RXBUF: a packet may span buffers
    cdef uint32_t mrg_max_len       # largest packet accepted when mergeable
    cdef public uint64_t no_buffer  # refills short of pool buffers
    cdef public uint64_t truncated
    cdef public uint64_t runt       # shorter than an Ethernet header: dropped
    cdef public uint64_t bad_num_buffers
    cdef public uint64_t zc_multi_dropped

    def __init__(self, Virtqueue vq not None, PacketPool pool not None, *, bint mergeable=False,
                 uint32_t max_packet_len=9216, **kw):
        """``mergeable``: VIRTIO_NET_F_MRG_RXBUF was negotiated (5.1.6.3.2): packets up to
        ``max_packet_len`` bytes arrive spread over several buffers, with the count
        in the first header's num_buffers. Needs the 12-byte header."""
        hdr_len = kw.get("hdr_len", DEF_HDR_LEN)
        if mergeable and hdr_len != 12:
            raise ValueError("mergeable rx buffers need the 12-byte header (num_buffers)")
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
        cdef uint32_t added = 0, b
        while self.vq.num_free:
            b = self.pool.get(self.owner)
            if pmd_unlikely(b == NO_BUF):
                self.no_buffer += 1
                break
            self.vq.add1(self.pool.iova[b] + self.buf_off, self.buf_len, True, b)
            added += 1
        return added

    cdef inline bint idle(self) noexcept:
        """Nothing received and nothing to refill: a poll that finds an empty
        ring returns without the cost of releasing and retaking the GIL."""
        return self.vq.num_free == 0 and self.vq.nused() == 0 and not self.vq.broken

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

    cdef int harvest_mrg(self, char *out, Py_ssize_t cols, uint32_t *ids, uint32_t *lengths,
                         Py_ssize_t burst) noexcept nogil:
        """harvest() with mergeable buffers (5.1.6.4.2): the first buffer's header
        says how many used entries the packet takes; they follow it in the ring.
        A packet whose buffers are not all published yet waits for the next burst.
        num_buffers is device-written: 0, more than the ring, or a packet longer
        than max_packet_len is counted and dropped.
        """
        cdef uint16_t avail = self.vq.nused()
        cdef uint16_t head = 0, nb, k
        cdef uint32_t length = 0, b, cookie = 0, pkt, take, handed
        cdef int r, got = 0
        cdef bint ok
        cdef char *dst
        cdef const char *src
        while got < burst and avail > 0:
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

    def rx_burst(self, out, lengths, *, bint truncate=False):
        """Receive up to ``len(out)`` packets into the rows of ``out`` (uint8, 2-D,
        C-contiguous); ``lengths[i]`` (uint32) gets packet i's length. Returns the
        count. Rows must hold ``max_packet_len`` bytes unless ``truncate=True``
        (then longer packets are cut to the row and ``lengths`` keeps their
        real length, like pcap's snaplen).
        """
        self.check()
        cdef Py_ssize_t rows, cols, nlen
        cdef char *o = _u8_2d(out, "out", True, &rows, &cols)
        cdef uint32_t *l = _u32_1d(lengths, "lengths", True, &nlen)
        if nlen < rows:
            raise ValueError(f"lengths has {nlen} entries but out has {rows} rows; "
                             "give lengths at least one entry per row")
        if cols < self.max_packet_len and not truncate:
            raise ValueError(f"out rows hold {cols} bytes but packets can be up to {self.max_packet_len}; "
                             f"use out with at least {self.max_packet_len} columns, or truncate=True")
        if self.idle():
            return 0
        cdef int n
        self.enter()
        with nogil:
            n = self.harvest(o, cols, NULL, l, rows)
        self.leave()
        self.report()
        return n

    def rx_burst_zc(self, ids, lengths):
        """Receive up to ``len(ids)`` packets without copying: ``ids[i]`` (uint32) is
        a pool buffer whose data is ``pool.data[ids[i], :lengths[i]]``. The
        application owns those buffers until it gives them back with
        ``pool.free(ids[:n])`` or transmits them with ``TxQueue.tx_burst_zc``.
        Returns the count.
        """
        self.check()
        cdef Py_ssize_t nids, nlen
        cdef uint32_t *i = _u32_1d(ids, "ids", True, &nids)
        cdef uint32_t *l = _u32_1d(lengths, "lengths", True, &nlen)
        if nlen < nids:
            raise ValueError(f"lengths has {nlen} entries but ids has {nids}; give one length per id")
        if self.idle():
            return 0
        cdef int n
        self.enter()
        with nogil:
            n = self.harvest(NULL, 0, i, l, nids)
        self.leave()
        self.report()
        return n

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
        with nogil:
            n = self.harvest(NULL, 0, NULL, lens, max_packets)   # neither rows nor ids: freed at once
        self.leave()
        self.report()
        return n

    def stats(self):
        s = super().stats()
        s["no_buffer"] = self.no_buffer
        s["truncated"] = self.truncated
        s["runt"] = self.runt
        s["bad_num_buffers"] = self.bad_num_buffers
        s["zc_multi_dropped"] = self.zc_multi_dropped
        return s


@cython.no_gc_clear
cdef class TxQueue(_Queue):
    """``TxQueue(vq, pool, hdr_len=12, strict=False)``: transmit side of a port queue.

    A packet is one descriptor (header in the headroom, then data) when it
    fits a buffer's data room; copy mode chains more buffers for longer ones.
    Completed buffers go back to the pool at the start of each burst.
    """
    cdef public uint64_t ring_full
    # The caller's ids and lengths, read once with the GIL held, checked, and
    # used from here without it: an array in shared memory may change meanwhile.
    cdef uint32_t *s_ids
    cdef uint32_t *s_lens

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
        cdef uint16_t n = self.vq.nused(), k
        cdef uint16_t head = 0
        cdef uint32_t length = 0, b
        cdef int r
        cdef uint32_t freed = 0
        for k in range(n):
            r = self.vq.pop_used(&head, &length, False)
            if pmd_unlikely(r == USED_BAD_ID or r == USED_NOT_IN_FLIGHT):
                continue
            if pmd_likely(self.vq.extra[head].ndescs == 1):
                b = self.take1(head)
                if pmd_likely(b != NO_BUF):
                    self.pool.put(b)
                    freed += 1
            else:
                freed += self.put_chain(head)
        return freed

    def reclaim(self):
        """Give buffers the device has finished with back to the pool; returns how many."""
        self.check()
        cdef uint32_t n
        self.enter()
        with nogil:
            n = self.reclaim_used()
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
            if pmd_unlikely(nseg > self.vq.num_free or nseg > self.pool.n_free):
                self.ring_full += 1
                break
            if pmd_likely(nseg == 1):
                b = self.pool.get(self.owner)
                dst = self.pool.buf(b) + self.buf_off
                memset(dst, 0, self.hdr_len)
                memcpy(dst + self.hdr_len, src, ln)
                self.vq.add1(self.pool.iova[b] + self.buf_off, self.hdr_len + ln, False, b)
            else:
                # Header + first part in the first buffer, the rest in whole buffers.
                done = 0
                for k in range(nseg):
                    ids[k] = self.pool.get(self.owner)
                    if k == 0:
                        dst = self.pool.buf(ids[k]) + self.buf_off
                        memset(dst, 0, self.hdr_len)
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

    def tx_burst(self, packets, lengths):
        """Transmit ``packets[i, :lengths[i]]`` for each row of ``packets`` (uint8,
        2-D, C-contiguous; ``lengths`` uint32). Data is copied into pool buffers.
        Returns how many were queued: fewer than the rows when the ring or the
        pool is full (send the rest again later). One call looks at no more rows
        than the ring has entries.
        """
        self.check()
        cdef Py_ssize_t rows, cols, nlen, i
        cdef const char *p = _u8_2d(packets, "packets", False, &rows, &cols)
        cdef uint32_t *l = _u32_1d(lengths, "lengths", False, &nlen)
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
        with nogil:
            n = self.send_copy(p, cols, self.s_lens, rows)
        self.leave()
        if capped and n == rows:
            self.ring_full += 1     # a whole ring's worth went: the rest did not fit
        self.report()
        return n

    cdef int send_zc(self, const uint32_t *ids, const uint32_t *lengths, Py_ssize_t burst) noexcept nogil:
        cdef Py_ssize_t i
        cdef uint32_t b
        self.reclaim_used()
        for i in range(burst):
            if pmd_unlikely(self.vq.num_free == 0):
                self.ring_full += 1
                return <int>i
            b = ids[i]
            memset(self.pool.buf(b) + self.buf_off, 0, self.hdr_len)
            self.vq.add1(self.pool.iova[b] + self.buf_off, self.hdr_len + lengths[i], False, b)
            self.bytes += lengths[i]
            self.packets += 1
        return <int>burst

    cdef object _zc_error(self, Py_ssize_t i, uint32_t b, uint32_t ln):
        cdef PacketPool pool = self.pool
        if b >= pool.n_buffers:
            return PoolError(f"ids[{i}] = {b} does not belong to this pool (ids 0..{pool.n_buffers - 1})")
        if pool.state[b] != BUF_APP:
            return PoolError(f"ids[{i}] = {b} is not owned by the application "
                             f"({'free' if pool.state[b] == BUF_FREE else 'already queued'}): "
                             "transmit only buffers from pool.alloc or rx_burst_zc, once")
        return ValueError(f"lengths[{i}] = {ln}: a zero-copy packet must be 1 to "
                          f"{pool.buffer_size - pool.headroom} bytes (the pool's data room)")

    cdef void _unclaim(self, Py_ssize_t start, Py_ssize_t end) noexcept:
        cdef Py_ssize_t j
        for j in range(start, end):
            self.pool.state[self.s_ids[j]] = BUF_APP

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
        cdef uint32_t *d = _u32_1d(ids, "ids", False, &nids)
        cdef uint32_t *l = _u32_1d(lengths, "lengths", False, &nlen)
        if nlen < nids:
            raise ValueError(f"lengths has {nlen} entries but ids has {nids}; give one length per id")
        cdef bint capped = nids > self.vq.size
        if capped:
            nids = self.vq.size
        cdef PacketPool pool = self.pool
        cdef uint32_t room = pool.buffer_size - pool.headroom, b, ln
        cdef uint32_t n_buffers = pool.n_buffers
        cdef uint8_t *state = pool.state
        cdef uint8_t owner = self.owner
        cdef uint32_t *s_ids = self.s_ids
        cdef uint32_t *s_lens = self.s_lens
        # Read each id and length once into the queue's own arrays, check the
        # copy and claim the id; undo on error. Claiming as we go catches an id
        # listed twice (it would be sent twice and freed twice).
        for i in range(nids):
            b = d[i]
            ln = l[i]
            if pmd_unlikely(b >= n_buffers or state[b] != BUF_APP or ln == 0 or ln > room):
                err = self._zc_error(i, b, ln)
                self._unclaim(0, i)
                raise err
            state[b] = owner
            s_ids[i] = b
            s_lens[i] = ln
        cdef int n
        if pmd_unlikely(self.is_closed):
            self._unclaim(0, nids)
            self.check()
        self.busy += 1      # as enter(): checked, and nothing since let another thread in
        with nogil:
            n = self.send_zc(self.s_ids, self.s_lens, nids)
            self.vq.flush()
        self.leave()
        self._unclaim(n, nids)   # not sent: still the application's
        if capped and n == nids:
            self.ring_full += 1
        self.report()
        return n

    def stats(self):
        s = super().stats()
        s["ring_full"] = self.ring_full
        return s
