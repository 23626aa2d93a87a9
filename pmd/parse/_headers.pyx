"""Packet headers of a burst into numpy columns, in C, one pass per packet.

``HeaderParser.parse_into(data, lengths, n)`` reads packet ``i`` from
``data[i, :lengths[i]]`` (the shape ``RxQueue.rx_burst`` fills; ``parse_ids``
takes the zero-copy shape, ``pool.data`` rows by buffer id) and writes one row of
each column (docs/analytics.md):

    Ethernet II, then zero, one or two VLAN tags (802.1Q 0x8100, 802.1ad 0x88a8)
    IPv4 (RFC 791, options skipped by IHL) or IPv6 (RFC 8200, fixed header only:
    extension headers are not followed, ``protocol`` is the fixed header's next header)
    TCP (RFC 9293, options skipped by data offset), UDP (RFC 768),
    ICMP (RFC 792) over IPv4, ICMPv6 (RFC 4443) over IPv6: type and code

Every read is inside ``min(lengths[i], row width)``: a header is read only after
the check that all of its bytes are there (``have``), and a packet whose
headers the frame cuts short is marked ``TRUNCATED``; a field no valid packet
has (IHL < 5, a total length shorter than the header, ...) is ``MALFORMED``.
The fields of a header that was not read whole stay 0.

The loop runs without the GIL and touches no Python object; the GIL is held
only to check the arguments.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import numpy as np

cnp.import_array()

# The flags column (uint8 bits).
TRUNCATED = 0x01
MALFORMED = 0x02
SNAPPED = 0x04
FRAGMENT = 0x08

cdef enum:
    F_TRUNCATED = 0x01   # the frame ends inside a header, or before the IP length says
    F_MALFORMED = 0x02   # a header field no valid packet has
    F_SNAPPED = 0x04     # lengths[i] is more than the row holds: the rest was not there to read
    F_FRAGMENT = 0x08    # an IPv4 fragment (MF or an offset); L4 is read only at offset 0

cdef enum:
    ETH_HLEN = 14
    VLAN_HLEN = 4
    MAX_VLANS = 2
    ETH_P_IP = 0x0800
    ETH_P_IPV6 = 0x86DD
    ETH_P_8021Q = 0x8100
    ETH_P_8021AD = 0x88A8
    IPV4_HLEN = 20
    IPV6_HLEN = 40
    TCP_HLEN = 20
    UDP_HLEN = 8
    ICMP_HLEN = 4        # type, code, checksum: the rest depends on the type (payload)
    PROTO_ICMP = 1
    PROTO_TCP = 6
    PROTO_UDP = 17
    PROTO_ICMPV6 = 58

# Name, dtype and width of each column, in the order of the dict parse() returns.
COLUMNS = (
    ("dst_mac", "uint64", 1), ("src_mac", "uint64", 1), ("ethertype", "uint16", 1),
    ("vlan_id", "uint16", 1), ("vlan_count", "uint8", 1), ("ip_version", "uint8", 1),
    ("ip_src", "uint32", 1), ("ip_dst", "uint32", 1), ("ip6_src", "uint8", 16), ("ip6_dst", "uint8", 16),
    ("protocol", "uint8", 1), ("ttl", "uint8", 1), ("src_port", "uint16", 1), ("dst_port", "uint16", 1),
    ("tcp_flags", "uint8", 1), ("icmp_type", "uint8", 1), ("icmp_code", "uint8", 1),
    ("payload_offset", "uint32", 1), ("payload_length", "uint32", 1), ("flags", "uint8", 1),
)


cdef struct Row:
    # Where packet i's values go: one pointer per column, already at row i.
    uint64_t *dst_mac
    uint64_t *src_mac
    uint16_t *ethertype
    uint16_t *vlan_id
    uint8_t *vlan_count
    uint8_t *ip_version
    uint32_t *ip_src
    uint32_t *ip_dst
    uint8_t *ip6_src
    uint8_t *ip6_dst
    uint8_t *protocol
    uint8_t *ttl
    uint16_t *src_port
    uint16_t *dst_port
    uint8_t *tcp_flags
    uint8_t *icmp_type
    uint8_t *icmp_code
    uint32_t *payload_offset
    uint32_t *payload_length
    uint8_t *flags


cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t be48(const uint8_t *p) noexcept nogil:
    return (<uint64_t>be16(p) << 32) | be32(p + 2)


cdef inline bint have(uint32_t off, uint32_t size, uint32_t avail) noexcept nogil:
    """The one gate before every read: bytes off .. off + size - 1 are in the frame."""
    return size <= avail and off <= avail - size


cdef inline bint l4_fits(uint32_t off, uint32_t size, uint32_t ip_end, uint32_t avail,
                         uint8_t *flags) noexcept nogil:
    """An L4 header of ``size`` bytes at ``off`` is inside the IP packet (else
    MALFORMED: its own length leaves no room) and inside the frame (else TRUNCATED)."""
    if not have(off, size, ip_end):
        flags[0] |= F_MALFORMED
        return False
    if not have(off, size, avail):
        flags[0] |= F_TRUNCATED
        return False
    return True


cdef inline uint32_t parse_headers(const uint8_t *p, uint32_t wire_len, uint32_t avail, Row *r, Py_ssize_t i,
                                   uint8_t *flags, uint32_t *end) noexcept nogil:
    """The headers of packet ``p`` (``wire_len`` bytes long, ``avail`` of them
    readable) into row i; returns where the last header read whole ends. ``end``
    gets where the packet ends (the IP length, when the frame holds it)."""
    cdef uint8_t proto = 0, vihl, doff
    cdef uint16_t et, frag, tot
    cdef uint32_t off = ETH_HLEN, ip_end, ihl, ulen
    cdef int nvlan = 0
    r.dst_mac[i] = 0
    r.src_mac[i] = 0
    r.ethertype[i] = 0
    r.vlan_id[i] = 0
    r.vlan_count[i] = 0
    r.ip_version[i] = 0
    r.ip_src[i] = 0
    r.ip_dst[i] = 0
    memset(r.ip6_src + 16 * i, 0, 16)
    memset(r.ip6_dst + 16 * i, 0, 16)
    r.protocol[i] = 0
    r.ttl[i] = 0
    r.src_port[i] = 0
    r.dst_port[i] = 0
    r.tcp_flags[i] = 0
    r.icmp_type[i] = 0
    r.icmp_code[i] = 0
    if not have(0, ETH_HLEN, avail):
        flags[0] |= F_TRUNCATED
        return 0
    r.dst_mac[i] = be48(p)
    r.src_mac[i] = be48(p + 6)
    et = be16(p + 12)
    while (et == ETH_P_8021Q or et == ETH_P_8021AD) and nvlan < MAX_VLANS:
        if not have(off, VLAN_HLEN, avail):
            flags[0] |= F_TRUNCATED
            break
        if nvlan == 0:
            r.vlan_id[i] = be16(p + off) & 0x0FFF
        et = be16(p + off + 2)
        off += VLAN_HLEN
        nvlan += 1
    r.vlan_count[i] = <uint8_t>nvlan
    r.ethertype[i] = et
    if flags[0] & F_TRUNCATED:
        return off
    if et == ETH_P_IP:
        r.ip_version[i] = 4
        if not have(off, IPV4_HLEN, avail):
            flags[0] |= F_TRUNCATED
            return off
        vihl = p[off]
        ihl = (vihl & 0x0F) * <uint32_t>4
        tot = be16(p + off + 2)
        if (vihl >> 4) != 4 or ihl < IPV4_HLEN or tot < ihl:
            flags[0] |= F_MALFORMED
            return off
        if not have(off, ihl, avail):
            flags[0] |= F_TRUNCATED
            return off
        frag = be16(p + off + 6)
        proto = p[off + 9]
        r.ttl[i] = p[off + 8]
        r.protocol[i] = proto
        r.ip_src[i] = be32(p + off + 12)
        r.ip_dst[i] = be32(p + off + 16)
        ip_end = off + tot
        off += ihl
        if frag & 0x3FFF:
            flags[0] |= F_FRAGMENT
        if frag & 0x1FFF:
            proto = 0            # a later fragment: no L4 header in it
    elif et == ETH_P_IPV6:
        r.ip_version[i] = 6
        if not have(off, IPV6_HLEN, avail):
            flags[0] |= F_TRUNCATED
            return off
        if (p[off] >> 4) != 6:
            flags[0] |= F_MALFORMED
            return off
        proto = p[off + 6]
        r.protocol[i] = proto
        r.ttl[i] = p[off + 7]
        memcpy(r.ip6_src + 16 * i, p + off + 8, 16)
        memcpy(r.ip6_dst + 16 * i, p + off + 24, 16)
        ip_end = off + IPV6_HLEN + be16(p + off + 4)
        off += IPV6_HLEN
    else:
        return off
    # The IP packet ends where its length says; Ethernet padding after it is not payload.
    if ip_end > wire_len:
        flags[0] |= F_TRUNCATED
    else:
        end[0] = ip_end
    if proto == PROTO_TCP:
        if not l4_fits(off, TCP_HLEN, ip_end, avail, flags):
            return off
        r.src_port[i] = be16(p + off)
        r.dst_port[i] = be16(p + off + 2)
        r.tcp_flags[i] = p[off + 13]
        doff = p[off + 12] >> 4
        if doff < 5:
            flags[0] |= F_MALFORMED
            return off
        if not l4_fits(off, doff * <uint32_t>4, ip_end, avail, flags):
            return off
        off += doff * <uint32_t>4
    elif proto == PROTO_UDP:
        if not l4_fits(off, UDP_HLEN, ip_end, avail, flags):
            return off
        r.src_port[i] = be16(p + off)
        r.dst_port[i] = be16(p + off + 2)
        ulen = be16(p + off + 4)
        if ulen < UDP_HLEN or not have(off, ulen, ip_end):
            flags[0] |= F_MALFORMED
        off += UDP_HLEN
    elif (proto == PROTO_ICMP and r.ip_version[i] == 4) or (proto == PROTO_ICMPV6 and r.ip_version[i] == 6):
        if not l4_fits(off, ICMP_HLEN, ip_end, avail, flags):
            return off
        r.icmp_type[i] = p[off]
        r.icmp_code[i] = p[off + 1]
        off += ICMP_HLEN
    return off


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void parse_one(const uint8_t *p, uint32_t wire_len, uint32_t avail, Row *r, Py_ssize_t i) noexcept nogil:
    """Packet ``p`` (``wire_len`` bytes long, ``avail`` of them readable) into row i."""
    cdef uint8_t fl = F_SNAPPED if wire_len > avail else 0
    cdef uint32_t end = wire_len
    cdef uint32_t off = parse_headers(p, wire_len, avail, r, i, &fl, &end)
    r.payload_offset[i] = off
    r.payload_length[i] = end - off if end > off else 0
    r.flags[i] = fl


cdef const uint8_t *rows_of(object data, Py_ssize_t *rows, Py_ssize_t *cols, Py_ssize_t *stride) except NULL:
    if not cnp.PyArray_Check(data):
        raise TypeError(f"data must be a numpy array of dtype uint8 and shape (packets, bytes), "
                        f"got {type(data).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>data
    if cnp.PyArray_TYPE(a) != cnp.NPY_UINT8 or cnp.PyArray_NDIM(a) != 2:
        raise TypeError(f"data must be a 2-D uint8 array (packets, bytes), got {a.dtype} "
                        f"of shape {(<object>a).shape}")
    rows[0] = cnp.PyArray_DIM(a, 0)
    cols[0] = cnp.PyArray_DIM(a, 1)
    stride[0] = cnp.PyArray_STRIDE(a, 0)
    if cols[0] > 1 and cnp.PyArray_STRIDE(a, 1) != 1:
        raise ValueError("data rows must be contiguous bytes (strides[1] == 1); "
                         "pass np.ascontiguousarray(data)")
    return <const uint8_t *>cnp.PyArray_DATA(a)


cdef const uint32_t *u32_of(object a, str name, Py_ssize_t *n) except NULL:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array of dtype uint32, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT32 or cnp.PyArray_NDIM(arr) != 1:
        raise TypeError(f"{name} must be a 1-D uint32 array, got {arr.dtype} of shape {(<object>a).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be contiguous and aligned; pass np.ascontiguousarray({name})")
    n[0] = cnp.PyArray_DIM(arr, 0)
    return <const uint32_t *>cnp.PyArray_DATA(arr)


cdef class HeaderParser:
    """``HeaderParser(capacity=256)``: column arrays for ``capacity`` packets,
    reused by every call (they grow when a call brings more packets).

    ``parse_into`` fills the first n rows and returns n, with no allocation;
    ``columns`` is the dict of the whole arrays (the same objects from call to
    call until they grow). ``parse`` returns views of the first n rows, valid
    until the next call.
    """
    cdef readonly Py_ssize_t capacity
    cdef readonly dict columns
    cdef Row row

    def __init__(self, Py_ssize_t capacity=256):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._allocate(capacity)

    cdef _allocate(self, Py_ssize_t capacity):
        cols = {}
        for name, dtype, width in COLUMNS:
            cols[name] = np.zeros((capacity, width) if width > 1 else capacity, dtype=dtype)
        cdef Row r
        r.dst_mac = <uint64_t *>cnp.PyArray_DATA(cols["dst_mac"])
        r.src_mac = <uint64_t *>cnp.PyArray_DATA(cols["src_mac"])
        r.ethertype = <uint16_t *>cnp.PyArray_DATA(cols["ethertype"])
        r.vlan_id = <uint16_t *>cnp.PyArray_DATA(cols["vlan_id"])
        r.vlan_count = <uint8_t *>cnp.PyArray_DATA(cols["vlan_count"])
        r.ip_version = <uint8_t *>cnp.PyArray_DATA(cols["ip_version"])
        r.ip_src = <uint32_t *>cnp.PyArray_DATA(cols["ip_src"])
        r.ip_dst = <uint32_t *>cnp.PyArray_DATA(cols["ip_dst"])
        r.ip6_src = <uint8_t *>cnp.PyArray_DATA(cols["ip6_src"])
        r.ip6_dst = <uint8_t *>cnp.PyArray_DATA(cols["ip6_dst"])
        r.protocol = <uint8_t *>cnp.PyArray_DATA(cols["protocol"])
        r.ttl = <uint8_t *>cnp.PyArray_DATA(cols["ttl"])
        r.src_port = <uint16_t *>cnp.PyArray_DATA(cols["src_port"])
        r.dst_port = <uint16_t *>cnp.PyArray_DATA(cols["dst_port"])
        r.tcp_flags = <uint8_t *>cnp.PyArray_DATA(cols["tcp_flags"])
        r.icmp_type = <uint8_t *>cnp.PyArray_DATA(cols["icmp_type"])
        r.icmp_code = <uint8_t *>cnp.PyArray_DATA(cols["icmp_code"])
        r.payload_offset = <uint32_t *>cnp.PyArray_DATA(cols["payload_offset"])
        r.payload_length = <uint32_t *>cnp.PyArray_DATA(cols["payload_length"])
        r.flags = <uint8_t *>cnp.PyArray_DATA(cols["flags"])
        self.columns = cols
        self.row = r
        self.capacity = capacity

    cdef Py_ssize_t _count(self, object n, Py_ssize_t most, str what) except -1:
        cdef Py_ssize_t k = most if n is None else n
        if k < 0 or k > most:
            raise ValueError(f"n must be 0 to {most} ({what}), got {k}")
        if k > self.capacity:
            self._allocate(k)
        return k

    def parse_into(self, data, lengths, n=None):
        """Parse packets ``data[i, :lengths[i]]`` for i < n (default: every row)
        into the first n rows of ``columns``; returns n."""
        cdef Py_ssize_t rows, cols, stride, nlen
        cdef const uint8_t *d = rows_of(data, &rows, &cols, &stride)
        cdef const uint32_t *l = u32_of(lengths, "lengths", &nlen)
        cdef Py_ssize_t k = self._count(n, min(rows, nlen), "at most the rows of data and of lengths")
        cdef Py_ssize_t i
        cdef uint32_t avail, length
        cdef uint32_t width = <uint32_t>min(cols, 0xFFFFFFFF)
        with nogil:
            for i in range(k):
                length = l[i]
                avail = length if length < width else width
                parse_one(d + i * stride, length, avail, &self.row, i)
        return k

    def parse_ids_into(self, data, ids, lengths, n=None):
        """The zero-copy shape: packet i is ``data[ids[i], :lengths[i]]``
        (``data`` is ``pool.data``, ``ids`` and ``lengths`` what ``rx_burst_zc``
        filled); n defaults to ``len(ids)``. Returns n."""
        cdef Py_ssize_t rows, cols, stride, nids, nlen
        cdef const uint8_t *d = rows_of(data, &rows, &cols, &stride)
        cdef const uint32_t *b = u32_of(ids, "ids", &nids)
        cdef const uint32_t *l = u32_of(lengths, "lengths", &nlen)
        cdef Py_ssize_t k = self._count(n, min(nids, nlen), "at most the entries of ids and of lengths")
        cdef Py_ssize_t i, bad = -1
        cdef uint32_t avail, length, buf
        cdef uint32_t width = <uint32_t>min(cols, 0xFFFFFFFF)
        with nogil:
            for i in range(k):
                buf = b[i]               # read once: checked, then used
                if buf >= <uint64_t>rows:
                    bad = i
                    break
                length = l[i]
                avail = length if length < width else width
                parse_one(d + buf * stride, length, avail, &self.row, i)
        if bad >= 0:
            raise ValueError(f"ids[{bad}] is {b[bad]} but data has {rows} rows")
        return k

    def view(self, Py_ssize_t n):
        """The first n rows of every column, as a dict of views."""
        if not 0 <= n <= self.capacity:
            raise ValueError(f"n must be 0 to {self.capacity}, got {n}")
        return {name: a[:n] for name, a in self.columns.items()}

    def parse(self, data, lengths, n=None):
        """``parse_into`` then ``view``: a dict of columns for the packets parsed."""
        return self.view(self.parse_into(data, lengths, n))

    def parse_ids(self, data, ids, lengths, n=None):
        """``parse_ids_into`` then ``view``."""
        return self.view(self.parse_ids_into(data, ids, lengths, n))


def parse(data, lengths, n=None):
    """Parse ``data[i, :lengths[i]]`` for i < n (default: every row) into a new
    dict of columns (docs/analytics.md). For a loop over bursts, keep a
    :class:`HeaderParser` instead: its arrays are reused."""
    rows = len(data) if n is None else n
    return HeaderParser(max(rows, 1)).parse(data, lengths, n)
