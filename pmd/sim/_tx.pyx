"""Serving the driver's transmit queues: what it sent, out of its tx ring.

Each tx chain is a virtio-net header and a packet (5.1.6). :func:`device_tx_burst`
copies the packets into numpy rows for the wire behind the device;
:func:`tx_to_rx` moves them straight into the driver's rx ring instead (the
loopback wire with no receive filter, and :class:`pmd.Loopback`), through the
same ``deliver`` as the wire path (_rx.pxd). Every chain taken is returned used
(length 0: the device wrote nothing), one used index store per burst. It
mirrors the driver's :mod:`pmd.driver._tx`.
"""

cimport cython
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memmove, memset

from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.gil cimport PyThreadState, pmd_gil_init, pmd_gil_release, pmd_gil_take
from pmd.includes.virtio_net cimport virtio_net_hdr_v1_hash
from pmd.includes.vring cimport (
    VRING_DESC_F_WRITE, pvirtq_desc, vring_desc, vring_load32, vring_load64, vring_store32, vring_used_elem,
)
from pmd.sim._rx cimport check_hdr_len, deliver, split_ready, split_ready_up_to, write_net_hdr
from pmd.sim._virtqueue cimport BAD_SHORT, DeviceQueue, packed_advance, packed_single, split_single

pmd_gil_init()   # the bursts share one GIL hand-off hint (csrc/pmd_gil.h)


cdef bint _alloc(char **p, uint32_t n) noexcept nogil:
    p[0] = <char *>malloc(n)
    return p[0] != NULL


cdef inline char *readable_packet(DeviceQueue tx, uint64_t addr, uint32_t ln, uint32_t hdr_len) noexcept nogil:
    """A tx buffer of ``ln`` bytes at ``addr``, when it holds at least a header and lies
    inside a window; NULL otherwise (the one loops stop there)."""
    if pmd_unlikely(ln < hdr_len):
        return NULL
    return tx.windows.translate(addr, ln)


cdef inline bint copy_into(DeviceQueue rx, uint64_t addr, uint32_t room, const char *tp, uint32_t tln,
                           const virtio_net_hdr_v1_hash *hdr, uint32_t hdr_len) noexcept nogil:
    """The packet at ``tp`` (``tln`` bytes, its header included) into the rx buffer of
    ``room`` bytes at ``addr`` with a fresh header, when it fits and lies inside a
    window; False, nothing written, otherwise."""
    if pmd_unlikely(room < tln):
        return False
    cdef char *rp = rx.windows.translate(addr, room)
    if pmd_unlikely(rp == NULL):
        return False
    write_net_hdr(rp, hdr, hdr_len)
    memmove(rp + hdr_len, tp + hdr_len, tln - hdr_len)   # the two buffers may overlap
    return True


cdef int tx_to_rx_split(DeviceQueue tx, DeviceQueue rx, int budget, uint32_t hdr_len) noexcept nogil:
    """tx_to_rx_burst's common case on split rings, in one loop with both rings' fields
    in locals: a tx chain of one device-readable descriptor of at least a header, an rx
    chain of one device-writable descriptor with room for it, both ids in range and
    both buffers inside a window, as pop() checks them. It stops at the first pair that
    is anything else (or when either ring has no more), leaving it untouched for the
    general loop, which takes it the usual way. Returns packets moved (used entries
    written, not published)."""
    cdef int n = split_ready_up_to(tx, budget)
    if n == 0:
        return 0
    cdef uint16_t rn = 0      # rx entries read and not taken: its index is read as pop() reads it,
                              # when a tx chain has passed its checks and none is left
    cdef uint16_t tl = tx.last_avail_idx, tm = tx.mask, tu = tx.used_idx
    cdef uint16_t rl = rx.last_avail_idx, rm = rx.mask, ru = rx.used_idx
    cdef uint32_t tsize = tx.size, rsize = rx.size, tln
    cdef const uint16_t *tring = tx.vr.avail.ring
    cdef const uint16_t *rring = rx.vr.avail.ring
    cdef vring_desc *tdesc = tx.vr.desc
    cdef vring_desc *rdesc = rx.vr.desc
    cdef vring_used_elem *tused = tx.vr.used.ring
    cdef vring_used_elem *rused = rx.vr.used.ring
    cdef uint16_t th, rh
    cdef vring_desc *d
    cdef char *tp
    cdef virtio_net_hdr_v1_hash hdr
    memset(&hdr, 0, sizeof(hdr))
    hdr.num_buffers = 1
    cdef int moved = 0
    while moved < n:
        d = split_single(tring, tdesc, tl & tm, tsize, 0, &th)
        if pmd_unlikely(d == NULL):
            break
        tln = vring_load32(&d.len)
        tp = readable_packet(tx, vring_load64(&d.addr), tln, hdr_len)
        if tp == NULL:
            break
        if rn == 0:
            rx.last_avail_idx = rl
            rn = split_ready(rx)
            if rn == 0:
                break
        d = split_single(rring, rdesc, rl & rm, rsize, VRING_DESC_F_WRITE, &rh)
        if pmd_unlikely(d == NULL):
            break
        if not copy_into(rx, vring_load64(&d.addr), vring_load32(&d.len), tp, tln, &hdr, hdr_len):
            break
        vring_store32(&tused[tu & tm].id, th)
        vring_store32(&tused[tu & tm].len, 0)
        vring_store32(&rused[ru & rm].id, rh)
        vring_store32(&rused[ru & rm].len, tln)
        rn -= 1
        tl += 1
        rl += 1
        tu += 1
        ru += 1
        moved += 1
    tx.last_avail_idx = tl
    rx.last_avail_idx = rl
    tx.used_idx = tu
    rx.used_idx = ru
    tx.n_popped += <uint32_t>moved
    rx.n_popped += <uint32_t>moved
    tx.n_used_entries += <uint32_t>moved
    rx.n_used_entries += <uint32_t>moved
    return moved


cdef int tx_to_rx_packed(DeviceQueue tx, DeviceQueue rx, int budget, uint32_t hdr_len) noexcept nogil:
    """tx_to_rx_split's twin on packed rings: a tx list of one device-readable
    descriptor of at least a header and an rx list of one device-writable descriptor
    with room for it, both made available on this lap, their ids in range and not in
    flight, both buffers inside a window, as pop() checks them; each pair used at once
    (the batch's first flags still written last, at publish: 2.8.9). It stops at the
    first pair that is anything else, untouched, for the general loop. Returns packets
    moved (used descriptors written, not published)."""
    cdef pvirtq_desc *d
    cdef uint16_t th, rh
    cdef uint32_t tln
    cdef char *tp
    cdef virtio_net_hdr_v1_hash hdr
    memset(&hdr, 0, sizeof(hdr))
    hdr.num_buffers = 1
    cdef int moved = 0
    while moved < budget:
        d = packed_single(tx, 0, &th)
        if d == NULL:
            break
        tln = vring_load32(&d.len)
        tp = readable_packet(tx, vring_load64(&d.addr), tln, hdr_len)
        if tp == NULL:
            break
        d = packed_single(rx, VRING_DESC_F_WRITE, &rh)
        if d == NULL:
            break
        if not copy_into(rx, vring_load64(&d.addr), vring_load32(&d.len), tp, tln, &hdr, hdr_len):
            break
        packed_advance(tx)
        packed_advance(rx)
        tx._push_packed(th, 0, 1)
        rx._push_packed(rh, tln, 1)
        moved += 1
    tx.n_popped += <uint32_t>moved
    rx.n_popped += <uint32_t>moved
    return moved


cdef int tx_to_rx_burst(DeviceQueue tx, DeviceQueue rx, int budget, uint32_t hdr_len,
                        bint mergeable, char **scratch, uint32_t scratch_len) noexcept nogil:
    """Move up to ``budget`` packets from the driver's tx queue to its rx queue.

    Each tx chain is header + packet; the packet goes to the rx ring with a
    fresh header (deliver: over several buffers when ``mergeable``). No rx
    buffer: the tx chain is put back (back-pressure, nothing lost). A packet
    the rx buffers cannot hold is dropped and counted. A packet spread over
    several tx descriptors is gathered into ``*scratch`` first, allocated
    (``scratch_len`` bytes) on the first such packet: a burst of one-descriptor
    packets never pays for it; without memory the packet is dropped and counted.
    """
    cdef int moved = 0, r
    cdef uint32_t pkt
    cdef const char *src
    if pmd_likely(not (tx.in_order or rx.in_order or tx.broken or rx.broken)):
        if not (tx.packed or rx.packed):
            moved = tx_to_rx_split(tx, rx, budget, hdr_len)
        elif tx.packed and rx.packed:
            moved = tx_to_rx_packed(tx, rx, budget, hdr_len)
    while moved < budget:
        r = tx.pop()
        if r == 0:
            break
        if r < 0:
            continue
        if pmd_unlikely(tx.out_len < hdr_len):
            tx._bad(BAD_SHORT)
            tx.push(tx.head, 0)
            continue
        pkt = tx.out_len - hdr_len
        if pmd_likely(tx.nsegs == 1):
            src = tx.segs[0].ptr + hdr_len
        elif pkt <= scratch_len and (scratch[0] != NULL or _alloc(scratch, scratch_len)):
            tx.read_out(hdr_len, scratch[0], pkt)
            src = scratch[0]
        else:
            tx.n_dropped += 1
            tx.push(tx.head, 0)
            continue
        r = deliver(rx, src, pkt, hdr_len, mergeable, False, 0, 0)
        if r < 0:
            tx.unpop()
            break
        if r == 0:
            tx.n_dropped += 1
        else:
            moved += 1
        tx.push(tx.head, 0)
    tx.flush()
    rx.flush()
    return moved


cdef enum:
    GATHER_SCRATCH = 65536 + 64   # the largest packet a tx chain may carry, gathered


@cython.binding(False)   # a plain builtin function: CPython calls it without the cyfunction layer
@cython.embedsignature.format("clinic")   # so inspect.signature still reads it
def tx_to_rx(DeviceQueue tx not None, DeviceQueue rx not None, int budget=256, uint32_t hdr_len=12,
             bint mergeable=False):
    """The driver's tx queue into its rx queue, ring to ring (GIL released). Returns packets moved.
    ``mergeable``: spread packets larger than one rx buffer over several (MRG_RXBUF)."""
    check_hdr_len(hdr_len)
    cdef int n
    tx.check()
    rx.check()
    cdef char *scratch = NULL
    tx.busy += 1        # checked above, nothing since let another thread in: see enter()
    rx.busy += 1
    cdef PyThreadState *ts = pmd_gil_release()
    n = tx_to_rx_burst(tx, rx, budget, hdr_len, mergeable, &scratch, GATHER_SCRATCH)
    pmd_gil_take(ts)
    rx.leave()
    tx.leave()
    free(scratch)
    return n


def device_tx_burst(DeviceQueue tx not None, unsigned char[:, ::1] out not None,
                    unsigned int[::1] lengths not None, uint32_t hdr_len=12):
    """Take up to ``len(out)`` packets the driver transmitted: packet i (without
    the virtio-net header) goes to ``out[i, :lengths[i]]``. A packet longer than
    a row, or shorter than the header, is dropped and counted. Returns the count."""
    if lengths.shape[0] < out.shape[0]:
        raise ValueError("lengths needs one entry per row of out")
    cdef Py_ssize_t rows = out.shape[0], cols = out.shape[1], i = 0
    cdef uint32_t pkt
    cdef int r
    if rows == 0:
        return 0
    tx.enter()
    with nogil:
        while i < rows:
            r = tx.pop()
            if r == 0:
                break
            if r < 0:
                continue
            if tx.out_len < hdr_len:
                tx._bad(BAD_SHORT)
                tx.push(tx.head, 0)
                continue
            pkt = tx.out_len - hdr_len
            if pkt > cols:
                tx.n_dropped += 1
                tx.push(tx.head, 0)
                continue
            tx.read_out(hdr_len, <char *>&out[i, 0], pkt)
            lengths[i] = pkt
            tx.push(tx.head, 0)
            i += 1
        tx.flush()
    tx.leave()
    return i
