# Declarations of csrc/pmd_vring.h: the split virtqueue (Virtio 1.2 2.7) and the packed one (2.8).
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "pmd_vring.h" nogil:
    enum:
        VRING_DESC_F_NEXT
        VRING_DESC_F_WRITE
        VRING_DESC_F_INDIRECT
        VRING_AVAIL_F_NO_INTERRUPT
        VRING_USED_F_NO_NOTIFY
        VIRTIO_RING_F_INDIRECT_DESC
        VIRTIO_RING_F_EVENT_IDX
        VRING_MAX_SIZE
        VRING_LEGACY_ALIGN

    struct vring_desc:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next

    struct vring_avail:
        uint16_t flags
        uint16_t idx
        uint16_t ring[1]

    struct vring_used_elem:
        uint32_t id
        uint32_t len

    struct vring_used:
        uint16_t flags
        uint16_t idx
        vring_used_elem ring[1]

    struct vring:
        uint32_t num
        vring_desc *desc
        vring_avail *avail
        vring_used *used

    uint16_t *vring_used_event(const vring *vr)
    uint16_t *vring_avail_event(const vring *vr)
    size_t vring_desc_bytes(uint32_t num)
    size_t vring_avail_bytes(uint32_t num)
    size_t vring_used_bytes(uint32_t num)
    size_t vring_size(uint32_t num, size_t align)
    void vring_init(vring *vr, uint32_t num, void *p, size_t align)
    bint vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)

    uint16_t vring_load16(const uint16_t *p)
    uint32_t vring_load32(const uint32_t *p)
    uint64_t vring_load64(const uint64_t *p)
    void vring_store16(uint16_t *p, uint16_t v)
    void vring_store32(uint32_t *p, uint32_t v)
    void vring_copy_desc(void *dst, const void *table, uint32_t i)


# ---- packed ring (2.8) ----
cdef extern from "pmd_vring.h" nogil:
    enum:
        VIRTQ_DESC_F_AVAIL
        VIRTQ_DESC_F_USED
        PVIRTQ_AVAIL_USED
        RING_EVENT_FLAGS_ENABLE
        RING_EVENT_FLAGS_DISABLE
        RING_EVENT_FLAGS_DESC
        RING_EVENT_FLAGS_MASK
        RING_EVENT_WRAP_SHIFT
        VIRTIO_F_RING_PACKED

    struct pvirtq_desc:
        uint64_t addr
        uint32_t len
        uint16_t id
        uint16_t flags

    struct pvirtq_event_suppress:
        uint16_t off_wrap
        uint16_t flags

    size_t pvirtq_desc_bytes(uint32_t num)
    size_t pvirtq_size(uint32_t num)
    bint pvirtq_desc_is_avail(uint16_t flags, int wrap)
    uint32_t pvirtq_position(uint32_t num, uint32_t off, int wrap)
    bint pvirtq_need_event(uint32_t num, uint16_t off_wrap, uint32_t new_pos, uint32_t old_pos)
    bint pvirtq_event_stale(uint32_t num, uint16_t off_wrap, uint32_t used_pos)
