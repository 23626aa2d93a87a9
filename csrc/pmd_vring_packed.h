/* pmd_vring_packed.h: the packed virtqueue (Virtio 1.2 section 2.8).
 *
 * One queue of N entries (N at most 32768; a power of two here, as pmd lays
 * rings out) is three areas:
 *
 *   descriptor ring      16*N bytes, align 16  (2.8.13) written by both sides
 *   +------------------------------------------+
 *   | addr (le64) | len (le32) | id | flags     |  x N
 *   +------------------------------------------+
 *   driver event suppression  4 bytes, align 4  (2.8.10) written by the driver
 *   device event suppression  4 bytes, align 4           written by the device
 *   +-------------------+-------------+
 *   | off_wrap (le16)   | flags (le16)|
 *   +-------------------+-------------+
 *
 * The driver makes a descriptor available by writing it with AVAIL = its wrap
 * counter and USED = the inverse (2.8.1); the device marks one used with both
 * bits equal to its wrap counter. Both counters start at 1 and flip each time
 * their side passes the end of the ring. A chain is consecutive descriptors
 * with NEXT (2.8.6); the device writes back one used descriptor per chain,
 * with the buffer id of the chain, and the driver skips as many descriptors
 * as that chain had.
 */
#ifndef PMD_VRING_PACKED_H
#define PMD_VRING_PACKED_H

#include "pmd_compiler.h"

#define VRING_PACKED_DESC_F_AVAIL   (1u << 7)    /* 2.8.1 */
#define VRING_PACKED_DESC_F_USED    (1u << 15)

#define VRING_PACKED_EVENT_FLAG_ENABLE  0u  /* notify / interrupt (2.8.10) */
#define VRING_PACKED_EVENT_FLAG_DISABLE 1u  /* don't */
#define VRING_PACKED_EVENT_FLAG_DESC    2u  /* only past off_wrap (with EVENT_IDX) */
#define VRING_PACKED_EVENT_F_WRAP_CTR   15  /* off_wrap: bit 15 wrap counter, 0..14 offset */

#define VIRTIO_F_RING_PACKED 34

struct vring_packed_desc {
    uint64_t addr;   /* bus address (IOVA) of the buffer */
    uint32_t len;    /* its length; written back by the device: bytes written */
    uint16_t id;     /* buffer id (the chain's, in its last descriptor at least) */
    uint16_t flags;  /* VRING_DESC_F_NEXT/WRITE/INDIRECT, AVAIL, USED */
};

struct vring_packed_desc_event {
    uint16_t off_wrap;
    uint16_t flags;
};

PMD_LAYOUT(struct vring_packed_desc, 16);
PMD_OFFSET(struct vring_packed_desc, len, 8);
PMD_OFFSET(struct vring_packed_desc, id, 12);
PMD_OFFSET(struct vring_packed_desc, flags, 14);
PMD_LAYOUT(struct vring_packed_desc_event, 4);

/* Bytes of one packed queue laid out contiguously: ring, driver area, device area. */
PMD_ALWAYS_INLINE size_t vring_packed_size(uint32_t num) { return 16u * (size_t)num + 8u; }

#endif /* PMD_VRING_PACKED_H */
