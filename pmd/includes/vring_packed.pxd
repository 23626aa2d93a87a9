# Declarations of csrc/pmd_vring_packed.h: the packed virtqueue (Virtio 1.2 2.8).
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "pmd_vring_packed.h" nogil:
    enum:
        VRING_PACKED_DESC_F_AVAIL
        VRING_PACKED_DESC_F_USED
        VRING_PACKED_EVENT_FLAG_ENABLE
        VRING_PACKED_EVENT_FLAG_DISABLE
        VRING_PACKED_EVENT_FLAG_DESC
        VRING_PACKED_EVENT_F_WRAP_CTR
        VIRTIO_F_RING_PACKED

    struct vring_packed_desc:
        uint64_t addr
        uint32_t len
        uint16_t id
        uint16_t flags

    struct vring_packed_desc_event:
        uint16_t off_wrap
        uint16_t flags

    size_t vring_packed_size(uint32_t num)
