# Serving the driver's receive queues: a packet into the next rx chain (Virtio 1.2
# 5.1.6.4), with a fresh virtio-net header, over several buffers when MRG_RXBUF
# is negotiated (5.1.6.4.2).
#
# `cdef inline` here, not in _rx.pyx: both the wire paths (_rx.pyx) and the
# ring-to-ring path (_tx.pyx, tx_to_rx) deliver every packet through it, and
# the split into modules must cost no call per packet.

from libc.stdint cimport uint16_t, uint32_t
from libc.string cimport memcpy, memmove, memset

from pmd.includes.barrier cimport pmd_virtio_rmb
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.virtio_net cimport virtio_net_hdr, virtio_net_hdr_v1_hash
from pmd.includes.vring cimport vring_load16
from pmd.sim._virtqueue cimport DeviceQueue


cdef inline int check_hdr_len(uint32_t hdr_len) except -1:
    if hdr_len > sizeof(virtio_net_hdr_v1_hash):
        raise ValueError(f"hdr_len must be at most {sizeof(virtio_net_hdr_v1_hash)} (the virtio-net header "
                         "with the hash fields, 5.1.6)")
    return 0


cdef inline uint16_t split_ready(DeviceQueue q) noexcept nogil:
    """Avail entries of a split ring that can be read now, looking at avail->idx again
    only when caught up, as pop() does. An index more than a ring ahead gives 0 here:
    the general path then reads it, counts it and stops the queue."""
    cdef uint16_t idx
    if q.shadow_avail_idx == q.last_avail_idx:
        idx = vring_load16(&q.vr.avail.idx)
        if idx == q.last_avail_idx or <uint16_t>(idx - q.last_avail_idx) > q.size:
            return 0
        pmd_virtio_rmb(q.weak_barriers)   # the entries only after the index that covers them (2.7.13.3)
        q.shadow_avail_idx = idx
    return <uint16_t>(q.shadow_avail_idx - q.last_avail_idx)


cdef inline int split_ready_up_to(DeviceQueue q, int budget) noexcept nogil:
    """split_ready(q), at most ``budget``: what a one-loop path takes this turn
    (the index not looked at when the budget is spent)."""
    if budget <= 0:
        return 0
    cdef int ready = split_ready(q)
    return ready if ready < budget else budget


cdef inline void write_net_hdr(char *dst, const virtio_net_hdr_v1_hash *hdr, uint32_t hdr_len) noexcept nogil:
    """The first ``hdr_len`` bytes of ``hdr`` into a buffer: for the sizes negotiated
    (12: VERSION_1, 20: HASH_REPORT) a constant memcpy, two or three stores; a
    variable one is a byte loop."""
    if hdr_len == 12:
        memcpy(dst, hdr, 12)
    elif hdr_len == 20:
        memcpy(dst, hdr, 20)
    else:
        memcpy(dst, hdr, hdr_len)


cdef inline int deliver(DeviceQueue rx, const char *src, uint32_t pkt, uint32_t hdr_len,
                        bint mergeable, bint with_hash, uint32_t hash_value, uint16_t hash_report) noexcept nogil:
    """Write one packet into the driver's rx ring: 1 delivered, 0 dropped (too
    large for the driver's buffers), -1 no rx buffer available (nothing taken).
    ``with_hash`` (the 20-byte header of HASH_REPORT): its hash fields get
    ``hash_value`` and ``hash_report`` (5.1.6.4.4); otherwise they are zero
    (HASH_REPORT_NONE). Callers pass a constant, so the paths without a hash
    compile without the branch."""
    cdef int r = rx.pop()
    while r < 0:
        r = rx.pop()
    if r == 0:
        return -1
    cdef virtio_net_hdr_v1_hash hdr
    memset(&hdr, 0, sizeof(hdr))      # the same stores as for 12 bytes: one 16-byte, one 4-byte
    hdr.num_buffers = 1
    if with_hash:
        hdr.hash_value = hash_value
        hdr.hash_report = hash_report
    if rx.in_len >= hdr_len + pkt:
        if pmd_likely(rx.nsegs == 1):
            # The common case: one buffer; header then data, no segment walk.
            write_net_hdr(rx.segs[0].ptr, &hdr, hdr_len)
            memmove(rx.segs[0].ptr + hdr_len, src, pkt)   # src may be a tx buffer that overlaps
        else:
            rx.write_in(0, <const char *>&hdr, hdr_len)
            rx.write_in(hdr_len, src, pkt)
        rx.push(rx.head, hdr_len + pkt)
        return 1
    if not mergeable or rx.in_len <= hdr_len:
        rx.unpop()
        return 0
    cdef uint32_t room = rx.in_len
    cdef uint32_t need = (hdr_len + pkt + room - 1) // room
    if need > rx.size:
        rx.unpop()
        return 0
    if rx.pending() + 1 < need:
        rx.unpop()
        return -1
    hdr.num_buffers = <uint16_t>need
    cdef uint32_t done = room - hdr_len, take, k
    rx.write_in(0, <const char *>&hdr, hdr_len)
    rx.write_in(hdr_len, src, done)
    rx.push(rx.head, room)
    for k in range(1, need):
        if rx.pop() != 1:
            rx.broken = True
            return 1
        take = pkt - done if pkt - done <= rx.in_len else rx.in_len
        rx.write_in(0, src + done, take)
        rx.push(rx.head, take)
        done += take
    return 1


cdef inline bint deliver_or_drop(DeviceQueue rx, const char *src, uint32_t pkt, uint32_t hdr_len,
                                 bint mergeable, bint with_hash, uint32_t hash_value,
                                 uint16_t hash_report) noexcept nogil:
    """deliver() for a packet from outside the rings: one too large for the
    driver's buffers is dropped and counted on ``rx``. False: no rx buffer (nothing taken)."""
    cdef int r = deliver(rx, src, pkt, hdr_len, mergeable, with_hash, hash_value, hash_report)
    if r == 0:
        rx.n_dropped += 1
    return r >= 0
