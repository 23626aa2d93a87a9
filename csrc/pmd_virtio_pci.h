/* pmd_virtio_pci.h: virtio structures in PCI config space and BARs
 * (Virtio 1.2 section 4.1.4 "Virtio Structure PCI Capabilities").
 *
 * The driver finds each structure through a vendor-specific capability
 * (cap_vndr 0x09) in config space that names a BAR, an offset and a length;
 * the structure itself lives in that BAR and is accessed with the MMIO
 * helpers of pmd_mmio.h, field by field, at the field's own width.
 */
#ifndef PMD_VIRTIO_PCI_H
#define PMD_VIRTIO_PCI_H

#include "pmd_compiler.h"

#define VIRTIO_PCI_CAP_COMMON_CFG 1  /* 4.1.4.3 */
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2  /* 4.1.4.4 */
#define VIRTIO_PCI_CAP_ISR_CFG    3  /* 4.1.4.5 */
#define VIRTIO_PCI_CAP_DEVICE_CFG 4  /* 4.1.4.6 */
#define VIRTIO_PCI_CAP_PCI_CFG    5  /* 4.1.4.8 */

/* 4.1.4: in config space, at the capability's position. */
struct virtio_pci_cap {
    uint8_t  cap_vndr;    /* 0x09, PCI_CAP_ID_VNDR */
    uint8_t  cap_next;    /* next capability pointer */
    uint8_t  cap_len;     /* length of this capability, >= 16 */
    uint8_t  cfg_type;    /* VIRTIO_PCI_CAP_* */
    uint8_t  bar;         /* BAR index 0..5 */
    uint8_t  id;          /* several of one type may exist */
    uint8_t  padding[2];
    uint32_t offset;      /* of the structure within the BAR (le32) */
    uint32_t length;      /* of the structure (le32) */
};

/* 4.1.4.4: the notify capability adds the queue_notify_off multiplier. */
struct virtio_pci_notify_cap {
    struct virtio_pci_cap cap;
    uint32_t notify_off_multiplier;  /* notify address = offset + queue_notify_off * this */
};

/* 4.1.4.3: common configuration, in the BAR. */
struct virtio_pci_common_cfg {
    /* About the whole device. */
    uint32_t device_feature_select;  /* read-write */
    uint32_t device_feature;         /* read-only for driver */
    uint32_t driver_feature_select;  /* read-write */
    uint32_t driver_feature;         /* read-write */
    uint16_t config_msix_vector;     /* read-write, 0xffff = none */
    uint16_t num_queues;             /* read-only for driver */
    uint8_t  device_status;          /* read-write */
    uint8_t  config_generation;      /* read-only for driver */

    /* About a specific virtqueue, the one in queue_select. */
    uint16_t queue_select;           /* read-write */
    uint16_t queue_size;             /* read-write, power of 2 (split) */
    uint16_t queue_msix_vector;      /* read-write, 0xffff = none */
    uint16_t queue_enable;           /* read-write */
    uint16_t queue_notify_off;       /* read-only for driver */
    uint64_t queue_desc;             /* read-write */
    uint64_t queue_driver;           /* read-write (the available ring) */
    uint64_t queue_device;           /* read-write (the used ring) */
};

PMD_LAYOUT(struct virtio_pci_cap, 16);
PMD_LAYOUT(struct virtio_pci_notify_cap, 20);
PMD_LAYOUT(struct virtio_pci_common_cfg, 56);
PMD_OFFSET(struct virtio_pci_common_cfg, config_msix_vector, 16);
PMD_OFFSET(struct virtio_pci_common_cfg, device_status, 20);
PMD_OFFSET(struct virtio_pci_common_cfg, queue_select, 22);
PMD_OFFSET(struct virtio_pci_common_cfg, queue_notify_off, 30);
PMD_OFFSET(struct virtio_pci_common_cfg, queue_desc, 32);
PMD_OFFSET(struct virtio_pci_common_cfg, queue_driver, 40);
PMD_OFFSET(struct virtio_pci_common_cfg, queue_device, 48);

/* 2.1 Device Status Field */
#define VIRTIO_STATUS_ACKNOWLEDGE        1
#define VIRTIO_STATUS_DRIVER             2
#define VIRTIO_STATUS_DRIVER_OK          4
#define VIRTIO_STATUS_FEATURES_OK        8
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED             128

#define VIRTIO_MSI_NO_VECTOR 0xffff

#endif /* PMD_VIRTIO_PCI_H */
