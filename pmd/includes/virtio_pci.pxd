# Declarations of csrc/pmd_virtio_pci.h: virtio PCI capabilities (4.1.4).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "pmd_virtio_pci.h" nogil:
    enum:
        VIRTIO_PCI_CAP_COMMON_CFG
        VIRTIO_PCI_CAP_NOTIFY_CFG
        VIRTIO_PCI_CAP_ISR_CFG
        VIRTIO_PCI_CAP_DEVICE_CFG
        VIRTIO_PCI_CAP_PCI_CFG
        VIRTIO_MSI_NO_VECTOR
        VIRTIO_STATUS_ACKNOWLEDGE
        VIRTIO_STATUS_DRIVER
        VIRTIO_STATUS_DRIVER_OK
        VIRTIO_STATUS_FEATURES_OK
        VIRTIO_STATUS_DEVICE_NEEDS_RESET
        VIRTIO_STATUS_FAILED

    struct virtio_pci_cap:
        uint8_t cap_vndr
        uint8_t cap_next
        uint8_t cap_len
        uint8_t cfg_type
        uint8_t bar
        uint8_t id
        uint32_t offset
        uint32_t length

    struct virtio_pci_common_cfg:
        uint32_t device_feature_select
        uint32_t device_feature
        uint32_t driver_feature_select
        uint32_t driver_feature
        uint16_t config_msix_vector
        uint16_t num_queues
        uint8_t device_status
        uint8_t config_generation
        uint16_t queue_select
        uint16_t queue_size
        uint16_t queue_msix_vector
        uint16_t queue_enable
        uint16_t queue_notify_off
        uint64_t queue_desc
        uint64_t queue_driver
        uint64_t queue_device
