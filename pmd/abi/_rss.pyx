"""The RSS hash (Virtio 1.2 5.1.6.4.3), as both sides and the tests use it.

:func:`toeplitz_hash` is the Toeplitz hash of some bytes under a key;
:func:`rss_input` picks the fields of a frame that the enabled hash types hash
(addresses, then ports for TCP/UDP) and the hash_report they give;
:func:`rss_hash` is the two together, what a device computes per packet. The C
is ``csrc/pmd_rss.h`` (the built-in device calls it without the GIL).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t

from pmd.includes.rss cimport PMD_RSS_INPUT_MAX, pmd_rss_input, pmd_toeplitz

INPUT_MAX = PMD_RSS_INPUT_MAX


def toeplitz_hash(key, data):
    """The Toeplitz hash (32 bits) of ``data`` under ``key`` (bytes-like). Key bits past
    its end count as zero; a key shorter than ``len(data) + 4`` bytes is a ValueError,
    since the hash of the last input bits would then not use the key at all."""
    cdef const uint8_t[::1] k = memoryview(key).cast("B")
    cdef const uint8_t[::1] d = memoryview(data).cast("B")
    if k.shape[0] < d.shape[0] + 4:
        raise ValueError(f"a {k.shape[0]}-byte key cannot hash {d.shape[0]} bytes; the key needs at least "
                         f"{d.shape[0] + 4} (the 40-byte RSS key covers 36: IPv6 addresses and ports)")
    if d.shape[0] == 0:
        return 0
    return pmd_toeplitz(&k[0], <uint32_t>k.shape[0], &d[0], <uint32_t>d.shape[0])


def rss_input(frame, uint32_t hash_types):
    """``(input bytes, hash_report)``: what a packet is hashed over under ``hash_types``
    (HASH_TYPE_* bits; the _EX types are not implemented and ignored); ``(b"", 0)``
    when it is not hashed (HASH_REPORT_NONE)."""
    cdef const uint8_t[::1] f = memoryview(frame).cast("B")
    cdef uint8_t out[PMD_RSS_INPUT_MAX]
    cdef uint16_t report = 0
    cdef uint32_t n = 0
    if f.shape[0]:
        n = pmd_rss_input(&f[0], <uint32_t>f.shape[0], hash_types, out, &report)
    return (<bytes>(<char *>out)[:n], report)


def rss_hash(frame, key, uint32_t hash_types):
    """``(hash_value, hash_report)`` of a frame as the device computes them: ``(0, 0)``
    when the packet is not hashed."""
    data, report = rss_input(frame, hash_types)
    if not report:
        return (0, 0)
    return (toeplitz_hash(bytes(key).ljust(len(data) + 4, b"\0"), data), report)
