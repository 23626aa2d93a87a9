"""Kernel VFIO device access (pmd.vfio) and the device-access interface (pmd.access).

This host has no VFIO: the tests at the top check what can be checked here
(request numbers, structure layouts, capability-chain parsing, eventfd
buffers, sysfs lookups on a fake tree, pagemap decoding, mapping mechanics on
a memfd, error messages, resource release). The tests marked ``vfio`` at the
bottom run against a real vfio-pci device named by ``PMD_VFIO_DEVICE``, i.e.
inside the QEMU guest::

    python tests/vm/harness.py -- python -m pytest tests/test_vfio.py -m vfio -q
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import pmd
from pmd.driver.access import iova as access_iova
from pmd.driver.access import pagemap as access_pagemap
from pmd.driver.access import vfio
from pmd.driver import sysfs as pci_sysfs
from pmd.abi import vfio as spec_vfio
from pmd.abi.pci import PciAddress
from pmd.driver.access import DeviceAccess, RegionMapping
from pmd.abi.vfio import DeviceInfo, IrqInfo, RegionInfo, SparseArea
from pmd.errors import PmdError, QueueStateError, VfioError

PAGE = mmap.PAGESIZE

# ---------------------------------------------------------------------------
# ioctl request numbers, computed here from <asm-generic/ioctl.h> and vfio.h
# independently of pmd.vfio:
#   #define _IOC(dir,type,nr,size) ((dir)<<30 | (size)<<16 | (type)<<8 | (nr))
#   #define _IO(type,nr)           _IOC(_IOC_NONE, (type), (nr), 0)
#   #define VFIO_TYPE (';')   #define VFIO_BASE 100
# ---------------------------------------------------------------------------


def _IO(type_: int, nr: int) -> int:
    return (0 << 30) | (0 << 16) | (type_ << 8) | nr


HEADER_REQUESTS: dict[str, int] = {  # name -> n in _IO(VFIO_TYPE, VFIO_BASE + n), as vfio.h defines them
    "VFIO_GET_API_VERSION": 0,
    "VFIO_CHECK_EXTENSION": 1,
    "VFIO_SET_IOMMU": 2,
    "VFIO_GROUP_GET_STATUS": 3,
    "VFIO_GROUP_SET_CONTAINER": 4,
    "VFIO_GROUP_UNSET_CONTAINER": 5,
    "VFIO_GROUP_GET_DEVICE_FD": 6,
    "VFIO_DEVICE_GET_INFO": 7,
    "VFIO_DEVICE_GET_REGION_INFO": 8,
    "VFIO_DEVICE_GET_IRQ_INFO": 9,
    "VFIO_DEVICE_SET_IRQS": 10,
    "VFIO_DEVICE_RESET": 11,
    "VFIO_IOMMU_GET_INFO": 12,
    "VFIO_IOMMU_MAP_DMA": 13,
    "VFIO_IOMMU_UNMAP_DMA": 14,
}


@pytest.mark.parametrize("name,n", list(HEADER_REQUESTS.items()))
def test_ioctl_request_numbers_follow_the_header(name: str, n: int) -> None:
    assert getattr(vfio, name) == _IO(ord(";"), 100 + n)


@pytest.mark.parametrize(
    "name,value",
    [
        ("VFIO_GET_API_VERSION", 0x3B64),
        ("VFIO_GROUP_GET_DEVICE_FD", 0x3B6A),
        ("VFIO_DEVICE_SET_IRQS", 0x3B6E),
        ("VFIO_IOMMU_MAP_DMA", 0x3B71),
    ],
)
def test_ioctl_request_known_literals(name: str, value: int) -> None:
    assert getattr(vfio, name) == value


def test_ioc_macro_encodes_direction_and_size() -> None:
    # FS_IOC_GETFLAGS = _IOR('f', 1, long) = 0x80086601 on 64-bit Linux (_IOC_READ = 2)
    assert spec_vfio.ioc(2, ord("f"), 1, 8) == 0x80086601
    assert spec_vfio.io(ord(";"), 100) == 0x3B64


def test_header_constants() -> None:
    assert spec_vfio.VFIO_API_VERSION == 0
    assert (spec_vfio.VFIO_TYPE1_IOMMU, spec_vfio.VFIO_TYPE1v2_IOMMU, spec_vfio.VFIO_NOIOMMU_IOMMU) == (1, 3, 8)
    assert spec_vfio.VFIO_PCI_CONFIG_REGION_INDEX == 7
    assert (spec_vfio.VFIO_PCI_INTX_IRQ_INDEX, spec_vfio.VFIO_PCI_MSI_IRQ_INDEX, spec_vfio.VFIO_PCI_MSIX_IRQ_INDEX) == (0, 1, 2)
    assert spec_vfio.VFIO_REGION_INFO_CAP_SPARSE_MMAP == 1
    assert spec_vfio.VFIO_REGION_INFO_CAP_TYPE == 2
    assert spec_vfio.VFIO_IRQ_SET_DATA_EVENTFD | spec_vfio.VFIO_IRQ_SET_ACTION_TRIGGER == 0x24
    assert spec_vfio.VFIO_IRQ_SET_DATA_NONE | spec_vfio.VFIO_IRQ_SET_ACTION_TRIGGER == 0x21


# ---------------------------------------------------------------------------
# structure layouts (sizes and offsets from vfio.h: __u32 fields, __aligned_u64 at 8)
# ---------------------------------------------------------------------------

LAYOUTS = {
    "vfio_info_cap_header": (8, {"id": 0, "version": 2, "next": 4}),
    "vfio_group_status": (8, {"argsz": 0, "flags": 4}),
    "vfio_device_info": (24, {"argsz": 0, "flags": 4, "num_regions": 8, "num_irqs": 12, "cap_offset": 16, "pad": 20}),
    "vfio_region_info": (32, {"argsz": 0, "flags": 4, "index": 8, "cap_offset": 12, "size": 16, "offset": 24}),
    "vfio_region_sparse_mmap_area": (16, {"offset": 0, "size": 8}),
    "vfio_region_info_cap_sparse_mmap": (16, {"header": 0, "nr_areas": 8, "reserved": 12}),
    "vfio_region_info_cap_type": (16, {"header": 0, "type": 8, "subtype": 12}),
    "vfio_irq_info": (16, {"argsz": 0, "flags": 4, "index": 8, "count": 12}),
    "vfio_irq_set": (20, {"argsz": 0, "flags": 4, "index": 8, "start": 12, "count": 16}),
    "vfio_iommu_type1_info": (24, {"argsz": 0, "flags": 4, "iova_pgsizes": 8, "cap_offset": 16, "pad": 20}),
    "vfio_iommu_type1_dma_map": (32, {"argsz": 0, "flags": 4, "vaddr": 8, "iova": 16, "size": 24}),
    "vfio_iommu_type1_dma_unmap": (24, {"argsz": 0, "flags": 4, "iova": 8, "size": 16}),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_struct_size_and_offsets(name: str) -> None:
    size, offsets = LAYOUTS[name]
    cls = getattr(spec_vfio, name)
    assert ctypes.sizeof(cls) == size
    assert {f: getattr(cls, f).offset for f in offsets} == offsets


# ---------------------------------------------------------------------------
# capability chains, built by hand
# ---------------------------------------------------------------------------


def region_info_bytes(index: int, flags: int, size: int, offset: int, caps: bytes = b"", cap_offset: int = 0) -> bytes:
    argsz = 32 + len(caps)
    return struct.pack("=IIIIQQ", argsz, flags, index, cap_offset, size, offset) + caps


def cap(cap_id: int, version: int, nxt: int, body: bytes) -> bytes:
    return struct.pack("=HHI", cap_id, version, nxt) + body


def sparse_body(areas: Sequence[tuple[int, int]], nr: int | None = None) -> bytes:
    out = struct.pack("=II", len(areas) if nr is None else nr, 0)
    return out + b"".join(struct.pack("=QQ", o, s) for o, s in areas)


def test_region_info_without_caps() -> None:
    info = spec_vfio.parse_region_info(region_info_bytes(4, 0x7, 0x4000, 4 << 40))
    assert (info.index, info.flags, info.size, info.offset) == (4, 7, 0x4000, 4 << 40)
    assert info.sparse_areas is None
    assert info.readable and info.writable and info.mmappable
    assert info.mmap_areas() == (SparseArea(0, 0x4000),)
    assert info.describe_flags() == "READ|WRITE|MMAP"


def test_sparse_mmap_with_two_areas() -> None:
    areas = [(0, 0x2000), (0x3000, 0x1000)]
    caps = cap(1, 1, 0, sparse_body(areas))
    info = spec_vfio.parse_region_info(region_info_bytes(0, 0xF, 0x4000, 0, caps, cap_offset=32))
    assert info.sparse_areas == (SparseArea(0, 0x2000), SparseArea(0x3000, 0x1000))
    assert info.mmap_areas() == info.sparse_areas
    assert [(c.id, c.version, c.offset) for c in info.caps] == [(1, 1, 32)]


def test_chain_of_sparse_type_and_msix_mappable() -> None:
    first = cap(2, 1, 32 + 16, struct.pack("=II", 0x80008086, 1))  # CAP_TYPE, then ...
    second = cap(3, 1, 32 + 16 + 8, b"")  # MSIX_MAPPABLE, then ...
    third = cap(1, 1, 0, sparse_body([(0x1000, 0x1000)]))
    info = spec_vfio.parse_region_info(region_info_bytes(1, 0xF, 0x2000, 1 << 40, first + second + third, 32))
    assert info.type == (0x80008086, 1)
    assert info.msix_mappable
    assert info.sparse_areas == (SparseArea(0x1000, 0x1000),)
    assert [c.id for c in info.caps] == [2, 3, 1]


def test_sparse_mmap_with_no_areas_allows_no_mapping() -> None:
    info = spec_vfio.parse_region_info(region_info_bytes(2, 0xF, 0x1000, 0, cap(1, 1, 0, sparse_body([])), 32))
    assert info.sparse_areas == ()
    assert info.mmap_areas() == ()


def test_capability_chain_loop_is_an_error() -> None:
    a = cap(2, 1, 32 + 16, struct.pack("=II", 1, 1))
    b = cap(2, 1, 32, struct.pack("=II", 1, 1))  # points back to the first
    with pytest.raises(VfioError, match="loops back to offset 0x20") as ei:
        spec_vfio.parse_region_info(region_info_bytes(0, 0xF, 0x1000, 0, a + b, 32))
    assert ei.value.errno == errno.ELOOP


def test_capability_chain_self_loop_is_an_error() -> None:
    with pytest.raises(VfioError, match="loops"):
        spec_vfio.parse_region_info(region_info_bytes(0, 0xF, 0x1000, 0, cap(3, 1, 32, b""), 32))


@pytest.mark.parametrize("nxt", [0x1000, 44, 8, 0xFFFFFFFF])
def test_capability_next_out_of_range_is_an_error(nxt: int) -> None:
    caps = cap(3, 1, nxt, b"") + b"\0" * 8
    with pytest.raises(VfioError, match="out of range") as ei:
        spec_vfio.parse_region_info(region_info_bytes(0, 0xF, 0x1000, 0, caps, 32))
    assert ei.value.errno == errno.ERANGE


def test_first_capability_inside_fixed_struct_is_an_error() -> None:
    with pytest.raises(VfioError, match="out of range"):
        spec_vfio.parse_region_info(region_info_bytes(0, 0xF, 0x1000, 0, cap(3, 1, 0, b""), cap_offset=16))


def test_sparse_mmap_claiming_more_areas_than_fit_is_an_error() -> None:
    caps = cap(1, 1, 0, sparse_body([(0, 0x1000)], nr=5))
    with pytest.raises(VfioError, match="claims 5 areas but has room for 1"):
        spec_vfio.parse_region_info(region_info_bytes(0, 0xF, 0x4000, 0, caps, 32))


def test_sparse_area_outside_region_is_an_error() -> None:
    caps = cap(1, 1, 0, sparse_body([(0x3000, 0x2000)]))
    with pytest.raises(VfioError, match="outside the region"):
        spec_vfio.parse_region_info(region_info_bytes(0, 0xF, 0x4000, 0, caps, 32))


def test_caps_flag_with_zero_offset_means_no_chain() -> None:
    # What the kernel answers when argsz was too small: CAPS set, cap_offset 0, argsz grown.
    raw = bytearray(region_info_bytes(1, 0xF, 0x1000, 0))
    struct.pack_into("=I", raw, 0, 80)
    info = spec_vfio.parse_region_info(bytes(raw))
    assert info.caps == () and info.sparse_areas is None


def test_device_info_with_and_without_caps() -> None:
    plain = spec_vfio.parse_device_info(struct.pack("=IIIIII", 24, 0x2, 9, 5, 0, 0))
    assert (plain.flags, plain.num_regions, plain.num_irqs, plain.caps) == (2, 9, 5, ())
    assert plain.is_pci and not plain.supports_reset
    old = spec_vfio.parse_device_info(struct.pack("=IIII", 16, 0x3, 9, 5))  # pre-caps layout
    assert old.supports_reset
    atomic = cap(spec_vfio.VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP, 1, 0, struct.pack("=II", 0x3, 0))
    withcaps = spec_vfio.parse_device_info(struct.pack("=IIIIII", 24 + 16, 0x82, 9, 5, 24, 0) + atomic)
    assert [(c.id, c.data[:4]) for c in withcaps.caps] == [(5, b"\x03\0\0\0")]


def test_irq_info_parsing() -> None:
    info = spec_vfio.parse_irq_info(struct.pack("=IIII", 16, 0x9, 2, 4))
    assert info == IrqInfo(index=2, flags=9, count=4)
    assert info.eventfd and info.noresize and not info.maskable and info.name == "MSI-X"


def test_areas_without_msix_table() -> None:
    # 16 KiB BAR, MSI-X table of 4 vectors at 0x2000: that page is left out
    assert spec_vfio.areas_without(0x4000, 0x2000, 64, 0x1000) == (SparseArea(0, 0x2000), SparseArea(0x3000, 0x1000))
    # table at the start: one area after it; table covering the BAR: nothing
    assert spec_vfio.areas_without(0x4000, 0, 0x800, 0x1000) == (SparseArea(0x1000, 0x3000),)
    assert spec_vfio.areas_without(0x1000, 0, 0x800, 0x1000) == ()


# ---------------------------------------------------------------------------
# vfio_irq_set buffers
# ---------------------------------------------------------------------------


def test_irq_set_with_eventfds() -> None:
    buf = spec_vfio.build_irq_set_eventfds(spec_vfio.VFIO_PCI_MSIX_IRQ_INDEX, 1, [10, -1, 12])
    assert len(buf) == 20 + 3 * 4
    argsz, flags, index, start, count = struct.unpack_from("=IIIII", buf, 0)
    assert (argsz, flags, index, start, count) == (32, 0x24, 2, 1, 3)
    assert struct.unpack_from("=3i", buf, 20) == (10, -1, 12)


def test_irq_set_disable() -> None:
    buf = spec_vfio.build_irq_set(2, spec_vfio.VFIO_IRQ_SET_DATA_NONE | spec_vfio.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)
    assert bytes(buf) == struct.pack("=IIIII", 20, 0x21, 2, 0, 0)


# ---------------------------------------------------------------------------
# container, sysfs lookups and open errors
# ---------------------------------------------------------------------------


def test_missing_container_says_vfio_is_not_available(tmp_path: Path) -> None:
    path = tmp_path / "vfio"
    with pytest.raises(VfioError) as ei:
        vfio.open_container(str(path))
    assert str(path) in str(ei.value)
    assert "VFIO is not available in this kernel" in str(ei.value)
    assert ei.value.errno == errno.ENOENT
    assert isinstance(ei.value, OSError) and isinstance(ei.value, PmdError)


@pytest.mark.skipif(os.path.exists(vfio.VFIO_CONTAINER_PATH), reason="this machine has /dev/vfio/vfio")
def test_this_host_has_no_vfio_container() -> None:
    with pytest.raises(VfioError, match="/dev/vfio/vfio does not exist: VFIO is not available in this kernel"):
        vfio.open_container()


class FakeSysfs:
    """A sysfs tree: <root>/bus/pci/devices/<addr> with driver and iommu_group links."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.devices = root / "bus/pci/devices"
        self.devices.mkdir(parents=True)
        (root / "bus/pci/drivers").mkdir(parents=True)

    def add(self, address: str, driver: str | None = None, group: int | None = None) -> Path:
        dev = self.devices / address
        dev.mkdir()
        if driver is not None:
            drv = self.root / "bus/pci/drivers" / driver
            drv.mkdir(exist_ok=True)
            (dev / "driver").symlink_to(os.path.relpath(drv, dev))
        if group is not None:
            gdir = self.root / "kernel/iommu_groups" / str(group)
            (gdir / "devices").mkdir(parents=True, exist_ok=True)
            (dev / "iommu_group").symlink_to(os.path.relpath(gdir, dev))
            (gdir / "devices" / address).symlink_to(os.path.relpath(dev, gdir / "devices"))
        return dev


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    tree = FakeSysfs(tmp_path / "sys")
    monkeypatch.setenv("SYSFS_PCI_DEVICES", str(tree.devices))
    return tree


def test_sysfs_root_follows_environment(sysfs: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> None:
    assert str(pci_sysfs.sysfs_pci_devices()) == str(sysfs.devices)
    monkeypatch.delenv("SYSFS_PCI_DEVICES")
    assert str(pci_sysfs.sysfs_pci_devices()) == "/sys/bus/pci/devices"


def test_group_from_iommu_group_link(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", "vfio-pci", 7)
    assert vfio.iommu_group_of("0000:00:03.0") == 7
    assert vfio.iommu_group_of("00:03.0") == 7  # short form: domain 0


def test_device_without_iommu_group_says_how_to_bind(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:04.0", "virtio-pci")
    with pytest.raises(VfioError) as ei:
        vfio.iommu_group_of("0000:00:04.0")
    msg = str(ei.value)
    assert "0000:00:04.0 has no IOMMU group" in msg and "bound to virtio-pci" in msg
    assert "pmd bind 0000:00:04.0" in msg
    assert "echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override" in msg
    assert "echo 0000:00:04.0 > /sys/bus/pci/drivers/virtio-pci/unbind" in msg
    assert "enable_unsafe_noiommu_mode" in msg


def test_no_such_device(sysfs: FakeSysfs) -> None:
    with pytest.raises(VfioError, match=r"no PCI device 0000:00:1f\.7") as ei:
        vfio.VfioAccess.open("0000:00:1f.7")
    assert ei.value.errno == errno.ENODEV


@pytest.mark.parametrize("bad", ["", "eth0", "0000:00:03", "00:03.8", "00:20.0", "0000:000:03.0", "zz:03.0"])
def test_malformed_address(bad: str) -> None:
    with pytest.raises(VfioError, match="is not a PCI address") as ei:
        vfio.VfioAccess.open(bad)
    assert ei.value.errno == errno.EINVAL


def test_address_normalization() -> None:
    assert str(PciAddress.parse("00:03.0")) == "0000:00:03.0"
    assert str(PciAddress.parse("0000:0A:1F.7")) == "0000:0a:1f.7"
    assert str(PciAddress.parse("10000:00:00.0")) == "10000:00:00.0"


def test_device_bound_to_another_driver(sysfs: FakeSysfs, tmp_path: Path) -> None:
    sysfs.add("0000:00:05.0", "virtio-pci", 9)
    with pytest.raises(VfioError, match="is bound to virtio-pci, not vfio-pci: bind it to vfio-pci") as ei:
        vfio.VfioAccess.open("0000:00:05.0", dev_dir=str(tmp_path))
    assert "pmd bind 0000:00:05.0" in str(ei.value)


def test_unbound_device(sysfs: FakeSysfs, tmp_path: Path) -> None:
    sysfs.add("0000:00:06.0", None, 10)
    with pytest.raises(VfioError, match="is not bound to any driver, not vfio-pci"):
        vfio.VfioAccess.open("0000:00:06.0", dev_dir=str(tmp_path))


def test_open_without_container_names_it(sysfs: FakeSysfs, tmp_path: Path) -> None:
    sysfs.add("0000:00:03.0", "vfio-pci", 7)
    devdir = tmp_path / "dev-vfio"
    devdir.mkdir()
    with pytest.raises(VfioError) as ei:
        vfio.VfioAccess.open("0000:00:03.0", dev_dir=str(devdir))
    assert f"{devdir}/vfio does not exist: VFIO is not available in this kernel" in str(ei.value)


def test_group_not_viable_message_names_the_others(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", "vfio-pci", 7)
    sysfs.add("0000:00:03.1", "snd_hda_intel", 7)
    sysfs.add("0000:00:03.2", None, 7)
    dev = object.__new__(vfio.VfioAccess)
    dev.address, dev.group, dev._sysfs_root = "0000:00:03.0", 7, None
    msg = str(dev._not_viable_error())
    assert "IOMMU group 7 of 0000:00:03.0 is not viable" in msg
    assert "0000:00:03.1 (driver snd_hda_intel)" in msg
    assert "0000:00:03.2 (no driver)" in msg
    assert "pmd bind 0000:00:03.1" in msg
    assert "0000:00:03.0 (" not in msg  # not itself


# ---------------------------------------------------------------------------
# pagemap (no-IOMMU physical addresses)
# ---------------------------------------------------------------------------


def test_pagemap_entry_decoding() -> None:
    entry = (1 << 63) | 0x12345  # present, PFN 0x12345
    assert access_pagemap.pagemap_entry_to_phys(entry, 0x7F0000001ABC, 0x1000) == 0x12345ABC
    # bits 55-62 (soft-dirty, exclusive, file, swapped) are not part of the PFN
    assert access_pagemap.pagemap_entry_to_phys(entry | (1 << 55) | (1 << 61), 0x1000, 0x1000) == 0x12345000


def test_pagemap_entry_not_present() -> None:
    with pytest.raises(VfioError, match="not present"):
        access_pagemap.pagemap_entry_to_phys(0x12345, 0x1000, 0x1000)
    with pytest.raises(VfioError, match="swapped out"):
        access_pagemap.pagemap_entry_to_phys(1 << 62, 0x1000, 0x1000)


def test_pagemap_hidden_pfn_needs_root() -> None:
    with pytest.raises(VfioError, match="CAP_SYS_ADMIN") as ei:
        access_pagemap.pagemap_entry_to_phys(1 << 63, 0x1000, 0x1000)
    assert ei.value.errno == errno.EPERM


def test_virt_to_phys_reads_the_right_entry(tmp_path: Path) -> None:
    pagemap = tmp_path / "pagemap"
    entries = [0] * 8
    entries[5] = (1 << 63) | 0xABCDE
    pagemap.write_bytes(struct.pack("=8Q", *entries))
    assert access_pagemap.virt_to_phys(5 * PAGE + 0x10, str(pagemap)) == 0xABCDE * PAGE + 0x10
    with pytest.raises(VfioError, match="not present"):
        access_pagemap.virt_to_phys(4 * PAGE, str(pagemap))


def test_virt_to_phys_of_this_process() -> None:
    buf = mmap.mmap(-1, PAGE)
    buf[0] = 1  # present now
    holder = ctypes.c_char.from_buffer(buf)
    try:
        addr = ctypes.addressof(holder)
        try:
            phys = access_pagemap.virt_to_phys(addr)
        except VfioError as exc:  # not root: PFNs hidden, and the message says so
            assert "CAP_SYS_ADMIN" in str(exc)
        else:
            assert phys % PAGE == addr % PAGE and phys > 0
    finally:
        del holder
        buf.close()


# ---------------------------------------------------------------------------
# mappings: the reserve-then-map-areas mechanics, on a memfd standing in for a device fd
# ---------------------------------------------------------------------------


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("pmd-test-bar", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8 * PAGE)
    yield fd
    os.close(fd)


def test_region_mapping_honours_sparse_areas(memfd: int) -> None:
    os.pwrite(memfd, struct.pack("<I", 0xDEADBEEF), PAGE + 2 * PAGE)  # region offset 2*PAGE
    areas = [SparseArea(0, PAGE), SparseArea(2 * PAGE, 2 * PAGE)]
    m = RegionMapping(4, memfd, PAGE, 4 * PAGE, areas)
    try:
        assert m.read(2 * PAGE, 4) == 0xDEADBEEF
        m.write(2 * PAGE + 8, 2, 0x1234)
        assert os.pread(memfd, 2, PAGE + 2 * PAGE + 8) == b"\x34\x12"
        m.write(0, 8, 0x0102030405060708)
        assert m.read(0, 1) == 0x08
        with pytest.raises(ValueError, match="not mapped"):
            m.read(PAGE, 4)  # the hole (think: MSI-X table) is never touched
        with pytest.raises(ValueError, match="outside"):
            m.read(4 * PAGE, 4)
        with pytest.raises(ValueError, match="aligned"):
            m.read(2, 4)
    finally:
        m.close()
    m.close()  # idempotent
    assert m.closed
    with pytest.raises(QueueStateError, match="closed"):
        m.read(0, 4)


def test_region_mapping_rejects_unaligned_areas(memfd: int) -> None:
    with pytest.raises(VfioError, match="not page aligned"):
        RegionMapping(1, memfd, 0, 2 * PAGE, [SparseArea(0x10, PAGE)])
    with pytest.raises(VfioError, match="outside the region"):
        RegionMapping(1, memfd, 0, 2 * PAGE, [SparseArea(PAGE, 2 * PAGE)])


def test_region_mapping_failure_is_clear() -> None:
    with pytest.raises(VfioError, match="cannot mmap region 4"):
        RegionMapping(4, 1 << 20, 0, PAGE, [SparseArea(0, PAGE)])  # not an fd


def test_region_mapping_read_and_write_go_through_mmio(memfd: int) -> None:
    m = RegionMapping(4, memfd, 0, 2 * PAGE, [SparseArea(0, PAGE)])
    try:
        assert all(type(w) is pmd.Mmio for w in m._area_windows)  # the Cython accessors, not ctypes
        m.write(0x10, 8, 0x1122334455667788)
        assert os.pread(memfd, 8, 0x10) == struct.pack("<Q", 0x1122334455667788)
        assert [m.read(0x10 + i, 1) for i in range(2)] == [0x88, 0x77]
        with pytest.raises(ValueError, match="1, 2, 4 or 8"):
            m.read(0, 3)
    finally:
        m.close()


def test_mmio_window_inside_one_area(memfd: int) -> None:
    os.pwrite(memfd, struct.pack("<HI", 3, 0xCAFE), 2 * PAGE + 0x12)  # region offset 2*PAGE+0x12
    m = RegionMapping(4, memfd, 0, 4 * PAGE, [SparseArea(0, PAGE), SparseArea(2 * PAGE, 2 * PAGE)])
    try:
        common = m.mmio(2 * PAGE, 0x38)
        assert isinstance(common, pmd.Mmio) and common.length == 0x38
        assert common.address == m.address + 2 * PAGE
        assert common.read16(0x12) == 3 and common.read32(0x14) == 0xCAFE
        common.write32(0x00, 1)
        assert os.pread(memfd, 4, 2 * PAGE) == b"\x01\0\0\0"
        with pytest.raises(ValueError, match="outside"):
            common.read32(0x38)
        rest = m.mmio(3 * PAGE)  # length None: to the end of the area holding the offset
        assert rest.length == PAGE
        first = m.mmio()  # offset 0: the first area
        assert first.length == PAGE
        assert m.open_windows == 3
    finally:
        m.close()


@pytest.mark.parametrize(
    "offset,length,why",
    [
        (PAGE, 4, "not inside one mapped area"),  # the hole (an MSI-X table)
        (PAGE - 4, 8, "not inside one mapped area"),  # straddles area and hole
        (2 * PAGE, 3 * PAGE, "outside region"),
        (-4, 4, "outside region"),
        (0, 0, "outside region"),
    ],
)
def test_mmio_window_outside_the_mapped_areas_is_refused(memfd: int, offset: int, length: int, why: str) -> None:
    with RegionMapping(4, memfd, 0, 4 * PAGE, [SparseArea(0, PAGE), SparseArea(2 * PAGE, 2 * PAGE)]) as m:
        with pytest.raises(ValueError, match=why):
            m.mmio(offset, length)
        assert m.open_windows == 0


def test_closing_the_mapping_closes_every_window_it_handed_out(memfd: int) -> None:
    m = RegionMapping(4, memfd, 0, 2 * PAGE, [SparseArea(0, 2 * PAGE)])
    whole = m.mmio()
    notify = whole.window(PAGE, 0x100)  # a window of a window is tracked too
    inner = notify.window(0x10, 2)
    assert inner.address == m.address + PAGE + 0x10
    inner.write16(0, 0xBEEF)
    assert os.pread(memfd, 2, PAGE + 0x10) == b"\xef\xbe"
    assert m.open_windows == 3
    m.close()
    for w in (whole, notify, inner):
        assert w.closed
        with pytest.raises(QueueStateError, match="closed"):
            w.read16(0)
    with pytest.raises(QueueStateError, match="closed"):
        m.mmio(0, 4)
    with pytest.raises(QueueStateError, match="closed"):
        whole.window(0, 4)


def test_windows_are_tracked_weakly_and_keep_the_mapping_alive(memfd: int) -> None:
    import gc
    import weakref

    m = RegionMapping(4, memfd, 0, PAGE, [SparseArea(0, PAGE)])
    dropped = m.mmio(0, 8)
    del dropped
    gc.collect()
    assert m.open_windows == 0  # the mapping does not keep windows alive
    window = m.mmio(0, 8)
    alive = weakref.ref(m)
    del m
    gc.collect()
    assert alive() is not None and not alive().closed  # type: ignore[union-attr]
    window.write32(4, 7)  # still mapped: the window holds its mapping
    assert os.pread(memfd, 4, 4) == b"\x07\0\0\0"
    alive().close()  # type: ignore[union-attr]
    assert window.closed


# ---------------------------------------------------------------------------
# the interface's shared logic on a fake transport (what vfio-user will reuse)
# ---------------------------------------------------------------------------


class FakeAccess(DeviceAccess):
    def __init__(self, irqs: dict[int, IrqInfo]) -> None:
        self.name = "fake"
        self.config = bytearray(256)
        struct.pack_into("<HH", self.config, 0, 0x1AF4, 0x1041)
        struct.pack_into("<I", self.config, 0x10, 0xC001)  # BAR0: I/O
        struct.pack_into("<I", self.config, 0x20, 0xFE000000)  # BAR4: memory
        self.irqs = irqs
        self.calls: list[tuple[int, int, list[int]]] = []
        self._closed = False

    @property
    def device_info(self) -> DeviceInfo:
        return DeviceInfo(flags=2, num_regions=9, num_irqs=5)

    def region_info(self, index: int) -> RegionInfo:
        return RegionInfo(index, 3, 0, 256 if index == 7 else 0)

    def irq_info(self, index: int) -> IrqInfo:
        return self.irqs.get(index, IrqInfo(index, 0, 0))

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        assert index == 7
        return bytes(self.config[offset : offset + size])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        assert index == 7
        self.config[offset : offset + len(data)] = data

    def map_region(self, index: int) -> RegionMapping:
        raise NotImplementedError

    def dma_map(self, vaddr: int, iova: int, size: int, fd: int = -1, fd_offset: int = 0) -> None:
        pass

    def dma_unmap(self, iova: int, size: int) -> None:
        pass

    def set_irqs(self, index: int, start: int, fds: Sequence[int]) -> None:
        self.calls.append((index, start, list(fds)))

    def disable_irqs(self, index: int) -> None:
        pass

    def unmask_irq(self, index: int, start: int = 0, count: int = 1) -> None:
        pass

    def reset(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True


def test_bus_master_is_read_modify_write() -> None:
    dev = FakeAccess({})
    struct.pack_into("<H", dev.config, 4, 0x0003)  # I/O and memory decode on
    assert not dev.bus_master_enabled()
    dev.enable_bus_master()
    assert struct.unpack_from("<H", dev.config, 4)[0] == 0x0007
    assert dev.bus_master_enabled()


def test_io_bar_from_bit_0_of_the_bar_register() -> None:
    dev = FakeAccess({})
    assert dev.is_io_bar(0) and not dev.is_io_bar(4)
    with pytest.raises(ValueError):
        dev.is_io_bar(6)
    assert dev.config_read_int(0, 2) == 0x1AF4


def test_interrupts_prefer_msix() -> None:
    dev = FakeAccess({2: IrqInfo(2, 0x9, 4), 1: IrqInfo(1, 0x9, 1), 0: IrqInfo(0, 0x7, 1)})
    assert dev.enable_interrupts([5, 6, 7]) == (2, 3)
    assert dev.calls == [(2, 0, [5, 6, 7])]


def test_interrupts_fall_back_to_msi_then_intx() -> None:
    dev = FakeAccess({2: IrqInfo(2, 0x9, 0), 1: IrqInfo(1, 0x9, 2), 0: IrqInfo(0, 0x7, 1)})
    assert dev.enable_interrupts([5, 6, 7]) == (1, 2)
    dev = FakeAccess({0: IrqInfo(0, 0x7, 1)})
    assert dev.enable_interrupts([5, 6]) == (0, 1)
    assert dev.calls == [(0, 0, [5])]


def test_interrupts_unavailable_is_clear() -> None:
    with pytest.raises(VfioError, match="no interrupt index supports eventfds"):
        FakeAccess({}).enable_interrupts([5])


def test_context_manager_closes() -> None:
    with FakeAccess({}) as dev:
        assert not dev.closed
    assert dev.closed


# ---------------------------------------------------------------------------
# VfioAccess lifetime without a kernel: resources released once, in order, on errors too
# ---------------------------------------------------------------------------


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def fake_open(sysfs: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make VfioAccess._open hand out three ordinary fds instead of VFIO ones."""
    sysfs.add("0000:00:03.0", "vfio-pci", 7)
    handed: list[int] = []

    def _open(self: vfio.VfioAccess, dev_dir: str, iommu_type: int | None) -> None:
        res = self._res
        res.container_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        res.group_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        res.device_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        handed[:] = [res.container_fd, res.group_fd, res.device_fd]
        self.group, self.group_path, self.noiommu = 7, "/dev/vfio/7", False
        self.iommu_type = spec_vfio.VFIO_TYPE1v2_IOMMU
        self._device_info = DeviceInfo(flags=2, num_regions=9, num_irqs=5)
        if dev_dir == "fail":
            raise VfioError("injected failure after the fds were opened")

    monkeypatch.setattr(vfio.VfioAccess, "_open", _open)
    return handed


def test_close_is_idempotent(fake_open: list[int]) -> None:
    dev = vfio.VfioAccess.open("0000:00:03.0")
    assert all(_fd_open(fd) for fd in fake_open)
    dev.close()
    assert dev.closed and not any(_fd_open(fd) for fd in fake_open)
    assert (dev.device_fd, dev.group_fd, dev.container_fd) == (-1, -1, -1)
    dev.close()
    assert dev.closed


def test_use_after_close_is_a_clear_error(fake_open: list[int]) -> None:
    with vfio.VfioAccess.open("0000:00:03.0") as dev:
        pass
    with pytest.raises(VfioError, match="is closed") as ei:
        dev.region_read(7, 0, 4)
    assert ei.value.errno == errno.EBADF


def test_failed_open_releases_what_it_took(fake_open: list[int]) -> None:
    with pytest.raises(VfioError, match="injected"):
        vfio.VfioAccess.open("0000:00:03.0", dev_dir="fail")
    assert fake_open and not any(_fd_open(fd) for fd in fake_open)


def test_garbage_collection_releases(fake_open: list[int]) -> None:
    dev = vfio.VfioAccess.open("0000:00:03.0")
    del dev
    import gc

    gc.collect()
    assert not any(_fd_open(fd) for fd in fake_open)


def test_dma_map_validates_alignment(fake_open: list[int]) -> None:
    with vfio.VfioAccess.open("0000:00:03.0") as dev:
        with pytest.raises(ValueError, match="page-aligned"):
            dev.dma_map(0x1001, 0x1000, PAGE)
        with pytest.raises(ValueError, match="page-aligned"):
            dev.dma_map(0x1000, 0x1000, 0)
        with pytest.raises(VfioError, match="no DMA mapping at IOVA 0x1000"):
            dev.dma_unmap(0x1000, PAGE)


def test_reset_unsupported_points_at_device_status(fake_open: list[int]) -> None:
    with vfio.VfioAccess.open("0000:00:03.0") as dev:
        with pytest.raises(VfioError, match="device_status") as ei:
            dev.reset()
    assert ei.value.errno == errno.ENOTSUP


# ---------------------------------------------------------------------------
# choosing IOVAs (pure function over ranges) and map_memory without a kernel
# ---------------------------------------------------------------------------

# What QEMU 7.2's intel-iommu (39 address bits) reports in the guest of tests/vm.
QEMU_39BIT = ((0x0, 0xFEDFFFFF), (0xFEF00000, 0x7FFFFFFFFF))
MIB = 1 << 20
HIGH_VA = 0x7F12_3456_0000  # where mmap puts memory: 47 bits


def test_iova_is_the_virtual_address_when_the_iommu_reaches_it() -> None:
    assert access_iova.choose_iova(MIB, ((0, (1 << 48) - 1),), identity=HIGH_VA) == HIGH_VA
    assert access_iova.choose_iova(MIB, None, identity=HIGH_VA) == HIGH_VA  # no ranges reported: any


def test_iova_past_39_bits_gets_the_lowest_aligned_free_range_instead() -> None:
    assert access_iova.choose_iova(MIB, QEMU_39BIT, identity=HIGH_VA) == PAGE  # never 0
    assert access_iova.choose_iova(MIB, QEMU_39BIT, identity=HIGH_VA, align=2 * MIB) == 2 * MIB


def test_iova_skips_what_is_taken() -> None:
    taken = [(PAGE, MIB), (MIB + 2 * PAGE, PAGE)]
    # the gap [MIB + PAGE, MIB + 2*PAGE) holds one page, no more
    assert access_iova.choose_iova(PAGE, QEMU_39BIT, taken) == MIB + PAGE
    assert access_iova.choose_iova(2 * PAGE, QEMU_39BIT, taken) == MIB + 3 * PAGE
    assert access_iova.choose_iova(PAGE, QEMU_39BIT, taken, align=2 * MIB) == 2 * MIB


def test_iova_identity_overlapping_a_mapping_is_not_taken() -> None:
    va = 0x40000000
    ranges = ((0, (1 << 39) - 1),)
    assert access_iova.choose_iova(MIB, ranges, identity=va) == va
    assert access_iova.choose_iova(MIB, ranges, [(va + PAGE, PAGE)], identity=va) == PAGE


def test_iova_does_not_straddle_a_hole_between_ranges() -> None:
    # Everything below 0xfe800000 is taken; 8 MiB from there would run into the hole
    # [0xfee00000, 0xfeefffff] (the MSI window): the next aligned place is in the second range.
    taken = [(PAGE, 0xFE800000 - PAGE)]
    got = access_iova.choose_iova(8 * MIB, QEMU_39BIT, taken, align=2 * MIB)
    assert got == 0xFF000000
    assert got >= 0xFEF00000 and got + 8 * MIB - 1 <= 0x7FFFFFFFFF


def test_iova_range_starting_high_is_respected() -> None:
    assert access_iova.choose_iova(PAGE, ((0x10000, 0x1FFFF),)) == 0x10000
    assert access_iova.choose_iova(PAGE, ((0x10800, 0x1FFFF),)) == 0x11000


def test_no_room_for_the_iova_is_a_clear_error() -> None:
    with pytest.raises(VfioError, match=r"no free IOVA range of 0x200000 bytes.*\[0x0, 0xfffff\]") as ei:
        access_iova.choose_iova(2 * MIB, ((0, MIB - 1),))
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(VfioError, match="already mapped: 0x1000\\+0xff000"):
        access_iova.choose_iova(PAGE, ((0, MIB - 1),), [(PAGE, MIB - PAGE)])


@pytest.mark.parametrize("size,align", [(0, PAGE), (PAGE, 0), (PAGE, 3 * PAGE)])
def test_iova_arguments_are_checked(size: int, align: int) -> None:
    with pytest.raises(ValueError):
        access_iova.choose_iova(size, None, align=align)


class FakeIoctl:
    """Stands in for the container's MAP_DMA/UNMAP_DMA ioctls; everything else goes to the kernel."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.maps: list[tuple[int, int, int]] = []  # (vaddr, iova, size)
        self.unmaps: list[tuple[int, int]] = []

    def __call__(self, fd: int, request: int, arg: object = 0, mutate: bool = True) -> object:
        if request == spec_vfio.VFIO_IOMMU_MAP_DMA:
            m = spec_vfio.vfio_iommu_type1_dma_map.from_buffer_copy(bytes(arg))  # type: ignore[arg-type]
            assert m.flags == spec_vfio.VFIO_DMA_MAP_FLAG_READ | spec_vfio.VFIO_DMA_MAP_FLAG_WRITE
            self.maps.append((m.vaddr, m.iova, m.size))
            return 0
        if request == spec_vfio.VFIO_IOMMU_UNMAP_DMA:
            u = spec_vfio.vfio_iommu_type1_dma_unmap.from_buffer_copy(bytes(arg))  # type: ignore[arg-type]
            self.unmaps.append((u.iova, u.size))
            return 0
        return self.real(fd, request, arg, mutate)  # type: ignore[operator]


@pytest.fixture
def fake_dma(fake_open: list[int], monkeypatch: pytest.MonkeyPatch) -> FakeIoctl:
    fake = FakeIoctl(vfio.fcntl.ioctl)
    monkeypatch.setattr(vfio.fcntl, "ioctl", fake)
    return fake


def _iommu(ranges: tuple[tuple[int, int], ...]) -> vfio.IommuInfo:
    return vfio.IommuInfo(flags=3, iova_pgsizes=0x40201000, iova_ranges=ranges)


def test_map_memory_with_a_39_bit_iommu_allocates_low_iovas(fake_dma: FakeIoctl) -> None:
    with vfio.VfioAccess.open("0000:00:03.0") as dev, pmd.DmaMemory(1 * MIB, hugepages=False, lock=False) as mem:
        dev._iommu_info = _iommu(QEMU_39BIT)
        iova = dev.map_memory(mem)
        assert iova == PAGE and mem.address > 0x7FFFFFFFFF  # not the virtual address
        assert fake_dma.maps == [(mem.address, PAGE, mem.size)]
        assert dev.dma_mappings == {PAGE: (mem.address, mem.size)}
        (entry,) = dev.mapped_memories
        assert (entry.how, entry.iova, entry.size) == ("allocated", PAGE, mem.size)
        pool = pmd.PacketPool(mem, 64)
        vq = pmd.Virtqueue(mem, 64, 0)
        for i in (0, 63):
            assert PAGE <= pool.iova_of(i) < PAGE + mem.size
            assert pool.iova_of(i) - PAGE == pool.iova_of(i) - iova  # offset within the memory kept
        assert PAGE <= vq.desc_iova < vq.avail_iova < vq.used_iova < PAGE + mem.size
        assert mem.iova(0x1234) == PAGE + 0x1234

        second = pmd.DmaMemory(2 * PAGE, hugepages=False, lock=False)
        assert dev.map_memory(second) == PAGE + mem.size  # the next free IOVA
        with pytest.raises(VfioError, match="already mapped") as ei:
            dev.map_memory(second)
        assert ei.value.errno == errno.EEXIST
        dev.unmap_memory(second)
        assert fake_dma.unmaps == [(PAGE + mem.size, 2 * PAGE)]
        assert second.iova(0) == second.address  # its own addresses again
        with pytest.raises(VfioError, match="not mapped"):
            dev.unmap_memory(second)
        second.close()
        vq.close()
        pool.close()
    # close() unmapped the rest and gave the memory back its addresses
    assert fake_dma.unmaps[-1] == (PAGE, mem.size)
    assert dev.mapped_memories == ()


def test_map_memory_uses_the_virtual_address_when_the_iommu_has_48_bits(fake_dma: FakeIoctl) -> None:
    with vfio.VfioAccess.open("0000:00:03.0") as dev, pmd.DmaMemory(4 * PAGE, hugepages=False, lock=False) as mem:
        dev._iommu_info = _iommu(((0, (1 << 48) - 1),))
        assert dev.map_memory(mem) == mem.address
        assert dev.mapped_memories[0].how == "identity"
        assert fake_dma.maps == [(mem.address, mem.address, mem.size)]
        dev.unmap_memory(mem)


def test_map_memory_failure_leaves_nothing_mapped(fake_dma: FakeIoctl) -> None:
    with vfio.VfioAccess.open("0000:00:03.0") as dev, pmd.DmaMemory(4 * PAGE, hugepages=False, lock=False) as mem:
        dev._iommu_info = _iommu(((0, 2 * PAGE - 1),))  # too small for 4 pages
        with pytest.raises(VfioError, match="no free IOVA range"):
            dev.map_memory(mem)
        assert dev.dma_mappings == {} and dev.mapped_memories == () and fake_dma.maps == []
        assert mem.iova(0) == mem.address
    with pytest.raises(VfioError, match="closed"):
        dev.map_memory(mem)


def test_map_memory_without_iommu_uses_physical_pages(fake_open: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """No-IOMMU mode: one DMA "mapping" per physically contiguous stretch, translator per page."""
    with pmd.DmaMemory(4 * PAGE, hugepages=False, lock=True) as mem:
        base = mem.address
        phys = {base: 0x10000, base + PAGE: 0x11000, base + 2 * PAGE: 0x50000, base + 3 * PAGE: 0x51000}
        monkeypatch.setattr(vfio, "virt_to_phys", lambda va: phys[va // PAGE * PAGE] + va % PAGE)
        with vfio.VfioAccess.open("0000:00:03.0") as dev:
            dev.iommu_type = spec_vfio.VFIO_NOIOMMU_IOMMU
            assert dev.iova_mode == "pa" and dev.iova_ranges() is None
            assert dev.map_memory(mem) == 0x10000
            entry = dev.mapped_memories[0]
            assert entry.how == "physical"
            assert entry.runs == ((base, 0x10000, 2 * PAGE), (base + 2 * PAGE, 0x50000, 2 * PAGE))
            assert dev.dma_mappings == {0x10000: (base, 2 * PAGE), 0x50000: (base + 2 * PAGE, 2 * PAGE)}
            assert dev._res.locked == {}  # DmaMemory locked the pages; unmapping must not unlock them
            assert [mem.iova(o) for o in (0, PAGE + 8, 2 * PAGE, 3 * PAGE + 4)] == [
                0x10000, 0x11008, 0x50000, 0x51004]
            pool = pmd.PacketPool(mem, 4, buffer_size=2048)
            assert [pool.iova_of(i) for i in range(4)] == [0x10000, 0x10800, 0x11000, 0x11800]
            pool.close()
            dev.unmap_memory(mem)
            assert dev.dma_mappings == {} and mem.iova(0) == base
        assert mem.locked


def test_map_memory_without_iommu_needs_locked_memory(fake_open: list[int]) -> None:
    with vfio.VfioAccess.open("0000:00:03.0") as dev, pmd.DmaMemory(PAGE, hugepages=False, lock=False) as mem:
        dev.iommu_type = spec_vfio.VFIO_NOIOMMU_IOMMU
        with pytest.raises(VfioError, match="lock=True"):
            dev.map_memory(mem)


# ===========================================================================
# Against a real vfio-pci device (PMD_VFIO_DEVICE; the QEMU guest of tests/vm)
# ===========================================================================

VFIO_DEVICE = os.environ.get("PMD_VFIO_DEVICE", "")
needs_vfio = pytest.mark.skipif(
    not VFIO_DEVICE,
    reason="PMD_VFIO_DEVICE is not set: no vfio-pci device here "
    "(run: python tests/vm/harness.py -- python -m pytest tests/test_vfio.py -m vfio -q)",
)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _virtio_caps(dev: DeviceAccess) -> dict[int, tuple[int, int, int]]:
    """cfg_type -> (bar, offset, length) of the virtio vendor capabilities (Virtio 1.2, 4.1.4)."""
    found: dict[int, tuple[int, int, int]] = {}
    pos = dev.config_read_int(0x34, 1) & ~3
    seen: set[int] = set()
    while pos and pos not in seen:
        seen.add(pos)
        cap_id, nxt, _len, cfg_type, bar = struct.unpack("<BBBBB", dev.config_read(pos, 5))
        if cap_id == 0x09:
            offset, length = struct.unpack("<II", dev.config_read(pos + 8, 8))
            found.setdefault(cfg_type, (bar, offset, length))
        pos = nxt & ~3
    return found


def _dma_buffer(size: int) -> tuple[mmap.mmap, int]:
    buf = mmap.mmap(-1, size)
    holder = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(holder)
    del holder
    return buf, addr


def _pick_iova(dev: vfio.VfioAccess, vaddr: int, size: int) -> int:
    """IOVA = vaddr when the IOMMU reaches it; QEMU 7.2's intel-iommu has 39 address bits,
    below where mmap puts memory: then the lowest free IOVA inside its ranges."""
    taken = [(iova, n) for iova, (_v, n) in dev.dma_mappings.items()]
    return access_iova.choose_iova(size, dev.iova_ranges(), taken, align=dev.iova_alignment(), identity=vaddr)


@pytest.fixture
def device() -> Iterator[vfio.VfioAccess]:
    with vfio.VfioAccess.open(VFIO_DEVICE) as dev:
        yield dev


@pytest.mark.vfio
@needs_vfio
class TestRealDevice:
    def test_config_space_is_virtio(self, device: vfio.VfioAccess) -> None:
        vendor, dev_id = struct.unpack("<HH", device.config_read(0, 4))
        assert vendor == 0x1AF4
        assert dev_id in (0x1000, 0x1041)  # transitional or modern virtio-net
        assert device.device_info.is_pci
        assert device.region_info(7).size >= 256

    def test_every_region_info(self, device: vfio.VfioAccess) -> None:
        regions = device.regions()
        assert [r.index for r in regions] == list(range(device.device_info.num_regions))
        for r in regions:
            assert r.size == 0 or r.offset >= 0
            for a in r.mmap_areas():
                assert a.end <= r.size and a.offset % PAGE == 0
        assert any(r.mmappable for r in regions[:6])
        for i in range(device.device_info.num_irqs):
            assert device.irq_info(i).index == i

    def test_map_bar_with_common_config(self, device: vfio.VfioAccess) -> None:
        """num_queues and the device features through the Cython MMIO accessors (Virtio 1.2 4.1.4.3)."""
        caps = _virtio_caps(device)
        assert 1 in caps, f"no virtio common config capability: {caps}"
        bar, offset, length = caps[1]
        assert not device.is_io_bar(bar)
        m = device.map_region(bar)
        assert m.length == device.region_info(bar).size and offset + length <= m.length
        common = m.mmio(offset, length)
        assert isinstance(common, pmd.Mmio) and common.length == length >= 0x38
        num_queues = common.read16(0x12)
        assert num_queues == 3  # QEMU's virtio-net: rx, tx and the control queue
        common.write32(0x00, 0)  # device_feature_select = 0: bits 0-31
        low = common.read32(0x04)
        common.write32(0x00, 1)  # bits 32-63
        high = common.read32(0x04)
        features = low | high << 32
        assert features & 1 << 32  # VIRTIO_F_VERSION_1
        assert features & 1 << 33  # VIRTIO_F_ACCESS_PLATFORM (iommu_platform=on)
        assert features & 1 << 5 and features & 1 << 16  # VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS
        assert m.read(offset + 0x12, 2) == num_queues  # RegionMapping.read: the same accessors
        field = common.window(0x12, 2)  # a window of the window
        assert field.read16(0) == num_queues
        m.close()
        assert m.closed and common.closed and field.closed
        with pytest.raises(QueueStateError, match="closed"):
            common.read16(0x12)

    def test_map_memory_with_pool_and_virtqueue(self, device: vfio.VfioAccess) -> None:
        """pmd's own DMA memory, mapped with an IOVA the IOMMU accepts; the pool and the ring
        built in it hand the device IOVAs inside the mapping."""
        ranges = device.iova_ranges()
        with pmd.DmaMemory(2 << 20, hugepages=False, lock=True, name="pmd-vfio-test") as mem:
            iova = device.map_memory(mem)
            (entry,) = device.mapped_memories
            assert entry.runs == ((mem.address, iova, mem.size),)
            assert device.dma_mappings == {iova: (mem.address, mem.size)}
            if ranges is not None:
                assert any(lo <= iova and iova + mem.size - 1 <= hi for lo, hi in ranges)
                if max(hi for _lo, hi in ranges) < mem.address:  # QEMU's 39-bit IOMMU
                    assert entry.how == "allocated" and 0 < iova < mem.address
            pool = pmd.PacketPool(mem, 256)
            vq = pmd.Virtqueue(mem, 256, 0)
            for i in (0, 1, 255):
                assert iova <= pool.iova_of(i) < iova + mem.size
                assert pool.iova_of(i) - iova == pool.iova_of(i) - mem.iova(0)
            for addr in (vq.desc_iova, vq.avail_iova, vq.used_iova):
                assert iova <= addr < iova + mem.size
            # a second memory gets its own range, clear of the first
            with pmd.DmaMemory(64 << 10, hugepages=False, lock=True) as other:
                other_iova = device.map_memory(other)
                assert other_iova >= iova + mem.size or other_iova + other.size <= iova
                device.unmap_memory(other)
            vq.close()
            pool.close()
            device.unmap_memory(mem)
            assert device.dma_mappings == {} and device.mapped_memories == ()
            assert mem.iova(0) == mem.address

    def test_dma_map_and_unmap(self, device: vfio.VfioAccess) -> None:
        size = 16 * PAGE
        buf, vaddr = _dma_buffer(size)
        iova = _pick_iova(device, vaddr, size)
        device.dma_map(vaddr, iova, size)
        assert device.dma_mappings == {iova: (vaddr, size)}
        with pytest.raises(VfioError, match="overlaps"):
            device.dma_map(vaddr, iova + PAGE, PAGE)
        device.dma_unmap(iova, size)
        assert device.dma_mappings == {}
        with pytest.raises(VfioError, match="no DMA mapping"):
            device.dma_unmap(iova, size)
        buf.close()

    def test_msix_with_eventfds(self, device: vfio.VfioAccess) -> None:
        msix = device.irq_info(spec_vfio.VFIO_PCI_MSIX_IRQ_INDEX)
        assert msix.count >= 2 and msix.eventfd
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        try:
            assert device.enable_interrupts(fds) == (spec_vfio.VFIO_PCI_MSIX_IRQ_INDEX, 2)
            assert device.enabled_irqs == {2: 2}
            with pytest.raises(VfioError, match="vector"):
                device.set_irqs(2, 0, [fds[0]] * (msix.count + 1))
            device.disable_irqs(2)
            assert device.enabled_irqs == {}
        finally:
            for fd in fds:
                os.close(fd)

    def test_bus_master(self, device: vfio.VfioAccess) -> None:
        device.enable_bus_master()
        assert device.config_read_int(4, 2) & 0x4

    def test_reset_or_clear_refusal(self, device: vfio.VfioAccess) -> None:
        if device.device_info.supports_reset:
            device.reset()
        else:
            with pytest.raises(VfioError, match="device_status"):
                device.reset()

    def test_already_open(self, device: vfio.VfioAccess, monkeypatch: pytest.MonkeyPatch) -> None:
        with pytest.raises(VfioError, match="already open in this process") as ei:
            vfio.VfioAccess.open(VFIO_DEVICE)
        assert ei.value.errno == errno.EBUSY
        # and the kernel's own refusal, past our bookkeeping
        monkeypatch.setattr(vfio, "_open_addresses", set())
        before = _fd_count()
        with pytest.raises(VfioError, match="busy|already open") as ei:
            vfio.VfioAccess.open(VFIO_DEVICE)
        assert ei.value.errno == errno.EBUSY
        assert _fd_count() == before

    def test_wrong_addresses(self) -> None:
        with pytest.raises(VfioError, match="no PCI device"):
            vfio.VfioAccess.open("0000:00:1f.7")
        with pytest.raises(VfioError, match="not a PCI address"):
            vfio.VfioAccess.open("00:03")
        root = str(pci_sysfs.sysfs_pci_devices())
        other = next(
            (a for a in sorted(os.listdir(root)) if pci_sysfs.link_name(Path(root, a, "driver")) not in (None, "vfio-pci")),
            None,
        )
        if other is not None:  # e.g. the guest's 9p transport, bound to virtio-pci (only read, never touched)
            with pytest.raises(VfioError, match="not vfio-pci"):
                vfio.VfioAccess.open(other)

    def test_close_releases_everything(self) -> None:
        before = _fd_count()
        dev = vfio.VfioAccess.open(VFIO_DEVICE)
        bar = next(r.index for r in dev.regions()[:6] if r.mmappable)
        mapping = dev.map_region(bar)
        window = mapping.mmio(0, 4)
        buf, vaddr = _dma_buffer(4 * PAGE)
        dev.dma_map(vaddr, _pick_iova(dev, vaddr, 4 * PAGE), 4 * PAGE)
        mem = pmd.DmaMemory(16 * PAGE, hugepages=False, lock=True)
        iova = dev.map_memory(mem)
        assert mem.iova(0) == iova and len(dev.dma_mappings) == 2
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        dev.enable_interrupts([fd])
        dev.close()
        dev.close()
        assert mapping.closed and window.closed and dev.dma_mappings == {} and dev.enabled_irqs == {}
        assert dev.mapped_memories == () and mem.iova(0) == mem.address
        os.close(fd)
        buf.close()
        mem.close()
        assert _fd_count() == before
        with vfio.VfioAccess.open(VFIO_DEVICE) as again:  # the group is free again
            assert again.config_read_int(0, 2) == 0x1AF4


LEGACY_DEVICE = os.environ.get("PMD_VFIO_LEGACY_DEVICE", "")


@pytest.mark.vfio
@pytest.mark.skipif(
    not LEGACY_DEVICE,
    reason="PMD_VFIO_LEGACY_DEVICE is not set (run the harness with --legacy for a transitional device)",
)
def test_io_bar_by_pread_and_pwrite() -> None:
    """The transitional device's legacy registers sit in I/O BAR0 (Virtio 1.2, 4.1.4.8)."""
    with vfio.VfioAccess.open(LEGACY_DEVICE) as dev:
        assert dev.is_io_bar(0)
        assert not dev.region_info(0).mmappable
        with pytest.raises(VfioError, match="I/O-space BAR"):
            dev.map_region(0)
        host_features = struct.unpack("<I", dev.region_read(0, 0, 4))[0]
        assert host_features & (1 << 5)  # VIRTIO_NET_F_MAC
        dev.region_write(0, 14, struct.pack("<H", 0))  # queue_select = 0
        assert struct.unpack("<H", dev.region_read(0, 12, 2))[0] > 0  # queue_size of rx queue 0
