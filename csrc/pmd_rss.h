/* pmd_rss.h: the hash of receive-side scaling (Virtio 1.2 5.1.6.4.3, 5.1.6.5.7).
 *
 * Two steps, each usable alone:
 *   pmd_rss_input()  picks the fields a packet is hashed over, by the enabled
 *                    hash types (5.1.6.4.3.2-4): source and destination address,
 *                    then source and destination port for TCP/UDP, in network
 *                    order, and says which hash_report that is (5.1.6.4.4);
 *   pmd_toeplitz()   the Toeplitz hash of those bytes under a key, as in
 *                    Microsoft's "Verifying the RSS Hash Calculation".
 * The frame is untrusted (it comes from the wire, or from a driver in a
 * loopback): every read is inside `len`, and a header that does not fit makes
 * the packet less classified, never a read past its end.
 */
#ifndef PMD_RSS_H
#define PMD_RSS_H

#include "pmd_compiler.h"

#define PMD_RSS_HASH_TYPE_IPv4   (1u << 0)
#define PMD_RSS_HASH_TYPE_TCPv4  (1u << 1)
#define PMD_RSS_HASH_TYPE_UDPv4  (1u << 2)
#define PMD_RSS_HASH_TYPE_IPv6   (1u << 3)
#define PMD_RSS_HASH_TYPE_TCPv6  (1u << 4)
#define PMD_RSS_HASH_TYPE_UDPv6  (1u << 5)

#define PMD_RSS_REPORT_NONE  0
#define PMD_RSS_REPORT_IPv4  1
#define PMD_RSS_REPORT_TCPv4 2
#define PMD_RSS_REPORT_UDPv4 3
#define PMD_RSS_REPORT_IPv6  4
#define PMD_RSS_REPORT_TCPv6 5
#define PMD_RSS_REPORT_UDPv6 6

#define PMD_RSS_INPUT_MAX 36u   /* IPv6 source, destination, two ports */
#define PMD_RSS_KEY_MAX   40u   /* rss_max_key_size: enough for PMD_RSS_INPUT_MAX + 4 (5.1.4.1) */
#define PMD_RSS_EXT_MAX   8     /* IPv6 extension headers skipped at most */

static inline uint16_t pmd_rss_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* The Toeplitz hash: for every set bit i of the input (most significant first),
 * XOR in the 32 key bits starting at key bit i. Key bytes past key_len count as
 * zero, so a key shorter than input + 4 bytes is still defined. */
static inline uint32_t pmd_toeplitz(const uint8_t *key, uint32_t key_len, const uint8_t *in, uint32_t n)
{
    uint64_t window = 0;   /* key bits [8i, 8i + 64) at input byte i */
    uint32_t hash = 0, i, k;
    int bit;
    for (k = 0; k < 8; k++)
        window = window << 8 | (k < key_len ? key[k] : 0);
    for (i = 0; i < n; i++) {
        for (bit = 0; bit < 8; bit++)
            if (in[i] & (0x80u >> bit))
                hash ^= (uint32_t)(window >> (32 - bit));
        k = i + 8;
        window = window << 8 | (k < key_len ? key[k] : 0);
    }
    return hash;
}

/* Whether an IPv4 or IPv6 payload that starts at `l4` within `len` has room for
 * the two ports (the first 4 bytes of a TCP or a UDP header). */
static inline int pmd_rss_ports(const uint8_t *frame, uint32_t len, uint32_t l4, uint8_t *out)
{
    if (l4 > len || len - l4 < 4)
        return 0;
    out[0] = frame[l4]; out[1] = frame[l4 + 1]; out[2] = frame[l4 + 2]; out[3] = frame[l4 + 3];
    return 1;
}

/* Fill `out` (PMD_RSS_INPUT_MAX bytes) with the hash input of `frame` under the
 * enabled `types`; returns its length (0: the device does not hash the packet,
 * 5.1.6.4.3.2: "Else the device does not calculate the hash") and sets *report. */
static inline uint32_t pmd_rss_input(const uint8_t *frame, uint32_t len, uint32_t types, uint8_t *out,
                                     uint16_t *report)
{
    uint32_t off = 12, l4, ihl, i;
    uint16_t ethertype;
    uint8_t proto;
    int tags;
    *report = PMD_RSS_REPORT_NONE;
    if (len < 14)
        return 0;
    ethertype = pmd_rss_be16(frame + off);
    /* 802.1Q / 802.1ad tags in front of the EtherType: up to two (QinQ) */
    for (tags = 0; tags < 2 && (ethertype == 0x8100 || ethertype == 0x88a8); tags++) {
        off += 4;
        if (off + 2 > len)
            return 0;
        ethertype = pmd_rss_be16(frame + off);
    }
    off += 2;   /* the network header */
    if (ethertype == 0x0800) {
        if (!(types & (PMD_RSS_HASH_TYPE_IPv4 | PMD_RSS_HASH_TYPE_TCPv4 | PMD_RSS_HASH_TYPE_UDPv4)))
            return 0;
        if (len - off < 20 || frame[off] >> 4 != 4)
            return 0;
        ihl = (uint32_t)(frame[off] & 0x0f) * 4;
        if (ihl < 20 || ihl > len - off)
            return 0;
        for (i = 0; i < 8; i++)
            out[i] = frame[off + 12 + i];   /* source, destination address */
        proto = frame[off + 9];
        l4 = off + ihl;
        /* A fragment (more fragments, or an offset) may lack the ports: only the
         * first has them, and the others of its flow must hash alike: addresses only. */
        if (!(pmd_rss_be16(frame + off + 6) & 0x3fff)) {
            if (proto == 6 && types & PMD_RSS_HASH_TYPE_TCPv4 && pmd_rss_ports(frame, len, l4, out + 8)) {
                *report = PMD_RSS_REPORT_TCPv4;
                return 12;
            }
            if (proto == 17 && types & PMD_RSS_HASH_TYPE_UDPv4 && pmd_rss_ports(frame, len, l4, out + 8)) {
                *report = PMD_RSS_REPORT_UDPv4;
                return 12;
            }
        }
        if (types & PMD_RSS_HASH_TYPE_IPv4) {
            *report = PMD_RSS_REPORT_IPv4;
            return 8;
        }
        return 0;
    }
    if (ethertype == 0x86dd) {
        int ext, fragment = 0;
        if (!(types & (PMD_RSS_HASH_TYPE_IPv6 | PMD_RSS_HASH_TYPE_TCPv6 | PMD_RSS_HASH_TYPE_UDPv6)))
            return 0;
        if (len - off < 40 || frame[off] >> 4 != 6)
            return 0;
        for (i = 0; i < 32; i++)
            out[i] = frame[off + 8 + i];
        proto = frame[off + 6];
        l4 = off + 40;
        /* 5.1.6.4.3.4: without the _EX types, extension headers are skipped and the
         * packet hashed as one without them. Hop-by-hop (0), routing (43) and
         * destination options (60) are (len + 1) * 8 bytes, authentication (51)
         * (len + 2) * 4, fragment (44) 8; past a fragment with an offset or more
         * to come, the ports are not used (as for IPv4). */
        for (ext = 0; ext < PMD_RSS_EXT_MAX && (proto == 0 || proto == 43 || proto == 60 || proto == 51
                                               || proto == 44); ext++) {
            uint32_t hlen;
            if (l4 > len || len - l4 < 8) {
                fragment = 1;       /* cut short: no transport header to find */
                break;
            }
            if (proto == 44) {
                hlen = 8;
                if (pmd_rss_be16(frame + l4 + 2) & 0xfff9)
                    fragment = 1;   /* offset (bits 15-3) or M (bit 0) */
            } else if (proto == 51) {
                hlen = ((uint32_t)frame[l4 + 1] + 2) * 4;
            } else {
                hlen = ((uint32_t)frame[l4 + 1] + 1) * 8;
            }
            proto = frame[l4];
            l4 += hlen;
        }
        if (!fragment && (proto == 6 || proto == 17)) {
            if (proto == 6 && types & PMD_RSS_HASH_TYPE_TCPv6 && pmd_rss_ports(frame, len, l4, out + 32)) {
                *report = PMD_RSS_REPORT_TCPv6;
                return 36;
            }
            if (proto == 17 && types & PMD_RSS_HASH_TYPE_UDPv6 && pmd_rss_ports(frame, len, l4, out + 32)) {
                *report = PMD_RSS_REPORT_UDPv6;
                return 36;
            }
        }
        if (types & PMD_RSS_HASH_TYPE_IPv6) {
            *report = PMD_RSS_REPORT_IPv6;
            return 32;
        }
        return 0;
    }
    return 0;
}

#endif /* PMD_RSS_H */
