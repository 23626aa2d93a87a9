"""The engine's turns on its fastest path, in C without the GIL.

The engine (:mod:`pmd.sim.engine`) runs one Python round per turn: take what the
driver transmitted, hand it to the wire, fill the driver's rx ring from the
wire. For the generator wire at full rate with one flow (what ``pmd fwd`` runs
on the built-in device) a turn needs no Python at all: the packets the driver
sends back are checked for the generator's magic, flow and sequence (as
:meth:`GeneratorWire.transmit` does with numpy) straight in its tx buffers, and
new frames are written into its rx buffers (as ``device_rx_generate``).
:func:`generator_turns` runs such turns until the rings have been idle for
``idle_rounds`` turns, ``max_ns`` have passed, or a queue is closed, and
returns to Python, which keeps the control queue, the link, stop and the sleep
policy between calls.
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.sim._rx cimport check_hdr_len, deliver_or_drop
from pmd.sim._virtqueue cimport BAD_SHORT, DeviceQueue


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef inline uint64_t _le(const unsigned char *p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(n):
        v |= (<uint64_t>p[k]) << (8 * k)
    return v


def generator_turns(DeviceQueue tx not None, DeviceQueue rx not None, unsigned char[::1] frame not None,
                    Py_ssize_t payload, uint64_t first_seq, int64_t max_seen, int budget,
                    int64_t limit, uint32_t hdr_len=12, bint mergeable=False, uint32_t row_width=2048,
                    int idle_rounds=64, uint64_t max_ns=1000000):
    """Turns of the one-flow generator over ``tx`` (what the driver sends) and ``rx``.

    ``frame`` is the flow's template (the caller's scratch: its sequence number at
    ``payload + 8`` is rewritten), ``first_seq`` the next sequence number,
    ``max_seen`` the highest one seen back so far (-1: none), ``budget`` the packets
    per queue per turn, ``limit`` how many frames may still be generated (-1: no end).
    A transmitted packet longer than ``row_width`` is dropped and counted by the
    queue, as the wire path drops it.

    Returns ``(generated, taken, ours, bad, reordered, max_seen, rounds)``:
    frames consumed by the rx ring (delivered, or dropped as too large), packets
    taken from the tx ring, those that were the generator's, those that were not,
    those whose sequence number was below one already seen, and the turns run.
    """
    check_hdr_len(hdr_len)
    if budget < 1:
        raise ValueError("budget must be at least 1")
    if payload < 0 or payload + 16 > frame.shape[0]:
        raise ValueError(f"payload {payload} + 16 is outside the {frame.shape[0]}-byte frame")
    cdef unsigned char *p = &frame[0]
    cdef uint32_t size = <uint32_t>frame.shape[0]
    cdef uint64_t magic = _le(p + payload, 4)
    cdef uint64_t seq = first_seq, s, t0
    cdef int64_t generated = 0, taken = 0, ours = 0, bad = 0, reordered = 0, rounds = 0
    cdef int idle = 0, i, k, r, moved
    cdef uint32_t pkt
    cdef unsigned char head[16]
    tx.enter()
    try:
        rx.enter()
    except BaseException:
        tx.leave()
        raise
    with nogil:
        t0 = _now_ns()
        while True:
            if pmd_unlikely(tx.is_closed or rx.is_closed or tx.broken or rx.broken):
                break                        # the next Python call's checks say why
            moved = 0
            # What the driver sent: checked where it lies, then returned used (length 0).
            i = 0
            while i < budget:
                r = tx.pop()
                if r == 0:
                    break
                if r < 0:
                    continue                 # a bad chain: refused and counted by the queue
                if pmd_unlikely(tx.out_len < hdr_len):
                    tx._bad(BAD_SHORT)
                    tx.push(tx.head, 0)
                    continue
                pkt = tx.out_len - hdr_len
                if pmd_unlikely(pkt > row_width):
                    tx.n_dropped += 1
                    tx.push(tx.head, 0)
                    continue
                if (pkt == size and tx.read_out(hdr_len + <uint32_t>payload, <char *>head, 16) == 16
                        and _le(head, 4) == magic and _le(head + 4, 4) == 0):
                    s = _le(head + 8, 8)
                    ours += 1
                    if max_seen >= 0 and s < <uint64_t>max_seen:
                        reordered += 1
                    elif <int64_t>s > max_seen:
                        max_seen = <int64_t>s
                else:
                    bad += 1
                tx.push(tx.head, 0)
                i += 1
            tx.flush()
            taken += i
            moved += i
            # New frames into the driver's rx buffers, until it has none free.
            k = 0
            while k < budget and (limit < 0 or generated < limit):
                for r in range(8):
                    p[payload + 8 + r] = <unsigned char>(seq >> (8 * r))
                if not deliver_or_drop(rx, <const char *>p, size, hdr_len, mergeable, False, 0, 0):
                    break
                seq += 1
                generated += 1
                k += 1
            rx.flush()
            moved += k
            rounds += 1
            if moved:
                idle = 0
            else:
                idle += 1
                if idle >= idle_rounds:
                    break
            if (rounds & 63) == 0 and _now_ns() - t0 >= max_ns:
                break
    rx.leave()
    tx.leave()
    return generated, taken, ours, bad, reordered, max_seen, rounds
