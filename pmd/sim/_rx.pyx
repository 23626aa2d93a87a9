"""Serving the driver's receive queues: packets from a flat buffer into its rx ring.

The wire behind the built-in device hands the engine packets as numpy rows
(:func:`device_rx_burst`) or as one frame to repeat with a sequence number
(:func:`device_rx_generate`, the generator's fast path). Each goes through
``deliver`` (_rx.pxd): the next available chain, a fresh virtio-net header
(5.1.6), the data, a used entry; one used index store and one interrupt
decision per burst (``DeviceQueue.flush``). It mirrors the driver's
:mod:`pmd.driver._rx`.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pmd.sim._rx cimport check_hdr_len, deliver_or_drop
from pmd.sim._virtqueue cimport DeviceQueue


def device_rx_generate(DeviceQueue rx not None, unsigned char[::1] frame not None, Py_ssize_t n,
                       Py_ssize_t seq_offset, uint64_t first_seq, uint32_t hdr_len=12, bint mergeable=False):
    """Deliver up to ``n`` copies of ``frame`` into the driver's rx ring, copy ``i``
    carrying ``first_seq + i`` as a little-endian u64 at ``seq_offset`` (written into
    ``frame`` itself, which is the caller's scratch). A packet source without a batch
    in between: the generator wire's fast path. Stops at the first packet with no rx
    buffer; returns how many were consumed (delivered, or dropped as too large)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    check_hdr_len(hdr_len)
    if seq_offset < 0 or seq_offset + 8 > frame.shape[0]:
        raise ValueError(f"seq_offset {seq_offset} + 8 is outside the {frame.shape[0]}-byte frame")
    cdef Py_ssize_t i = 0
    cdef int k
    cdef uint64_t seq
    cdef uint32_t length = <uint32_t>frame.shape[0]
    cdef unsigned char *p = &frame[0]
    rx.enter()
    with nogil:
        while i < n:
            seq = first_seq + <uint64_t>i
            for k in range(8):
                p[seq_offset + k] = <unsigned char>(seq >> (8 * k))
            if not deliver_or_drop(rx, <const char *>p, length, hdr_len, mergeable, False, 0, 0):
                break
            i += 1
        rx.flush()
    rx.leave()
    return i


def device_rx_burst(DeviceQueue rx not None, const unsigned char[:, ::1] packets not None,
                    const unsigned int[::1] lengths not None, Py_ssize_t n=-1, uint32_t hdr_len=12,
                    bint mergeable=False):
    """Deliver ``packets[i, :lengths[i]]`` (i < n) into the driver's rx ring, each
    with a fresh header. Stops at the first packet with no rx buffer for it and
    returns how many were consumed (delivered or dropped as too large): the rest
    stay with the caller, which decides whether the wire waits or drops."""
    if n < 0:
        n = packets.shape[0]
    if n > packets.shape[0] or n > lengths.shape[0]:
        raise ValueError("n is larger than the packets given")
    check_hdr_len(hdr_len)
    cdef Py_ssize_t cols = packets.shape[1], i
    for i in range(n):
        if lengths[i] > cols:
            raise ValueError(f"lengths[{i}] = {lengths[i]} is larger than the row width {cols}")
    # Each length is read once, in the pass that uses it, and kept within its
    # row: the caller's array may change after the check above.
    cdef uint32_t ln
    i = 0
    rx.enter()
    with nogil:
        while i < n:
            ln = lengths[i]
            if ln > cols:
                ln = <uint32_t>cols
            if not deliver_or_drop(rx, <const char *>&packets[i, 0], ln, hdr_len, mergeable, False, 0, 0):
                break
            i += 1
        rx.flush()
    rx.leave()
    return i


def device_rx_steered(DeviceQueue rx not None, const unsigned char[:, ::1] packets not None,
                      const unsigned int[::1] lengths not None, const uint16_t[::1] queues not None,
                      const uint32_t[::1] hashes not None, const uint16_t[::1] reports not None,
                      uint8_t[::1] done not None, Py_ssize_t start, Py_ssize_t n, uint16_t queue,
                      uint32_t hdr_len=12, bint mergeable=False):
    """Deliver the packets ``start`` to ``n`` of a classified batch whose ``queues[i]`` is
    ``queue`` and that are not ``done`` yet, in order, each with its hash and report in
    the header (when ``hdr_len`` has room for them); mark each consumed one done. Stops
    at the first with no rx buffer (that queue's packets keep their order; other
    queues' are not held up). Returns how many were consumed (delivered or dropped as
    too large)."""
    if start < 0 or n > packets.shape[0] or n > lengths.shape[0] or n > queues.shape[0] \
            or n > hashes.shape[0] or n > reports.shape[0] or n > done.shape[0]:
        raise ValueError("n is larger than the arrays given")
    check_hdr_len(hdr_len)
    cdef Py_ssize_t cols = packets.shape[1], i = start
    cdef uint32_t ln
    cdef Py_ssize_t k = 0
    rx.enter()
    with nogil:
        while i < n:
            if done[i] or queues[i] != queue:
                i += 1
                continue
            ln = lengths[i]
            if ln > cols:
                ln = <uint32_t>cols          # read once, kept within its row
            if not deliver_or_drop(rx, <const char *>&packets[i, 0], ln, hdr_len, mergeable,
                                   hdr_len >= 20, hashes[i], reports[i]):
                break
            done[i] = 1
            k += 1
            i += 1
        rx.flush()
    rx.leave()
    return k
