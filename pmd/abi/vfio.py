"""The VFIO ABI (``include/uapi/linux/vfio.h``), as vocabulary: numbers, structures, parsers.

Kernel VFIO speaks it through ioctls on ``/dev/vfio`` files; vfio-user carries
the same region and IRQ indexes, flag bits, ``struct vfio_region_info`` with its
capability chain and ``struct vfio_irq_set`` in its messages. So the driver's
device access (kernel VFIO, the vfio-user client) and the built-in device's
server read them here, once:

- the fixed vfio-pci region and IRQ indexes ("Fixed user ABI"), the region,
  IRQ and device flags;
- the ioctl request numbers (``_IO(';', 100 + n)``) and the ``ctypes`` structures;
- what a device says about itself, decoded: :class:`RegionInfo` (with its sparse
  mmap areas), :class:`IrqInfo`, :class:`DeviceInfo`. The bytes are untrusted:
  every offset of a capability chain is checked, and a loop or a truncation
  raises :class:`pmd.errors.VfioError` (:func:`parse_cap_chain`);
- what a driver sends: ``struct vfio_irq_set`` (:func:`build_irq_set`).

Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import vfio_error

__all__ = [
    "PCI_BAR0_REGION_INDEX",
    "PCI_BAR5_REGION_INDEX",
    "PCI_ROM_REGION_INDEX",
    "PCI_CONFIG_REGION_INDEX",
    "PCI_VGA_REGION_INDEX",
    "PCI_NUM_REGIONS",
    "PCI_INTX_IRQ_INDEX",
    "PCI_MSI_IRQ_INDEX",
    "PCI_MSIX_IRQ_INDEX",
    "PCI_ERR_IRQ_INDEX",
    "PCI_REQ_IRQ_INDEX",
    "PCI_NUM_IRQS",
    "IRQ_INDEX_NAMES",
    "REGION_INFO_FLAG_READ",
    "REGION_INFO_FLAG_WRITE",
    "REGION_INFO_FLAG_MMAP",
    "REGION_INFO_FLAG_CAPS",
    "IRQ_INFO_EVENTFD",
    "IRQ_INFO_MASKABLE",
    "IRQ_INFO_AUTOMASKED",
    "IRQ_INFO_NORESIZE",
    "VFIO_API_VERSION",
    "VFIO_TYPE",
    "VFIO_BASE",
    "VFIO_TYPE1_IOMMU",
    "VFIO_SPAPR_TCE_IOMMU",
    "VFIO_TYPE1v2_IOMMU",
    "VFIO_DMA_CC_IOMMU",
    "VFIO_NOIOMMU_IOMMU",
    "IOMMU_TYPE_NAMES",
    "VFIO_GET_API_VERSION",
    "VFIO_CHECK_EXTENSION",
    "VFIO_SET_IOMMU",
    "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER",
    "VFIO_GROUP_UNSET_CONTAINER",
    "VFIO_GROUP_GET_DEVICE_FD",
    "VFIO_DEVICE_GET_INFO",
    "VFIO_DEVICE_GET_REGION_INFO",
    "VFIO_DEVICE_GET_IRQ_INFO",
    "VFIO_DEVICE_SET_IRQS",
    "VFIO_DEVICE_RESET",
    "VFIO_IOMMU_GET_INFO",
    "VFIO_IOMMU_MAP_DMA",
    "VFIO_IOMMU_UNMAP_DMA",
    "IOCTL_NAMES",
    "VFIO_PCI_BAR0_REGION_INDEX",
    "VFIO_PCI_BAR5_REGION_INDEX",
    "VFIO_PCI_ROM_REGION_INDEX",
    "VFIO_PCI_CONFIG_REGION_INDEX",
    "VFIO_PCI_VGA_REGION_INDEX",
    "VFIO_PCI_INTX_IRQ_INDEX",
    "VFIO_PCI_MSI_IRQ_INDEX",
    "VFIO_PCI_MSIX_IRQ_INDEX",
    "VFIO_GROUP_FLAGS_VIABLE",
    "VFIO_GROUP_FLAGS_CONTAINER_SET",
    "VFIO_DEVICE_FLAGS_RESET",
    "VFIO_DEVICE_FLAGS_PCI",
    "VFIO_DEVICE_FLAGS_CAPS",
    "VFIO_REGION_INFO_CAP_SPARSE_MMAP",
    "VFIO_REGION_INFO_CAP_TYPE",
    "VFIO_REGION_INFO_CAP_MSIX_MAPPABLE",
    "VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP",
    "VFIO_IRQ_SET_DATA_NONE",
    "VFIO_IRQ_SET_DATA_BOOL",
    "VFIO_IRQ_SET_DATA_EVENTFD",
    "VFIO_IRQ_SET_ACTION_MASK",
    "VFIO_IRQ_SET_ACTION_UNMASK",
    "VFIO_IRQ_SET_ACTION_TRIGGER",
    "VFIO_IOMMU_INFO_PGSIZES",
    "VFIO_IOMMU_INFO_CAPS",
    "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE",
    "VFIO_DMA_MAP_FLAG_READ",
    "VFIO_DMA_MAP_FLAG_WRITE",
    "ioc",
    "io",
    "SparseArea",
    "InfoCap",
    "RegionInfo",
    "IrqInfo",
    "DeviceInfo",
    "vfio_info_cap_header",
    "vfio_group_status",
    "vfio_device_info",
    "vfio_region_info",
    "vfio_region_sparse_mmap_area",
    "vfio_region_info_cap_sparse_mmap",
    "vfio_region_info_cap_type",
    "vfio_irq_info",
    "vfio_irq_set",
    "vfio_iommu_type1_info",
    "vfio_iommu_type1_dma_map",
    "vfio_iommu_type1_dma_unmap",
    "parse_cap_chain",
    "parse_region_info",
    "parse_device_info",
    "areas_without",
    "parse_irq_info",
    "build_irq_set",
    "build_irq_set_eventfds",
]

# --- Region indexes (include/uapi/linux/vfio.h, "Fixed user ABI"; vfio-user uses the same) ---
PCI_BAR0_REGION_INDEX = 0
PCI_BAR5_REGION_INDEX = 5
PCI_ROM_REGION_INDEX = 6
PCI_CONFIG_REGION_INDEX = 7
PCI_VGA_REGION_INDEX = 8
PCI_NUM_REGIONS = 9  # indexes >= 9 are device specific (described by a CAP_TYPE)

# --- IRQ indexes ---
PCI_INTX_IRQ_INDEX = 0
PCI_MSI_IRQ_INDEX = 1
PCI_MSIX_IRQ_INDEX = 2
PCI_ERR_IRQ_INDEX = 3
PCI_REQ_IRQ_INDEX = 4
PCI_NUM_IRQS = 5
IRQ_INDEX_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}

# --- struct vfio_region_info.flags ---
REGION_INFO_FLAG_READ = 1 << 0
REGION_INFO_FLAG_WRITE = 1 << 1
REGION_INFO_FLAG_MMAP = 1 << 2
REGION_INFO_FLAG_CAPS = 1 << 3

# --- struct vfio_irq_info.flags ---
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3


# ---------------------------------------------------------------------------
# ioctl request numbers: <asm-generic/ioctl.h> layout (x86-64, arm64):
# nr bits 0-7, type bits 8-15, size bits 16-29, direction bits 30-31.
# VFIO uses _IO() everywhere ("to avoid implicitly embedding a size"): the
# argument's size travels in its own argsz field instead.
# ---------------------------------------------------------------------------
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``."""
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def io(type_: int, nr: int) -> int:
    """``_IO(type, nr)``."""
    return ioc(_IOC_NONE, type_, nr, 0)


VFIO_API_VERSION = 0
VFIO_TYPE = ord(";")
VFIO_BASE = 100

# Extensions (VFIO_CHECK_EXTENSION arguments / VFIO_SET_IOMMU types)
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_NOIOMMU_IOMMU = 8
IOMMU_TYPE_NAMES = {VFIO_TYPE1_IOMMU: "type1", VFIO_TYPE1v2_IOMMU: "type1v2", VFIO_NOIOMMU_IOMMU: "no-IOMMU"}

# container (/dev/vfio/vfio)
VFIO_GET_API_VERSION = io(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = io(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = io(VFIO_TYPE, VFIO_BASE + 2)
# group (/dev/vfio/<n>)
VFIO_GROUP_GET_STATUS = io(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = io(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = io(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = io(VFIO_TYPE, VFIO_BASE + 6)
# device
VFIO_DEVICE_GET_INFO = io(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = io(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = io(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = io(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = io(VFIO_TYPE, VFIO_BASE + 11)
# type1 IOMMU (container)
VFIO_IOMMU_GET_INFO = io(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = io(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = io(VFIO_TYPE, VFIO_BASE + 14)

IOCTL_NAMES = {
    VFIO_GET_API_VERSION: "VFIO_GET_API_VERSION",
    VFIO_CHECK_EXTENSION: "VFIO_CHECK_EXTENSION",
    VFIO_SET_IOMMU: "VFIO_SET_IOMMU",
    VFIO_GROUP_GET_STATUS: "VFIO_GROUP_GET_STATUS",
    VFIO_GROUP_SET_CONTAINER: "VFIO_GROUP_SET_CONTAINER",
    VFIO_GROUP_UNSET_CONTAINER: "VFIO_GROUP_UNSET_CONTAINER",
    VFIO_GROUP_GET_DEVICE_FD: "VFIO_GROUP_GET_DEVICE_FD",
    VFIO_DEVICE_GET_INFO: "VFIO_DEVICE_GET_INFO",
    VFIO_DEVICE_GET_REGION_INFO: "VFIO_DEVICE_GET_REGION_INFO",
    VFIO_DEVICE_GET_IRQ_INFO: "VFIO_DEVICE_GET_IRQ_INFO",
    VFIO_DEVICE_SET_IRQS: "VFIO_DEVICE_SET_IRQS",
    VFIO_DEVICE_RESET: "VFIO_DEVICE_RESET",
    VFIO_IOMMU_GET_INFO: "VFIO_IOMMU_GET_INFO",
    VFIO_IOMMU_MAP_DMA: "VFIO_IOMMU_MAP_DMA",
    VFIO_IOMMU_UNMAP_DMA: "VFIO_IOMMU_UNMAP_DMA",
}

# vfio-pci's fixed region and IRQ indexes, under the header's names
VFIO_PCI_BAR0_REGION_INDEX = PCI_BAR0_REGION_INDEX
VFIO_PCI_BAR5_REGION_INDEX = PCI_BAR5_REGION_INDEX
VFIO_PCI_ROM_REGION_INDEX = PCI_ROM_REGION_INDEX
VFIO_PCI_CONFIG_REGION_INDEX = PCI_CONFIG_REGION_INDEX
VFIO_PCI_VGA_REGION_INDEX = PCI_VGA_REGION_INDEX
VFIO_PCI_INTX_IRQ_INDEX = PCI_INTX_IRQ_INDEX
VFIO_PCI_MSI_IRQ_INDEX = PCI_MSI_IRQ_INDEX
VFIO_PCI_MSIX_IRQ_INDEX = PCI_MSIX_IRQ_INDEX

# struct vfio_group_status.flags
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
# struct vfio_device_info.flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
# region info capability ids
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
# device info capability ids
VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP = 5
# struct vfio_irq_set.flags
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
# struct vfio_iommu_type1_info.flags and its capability
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
# struct vfio_iommu_type1_dma_map.flags
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1


@dataclass(frozen=True)
class SparseArea:
    """One mmap-able window of a region, relative to the region's start."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class InfoCap:
    """One entry of a VFIO info capability chain, kept raw (id, version, bytes after the header)."""

    id: int
    version: int
    offset: int  # offset of the capability header in the info buffer
    data: bytes  # the bytes after the 8-byte header, up to the next capability or the end


@dataclass(frozen=True)
class RegionInfo:
    """What a device says about one region (``struct vfio_region_info`` plus its capabilities).

    ``offset`` locates the region for the transport (kernel VFIO: offset in the
    device fd for pread/pwrite/mmap). ``sparse_areas`` is ``None`` when the
    region has no sparse-mmap capability (then the whole region may be mapped
    if ``MMAP`` is set) and a tuple (possibly empty) when it has one: only
    those areas may be mapped; the rest (an MSI-X table, typically) must not.
    """

    index: int
    flags: int
    offset: int
    size: int
    sparse_areas: tuple[SparseArea, ...] | None = None
    type: tuple[int, int] | None = None  # (type, subtype) from VFIO_REGION_INFO_CAP_TYPE
    msix_mappable: bool = False  # VFIO_REGION_INFO_CAP_MSIX_MAPPABLE present
    caps: tuple[InfoCap, ...] = ()

    @property
    def readable(self) -> bool:
        return bool(self.flags & REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & REGION_INFO_FLAG_MMAP) and self.size > 0

    def mmap_areas(self) -> tuple[SparseArea, ...]:
        """The parts of the region that may be mapped (empty if none)."""
        if not self.mmappable:
            return ()
        if self.sparse_areas is not None:
            return self.sparse_areas
        return (SparseArea(0, self.size),)

    def describe_flags(self) -> str:
        names = [
            name
            for bit, name in (
                (REGION_INFO_FLAG_READ, "READ"),
                (REGION_INFO_FLAG_WRITE, "WRITE"),
                (REGION_INFO_FLAG_MMAP, "MMAP"),
                (REGION_INFO_FLAG_CAPS, "CAPS"),
            )
            if self.flags & bit
        ]
        return "|".join(names) or "0"


@dataclass(frozen=True)
class IrqInfo:
    """``struct vfio_irq_info``: how many interrupts an index has and how they behave."""

    index: int
    flags: int
    count: int

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & IRQ_INFO_EVENTFD)

    @property
    def maskable(self) -> bool:
        return bool(self.flags & IRQ_INFO_MASKABLE)

    @property
    def automasked(self) -> bool:
        return bool(self.flags & IRQ_INFO_AUTOMASKED)

    @property
    def noresize(self) -> bool:
        return bool(self.flags & IRQ_INFO_NORESIZE)

    @property
    def name(self) -> str:
        return IRQ_INDEX_NAMES.get(self.index, f"index {self.index}")


@dataclass(frozen=True)
class DeviceInfo:
    """``struct vfio_device_info``: device flags, number of regions and IRQ indexes, caps."""

    flags: int
    num_regions: int
    num_irqs: int
    caps: tuple[InfoCap, ...] = field(default=())

    @property
    def supports_reset(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_FLAGS_RESET)

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_FLAGS_PCI)


# ---------------------------------------------------------------------------
# Structures. Native byte order and alignment (the ioctl ABI is the host's);
# __aligned_u64 is c_uint64, which ctypes aligns to 8 on every 64-bit ABI.
# ---------------------------------------------------------------------------


class vfio_info_cap_header(ctypes.Structure):
    id: int
    version: int
    next: int
    _fields_ = [("id", ctypes.c_uint16), ("version", ctypes.c_uint16), ("next", ctypes.c_uint32)]


class vfio_group_status(ctypes.Structure):
    argsz: int
    flags: int
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_device_info(ctypes.Structure):
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int
    cap_offset: int
    pad: int
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class vfio_region_info(ctypes.Structure):
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    ]


class vfio_region_sparse_mmap_area(ctypes.Structure):
    offset: int
    size: int
    _fields_ = [("offset", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):
    """Header of the sparse-mmap capability; ``nr_areas`` areas follow it."""

    header: vfio_info_cap_header
    nr_areas: int
    reserved: int
    _fields_ = [("header", vfio_info_cap_header), ("nr_areas", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class vfio_region_info_cap_type(ctypes.Structure):
    header: vfio_info_cap_header
    type: int
    subtype: int
    _fields_ = [("header", vfio_info_cap_header), ("type", ctypes.c_uint32), ("subtype", ctypes.c_uint32)]


class vfio_irq_info(ctypes.Structure):
    argsz: int
    flags: int
    index: int
    count: int
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_irq_set(ctypes.Structure):
    """Header of ``struct vfio_irq_set``; ``data[]`` (here: ``__s32`` eventfds) follows at offset 20."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_iommu_type1_info(ctypes.Structure):
    argsz: int
    flags: int
    iova_pgsizes: int
    cap_offset: int
    pad: int
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    argsz: int
    flags: int
    vaddr: int
    iova: int
    size: int
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    argsz: int
    flags: int
    iova: int
    size: int
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


_CAP_HEADER_SIZE = ctypes.sizeof(vfio_info_cap_header)  # 8

# ---------------------------------------------------------------------------
# Parsing and building (pure functions: host-testable, reusable by vfio-user,
# whose messages carry the same structures)
# ---------------------------------------------------------------------------


def parse_cap_chain(buf: bytes, first: int, fixed_size: int, what: str = "info") -> tuple[InfoCap, ...]:
    """Walk a VFIO info capability chain starting at offset ``first`` of ``buf``.

    Offsets are relative to the start of the info buffer; ``next == 0`` ends
    the chain. A capability may not start inside the fixed structure
    (``fixed_size``), run past the buffer, or be visited twice (a loop): each
    raises :class:`VfioError` saying which.
    """
    caps: list[InfoCap] = []
    seen: set[int] = set()
    offset = first
    while offset:
        if offset in seen:
            raise vfio_error(
                f"{what}: capability chain loops back to offset {offset:#x} "
                f"(visited {', '.join(hex(o) for o in sorted(seen))})",
                errno.ELOOP,
            )
        if offset < fixed_size or offset + _CAP_HEADER_SIZE > len(buf):
            raise vfio_error(
                f"{what}: capability at offset {offset:#x} is out of range "
                f"(valid: {fixed_size:#x} .. {len(buf) - _CAP_HEADER_SIZE:#x} in a {len(buf)}-byte buffer)",
                errno.ERANGE,
            )
        seen.add(offset)
        cap_id, version, nxt = struct.unpack_from("=HHI", buf, offset)
        end = nxt if offset < nxt <= len(buf) else len(buf)
        caps.append(InfoCap(cap_id, version, offset, bytes(buf[offset + _CAP_HEADER_SIZE : end])))
        offset = nxt
    return tuple(caps)


def parse_region_info(buf: bytes) -> RegionInfo:
    """Decode a ``struct vfio_region_info`` reply and its capabilities."""
    fixed = ctypes.sizeof(vfio_region_info)
    if len(buf) < fixed:
        raise vfio_error(f"region info is {len(buf)} bytes, shorter than struct vfio_region_info ({fixed})", errno.EINVAL)
    info = vfio_region_info.from_buffer_copy(bytes(buf[:fixed]))
    index = int(info.index)
    what = f"region {index} info"
    caps: tuple[InfoCap, ...] = ()
    if info.flags & REGION_INFO_FLAG_CAPS and info.cap_offset:
        caps = parse_cap_chain(bytes(buf[: min(len(buf), max(info.argsz, fixed))]), int(info.cap_offset), fixed, what)
    sparse: tuple[SparseArea, ...] | None = None
    rtype: tuple[int, int] | None = None
    msix_mappable = False
    size = int(info.size)
    for cap in caps:
        if cap.id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            if len(cap.data) < 8:
                raise vfio_error(f"{what}: sparse mmap capability is truncated ({len(cap.data)} bytes)", errno.EINVAL)
            (nr_areas,) = struct.unpack_from("=I", cap.data, 0)
            room = (len(cap.data) - 8) // 16
            if nr_areas > room:
                raise vfio_error(
                    f"{what}: sparse mmap capability claims {nr_areas} areas but has room for {room}",
                    errno.EINVAL,
                )
            areas = []
            for i in range(nr_areas):
                a_off, a_size = struct.unpack_from("=QQ", cap.data, 8 + 16 * i)
                if a_off + a_size > size:
                    raise vfio_error(
                        f"{what}: sparse mmap area {i} [{a_off:#x}, {a_off + a_size:#x}) "
                        f"lies outside the region (size {size:#x})",
                        errno.EINVAL,
                    )
                if a_size:
                    areas.append(SparseArea(a_off, a_size))
            sparse = tuple(areas)
        elif cap.id == VFIO_REGION_INFO_CAP_TYPE:
            if len(cap.data) < 8:
                raise vfio_error(f"{what}: type capability is truncated ({len(cap.data)} bytes)", errno.EINVAL)
            t, sub = struct.unpack_from("=II", cap.data, 0)
            rtype = (t, sub)
        elif cap.id == VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
            msix_mappable = True
    return RegionInfo(
        index=index,
        flags=int(info.flags),
        offset=int(info.offset),
        size=size,
        sparse_areas=sparse,
        type=rtype,
        msix_mappable=msix_mappable,
        caps=caps,
    )


def parse_device_info(buf: bytes) -> DeviceInfo:
    """Decode a ``struct vfio_device_info`` reply (the 16-byte pre-4.x layout too) and its caps."""
    if len(buf) < 16:
        raise vfio_error(f"device info is {len(buf)} bytes, shorter than 16", errno.EINVAL)
    argsz, flags, num_regions, num_irqs = struct.unpack_from("=IIII", buf, 0)
    caps: tuple[InfoCap, ...] = ()
    fixed = ctypes.sizeof(vfio_device_info)
    if flags & VFIO_DEVICE_FLAGS_CAPS and len(buf) >= fixed:
        (cap_offset,) = struct.unpack_from("=I", buf, vfio_device_info.__dict__["cap_offset"].offset)
        if cap_offset:
            caps = parse_cap_chain(bytes(buf[: min(len(buf), max(argsz, fixed))]), cap_offset, fixed, "device info")
    return DeviceInfo(flags=flags, num_regions=num_regions, num_irqs=num_irqs, caps=caps)


def areas_without(region_size: int, hole_offset: int, hole_size: int, page_size: int = mmap.PAGESIZE) -> tuple[SparseArea, ...]:
    """The mmap-able areas of a region when the pages covering ``[hole_offset, +hole_size)`` are
    excluded (an MSI-X table the kernel will not let us map), as DPDK computes them."""
    start = max(0, hole_offset // page_size * page_size)
    end = min(region_size, (hole_offset + hole_size + page_size - 1) // page_size * page_size)
    if start >= region_size or end <= 0 or hole_size <= 0:
        return (SparseArea(0, region_size),)
    parts = (SparseArea(0, start), SparseArea(end, region_size - end))
    return tuple(a for a in parts if a.size > 0)


def parse_irq_info(buf: bytes) -> IrqInfo:
    info = vfio_irq_info.from_buffer_copy(bytes(buf[: ctypes.sizeof(vfio_irq_info)]))
    return IrqInfo(index=int(info.index), flags=int(info.flags), count=int(info.count))


def build_irq_set(index: int, flags: int, start: int, count: int, data: bytes = b"") -> bytearray:
    """A ``struct vfio_irq_set`` followed by ``data``; ``argsz`` covers both."""
    header = vfio_irq_set(
        argsz=ctypes.sizeof(vfio_irq_set) + len(data), flags=flags, index=index, start=start, count=count
    )
    return bytearray(bytes(header) + data)


def build_irq_set_eventfds(index: int, start: int, fds: Sequence[int]) -> bytearray:
    """``DATA_EVENTFD | ACTION_TRIGGER`` for vectors ``start ..`` on ``fds`` (an ``__s32`` each; -1 = none)."""
    data = struct.pack(f"={len(fds)}i", *fds)
    return build_irq_set(index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, start, len(fds), data)

