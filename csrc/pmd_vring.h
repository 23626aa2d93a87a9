/* pmd_vring.h: the split virtqueue as the device sees it (Virtio 1.2 section 2.7),
 * and the packed one (2.8, in its own block at the end).
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

/* One entry of an indirect table (2.7.5.3, 2.8.7) copied out once. A table may
 * lie "anywhere in memory": no alignment is promised, so it is copied as bytes,
 * and the compiler barrier keeps the compiler from reading the table again in
 * place of the copy (the driver may be changing it). */
PMD_ALWAYS_INLINE void vring_copy_desc(void *dst, const void *table, uint32_t i)
{
    __builtin_memcpy(dst, (const char *)table + 16u * (size_t)i, 16);
    __asm__ __volatile__("" : : : "memory");
}

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

/* ---- packed ring (2.8) ---------------------------------------------------
 *
 * One queue of N descriptors (1 <= N <= 32768; 2.8 needs no power of two) is
 * one ring both sides write and two small structures, one per side:
 *
 *   descriptor ring            16*N bytes, align 16  (2.8.13)  driver and device
 *   +---------------------------------------------+
 *   | addr (le64) | len (le32) | id (le16) | flags |  x N
 *   +---------------------------------------------+
 *   driver event suppression   4 bytes, align 4  (2.8.14)  driver writes, device reads
 *   device event suppression   4 bytes, align 4            device writes, driver reads
 *   +-------------------------------+---------------------+
 *   | off_wrap: off:15, wrap:1      | flags: 2 bits       |
 *   +-------------------------------+---------------------+
 *
 * A descriptor is available when its AVAIL bit equals the reader's wrap
 * counter and its USED bit does not; used when both equal the writer's
 * (2.8.1). Both wrap counters start at 1 and flip at the ring's end. A chain
 * is consecutive descriptors linked by NEXT (VRING_DESC_F_NEXT, same value),
 * its buffer id in the last one (2.8.6); the device writes one used
 * descriptor per chain and skips the rest of the chain's slots.
 */
#define VIRTQ_DESC_F_AVAIL   (1u << 7)    /* 2.8.1: available when == driver wrap counter */
#define VIRTQ_DESC_F_USED    (1u << 15)   /* 2.8.1: used when AVAIL == USED == device wrap counter */
/* Both bits: on a lap with wrap counter 1 an available descriptor has AVAIL only and a
 * used one both, with 0 USED only and neither. Flipping both moves to the next lap. */
#define PVIRTQ_AVAIL_USED    (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)

#define RING_EVENT_FLAGS_ENABLE  0x0      /* 2.8.10: notify on every change */
#define RING_EVENT_FLAGS_DISABLE 0x1      /* never notify */
#define RING_EVENT_FLAGS_DESC    0x2      /* only at off_wrap (needs VIRTIO_F_RING_EVENT_IDX) */
#define RING_EVENT_FLAGS_MASK    0x3      /* the field is 2 bits; 0x3 is reserved */
#define RING_EVENT_WRAP_SHIFT    15       /* off_wrap: offset in bits 0-14, wrap counter in bit 15 */

#define VIRTIO_F_RING_PACKED     34

struct pvirtq_desc {
    uint64_t addr;   /* bus address (IOVA) of the buffer; unused in a used descriptor */
    uint32_t len;    /* its length; in a used descriptor, bytes written (with WRITE) */
    uint16_t id;     /* buffer id: in the last descriptor of a chain, and in a used one */
    uint16_t flags;  /* VRING_DESC_F_NEXT/WRITE/INDIRECT, VIRTQ_DESC_F_AVAIL/USED */
};

struct pvirtq_event_suppress {
    uint16_t off_wrap;  /* desc_event_off:15, desc_event_wrap:1 (with RING_EVENT_FLAGS_DESC) */
    uint16_t flags;     /* desc_event_flags:2, reserved:14 */
};

PMD_LAYOUT(struct pvirtq_desc, 16);
PMD_OFFSET(struct pvirtq_desc, len, 8);
PMD_OFFSET(struct pvirtq_desc, id, 12);
PMD_OFFSET(struct pvirtq_desc, flags, 14);
PMD_LAYOUT(struct pvirtq_event_suppress, 4);
PMD_OFFSET(struct pvirtq_event_suppress, flags, 2);

PMD_ALWAYS_INLINE size_t pvirtq_desc_bytes(uint32_t num) { return 16u * (size_t)num; }

/* Bytes of one packed queue laid out contiguously, as pmd's driver does: the
 * ring, then the driver's and the device's event suppression structures. */
PMD_ALWAYS_INLINE size_t pvirtq_size(uint32_t num) { return pvirtq_desc_bytes(num) + 8u; }

/* 2.8.1: is a descriptor with these flags available to a reader whose wrap counter is wrap? */
PMD_ALWAYS_INLINE int pvirtq_desc_is_avail(uint16_t flags, int wrap)
{
    return !!(flags & VIRTQ_DESC_F_AVAIL) == !!wrap && !!(flags & VIRTQ_DESC_F_USED) != !!wrap;
}

/* A ring position (offset, wrap counter) as one number in [0, 2N): the offset,
 * plus N while the wrap counter is 0. A position runs through 0..2N-1 over
 * two laps, so "how far from a to b" is (b - a) mod 2N, for any N. */
PMD_ALWAYS_INLINE uint32_t pvirtq_position(uint32_t num, uint32_t off, int wrap)
{
    return off + (wrap ? 0u : num);
}

/* 2.8.10 with EVENT_IDX: the other side asked for a notification when the
 * descriptor at off_wrap is made available/used. Positions moved from old to
 * new (both from pvirtq_position, new - old <= N): did they pass it, i.e. is
 * the event in [old, new) modulo 2N? off_wrap is untrusted: any value gives
 * some answer and touches nothing. */
PMD_ALWAYS_INLINE int pvirtq_need_event(uint32_t num, uint16_t off_wrap, uint32_t new_pos, uint32_t old_pos)
{
    uint32_t two = 2u * num;
    uint32_t ev = pvirtq_position(num, off_wrap & 0x7fffu, off_wrap >> RING_EVENT_WRAP_SHIFT) % two;
    return (new_pos + two - ev - 1u) % two < (new_pos + two - old_pos) % two;
}

/* Is the event at off_wrap behind used_pos, i.e. a descriptor the other side has
 * already used? Positions up to one lap ahead of used_pos are in flight or still to
 * come (a device may ask for a later one to batch its notifications); the lap behind
 * it is done, so a request there can never be met by what is added next: stale.
 * Untrusted off_wrap: any value gives some answer and touches nothing. */
PMD_ALWAYS_INLINE int pvirtq_event_stale(uint32_t num, uint16_t off_wrap, uint32_t used_pos)
{
    uint32_t two = 2u * num;
    uint32_t ev = pvirtq_position(num, off_wrap & 0x7fffu, off_wrap >> RING_EVENT_WRAP_SHIFT) % two;
    return (ev + two - used_pos) % two > num;
}

#endif /* PMD_VRING_H */
