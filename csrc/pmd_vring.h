/* pmd_vring.h: the split virtqueue as the device sees it (Virtio 1.2 section 2.7).
 *
 * One queue of N entries (N a power of two, at most 32768) is three areas in
 * memory the device can reach by DMA:
 *
 *   descriptor table   16*N bytes, align 16   (2.7.5)  written by the driver
 *   +-------------------------------------------+
 *   | addr (le64) | len (le32) | flags | next    |  x N
 *   +-------------------------------------------+
 *   available ring     6+2*N bytes, align 2    (2.7.6)  written by the driver
 *   +-------+-----+------------------+------------+
 *   | flags | idx | ring[N] (heads)  | used_event |
 *   +-------+-----+------------------+------------+
 *   used ring          6+8*N bytes, align 4    (2.7.8)  written by the device
 *   +-------+-----+--------------------------+-------------+
 *   | flags | idx | ring[N] {id le32,len le32} | avail_event |
 *   +-------+-----+--------------------------+-------------+
 *
 * used_event and avail_event exist only with VIRTIO_F_EVENT_IDX (2.7.7, 2.7.10).
 * idx fields are free-running 16-bit counters: entry = idx & (N - 1), and they
 * wrap at 65536 by unsigned arithmetic, never by a comparison against N.
 *
 * The legacy interface (2.7.2 "Legacy Interfaces") needs the three areas
 * contiguous, with the used ring aligned to 4096; pmd always lays them out
 * that way (vring_size with the alignment of the transport), which is also
 * valid for the modern interface.
 *
 * All fields are little-endian on the wire (virtio 1.x). pmd supports
 * little-endian hosts only, checked below.
 */
#ifndef PMD_VRING_H
#define PMD_VRING_H

#include "pmd_compiler.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pmd: virtio 1.x rings are little-endian; big-endian hosts are not supported"
#endif

#define VRING_DESC_F_NEXT      1  /* chain continues in .next (2.7.5) */
#define VRING_DESC_F_WRITE     2  /* device writes this buffer (device-writable) */
#define VRING_DESC_F_INDIRECT  4  /* buffer holds a table of descriptors (2.7.5.3) */

#define VRING_AVAIL_F_NO_INTERRUPT 1  /* driver: don't interrupt me (2.7.7) */
#define VRING_USED_F_NO_NOTIFY     1  /* device: don't notify me (2.7.10) */

#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX     29

#define VRING_MAX_SIZE   32768u      /* 2.7: Queue Size <= 32768 */
#define VRING_LEGACY_ALIGN 4096u     /* VIRTIO_PCI_VRING_ALIGN, legacy used ring */

struct vring_desc {
    uint64_t addr;   /* bus address (IOVA) of the buffer */
    uint32_t len;    /* its length in bytes */
    uint16_t flags;  /* VRING_DESC_F_* */
    uint16_t next;   /* next descriptor when flags & NEXT */
};

struct vring_avail {
    uint16_t flags;  /* VRING_AVAIL_F_NO_INTERRUPT */
    uint16_t idx;    /* where the driver puts the next head (free-running) */
    uint16_t ring[]; /* heads of chains; then used_event (EVENT_IDX) */
};

struct vring_used_elem {
    uint32_t id;     /* head of the chain the device finished */
    uint32_t len;    /* bytes the device wrote into it */
};

struct vring_used {
    uint16_t flags;  /* VRING_USED_F_NO_NOTIFY */
    uint16_t idx;    /* where the device puts the next entry (free-running) */
    struct vring_used_elem ring[];  /* then avail_event (EVENT_IDX) */
};

PMD_LAYOUT(struct vring_desc, 16);
PMD_OFFSET(struct vring_desc, len, 8);
PMD_OFFSET(struct vring_desc, flags, 12);
PMD_OFFSET(struct vring_desc, next, 14);
PMD_LAYOUT(struct vring_avail, 4);
PMD_OFFSET(struct vring_avail, ring, 4);
PMD_LAYOUT(struct vring_used_elem, 8);
PMD_LAYOUT(struct vring_used, 4);
PMD_OFFSET(struct vring_used, ring, 4);


/* Ring fields the other side writes (or reads) concurrently are accessed
 * exactly once, at exactly their width, through these: a plain access could be
 * repeated, torn, or hoisted out of a polling loop by the compiler. Ordering
 * between them is the caller's job, with the pmd_virtio_* barriers. */
PMD_ALWAYS_INLINE uint16_t vring_load16(const uint16_t *p) { return *(const volatile uint16_t *)p; }
PMD_ALWAYS_INLINE uint32_t vring_load32(const uint32_t *p) { return *(const volatile uint32_t *)p; }
PMD_ALWAYS_INLINE uint64_t vring_load64(const uint64_t *p) { return *(const volatile uint64_t *)p; }
PMD_ALWAYS_INLINE void vring_store16(uint16_t *p, uint16_t v) { *(volatile uint16_t *)p = v; }
PMD_ALWAYS_INLINE void vring_store32(uint32_t *p, uint32_t v) { *(volatile uint32_t *)p = v; }

/* Pointers to the three areas of one queue. */
struct vring {
    uint32_t num;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
};

/* 2.7.6 / 2.7.8: the event fields sit just past the last ring entry. */
/* Access them with vring_load16 / vring_store16 like every shared field. */
PMD_ALWAYS_INLINE uint16_t *vring_used_event(const struct vring *vr)
{
    return &vr->avail->ring[vr->num];
}
PMD_ALWAYS_INLINE uint16_t *vring_avail_event(const struct vring *vr)
{
    return (uint16_t *)&vr->used->ring[vr->num];
}

PMD_ALWAYS_INLINE size_t vring_desc_bytes(uint32_t num)  { return 16u * (size_t)num; }
PMD_ALWAYS_INLINE size_t vring_avail_bytes(uint32_t num) { return 6u + 2u * (size_t)num; }
PMD_ALWAYS_INLINE size_t vring_used_bytes(uint32_t num)  { return 6u + 8u * (size_t)num; }

/* Bytes of one contiguous queue whose used ring starts on an 'align' boundary
 * (align a power of two, >= 4). Same value as Linux's vring_size(). */
PMD_ALWAYS_INLINE size_t vring_size(uint32_t num, size_t align)
{
    size_t used_off = (vring_desc_bytes(num) + vring_avail_bytes(num) + align - 1) & ~(align - 1);
    return used_off + vring_used_bytes(num);
}

/* Lay a queue out at p (which must be 16-byte aligned). */
PMD_ALWAYS_INLINE void vring_init(struct vring *vr, uint32_t num, void *p, size_t align)
{
    vr->num = num;
    vr->desc = (struct vring_desc *)p;
    vr->avail = (struct vring_avail *)((char *)p + vring_desc_bytes(num));
    vr->used = (struct vring_used *)(((uintptr_t)&vr->avail->ring[num] + sizeof(uint16_t)
                                      + align - 1) & ~(uintptr_t)(align - 1));
}

/* 2.7.7.2 / 2.7.10.2: with EVENT_IDX, the other side wants to be told when the
 * index moves from old to new_idx past event_idx, i.e. event_idx is in
 * [old, new_idx). All arithmetic is modulo 2^16. */
PMD_ALWAYS_INLINE int vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

#endif /* PMD_VRING_H */
