"""The device-access interface: what a driver needs from a PCI device, and nothing more.

Kernel VFIO (:mod:`pmd.vfio`) and vfio-user (a later ``pmd.vfio_user``) both
implement :class:`DeviceAccess`; the virtio transports are written against
this class only. The vocabulary is VFIO's because vfio-user reuses it on the
wire: the same region indexes (BAR0-5, ROM, config space, VGA), the same
region and IRQ flag bits, the same region-info capability chain, the same
IRQ index numbers (INTx, MSI, MSI-X, ...). The constants below are that
shared ABI; the ioctl numbers and kernel structures stay in :mod:`pmd.vfio`.

What the interface gives:

- PCI configuration space as bytes at an offset (``config_read``/``config_write``);
- region information (:class:`RegionInfo`: flags, size, offset, sparse mmap
  areas) and region access by read/write (I/O BARs, config space) or by
  mapping into memory (memory BARs: :class:`RegionMapping`);
- DMA map/unmap of a memory range, given its virtual address, the IOVA the
  device shall use, its size, and the memory's fd and offset in that fd
  (kernel VFIO pins by virtual address; vfio-user hands the fd to the server);
- IRQ information and IRQ setup with eventfds (MSI-X, falling back to MSI
  and INTx), disable, unmask;
- bus mastering on, device reset, close (idempotent), context manager.
"""

from __future__ import annotations

import abc
import ctypes
import errno as _errno
import mmap as _mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

from .errors import QueueStateError, VfioError

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
    "PCI_COMMAND",
    "PCI_COMMAND_IO",
    "PCI_COMMAND_MEMORY",
    "PCI_COMMAND_MASTER",
    "PCI_BASE_ADDRESS_0",
    "PCI_BASE_ADDRESS_SPACE_IO",
    "SparseArea",
    "RegionInfo",
    "IrqInfo",
    "InfoCap",
    "DeviceInfo",
    "RegionMapping",
    "DeviceAccess",
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

# --- PCI configuration header (PCI Local Bus 3.0, 6.2) ---
PCI_COMMAND = 0x04  # 16 bits
PCI_COMMAND_IO = 1 << 0
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2  # bus master: the device may issue DMA
PCI_BASE_ADDRESS_0 = 0x10  # six 32-bit BAR registers follow
PCI_BASE_ADDRESS_SPACE_IO = 0x01  # bit 0 of a BAR: 1 = I/O space, 0 = memory


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
        return bool(self.flags & 1)  # VFIO_DEVICE_FLAGS_RESET

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & 2)  # VFIO_DEVICE_FLAGS_PCI


# --- memory mapping with a reserved, inaccessible span (the way DPDK maps sparse BARs) ---

_libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded into this process
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10  # Linux, all architectures pmd runs on
_PROT_NONE = 0  # not exported by Python's mmap module

_WIDTH_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_WIDTH_CTYPES: dict[int, type[ctypes.c_uint8 | ctypes.c_uint16 | ctypes.c_uint32 | ctypes.c_uint64]] = {
    1: ctypes.c_uint8,
    2: ctypes.c_uint16,
    4: ctypes.c_uint32,
    8: ctypes.c_uint64,
}


def _raw_mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _libc.mmap(addr or None, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def _raw_munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def vfio_error(message: str, err: int | None = None) -> VfioError:
    """A :class:`VfioError` whose ``str()`` is exactly ``message`` and whose ``errno`` is ``err``."""
    exc = VfioError(message)
    exc.errno = err
    return exc


class RegionMapping:
    """A region mapped into this process: ``address`` .. ``address + length``.

    The whole region's span is reserved with an inaccessible anonymous mapping
    and only the allowed areas are mapped from the device over it (so a
    register at region offset ``x`` is at ``address + x``, and touching an
    excluded area, such as an MSI-X table, faults instead of reaching the
    device). ``read``/``write`` here are for the control path and for tests;
    the data path uses the Cython MMIO accessors on ``address``.
    ``close()`` unmaps everything (idempotent).
    """

    def __init__(self, region: int, fd: int, file_offset: int, length: int, areas: Sequence[SparseArea]) -> None:
        page = _mmap.PAGESIZE
        if length <= 0:
            raise vfio_error(f"region {region} has size {length}: nothing to map", _errno.EINVAL)
        for area in areas:
            if area.offset % page or area.offset < 0 or area.size <= 0 or area.end > length:
                raise vfio_error(
                    f"region {region}: mmap area [{area.offset:#x}, {area.end:#x}) is not page aligned "
                    f"or lies outside the region (size {length:#x}); the device described it wrongly",
                    _errno.EINVAL,
                )
        self.region = region
        self.length = length
        self.areas: tuple[SparseArea, ...] = tuple(areas)
        span = (length + page - 1) // page * page
        self._span = span
        base = _raw_mmap(0, span, _PROT_NONE, _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS, -1, 0)
        try:
            for area in self.areas:
                size = (area.size + page - 1) // page * page
                _raw_mmap(
                    base + area.offset,
                    size,
                    _mmap.PROT_READ | _mmap.PROT_WRITE,
                    _mmap.MAP_SHARED | _MAP_FIXED,
                    fd,
                    file_offset + area.offset,
                )
        except OSError as exc:
            _raw_munmap(base, span)
            raise vfio_error(
                f"cannot mmap region {region} (offset {file_offset:#x}, areas "
                f"{[(hex(a.offset), hex(a.size)) for a in self.areas]}): {exc.strerror}",
                exc.errno,
            ) from exc
        self.address = base
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _raw_munmap(self.address, self._span)

    def __enter__(self) -> RegionMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.address:#x}"
        return f"<RegionMapping region {self.region} length {self.length:#x} {state}>"

    def _check(self, offset: int, width: int) -> int:
        if self._closed:
            raise QueueStateError(f"region {self.region} mapping is closed")
        if width not in _WIDTH_CTYPES:
            raise ValueError(f"access width must be 1, 2, 4 or 8 bytes, not {width}")
        if offset < 0 or offset + width > self.length or offset % width:
            raise ValueError(
                f"{width}-byte access at {offset:#x} is outside region {self.region} "
                f"(length {self.length:#x}) or not naturally aligned"
            )
        if not any(a.offset <= offset and offset + width <= a.end for a in self.areas):
            raise ValueError(f"offset {offset:#x} of region {self.region} is in an area that is not mapped")
        return self.address + offset

    def read(self, offset: int, width: int) -> int:
        """One aligned load of ``width`` bytes (1, 2, 4, 8) at ``offset``, little-endian value."""
        addr = self._check(offset, width)
        value = int(_WIDTH_CTYPES[width].from_address(addr).value)
        return value

    def write(self, offset: int, width: int, value: int) -> None:
        """One aligned store of ``width`` bytes at ``offset``."""
        addr = self._check(offset, width)
        _WIDTH_CTYPES[width].from_address(addr).value = value


_Access = TypeVar("_Access", bound="DeviceAccess")


class DeviceAccess(abc.ABC):
    """Access to one PCI device's config space, regions, DMA and interrupts.

    Implementations: :class:`pmd.vfio.VfioDevice` (kernel VFIO) and, later,
    a vfio-user client. Everything a virtio transport needs goes through here.
    """

    #: PCI address (kernel VFIO) or a socket path (vfio-user)
    name: str

    # --- identity and information ---

    @property
    @abc.abstractmethod
    def device_info(self) -> DeviceInfo:
        """Device flags, number of regions and IRQ indexes."""

    @abc.abstractmethod
    def region_info(self, index: int) -> RegionInfo:
        """Information about region ``index`` (size 0 when the device does not implement it)."""

    def regions(self) -> list[RegionInfo]:
        """Information about every region index the device reports."""
        return [self.region_info(i) for i in range(self.device_info.num_regions)]

    @abc.abstractmethod
    def irq_info(self, index: int) -> IrqInfo:
        """Information about IRQ index ``index`` (count 0 when not implemented)."""

    # --- region access ---

    @abc.abstractmethod
    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of region ``index`` (config space, an I/O BAR, ...)."""

    @abc.abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of region ``index``."""

    @abc.abstractmethod
    def map_region(self, index: int) -> RegionMapping:
        """Map a memory region (BAR) into this process, honouring its sparse areas.

        The mapping is owned by this object too: it is unmapped on ``close()``
        at the latest.
        """

    def config_read(self, offset: int, size: int) -> bytes:
        """Bytes of PCI configuration space."""
        return self.region_read(PCI_CONFIG_REGION_INDEX, offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        """Write bytes of PCI configuration space."""
        self.region_write(PCI_CONFIG_REGION_INDEX, offset, data)

    def config_read_int(self, offset: int, width: int) -> int:
        """A little-endian 1, 2 or 4-byte value of configuration space."""
        fmt = _WIDTH_FORMATS.get(width)
        if fmt is None or width == 8:
            raise ValueError(f"config access width must be 1, 2 or 4, not {width}")
        value: int = struct.unpack(fmt, self.config_read(offset, width))[0]
        return value

    def config_write_int(self, offset: int, width: int, value: int) -> None:
        fmt = _WIDTH_FORMATS.get(width)
        if fmt is None or width == 8:
            raise ValueError(f"config access width must be 1, 2 or 4, not {width}")
        self.config_write(offset, struct.pack(fmt, value))

    def is_io_bar(self, bar: int) -> bool:
        """Whether BAR ``bar`` is an I/O-space BAR (bit 0 of its config register, as DPDK reads it)."""
        if not PCI_BAR0_REGION_INDEX <= bar <= PCI_BAR5_REGION_INDEX:
            raise ValueError(f"BAR index must be 0..5, not {bar}")
        return bool(self.config_read_int(PCI_BASE_ADDRESS_0 + 4 * bar, 4) & PCI_BASE_ADDRESS_SPACE_IO)

    def enable_bus_master(self) -> None:
        """Set the PCI command register's bus-master bit (config offset 4, bit 2).

        Without it a device cannot DMA: QEMU's virtio-net then accepts every
        register write but silently ignores notifications. Read-modify-write,
        then read back to check the device kept it.
        """
        command = self.config_read_int(PCI_COMMAND, 2)
        if not command & PCI_COMMAND_MASTER:
            self.config_write_int(PCI_COMMAND, 2, command | PCI_COMMAND_MASTER)
            command = self.config_read_int(PCI_COMMAND, 2)
            if not command & PCI_COMMAND_MASTER:
                raise vfio_error(
                    f"{self.name}: the bus-master bit of the PCI command register did not stick "
                    f"(command reads {command:#06x}); the device cannot do DMA",
                    _errno.EIO,
                )

    def bus_master_enabled(self) -> bool:
        return bool(self.config_read_int(PCI_COMMAND, 2) & PCI_COMMAND_MASTER)

    # --- DMA ---

    @property
    def iova_mode(self) -> str:
        """``"va"`` when IOVAs are chosen freely (IOMMU), ``"pa"`` when they must be physical addresses."""
        return "va"

    def iova_for(self, vaddr: int) -> int:
        """The IOVA to use for memory at ``vaddr`` under this device's IOVA mode (identity by default)."""
        return vaddr

    @abc.abstractmethod
    def dma_map(self, vaddr: int, iova: int, size: int, fd: int = -1, fd_offset: int = 0) -> None:
        """Let the device reach ``size`` bytes at ``vaddr`` through IOVA ``iova`` (read and write).

        ``fd``/``fd_offset`` name the same memory as a file (a memfd) for
        implementations that share memory with another process (vfio-user);
        kernel VFIO ignores them.
        """

    @abc.abstractmethod
    def dma_unmap(self, iova: int, size: int) -> None:
        """Undo one :meth:`dma_map` (same ``iova`` and ``size``)."""

    # --- interrupts ---

    @abc.abstractmethod
    def set_irqs(self, index: int, start: int, fds: Sequence[int]) -> None:
        """Signal interrupts ``start .. start+len(fds)-1`` of ``index`` on these eventfds (-1: none)."""

    @abc.abstractmethod
    def disable_irqs(self, index: int) -> None:
        """Disable every interrupt of ``index`` (nothing is signalled any more)."""

    @abc.abstractmethod
    def unmask_irq(self, index: int, start: int = 0, count: int = 1) -> None:
        """Unmask interrupts (INTx is masked automatically after it fires)."""

    def enable_interrupts(self, fds: Sequence[int]) -> tuple[int, int]:
        """Set up interrupts on ``fds``: MSI-X, else MSI, else INTx (one fd), as DPDK falls back.

        Returns ``(irq index, number of vectors set)``; fewer vectors than fds
        when the device has fewer (vector ``i`` signals ``fds[i]``).
        """
        if not fds:
            raise ValueError("enable_interrupts needs at least one eventfd")
        seen: list[str] = []
        for index in (PCI_MSIX_IRQ_INDEX, PCI_MSI_IRQ_INDEX, PCI_INTX_IRQ_INDEX):
            if index >= self.device_info.num_irqs:
                continue
            info = self.irq_info(index)
            seen.append(f"{info.name}: {info.count} vector(s){'' if info.eventfd else ', no eventfd'}")
            if info.count == 0 or not info.eventfd:
                continue
            count = min(len(fds), info.count)
            self.set_irqs(index, 0, list(fds[:count]))
            return index, count
        raise vfio_error(
            f"{self.name}: no interrupt index supports eventfds ({'; '.join(seen) or 'no IRQ indexes'}); "
            "poll the device instead of waiting for interrupts",
            _errno.ENODEV,
        )

    # --- lifetime ---

    @abc.abstractmethod
    def reset(self) -> None:
        """Reset the device (function-level reset), if the device supports it."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything (IRQs, DMA maps, mappings, fds) in reverse order; idempotent."""

    def __enter__(self: _Access) -> _Access:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
