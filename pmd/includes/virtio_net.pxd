# Declarations of csrc/pmd_virtio_net.h: the virtio-net packet header (5.1.6).
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "pmd_virtio_net.h" nogil:
    enum:
        VIRTIO_NET_HDR_LEN
        VIRTIO_NET_HDR_LEN_LEGACY
        VIRTIO_NET_HDR_LEN_HASH

    struct virtio_net_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset
        uint16_t num_buffers

    struct virtio_net_hdr_v1_hash:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset
        uint16_t num_buffers
        uint32_t hash_value
        uint16_t hash_report
        uint16_t padding
