"""A burst's packets as the bytes of a capture file or an Arrow binary column, in C.

The writers of :mod:`pmd.abi.pcap` and :mod:`pmd.arrow` hand a whole burst here
(the 2-D uint8 rows ``rx_burst`` fills, or ``pool.data`` with buffer ids) and get
back one contiguous buffer: classic pcap records (16-byte header and the bytes),
pcapng Enhanced Packet Blocks, or the values and offsets of a variable-length
binary column. Packet ``i`` is ``data[i, :cap]`` (``data[ids[i], :cap]``) with
``cap = min(lengths[i], row width, snaplen)``: a row never yields more than it
holds, and the original length is kept beside the captured one, as pcap's
snaplen does. Arguments are checked with the GIL held; the copies run without it.
"""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import numpy as np

cnp.import_array()

# Record header sizes: classic pcap's per-packet header, and an EPB's fixed part with
# its trailing total length (pcapng 4.3: type, length, interface, ts high, ts low,
# captured, original ... length).
cdef enum:
    PCAP_RECORD_LEN = 16
    EPB_OVERHEAD_LEN = 32
    MAX_BINARY = 0x7FFFFFFF      # int32 offsets of pa.binary()

PCAP_RECORD = PCAP_RECORD_LEN
EPB_OVERHEAD = EPB_OVERHEAD_LEN


cdef struct Packets:
    const uint8_t *data
    Py_ssize_t stride
    uint32_t width
    const uint32_t *ids        # NULL: row i is packet i
    const uint32_t *lengths
    const uint64_t *ts         # NULL: every packet has ts_one
    uint64_t ts_one
    Py_ssize_t n
    uint32_t snaplen


cdef inline uint32_t cap_of(const Packets *p, Py_ssize_t i) noexcept nogil:
    cdef uint32_t c = p.lengths[i]
    if c > p.width:
        c = p.width
    if c > p.snaplen:
        c = p.snaplen
    return c


cdef inline const uint8_t *row_of(const Packets *p, Py_ssize_t i) noexcept nogil:
    return p.data + (p.ids[i] if p.ids != NULL else i) * p.stride


cdef inline uint64_t ts_of(const Packets *p, Py_ssize_t i) noexcept nogil:
    return p.ts[i] if p.ts != NULL else p.ts_one


cdef int u32_array(object a, str name, const uint32_t **out, Py_ssize_t *count) except -1:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array of dtype uint32, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT32 or cnp.PyArray_NDIM(arr) != 1:
        raise TypeError(f"{name} must be a 1-D uint32 array, got {arr.dtype} of shape {(<object>a).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be contiguous and aligned; pass np.ascontiguousarray({name})")
    out[0] = <const uint32_t *>cnp.PyArray_DATA(arr)
    count[0] = cnp.PyArray_DIM(arr, 0)
    return 0


cdef int packets_of(Packets *p, object data, object lengths, object n, object ids, object ts_ns,
                    Py_ssize_t snaplen) except -1:
    """Check the arguments and fill ``p``; raises with what to pass instead."""
    if not cnp.PyArray_Check(data):
        raise TypeError(f"data must be a numpy array of dtype uint8 and shape (packets, bytes), "
                        f"got {type(data).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>data
    if cnp.PyArray_TYPE(a) != cnp.NPY_UINT8 or cnp.PyArray_NDIM(a) != 2:
        raise TypeError(f"data must be a 2-D uint8 array (packets, bytes), got {a.dtype} of shape "
                        f"{(<object>a).shape}")
    if cnp.PyArray_DIM(a, 1) > 1 and cnp.PyArray_STRIDE(a, 1) != 1:
        raise ValueError("data rows must be contiguous bytes (strides[1] == 1); pass np.ascontiguousarray(data)")
    if not 1 <= snaplen <= 0x40000:
        raise ValueError(f"snaplen must be 1 to 262144 bytes, got {snaplen}")
    cdef Py_ssize_t rows = cnp.PyArray_DIM(a, 0), nlen, nids, most, k, i, nts
    p.data = <const uint8_t *>cnp.PyArray_DATA(a)
    p.stride = cnp.PyArray_STRIDE(a, 0)
    p.width = <uint32_t>min(cnp.PyArray_DIM(a, 1), 0xFFFFFFFF)
    p.snaplen = <uint32_t>snaplen
    u32_array(lengths, "lengths", &p.lengths, &nlen)
    p.ids = NULL
    most = min(rows, nlen)
    if ids is not None:
        u32_array(ids, "ids", &p.ids, &nids)
        most = min(nids, nlen)
    k = most if n is None else n
    if not 0 <= k <= most:
        raise ValueError(f"n must be 0 to {most} (the entries of {'ids' if ids is not None else 'data'} "
                         f"and of lengths), got {k}")
    p.n = k
    if p.ids != NULL:
        for i in range(k):
            if p.ids[i] >= <uint64_t>rows:
                raise ValueError(f"ids[{i}] is {p.ids[i]} but data has {rows} rows")
    p.ts = NULL
    p.ts_one = 0
    if ts_ns is None or isinstance(ts_ns, int):
        if ts_ns is not None and not 0 <= ts_ns < 2 ** 64:
            raise ValueError(f"ts_ns must be nanoseconds since the epoch (0 to 2**64 - 1), got {ts_ns}")
        p.ts_one = ts_ns or 0
        return 0
    if not cnp.PyArray_Check(ts_ns) or cnp.PyArray_TYPE(<cnp.ndarray>ts_ns) != cnp.NPY_UINT64 \
            or cnp.PyArray_NDIM(<cnp.ndarray>ts_ns) != 1:
        raise TypeError("ts_ns must be an int (one timestamp for the burst) or a 1-D uint64 array of "
                        "nanoseconds (rx_burst(..., timestamps=ts) fills one)")
    if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>ts_ns) or not cnp.PyArray_ISALIGNED(<cnp.ndarray>ts_ns):
        raise ValueError("ts_ns must be contiguous and aligned; pass np.ascontiguousarray(ts_ns)")
    nts = cnp.PyArray_DIM(<cnp.ndarray>ts_ns, 0)
    if nts < k:
        raise ValueError(f"ts_ns has {nts} entries for {k} packets: give one per packet")
    p.ts = <const uint64_t *>cnp.PyArray_DATA(<cnp.ndarray>ts_ns)
    return 0


cdef uint8_t *room(object out, Py_ssize_t pos, Py_ssize_t need) except? NULL:
    """``out``'s data, or NULL (no exception) when ``need`` bytes at ``pos`` do not fit."""
    if not cnp.PyArray_Check(out) or cnp.PyArray_TYPE(<cnp.ndarray>out) != cnp.NPY_UINT8 \
            or cnp.PyArray_NDIM(<cnp.ndarray>out) != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>out) \
            or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        raise TypeError("out must be a writable, contiguous 1-D uint8 array")
    if pos < 0 or pos > cnp.PyArray_DIM(<cnp.ndarray>out, 0):
        raise ValueError(f"pos must be 0 to {cnp.PyArray_DIM(<cnp.ndarray>out, 0)} (the bytes of out), got {pos}")
    if pos + need > cnp.PyArray_DIM(<cnp.ndarray>out, 0):
        return NULL
    return <uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>out)


def record_bound(Py_ssize_t n, Py_ssize_t width, Py_ssize_t snaplen):
    """The most bytes ``n`` packets of rows ``width`` bytes wide can take as pcap records
    or pcapng blocks (either: an EPB's overhead and padding are the larger)."""
    return n * (EPB_OVERHEAD_LEN + ((min(width, snaplen) + 3) & ~3))


cdef Py_ssize_t size_of(const Packets *p, Py_ssize_t overhead, bint pad) noexcept nogil:
    cdef Py_ssize_t total = 0, i
    cdef uint32_t c
    for i in range(p.n):
        c = cap_of(p, i)
        total += overhead + ((c + 3) & ~3 if pad else c)
    return total


def pcap_records(out, Py_ssize_t pos, data, lengths, n=None, *, ids=None, ts_ns=None,
                 Py_ssize_t snaplen=65535, bint nanosecond=False):
    """Classic pcap records (native byte order, as the file header) for the packets, into
    ``out[pos:]``; returns the position after them, or ``-need`` (nothing written) when
    the ``need`` bytes they take do not fit after ``pos``. ``ts_ns``: nanoseconds since the
    epoch, one int for the burst or an array with one per packet; written as seconds
    and microseconds, or nanoseconds with ``nanosecond`` (the file's magic says which)."""
    cdef Packets p
    packets_of(&p, data, lengths, n, ids, ts_ns, snaplen)
    cdef Py_ssize_t need = size_of(&p, PCAP_RECORD_LEN, False)
    cdef uint8_t *o = room(out, pos, need)
    if o == NULL:
        return -need             # nothing written: make room for ``need`` bytes and call again
    o += pos
    cdef Py_ssize_t i
    cdef uint32_t c, hdr[4]
    cdef uint64_t t
    with nogil:
        for i in range(p.n):
            c = cap_of(&p, i)
            t = ts_of(&p, i)
            hdr[0] = <uint32_t>(t // 1000000000)
            hdr[1] = <uint32_t>(t % 1000000000) if nanosecond else <uint32_t>((t % 1000000000) // 1000)
            hdr[2] = c
            hdr[3] = p.lengths[i]
            memcpy(o, hdr, PCAP_RECORD_LEN)
            memcpy(o + PCAP_RECORD_LEN, row_of(&p, i), c)
            o += PCAP_RECORD_LEN + c
    return pos + need


def pcapng_blocks(out, Py_ssize_t pos, data, lengths, n=None, *, ids=None, ts_ns=None,
                  Py_ssize_t snaplen=65535, uint32_t interface=0):
    """pcapng Enhanced Packet Blocks (native byte order, as the section header; the
    interface's ``if_tsresol`` must be 9: nanoseconds) into ``out[pos:]``; returns the
    position after them, or ``-need`` as :func:`pcap_records`."""
    cdef Packets p
    packets_of(&p, data, lengths, n, ids, ts_ns, snaplen)
    cdef Py_ssize_t need = size_of(&p, EPB_OVERHEAD_LEN, True)
    cdef uint8_t *o = room(out, pos, need)
    if o == NULL:
        return -need             # nothing written: make room for ``need`` bytes and call again
    o += pos
    cdef Py_ssize_t i
    cdef uint32_t c, padded, total, hdr[7]
    cdef uint64_t t
    with nogil:
        for i in range(p.n):
            c = cap_of(&p, i)
            padded = (c + 3) & ~3
            total = EPB_OVERHEAD_LEN + padded
            t = ts_of(&p, i)
            hdr[0] = 0x00000006
            hdr[1] = total
            hdr[2] = interface
            hdr[3] = <uint32_t>(t >> 32)
            hdr[4] = <uint32_t>t            # the low 32 bits
            hdr[5] = c
            hdr[6] = p.lengths[i]
            memcpy(o, hdr, 28)
            memcpy(o + 28, row_of(&p, i), c)
            memset(o + 28 + c, 0, padded - c)
            memcpy(o + 28 + padded, &total, 4)
            o += total
    return pos + need


def binary_column(data, lengths, n=None, *, ids=None, Py_ssize_t snaplen=65535):
    """The values and offsets of a variable-length binary column (Arrow's ``binary``:
    int32 offsets, ``n + 1`` of them, starting at 0) of the packets' captured bytes:
    ``(offsets, values)``, both new arrays."""
    cdef Packets p
    packets_of(&p, data, lengths, n, ids, None, snaplen)
    cdef Py_ssize_t total = size_of(&p, 0, False)
    if total > MAX_BINARY:
        raise ValueError(f"{p.n} packets hold {total} bytes, more than one binary column can (2 GiB - 1): "
                         "take fewer packets per batch, or a smaller snaplen")
    offsets = np.empty(p.n + 1, np.int32)
    values = np.empty(total, np.uint8)
    cdef int32_t *off = <int32_t *>cnp.PyArray_DATA(<cnp.ndarray>offsets)
    cdef uint8_t *v = <uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>values)
    cdef Py_ssize_t i
    cdef int64_t at = 0
    cdef uint32_t c
    with nogil:
        off[0] = 0
        for i in range(p.n):
            c = cap_of(&p, i)
            memcpy(v + at, row_of(&p, i), c)
            at += c
            off[i + 1] = <int32_t>at
    return offsets, values


def captured_lengths(data, lengths, n=None, *, ids=None, Py_ssize_t snaplen=65535):
    """``min(lengths[i], row width, snaplen)`` for each packet, as a new uint32 array."""
    cdef Packets p
    packets_of(&p, data, lengths, n, ids, None, snaplen)
    out = np.empty(p.n, np.uint32)
    cdef uint32_t *o = <uint32_t *>cnp.PyArray_DATA(<cnp.ndarray>out)
    cdef Py_ssize_t i
    with nogil:
        for i in range(p.n):
            o[i] = cap_of(&p, i)
    return out
