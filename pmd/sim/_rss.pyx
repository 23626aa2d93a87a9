"""The built-in device's RSS and hash-report state (Virtio 1.2 5.1.6.4.3, 5.1.6.5.7).

:class:`RssState` holds what the driver set with ``VIRTIO_NET_CTRL_MQ_RSS_CONFIG``
(hash types, key, indirection table, unclassified queue: packets are steered)
or ``VIRTIO_NET_CTRL_MQ_HASH_CONFIG`` (hash types and key only: packets are
hashed for the header, not steered). The control queue (``pmd.sim.net``)
validates the command before calling :meth:`RssState.configure`; this checks
again, so no value can index outside the table. :meth:`RssState.classify_burst`
gives each packet of a batch its queue, hash and report without the GIL.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memset

from pmd.includes.rss cimport PMD_RSS_INPUT_MAX, PMD_RSS_KEY_MAX, pmd_toeplitz

TABLE_MAX = RSS_TABLE_MAX
KEY_MAX = PMD_RSS_KEY_MAX


cdef class RssState:
    """``RssState()``: off (the reset state, 5.1.6.5.6.4: "Initially the device has all hash
    types disabled and reports only VIRTIO_NET_HASH_REPORT_NONE")."""

    def __cinit__(self):
        self.reset()

    def reset(self):
        """Back to the reset state: no hashing, no steering."""
        self.active = False
        self.redirect = False
        self.hash_types = 0
        self.unclassified_queue = 0
        self.table_len = 1
        self.key_len = 0
        memset(self._table, 0, sizeof(self._table))
        memset(self._key, 0, sizeof(self._key))
        memset(self.lut, 0, sizeof(self.lut))

    def configure(self, uint32_t hash_types, key, table=None, uint16_t unclassified_queue=0):
        """Take a configuration: ``table`` (a power-of-two number of rx queue numbers, at most
        TABLE_MAX) for RSS_CONFIG, None for HASH_CONFIG (hash only)."""
        cdef bytes k = bytes(key)
        if len(k) > PMD_RSS_KEY_MAX:
            raise ValueError(f"a key of {len(k)} bytes; at most {PMD_RSS_KEY_MAX}")
        cdef list entries = [] if table is None else [int(q) for q in table]
        if table is not None and (not entries or len(entries) > RSS_TABLE_MAX
                                  or len(entries) & (len(entries) - 1)):
            raise ValueError(f"the table has {len(entries)} entries; a power of two up to {RSS_TABLE_MAX}")
        if any(not 0 <= q <= 0xFFFF for q in entries):
            raise ValueError("table entries are 16-bit queue numbers")
        cdef uint32_t i
        self.reset()
        for i in range(len(k)):
            self._key[i] = k[i]
        self.key_len = <uint32_t>len(k)
        for i in range(len(entries)):
            self._table[i] = <uint16_t>entries[i]
        self.table_len = <uint32_t>len(entries) if entries else 1
        self.unclassified_queue = unclassified_queue
        self.hash_types = hash_types
        self.redirect = table is not None
        self.active = hash_types != 0 or self.redirect
        self._fill_lut()

    cdef void _fill_lut(self) noexcept:
        # lut[pos][v]: the Toeplitz hash of byte v at input position pos, the other
        # bytes zero; the hash of an input is the XOR of its bytes' entries (it is linear).
        cdef uint8_t one[PMD_RSS_INPUT_MAX]
        cdef uint32_t pos, bit, v, h
        cdef uint32_t bits[8]
        for pos in range(PMD_RSS_INPUT_MAX):
            memset(one, 0, sizeof(one))
            for bit in range(8):
                one[pos] = <uint8_t>(0x80 >> bit)
                bits[bit] = pmd_toeplitz(self._key, PMD_RSS_KEY_MAX, one, pos + 1)
            for v in range(256):
                h = 0
                for bit in range(8):
                    if v & (0x80 >> bit):
                        h ^= bits[bit]
                self.lut[pos][v] = h

    @property
    def key(self):
        return bytes(self._key[:self.key_len])

    @property
    def table(self):
        return [self._table[i] for i in range(self.table_len)] if self.redirect else []

    def hash(self, frame, uint16_t source=0):
        """``(queue, hash_value, hash_report)`` of one frame, as a steered receive gives them."""
        cdef const uint8_t[::1] f = memoryview(frame).cast("B")
        cdef uint32_t h = 0
        cdef uint16_t report = 0, q
        cdef uint8_t empty = 0
        q = self.classify(&f[0] if f.shape[0] else &empty, <uint32_t>f.shape[0], source, &h, &report)
        return (q, h, report)

    def classify_burst(self, const unsigned char[:, ::1] rows not None, const unsigned int[::1] lengths not None,
                       Py_ssize_t start, Py_ssize_t n, uint16_t source, uint16_t[::1] queues not None,
                       uint32_t[::1] hashes not None, uint16_t[::1] reports not None):
        """For packets ``start`` to ``n`` of a batch (``rows[i, :lengths[i]]``): their queue,
        hash and report into ``queues``, ``hashes``, ``reports``, without the GIL."""
        if start < 0 or n > rows.shape[0] or n > lengths.shape[0] or n > queues.shape[0] \
                or n > hashes.shape[0] or n > reports.shape[0]:
            raise ValueError("n is larger than the arrays given")
        cdef Py_ssize_t cols = rows.shape[1], i
        cdef uint32_t ln
        with nogil:
            for i in range(start, n):
                ln = lengths[i]
                if ln > cols:
                    ln = <uint32_t>cols        # read once, kept within its row
                queues[i] = self.classify(&rows[i, 0], ln, source, &hashes[i], &reports[i])
