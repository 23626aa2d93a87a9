"""What the driver's receive and transmit queues share (their base class, ``_Queue``).

A queue is a virtqueue and the packet pool its buffers come from, the
virtio-net header length (5.1.6), its statistics and the fence that lets a port
stop it while another thread may be in a burst. The inline part (the checks
each burst makes, the detach of a completed one-buffer chain, the checks of the
caller's arrays) is in _queue.pxd; the receive side is :mod:`pmd.driver._rx`
(harvest and refill), the transmit side :mod:`pmd.driver._tx` (send and reclaim).
"""

import logging

cimport cython
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from posix.unistd cimport usleep

from pmd.driver._pool cimport PacketPool
from pmd.driver._virtqueue cimport Virtqueue
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.gil cimport PMD_GIL_ALWAYS_KEPT, pmd_gil_alone, pmd_gil_init, pmd_gil_spun_handed, pmd_gil_spun_out

from pmd.errors import DeviceError, QueueStateError

cnp.import_array()

log = logging.getLogger("pmd.burst")

DEF_HDR_LEN = DEFAULT_HDR_LEN


def bursts_release_gil():
    """Whether a burst called now, from this thread, releases the GIL: False when
    this is the only thread of the only interpreter, as then nobody could take
    it and releasing and taking it back would cost some 400 instructions a call
    (``csrc/pmd_gil.h``). Starting a thread makes it True, except in the debug
    build (``GIL_ALWAYS_KEPT``), whose line tracing needs the GIL held."""
    return not pmd_gil_alone()


GIL_ALWAYS_KEPT = bool(PMD_GIL_ALWAYS_KEPT)

pmd_gil_init()


def gil_handoffs():
    """How bursts took the GIL back from another pmd thread, since the process
    started (``csrc/pmd_gil.h``): ``{"spun": n, "spun_out": m}``. ``spun``: a
    burst ended while another queue's thread ran the Python between two of its
    bursts, waited for it by spinning and got the GIL without sleeping;
    ``spun_out``: the holder kept it past the spin's bound, and the burst slept
    as CPython makes it. Both stay 0 with one thread or one CPU."""
    return {"spun": pmd_gil_spun_handed(), "spun_out": pmd_gil_spun_out()}


@cython.no_gc_clear   # __dealloc__ unpins the memory of `vq` and `pool`
cdef class _Queue:
    """What rx and tx queues share: the virtqueue, the pool, the header, the stats."""

    def __init__(self, Virtqueue vq not None, PacketPool pool not None, *, uint32_t hdr_len=DEFAULT_HDR_LEN,
                 bint strict=False):
        if hdr_len not in (10, 12, 20):
            raise ValueError(f"hdr_len must be 12 (VERSION_1), 20 (HASH_REPORT) or 10 (legacy without MRG_RXBUF), "
                             f"got {hdr_len}")
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

    cdef int raise_closed(self) except -1:
        raise QueueStateError(f"{type(self).__name__} {self.vq.queue_index} is closed; "
                              "open the port / create the queue again")

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

    cdef int report_after(self, int handed) except -1:
        """report() for a burst that gave the caller ``handed`` packets: an error it would
        raise now is raised by the next call instead, so the caller gets the count (and,
        zero-copy, the buffers it now owns) of the good packets received before it."""
        if handed > 0 and (self.vq.broken or (self.strict and self.device_errors() != self.seen_bad)):
            self.report_owed = True
            return 0
        return self.report()

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
        # Every descriptor still in flight holds pool buffers: give them back, in
        # a turn of the pool (the pair's other queue may still be in a burst).
        cdef uint32_t i
        self.pool.take_turn()
        try:
            for i in range(self.vq.size):
                if self.vq.extra[i].ndescs:
                    self.put_chain(<uint16_t>i)
        finally:
            self.pool.end_turn()

    @property
    def closed(self):
        """True once :meth:`close` ran."""
        return self.is_closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
