"""The engine's turns on its fastest path, in C without the GIL.

The engine (:mod:`pmd.sim.engine`) runs one Python round per turn: take what the
driver transmitted, hand it to the wire, fill the driver's rx ring from the
wire. For the generator wire at full rate (what ``pmd fwd`` runs on the built-in
device), on any number of queue pairs and flows, a turn needs no Python at all:
the packets the driver sends back are checked for the generator's magic, flow
and sequence (as :meth:`GeneratorWire.transmit` does with numpy) straight in its
tx buffers, and new frames are written into its rx buffers (as
``device_rx_generate``), each flow's into the rx queue the caller chose for it
(``f mod pairs``, or the one RSS steers its headers to, 5.1.6.5.7.2, with its hash
when the header has room, 5.1.6.4.4).
:func:`generator_turns` runs such turns until the rings have been idle for
``idle_rounds`` turns, ``max_ns`` have passed, or a queue is closed, and
returns to Python, which keeps the control queue, the link, stop and the sleep
policy between calls.
"""

from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.virtio_net cimport virtio_net_hdr_v1_hash
from pmd.includes.vring cimport (
    VRING_DESC_F_WRITE, vring_desc, vring_load32, vring_load64, vring_store32, vring_used_elem,
)
from pmd.sim._rx cimport check_hdr_len, deliver_or_drop, split_ready_up_to, write_net_hdr
from pmd.sim._virtqueue cimport BAD_SHORT, DeviceQueue, split_single


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


cdef inline void _inspect(const unsigned char *head, uint32_t pkt, uint32_t size, uint64_t magic,
                          uint32_t n_flows, int64_t *max_seen, int64_t *counts) noexcept nogil:
    """Count one packet taken back: ours (and reordered?) or not, by its payload's 16 bytes
    (``head``: NULL when the packet has none there). ``head`` must be our own copy, not the
    driver's buffer: the flow is checked, then used as an index."""
    cdef uint32_t f
    cdef uint64_t s
    if head != NULL and pkt == size and _le(head, 4) == magic and _le(head + 4, 4) < n_flows:
        f = <uint32_t>_le(head + 4, 4)
        s = _le(head + 8, 8)
        counts[0] += 1
        if max_seen[f] >= 0 and s < <uint64_t>max_seen[f]:
            counts[2] += 1
        elif <int64_t>s > max_seen[f]:
            max_seen[f] = <int64_t>s
    else:
        counts[1] += 1


cdef inline int _take_back_split(DeviceQueue tx, int budget, uint32_t hdr_len, uint32_t row_width,
                                 uint32_t size, Py_ssize_t payload, uint64_t magic, uint32_t n_flows,
                                 int64_t *max_seen, int64_t *counts) noexcept nogil:
    """_take_back's common case on a split ring, in one loop with the ring's fields in
    locals: a chain of one device-readable descriptor of a header and at most
    ``row_width`` bytes, its id in range and its buffer inside a window, as pop() checks
    them. It stops at the first chain that is anything else, untouched, for pop() to
    take. Returns the packets taken (used entries not published)."""
    cdef int k = 0
    budget = split_ready_up_to(tx, budget)
    if budget == 0:
        return 0
    cdef uint16_t tl = tx.last_avail_idx, tm = tx.mask, tu = tx.used_idx, th
    cdef uint32_t tsize = tx.size, tln, pkt
    cdef const uint16_t *ring = tx.vr.avail.ring
    cdef vring_desc *desc = tx.vr.desc
    cdef vring_used_elem *used = tx.vr.used.ring
    cdef vring_desc *d
    cdef const unsigned char *tp
    cdef unsigned char head[16]
    cdef uint64_t at = hdr_len + <uint64_t>payload
    while k < budget:
        d = split_single(ring, desc, tl & tm, tsize, 0, &th)
        if pmd_unlikely(d == NULL):
            break
        tln = vring_load32(&d.len)
        if pmd_unlikely(tln < hdr_len or tln - hdr_len > row_width):
            break
        tp = <const unsigned char *>tx.windows.translate(vring_load64(&d.addr), tln)
        if pmd_unlikely(tp == NULL):
            break
        pkt = tln - hdr_len
        if at + 16 <= tln:
            memcpy(head, tp + at, 16)     # read once: the driver may rewrite its buffer meanwhile
            _inspect(head, pkt, size, magic, n_flows, max_seen, counts)
        else:
            _inspect(NULL, pkt, size, magic, n_flows, max_seen, counts)
        vring_store32(&used[tu & tm].id, th)
        vring_store32(&used[tu & tm].len, 0)
        tl += 1
        tu += 1
        k += 1
    tx.last_avail_idx = tl
    tx.used_idx = tu
    tx.n_popped += <uint32_t>k
    tx.n_used_entries += <uint32_t>k
    return k


cdef inline int _take_back(DeviceQueue tx, int budget, uint32_t hdr_len, uint32_t row_width, uint32_t size,
                           Py_ssize_t payload, uint64_t magic, uint32_t n_flows, int64_t *max_seen,
                           int64_t *counts) noexcept nogil:
    """What the driver sent on ``tx``: checked where it lies, then returned used (length
    0). ``counts``: ours, bad, reordered. Returns the packets taken."""
    cdef int i = 0, r
    cdef uint32_t pkt
    cdef unsigned char head[16]
    if pmd_likely(not (tx.packed or tx.in_order or tx.broken)):
        i = _take_back_split(tx, budget, hdr_len, row_width, size, payload, magic, n_flows, max_seen, counts)
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
        _inspect(head if pkt == size and tx.read_out(hdr_len + <uint32_t>payload, <char *>head, 16) == 16
                 else NULL, pkt, size, magic, n_flows, max_seen, counts)
        tx.push(tx.head, 0)
        i += 1
    tx.flush()
    return i


cdef inline int _generate_split(DeviceQueue rx, int budget, unsigned char *frames, uint32_t size,
                                Py_ssize_t payload, const uint32_t *flows, uint32_t n, uint32_t *cursor,
                                int64_t *next_seq, uint32_t hdr_len, bint with_hash,
                                const uint32_t *hashes, const uint16_t *reports) noexcept nogil:
    """_generate's common case on a split ring, in one loop with the ring's fields in
    locals: each frame into one device-writable descriptor that holds header and frame,
    its id in range and its buffer inside a window, as pop() checks them. It stops at
    the first buffer that is anything else, untouched, for deliver() to take. Returns
    the frames written (used entries not published)."""
    cdef int k = 0
    budget = split_ready_up_to(rx, budget)
    if budget == 0:
        return 0
    cdef uint16_t rl = rx.last_avail_idx, rm = rx.mask, ru = rx.used_idx, rh
    cdef uint32_t rsize = rx.size, rln, f, c = cursor[0], need = hdr_len + size
    cdef const uint16_t *ring = rx.vr.avail.ring
    cdef vring_desc *desc = rx.vr.desc
    cdef vring_used_elem *used = rx.vr.used.ring
    cdef vring_desc *d
    cdef char *rp
    cdef unsigned char *p
    cdef uint64_t seq
    cdef virtio_net_hdr_v1_hash hdr
    cdef int r
    memset(&hdr, 0, sizeof(hdr))
    hdr.num_buffers = 1
    while k < budget:
        d = split_single(ring, desc, rl & rm, rsize, VRING_DESC_F_WRITE, &rh)
        if pmd_unlikely(d == NULL):
            break
        rln = vring_load32(&d.len)
        if pmd_unlikely(rln < need):
            break
        rp = rx.windows.translate(vring_load64(&d.addr), rln)
        if pmd_unlikely(rp == NULL):
            break
        f = flows[c]
        p = frames + <Py_ssize_t>f * size
        seq = <uint64_t>next_seq[f]
        for r in range(8):
            p[payload + 8 + r] = <unsigned char>(seq >> (8 * r))
        if with_hash:
            hdr.hash_value = hashes[f]
            hdr.hash_report = reports[f]
        write_net_hdr(rp, &hdr, hdr_len)
        memcpy(rp + hdr_len, p, size)
        vring_store32(&used[ru & rm].id, rh)
        vring_store32(&used[ru & rm].len, need)
        rl += 1
        ru += 1
        next_seq[f] += 1
        c = c + 1 if c + 1 < n else 0
        k += 1
    rx.last_avail_idx = rl
    rx.used_idx = ru
    rx.n_popped += <uint32_t>k
    rx.n_used_entries += <uint32_t>k
    cursor[0] = c
    return k


cdef inline int _generate(DeviceQueue rx, int budget, int64_t room, unsigned char *frames, uint32_t size,
                          Py_ssize_t payload, const uint32_t *flows, uint32_t n, uint32_t *cursor,
                          int64_t *next_seq, uint32_t hdr_len, bint mergeable, bint with_hash,
                          const uint32_t *hashes, const uint16_t *reports) noexcept nogil:
    """Up to ``budget`` (and ``room``, -1: no end) new frames into ``rx``, from its ``n``
    flows round robin from ``cursor``, each with its flow's next sequence number."""
    cdef int k = 0, r
    cdef uint32_t f
    cdef unsigned char *p
    if n == 0:
        return 0
    if pmd_likely(not (rx.packed or rx.in_order or rx.broken)):
        k = _generate_split(rx, budget if room < 0 or room > budget else <int>room, frames, size, payload,
                            flows, n, cursor, next_seq, hdr_len, with_hash, hashes, reports)
    while k < budget and (room < 0 or k < room):
        f = flows[cursor[0]]
        p = frames + <Py_ssize_t>f * size
        for r in range(8):
            p[payload + 8 + r] = <unsigned char>(<uint64_t>next_seq[f] >> (8 * r))
        if not deliver_or_drop(rx, <const char *>p, size, hdr_len, mergeable, with_hash,
                               hashes[f] if with_hash else 0, reports[f] if with_hash else 0):
            break
        next_seq[f] += 1
        cursor[0] = cursor[0] + 1 if cursor[0] + 1 < n else 0
        k += 1
    rx.flush()
    return k


def generator_turns(list txs not None, list rxs not None, unsigned char[:, ::1] frames not None,
                    Py_ssize_t payload, int64_t[::1] next_seq not None, int64_t[::1] max_seen not None,
                    const uint32_t[::1] queue_flows not None, const uint32_t[::1] queue_start not None,
                    uint32_t[::1] cursor not None, int budget, int64_t limit, uint32_t hdr_len=12,
                    bint mergeable=False, uint32_t row_width=2048, const uint32_t[::1] hashes=None,
                    const uint16_t[::1] reports=None, int idle_rounds=64, uint64_t max_ns=1000000):
    """Turns of the generator over the queue pairs' ``txs`` (what the driver sends) and ``rxs``.

    ``frames[f]`` is flow f's template (the caller's scratch: its sequence number at
    ``payload + 8`` is rewritten); ``next_seq[f]`` its next sequence number and
    ``max_seen[f]`` the highest seen back (-1: none), both updated in place. Rx queue
    ``j`` (``rxs[j]``) gets the flows ``queue_flows[queue_start[j]:queue_start[j + 1]]``
    round robin from ``cursor[j]`` (kept). ``hashes`` and ``reports``: each flow's
    hash and report for the header (5.1.6.4.4), or None. ``budget`` is the packets per
    queue per turn, ``limit`` how many frames may still be generated (-1: no end). A
    transmitted packet longer than ``row_width`` is dropped and counted by the queue,
    as the wire path drops it.

    Returns ``(generated, taken, ours, bad, reordered, rounds)``: frames consumed by the
    rx rings (delivered, or dropped as too large), packets taken from the tx rings,
    those that were the generator's, those that were not, those whose sequence number
    was below one already seen on their flow, and the turns run. They run until the
    rings have been idle for ``idle_rounds`` turns, ``max_ns`` have passed, or a queue
    is closed or broken.
    """
    check_hdr_len(hdr_len)
    cdef Py_ssize_t n_tx = len(txs), n_rx = len(rxs), n_flows = frames.shape[0], j
    cdef uint32_t size = <uint32_t>frames.shape[1]
    if budget < 1:
        raise ValueError("budget must be at least 1")
    if n_flows < 1 or payload < 0 or payload + 16 > size:
        raise ValueError(f"payload {payload} + 16 is outside the {size}-byte frames (or no flows)")
    if next_seq.shape[0] != n_flows or max_seen.shape[0] != n_flows:
        raise ValueError("next_seq and max_seen need one entry per flow")
    if queue_start.shape[0] != n_rx + 1 or cursor.shape[0] != n_rx or queue_start[0] != 0 \
            or queue_start[n_rx] != queue_flows.shape[0]:
        raise ValueError("queue_start needs len(rxs) + 1 entries from 0 to len(queue_flows), cursor len(rxs)")
    for j in range(n_rx):
        if queue_start[j + 1] < queue_start[j]:
            raise ValueError("queue_start must not decrease")
        if queue_start[j + 1] > queue_start[j] and cursor[j] >= queue_start[j + 1] - queue_start[j]:
            raise ValueError(f"cursor[{j}] is past its queue's flows")
    for j in range(queue_flows.shape[0]):
        if queue_flows[j] >= n_flows:
            raise ValueError(f"queue_flows names flow {queue_flows[j]}, there are {n_flows}")
    cdef bint with_hash = hashes is not None
    if with_hash and (reports is None or hashes.shape[0] != n_flows or reports.shape[0] != n_flows):
        raise ValueError("hashes and reports need one entry per flow")
    cdef list queues = list(txs) + list(rxs)
    for q in queues:
        if not isinstance(q, DeviceQueue):
            raise TypeError(f"txs and rxs hold DeviceQueue objects, not {type(q).__name__}")
    cdef unsigned char *base = &frames[0, 0]
    cdef uint64_t magic = _le(base + payload, 4), t0
    cdef int64_t generated = 0, taken = 0, rounds = 0, k
    cdef int64_t counts[3]
    cdef int idle = 0
    cdef int64_t moved
    cdef DeviceQueue q_tx, q_rx
    cdef Py_ssize_t entered = 0
    cdef bint stop = False
    counts[0] = counts[1] = counts[2] = 0
    try:
        for q in queues:
            (<DeviceQueue>q).enter()
            entered += 1
        if n_tx:
            q_tx = <DeviceQueue>queues[0]
        if n_rx:
            q_rx = <DeviceQueue>queues[n_tx]
        with nogil:
            t0 = _now_ns()
            while not stop:
                moved = 0
                for j in range(n_tx):
                    if n_tx > 1:
                        with gil:       # several: fetched from the private list each turn
                            q_tx = <DeviceQueue>queues[j]
                    if pmd_unlikely(q_tx.is_closed or q_tx.broken):
                        stop = True                    # the next Python call's checks say why
                        break
                    k = _take_back(q_tx, budget, hdr_len, row_width, size, payload, magic,
                                   <uint32_t>n_flows, &max_seen[0], counts)
                    taken += k
                    moved += k
                for j in range(n_rx):
                    if stop:
                        break
                    if n_rx > 1:
                        with gil:
                            q_rx = <DeviceQueue>queues[n_tx + j]
                    if pmd_unlikely(q_rx.is_closed or q_rx.broken):
                        stop = True
                        break
                    if queue_start[j + 1] == queue_start[j]:
                        continue
                    k = _generate(q_rx, budget, limit - generated if limit >= 0 else -1, base, size,
                                  payload, &queue_flows[queue_start[j]], queue_start[j + 1] - queue_start[j],
                                  &cursor[j], &next_seq[0], hdr_len, mergeable, with_hash,
                                  &hashes[0] if with_hash else NULL, &reports[0] if with_hash else NULL)
                    generated += k
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
    finally:
        for j in range(entered):
            (<DeviceQueue>queues[j]).leave()
    return generated, taken, counts[0], counts[1], counts[2], rounds
