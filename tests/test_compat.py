"""The import paths of before the restructuring (issue 9) still work, deprecated.

``pmd._compat`` aliases them: a module that moved whole is the new module, a
split one finds each old public name in its new home. Every public name the old
modules had (listed below, as they were) must still resolve, every old path must
warn ``DeprecationWarning`` once, and the objects must be the new ones (the same
classes, so ``isinstance`` holds across old and new code). Run in a fresh
interpreter: another test importing an old path first would have used up the
one warning.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: old module -> the public names it had (its __all__, or what it defined), before issue 9
OLD_NAMES: dict[str, str] = {
    "pmd._burst": "DEF_HDR_LEN RxQueue TxQueue",
    "pmd._device": (
        "BAD_DESC_NAMES DEFAULT_MAX_READABLE DeviceQueue DmaWindows device_rx_burst device_rx_generate "
        "device_tx_burst loopback"),
    "pmd._memory": "DEFAULT_HUGEPAGE_SIZE DmaMemory MFD_HUGE_2MB",
    "pmd._mmio": "BARRIER_ARCH Mmio",
    "pmd._pool": "DEFAULT_BUFFER_SIZE DEFAULT_HEADROOM MAX_HDR_LEN PacketPool",
    "pmd._virtqueue": "USED_RESULTS Virtqueue need_event ring_layout ring_size struct_sizes",
    "pmd.access": (
        "DeviceAccess DeviceInfo IOVA_SPACE IRQ_INDEX_NAMES IRQ_INFO_AUTOMASKED IRQ_INFO_EVENTFD "
        "IRQ_INFO_MASKABLE IRQ_INFO_NORESIZE InfoCap IrqInfo MemoryMapping PCI_BAR0_REGION_INDEX "
        "PCI_BAR5_REGION_INDEX PCI_BASE_ADDRESS_0 PCI_BASE_ADDRESS_SPACE_IO PCI_COMMAND PCI_COMMAND_IO "
        "PCI_COMMAND_MASTER PCI_COMMAND_MEMORY PCI_CONFIG_REGION_INDEX PCI_ERR_IRQ_INDEX PCI_INTX_IRQ_INDEX "
        "PCI_MSIX_IRQ_INDEX PCI_MSI_IRQ_INDEX PCI_NUM_IRQS PCI_NUM_REGIONS PCI_REQ_IRQ_INDEX "
        "PCI_ROM_REGION_INDEX PCI_VGA_REGION_INDEX REGION_INFO_FLAG_CAPS REGION_INFO_FLAG_MMAP "
        "REGION_INFO_FLAG_READ REGION_INFO_FLAG_WRITE RegionInfo RegionMapping SparseArea choose_iova"),
    "pmd.interrupts": (
        "Callback EventFd FdLike InterruptThread Registration SupportsFileno get_interrupt_thread wait "
        "wait_any"),
    "pmd.pcap": "LINKTYPE_ETHERNET MAGIC PcapWriter read_pcap",
    "pmd.pci": (
        "Bar Capability ConfigSpace DEFAULT_SYSFS_PCI_DEVICES DeviceBusyError ExtendedCapability "
        "MsiCapability MsixCapability NoSuchDeviceError PciAddress PciDevice PcieCapability StatusRow "
        "VFIO_PCI VIRTIO_VENDOR_ID VendorCapability VirtioPciCap VirtioStructures bind device_name "
        "format_info format_status iommu_group parse_address parse_config read_device scan "
        "select_virtio_structures status_rows sysfs_pci_devices unbind"),
    "pmd.port": "Link Port open_port",
    "pmd.shm": "SEALS create_sealed_memfd require_sealed seal_memfd seals_of",
    "pmd.sim.config": "BAR0_SIZE CONFIG_SIZE DEVICE_ID PciConfig VENDOR_ID",
    "pmd.sim.device": "COMMON_FIELDS DEFAULT_MAC NO_VECTOR OFFERED OFFERED_NAMES SimOptions VirtioNetModel",
    "pmd.sim.local": "LocalAccess open_local_port",
    "pmd.vfio": (
        "IommuInfo SYSFS_PCI_DEVICES VFIO_API_VERSION VFIO_BASE VFIO_CHECK_EXTENSION VFIO_CONTAINER_PATH "
        "VFIO_DEVICE_GET_INFO VFIO_DEVICE_GET_IRQ_INFO VFIO_DEVICE_GET_REGION_INFO VFIO_DEVICE_RESET "
        "VFIO_DEVICE_SET_IRQS VFIO_DEV_DIR VFIO_GET_API_VERSION VFIO_GROUP_GET_DEVICE_FD "
        "VFIO_GROUP_GET_STATUS VFIO_GROUP_SET_CONTAINER VFIO_GROUP_UNSET_CONTAINER VFIO_IOMMU_GET_INFO "
        "VFIO_IOMMU_MAP_DMA VFIO_IOMMU_UNMAP_DMA VFIO_NOIOMMU_IOMMU VFIO_PCI_BAR0_REGION_INDEX "
        "VFIO_PCI_BAR5_REGION_INDEX VFIO_PCI_CONFIG_REGION_INDEX VFIO_PCI_INTX_IRQ_INDEX "
        "VFIO_PCI_MSIX_IRQ_INDEX VFIO_PCI_MSI_IRQ_INDEX VFIO_PCI_ROM_REGION_INDEX VFIO_PCI_VGA_REGION_INDEX "
        "VFIO_SET_IOMMU VFIO_TYPE VFIO_TYPE1_IOMMU VFIO_TYPE1v2_IOMMU VfioDevice areas_without build_irq_set "
        "build_irq_set_eventfds io ioc iommu_group_of normalize_pci_address open_container "
        "pagemap_entry_to_phys parse_cap_chain parse_device_info parse_irq_info parse_region_info "
        "sysfs_pci_root virt_to_phys"),
    "pmd.vfio_user": "DeviceModel RegionSpec VfioUserDevice VfioUserServer",
    "pmd.vfio_user.client": "DEFAULT_TIMEOUT VfioUserDevice",
    "pmd.vfio_user.model": "DeviceModel RegionSpec",
    "pmd.vfio_user.protocol": (
        "COMMAND_NAMES Capabilities DEFAULT_MAX_DATA_XFER_SIZE DEFAULT_MAX_MSG_FDS DMA_FLAG_READ "
        "DMA_FLAG_WRITE DmaMap DmaUnmap FLAG_ERROR FLAG_NO_REPLY FLAG_TYPE_MASK HEADER HEADER_SIZE "
        "IRQ_SET_ACTION_MASK IRQ_SET_DATA_MASK IrqSet MAX_DATA_XFER_SIZE MAX_INFO_SIZE MAX_IRQ_INDEXES "
        "MAX_MSG_FDS MAX_REGIONS MAX_VERSION_DATA Message MessageError RegionAccess TYPE_COMMAND TYPE_REPLY "
        "VFIO_USER_DEVICE_GET_INFO VFIO_USER_DEVICE_GET_IRQ_INFO VFIO_USER_DEVICE_GET_REGION_INFO "
        "VFIO_USER_DEVICE_GET_REGION_IO_FDS VFIO_USER_DEVICE_RESET VFIO_USER_DEVICE_SET_IRQS "
        "VFIO_USER_DMA_MAP VFIO_USER_DMA_READ VFIO_USER_DMA_UNMAP VFIO_USER_DMA_WRITE VFIO_USER_MAJOR "
        "VFIO_USER_MINOR VFIO_USER_REGION_READ VFIO_USER_REGION_WRITE VFIO_USER_VERSION check_flags close_fds "
        "command_name deadline_after decode_device_info decode_device_info_request decode_dma_map "
        "decode_dma_unmap decode_header decode_irq_info decode_irq_info_request decode_region_access "
        "decode_region_info decode_region_info_request decode_set_irqs decode_version encode_device_info "
        "encode_device_info_request encode_dma_map encode_dma_unmap encode_header encode_irq_info "
        "encode_irq_info_request encode_message encode_region_access encode_region_info "
        "encode_region_info_request encode_set_irqs encode_version max_message_size message_error "
        "recv_message send_message"),
    "pmd.vfio_user.server": "VfioUserServer errno_for",
    "pmd.virtio": "LegacyTransport ModernTransport NO_VECTOR Transport open_transport",
    "pmd.virtio.features": (
        "ACCESS_PLATFORM BY_NAME CTRL_ERR CTRL_MAC CTRL_MAC_ADDR_SET CTRL_MAC_TABLE_SET CTRL_MQ "
        "CTRL_MQ_VQ_PAIRS_SET CTRL_OK CTRL_RX CTRL_RX_ALLMULTI CTRL_RX_PROMISC IN_ORDER NAMES NET_CFG_DUPLEX "
        "NET_CFG_MAC NET_CFG_MAX_QUEUE_PAIRS NET_CFG_MTU NET_CFG_SPEED NET_CFG_STATUS NET_CSUM "
        "NET_CTRL_GUEST_OFFLOADS NET_CTRL_MAC_ADDR NET_CTRL_RX NET_CTRL_VLAN NET_CTRL_VQ NET_GUEST_ANNOUNCE "
        "NET_GUEST_CSUM NET_GUEST_ECN NET_GUEST_TSO4 NET_GUEST_TSO6 NET_GUEST_UFO NET_HOST_ECN NET_HOST_TSO4 "
        "NET_HOST_TSO6 NET_HOST_UFO NET_MAC NET_MQ NET_MRG_RXBUF NET_MTU NET_SPEED_DUPLEX NET_STATUS "
        "NET_S_ANNOUNCE NET_S_LINK_UP NOTIFICATION_DATA ORDER_PLATFORM RING_EVENT_IDX RING_INDIRECT_DESC "
        "RING_PACKED SR_IOV STATUS_ACKNOWLEDGE STATUS_DEVICE_NEEDS_RESET STATUS_DRIVER STATUS_DRIVER_OK "
        "STATUS_FAILED STATUS_FEATURES_OK VERSION_1 bit names parse"),
    "pmd.virtio.legacy": "LegacyTransport",
    "pmd.virtio.modern": (
        "COMMON_CFG_LEN CONFIG_GENERATION CONFIG_MSIX_VECTOR DEVICE_FEATURE DEVICE_FEATURE_SELECT "
        "DEVICE_STATUS DRIVER_FEATURE DRIVER_FEATURE_SELECT ModernTransport NO_VECTOR NUM_QUEUES QUEUE_DESC "
        "QUEUE_DEVICE QUEUE_DRIVER QUEUE_ENABLE QUEUE_MSIX_VECTOR QUEUE_NOTIFY_OFF QUEUE_SELECT QUEUE_SIZE "
        "RegionRegisters"),
    "pmd.virtio.net": (
        "ControlQueue Link MANDATORY NetConfig QueueStateError WANTED ctrl_queue_index format_mac hdr_len_for "
        "link_from negotiate parse_mac random_mac read_net_config rx_queue_index tx_queue_index"),
    "pmd.virtio.transport": "F NO_VECTOR Transport check_queue_size",
}

_CHECK = r"""
import importlib, json, sys, warnings
old_names = json.loads(sys.argv[1])
import pmd
from pmd import _compat
out = {"missing": [], "silent": [], "twice": [], "not_new": []}
for old, names in old_names.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
        again = importlib.import_module(old)
    said = [w for w in caught if issubclass(w.category, DeprecationWarning) and old in str(w.message)]
    if not said:
        out["silent"].append(old)
    if len(said) > 1:
        out["twice"].append(old)
    if old in _compat.MOVED and module is not importlib.import_module(_compat.MOVED[old]):
        out["not_new"].append(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names.split():
            if not hasattr(module, name):
                out["missing"].append(f"{old}.{name}")
print(json.dumps(out))
"""


def test_every_old_path_and_public_name_resolves_and_warns_once() -> None:
    r = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(OLD_NAMES)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"missing": [], "silent": [], "twice": [], "not_new": []}, out


def test_old_names_are_the_new_objects() -> None:
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import pmd.vfio, pmd.vfio_user, pmd._device, pmd._burst, pmd.port, pmd.virtio.features as F\n"
        "from pmd.driver.access.vfio import VfioAccess\n"
        "from pmd.driver.access.vfio_user import VfioUserAccess\n"
        "from pmd.driver._rx import RxQueue\n"
        "from pmd.sim._tx import tx_to_rx\n"
        "from pmd.backends import open_port\n"
        "from pmd.abi.virtio_net import parse_features\n"
        "assert pmd.vfio.VfioDevice is VfioAccess\n"
        "assert pmd.vfio_user.VfioUserDevice is VfioUserAccess\n"
        "assert pmd._device.loopback is tx_to_rx and pmd._burst.RxQueue is RxQueue\n"
        "assert pmd.port.open_port is open_port is pmd.open_port\n"
        "assert F.parse is parse_features and F.parse('MRG_RXBUF') == 1 << 15\n"
        "print('same')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "same", r.stderr


def test_a_renamed_name_warns_with_its_new_name() -> None:
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from pmd.vfio import VfioDevice\n"
        "print([str(x.message) for x in w])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pmd.vfio.VfioDevice is deprecated" in r.stdout and "pmd.driver.access.vfio.VfioAccess" in r.stdout


def test_the_architecture_page_lists_every_old_path() -> None:
    # docs/architecture.md tells users where each old module went; an alias added or
    # dropped without its line there fails here.
    import re

    from pmd import _compat

    page = (ROOT / "docs" / "architecture.md").read_text()
    section = page.split("## Where the modules of before went", 1)[1]
    listed = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            listed.update(re.findall(r"`([\w.]+)`", line.split("|")[1]))
    assert listed == set(_compat.MOVED) | set(_compat.SPLIT)
