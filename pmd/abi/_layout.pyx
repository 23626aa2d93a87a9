"""The csrc/ layouts as the C compiler laid them out: sizes, field offsets, constants.

Nothing here is used at run time. tests/test_layout.py holds the Python tables
of the vocabulary (:mod:`pmd.abi.virtio`, :mod:`pmd.abi.virtio_net`,
:mod:`pmd.abi.virtio_pci`) against these figures, so the one definition in
Python and the C structures the Cython core uses cannot drift apart. The headers
also ``static_assert`` their own sizes and the offsets that matter most.
"""

from pmd.includes.virtio_net cimport (VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_LEN_HASH, VIRTIO_NET_HDR_LEN_LEGACY,
                                      virtio_net_hdr, virtio_net_hdr_v1_hash)
from pmd.includes.virtio_pci cimport (
    VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_PCI_CFG, VIRTIO_STATUS_ACKNOWLEDGE, VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_STATUS_DRIVER, VIRTIO_STATUS_DRIVER_OK, VIRTIO_STATUS_FAILED, VIRTIO_STATUS_FEATURES_OK,
    virtio_pci_cap, virtio_pci_common_cfg,
)
from pmd.includes.vring cimport vring_desc, vring_used_elem


def struct_sizes():
    """sizeof of the C layouts, as compiled."""
    return {"vring_desc": sizeof(vring_desc), "vring_used_elem": sizeof(vring_used_elem),
            "vring_avail": 4, "vring_used": 4, "virtio_net_hdr": sizeof(virtio_net_hdr),
            "virtio_net_hdr_v1_hash": sizeof(virtio_net_hdr_v1_hash),
            "virtio_pci_cap": sizeof(virtio_pci_cap),
            "virtio_pci_common_cfg": sizeof(virtio_pci_common_cfg)}


def common_cfg_layout():
    """``struct virtio_pci_common_cfg``: field name -> (offset, width) as compiled."""
    cdef virtio_pci_common_cfg c
    cdef char *base = <char *>&c
    return {
        "device_feature_select": (<char *>&c.device_feature_select - base, sizeof(c.device_feature_select)),
        "device_feature": (<char *>&c.device_feature - base, sizeof(c.device_feature)),
        "driver_feature_select": (<char *>&c.driver_feature_select - base, sizeof(c.driver_feature_select)),
        "driver_feature": (<char *>&c.driver_feature - base, sizeof(c.driver_feature)),
        "config_msix_vector": (<char *>&c.config_msix_vector - base, sizeof(c.config_msix_vector)),
        "num_queues": (<char *>&c.num_queues - base, sizeof(c.num_queues)),
        "device_status": (<char *>&c.device_status - base, sizeof(c.device_status)),
        "config_generation": (<char *>&c.config_generation - base, sizeof(c.config_generation)),
        "queue_select": (<char *>&c.queue_select - base, sizeof(c.queue_select)),
        "queue_size": (<char *>&c.queue_size - base, sizeof(c.queue_size)),
        "queue_msix_vector": (<char *>&c.queue_msix_vector - base, sizeof(c.queue_msix_vector)),
        "queue_enable": (<char *>&c.queue_enable - base, sizeof(c.queue_enable)),
        "queue_notify_off": (<char *>&c.queue_notify_off - base, sizeof(c.queue_notify_off)),
        "queue_desc": (<char *>&c.queue_desc - base, sizeof(c.queue_desc)),
        "queue_driver": (<char *>&c.queue_driver - base, sizeof(c.queue_driver)),
        "queue_device": (<char *>&c.queue_device - base, sizeof(c.queue_device)),
    }


def net_hdr_layout():
    """``struct virtio_net_hdr``: field name -> (offset, width) as compiled."""
    cdef virtio_net_hdr h
    cdef char *base = <char *>&h
    return {
        "flags": (<char *>&h.flags - base, sizeof(h.flags)),
        "gso_type": (<char *>&h.gso_type - base, sizeof(h.gso_type)),
        "hdr_len": (<char *>&h.hdr_len - base, sizeof(h.hdr_len)),
        "gso_size": (<char *>&h.gso_size - base, sizeof(h.gso_size)),
        "csum_start": (<char *>&h.csum_start - base, sizeof(h.csum_start)),
        "csum_offset": (<char *>&h.csum_offset - base, sizeof(h.csum_offset)),
        "num_buffers": (<char *>&h.num_buffers - base, sizeof(h.num_buffers)),
    }


def net_hdr_hash_layout():
    """``struct virtio_net_hdr_v1_hash``'s fields after ``num_buffers``: name -> (offset, width)."""
    cdef virtio_net_hdr_v1_hash h
    cdef char *base = <char *>&h
    return {
        "hash_value": (<char *>&h.hash_value - base, sizeof(h.hash_value)),
        "hash_report": (<char *>&h.hash_report - base, sizeof(h.hash_report)),
        "padding": (<char *>&h.padding - base, sizeof(h.padding)),
    }


def constants():
    """The numbers csrc/ defines that the Python vocabulary defines too."""
    return {
        "STATUS_ACKNOWLEDGE": VIRTIO_STATUS_ACKNOWLEDGE, "STATUS_DRIVER": VIRTIO_STATUS_DRIVER,
        "STATUS_DRIVER_OK": VIRTIO_STATUS_DRIVER_OK, "STATUS_FEATURES_OK": VIRTIO_STATUS_FEATURES_OK,
        "STATUS_DEVICE_NEEDS_RESET": VIRTIO_STATUS_DEVICE_NEEDS_RESET, "STATUS_FAILED": VIRTIO_STATUS_FAILED,
        "NO_VECTOR": VIRTIO_MSI_NO_VECTOR,
        "VIRTIO_PCI_CAP_COMMON_CFG": VIRTIO_PCI_CAP_COMMON_CFG, "VIRTIO_PCI_CAP_NOTIFY_CFG": VIRTIO_PCI_CAP_NOTIFY_CFG,
        "VIRTIO_PCI_CAP_ISR_CFG": VIRTIO_PCI_CAP_ISR_CFG, "VIRTIO_PCI_CAP_DEVICE_CFG": VIRTIO_PCI_CAP_DEVICE_CFG,
        "VIRTIO_PCI_CAP_PCI_CFG": VIRTIO_PCI_CAP_PCI_CFG,
        "NET_HDR_LEN": VIRTIO_NET_HDR_LEN, "NET_HDR_LEN_LEGACY": VIRTIO_NET_HDR_LEN_LEGACY,
        "NET_HDR_LEN_HASH": VIRTIO_NET_HDR_LEN_HASH,
    }
