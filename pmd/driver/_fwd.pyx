"""Forwarding loops in C: many bursts per Python call (what ``pmd.fwd`` runs).

A forwarding loop written in Python pays the interpreter on every burst: a txonly
burst was a ``tx_burst_zc`` call and a ``pool.alloc_into`` call, an io round a
``rx_burst_zc``, a ``pool.swap_macs`` and a ``tx_burst_zc``, each with its argument
checks, a memoryview or a numpy slice, and a release and retake of the GIL.
Counted with callgrind against DPDK's vhost-user back-end, that was about a third
of pmd's instructions per packet (bench/insn_vs_dpdk.py). Here one call runs up to
``max_bursts`` bursts (``max_polls`` polls) with the GIL released, and the caller
checks its stop event between calls.

Nothing is validated less than by the bursts: every used entry still goes
through ``pop_used`` and ``take1`` (2.7.14), every received length through the
harvest's checks, and a buffer goes to the transmit ring only if the receive side
just handed it to the application and its length fits the pool's data room, as
``tx_burst_zc`` requires. The ids never leave the loop's own memory, so there is
no caller's array to read once.
"""

cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from pmd.driver._pool cimport BUF_APP, PacketPool
from pmd.driver._rx cimport RxQueue
from pmd.driver._tx cimport TxQueue
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.gil cimport PyThreadState, pmd_gil_init, pmd_gil_release, pmd_gil_take

pmd_gil_init()   # the loops share the bursts' GIL hand-off hint (csrc/pmd_gil.h)

cdef enum:
    ETH_ALEN = 6


def txonly(TxQueue txq not None, uint32_t length, Py_ssize_t burst, Py_ssize_t max_bursts):
    """Up to ``max_bursts`` bursts of up to ``burst`` buffers each, taken straight from
    the queue's pool and sent as they are, ``length`` bytes of data each: testpmd's
    txonly, when every free buffer already holds the frame (``pmd.fwd`` writes it
    once). Returns the packets sent; a full ring ends a burst early (``ring_full``)."""
    txq.check()
    cdef PacketPool pool = txq.pool
    if length == 0 or length > pool.buffer_size - pool.headroom:
        raise ValueError(f"length {length}: a packet must be 1 to {pool.buffer_size - pool.headroom} "
                         "bytes (the pool's data room)")
    if burst < 1 or max_bursts < 1:
        raise ValueError("burst and max_bursts must be at least 1")
    txq.enter()
    cdef PyThreadState *ts = pmd_gil_release()
    cdef uint64_t sent = _txonly(txq, length, burst, max_bursts)
    pmd_gil_take(ts)
    txq.leave()
    txq.report()
    return sent


cdef uint64_t _txonly(TxQueue txq, uint32_t length, Py_ssize_t burst, Py_ssize_t max_bursts) noexcept nogil:
    cdef Py_ssize_t k
    cdef uint64_t sent = 0
    for k in range(max_bursts):
        if pmd_unlikely(txq.vq.broken or txq.is_closed):
            break                     # the next call's check says why
        sent += <uint64_t>txq.send_pool(length, burst)
    return sent


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _forward(RxQueue rxq, TxQueue txq, uint32_t *ids, uint32_t *lens, Py_ssize_t burst,
                   bint macswap, Py_ssize_t max_polls, Py_ssize_t tx_retry,
                   uint64_t *forwarded, uint64_t *dropped) noexcept nogil:
    cdef uint32_t room = rxq.pool.buffer_size - rxq.pool.headroom
    cdef uint32_t n_buffers = rxq.pool.n_buffers
    cdef uint8_t *state = rxq.pool.state
    cdef uint8_t owner = txq.owner
    cdef Py_ssize_t poll, i, k, n, sent, tries
    cdef uint32_t b, ln
    cdef char *p
    cdef char t[ETH_ALEN]
    for poll in range(max_polls):
        if pmd_unlikely(rxq.vq.broken or txq.vq.broken or rxq.is_closed or txq.is_closed):
            return                        # the next call's checks say why
        n = rxq.harvest(NULL, 0, ids, lens, burst)
        if n == 0:
            txq.reclaim_used()            # nothing came: give back what the device sent
            continue
        # What tx_burst_zc checks of every id and length, on the ids the harvest
        # just handed over; a buffer that fails is given back and counted.
        k = 0
        for i in range(n):
            b = ids[i]
            ln = lens[i]
            if pmd_unlikely(b >= n_buffers or state[b] != BUF_APP):
                dropped[0] += 1           # not the application's: never touched
                continue
            if pmd_unlikely(ln == 0 or ln > room):
                rxq.pool.put(b)
                dropped[0] += 1
                continue
            if macswap:
                p = rxq.pool.buf(b) + rxq.pool.headroom
                memcpy(t, p, ETH_ALEN)
                memcpy(p, p + ETH_ALEN, ETH_ALEN)
                memcpy(p + ETH_ALEN, t, ETH_ALEN)
            state[b] = owner
            ids[k] = b
            lens[k] = ln
            k += 1
        sent = txq.send_zc(ids, lens, k)
        txq.vq.flush()
        tries = 0
        while sent < k and tries < tx_retry and not txq.vq.broken:
            # tx ring full: the device is behind. Retry (each try reclaims what it
            # finished) before dropping, like testpmd's tx retry.
            sent += txq.send_zc(ids + sent, lens + sent, k - sent)
            txq.vq.flush()
            tries += 1
        for i in range(sent, k):
            rxq.pool.put(ids[i])              # the queue's claim ends here: back to the pool
        dropped[0] += <uint64_t>(k - sent)
        forwarded[0] += <uint64_t>sent


def forward(RxQueue rxq not None, TxQueue txq not None, Py_ssize_t burst, bint macswap,
            Py_ssize_t max_polls, Py_ssize_t tx_retry):
    """Up to ``max_polls`` polls of ``rxq`` (``burst`` packets at most each): what arrives
    goes out of ``txq`` without a copy, its MAC addresses swapped if ``macswap``
    (testpmd's io and macswap). A poll that finds nothing reclaims the transmit ring.
    What the transmit ring still cannot take after ``tx_retry`` more tries is freed
    and counted. Both queues must draw from one pool. Returns ``(forwarded, dropped)``."""
    rxq.check()
    txq.check()
    if rxq.pool is not txq.pool:
        raise ValueError("forwarding without a copy needs the receive and transmit queues on one pool")
    if burst < 1 or max_polls < 1 or tx_retry < 0:
        raise ValueError("burst and max_polls must be at least 1, tx_retry at least 0")
    cdef uint32_t *ids = <uint32_t *>malloc(sizeof(uint32_t) * burst)
    cdef uint32_t *lens = <uint32_t *>malloc(sizeof(uint32_t) * burst)
    cdef uint64_t forwarded = 0, dropped = 0
    cdef PyThreadState *ts
    try:
        if ids == NULL or lens == NULL:
            raise MemoryError()
        rxq.enter()
        try:
            txq.enter()
        except BaseException:
            rxq.leave()
            raise
        ts = pmd_gil_release()
        _forward(rxq, txq, ids, lens, burst, macswap, max_polls, tx_retry, &forwarded, &dropped)
        pmd_gil_take(ts)
        txq.leave()
        rxq.leave()
    finally:
        free(ids)
        free(lens)
    rxq.report()
    txq.report()
    return forwarded, dropped
