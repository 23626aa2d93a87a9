/* pmd_virtio_net.h: the header that precedes every packet (Virtio 1.2 5.1.6).
 *
 * With VIRTIO_F_VERSION_1 the header is always 12 bytes: num_buffers is present
 * even without VIRTIO_NET_F_MRG_RXBUF. A transitional device driven through
 * the legacy interface cannot negotiate VERSION_1 (bit 32; legacy feature
 * registers are 32 bits), and there the header is 10 bytes unless MRG_RXBUF
 * is negotiated (5.1.6.1, "Legacy Interface"). So the header length is a
 * parameter of each queue: 12 by default, 10 for such legacy devices.
 */
#ifndef PMD_VIRTIO_NET_H
#define PMD_VIRTIO_NET_H

#include "pmd_compiler.h"

#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_F_DATA_VALID 2
#define VIRTIO_NET_HDR_GSO_NONE     0

struct virtio_net_hdr {
    uint8_t  flags;        /* VIRTIO_NET_HDR_F_* */
    uint8_t  gso_type;     /* VIRTIO_NET_HDR_GSO_* */
    uint16_t hdr_len;      /* ethernet + ip + tcp/udp headers (GSO) */
    uint16_t gso_size;     /* bytes per segment (GSO) */
    uint16_t csum_start;   /* where to start checksumming (NEEDS_CSUM) */
    uint16_t csum_offset;  /* where to store it, from csum_start */
    uint16_t num_buffers;  /* rx buffers this packet spans (MRG_RXBUF) */
};

PMD_LAYOUT(struct virtio_net_hdr, 12);
PMD_OFFSET(struct virtio_net_hdr, num_buffers, 10);

/* With VIRTIO_NET_F_HASH_REPORT the header grows by the hash the device computed
 * (5.1.6: struct virtio_net_hdr_v1_hash), in both directions; the driver zeroes
 * the extra fields on transmit. */
struct virtio_net_hdr_v1_hash {
    uint8_t  flags;
    uint8_t  gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
    uint32_t hash_value;   /* the RSS hash (5.1.6.4.3) */
    uint16_t hash_report;  /* VIRTIO_NET_HASH_REPORT_*: which fields it was computed over */
    uint16_t padding;
};

PMD_LAYOUT(struct virtio_net_hdr_v1_hash, 20);
PMD_OFFSET(struct virtio_net_hdr_v1_hash, num_buffers, 10);
PMD_OFFSET(struct virtio_net_hdr_v1_hash, hash_value, 12);
PMD_OFFSET(struct virtio_net_hdr_v1_hash, hash_report, 16);

#define VIRTIO_NET_HDR_LEN_HASH   20u  /* HASH_REPORT */
#define VIRTIO_NET_HDR_LEN        12u  /* VERSION_1 */
#define VIRTIO_NET_HDR_LEN_LEGACY 10u  /* legacy without MRG_RXBUF */

#endif /* PMD_VIRTIO_NET_H */
