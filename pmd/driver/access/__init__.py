"""The device-access interface: what a driver needs from a PCI device, and nothing more.

Kernel VFIO (:class:`pmd.driver.access.vfio.VfioAccess`) and vfio-user
(:class:`pmd.driver.access.vfio_user.VfioUserAccess`) both implement
:class:`DeviceAccess`; the PCI virtio transports (:mod:`pmd.driver.virtio.pci`)
are written against this class only. Its vocabulary is VFIO's because vfio-user
reuses it on the wire (region and IRQ indexes, flags, region info with its
capability chain): that ABI is :mod:`pmd.abi.vfio`.

What the interface gives:

- PCI configuration space as bytes at an offset (``config_read``/``config_write``);
- region information (:class:`pmd.abi.vfio.RegionInfo`: flags, size, offset,
  sparse mmap areas) and region access by read/write (I/O BARs, config space)
  or by mapping into memory (memory BARs: :class:`RegionMapping`);
- DMA map/unmap of a memory range, given its virtual address, the IOVA the
  device shall use, its size, and the memory's fd and offset in that fd
  (kernel VFIO pins by virtual address; vfio-user hands the fd to the server);
  and, on top of it, ``map_memory(DmaMemory)``, which picks the IOVAs itself
  (:func:`pmd.driver.access.iova.choose_iova`) and tells the memory, so pools
  and queues built in it give the device addresses it can use;
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
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from ...errors import QueueStateError, vfio_error
from ...memory.raw import MAP_FIXED, PROT_NONE, mmap_raw, munmap_raw
from ...abi.pci import PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_SPACE_IO, PCI_COMMAND, PCI_COMMAND_MASTER
from ...abi.vfio import (
    PCI_BAR0_REGION_INDEX,
    PCI_BAR5_REGION_INDEX,
    PCI_CONFIG_REGION_INDEX,
    PCI_INTX_IRQ_INDEX,
    PCI_MSI_IRQ_INDEX,
    PCI_MSIX_IRQ_INDEX,
    DeviceInfo,
    IrqInfo,
    RegionInfo,
    SparseArea,
)
from .._mmio import Mmio
from .iova import choose_iova

if TYPE_CHECKING:
    from ...memory import DmaMemory

__all__ = ["RegionMapping", "MemoryMapping", "DeviceAccess"]

# --- memory mapping with a reserved, inaccessible span (the way DPDK maps sparse BARs) ---

_MAX_REGION_SPAN = 1 << 47  # x86-64 and arm64 (4 levels) user address space: no region can be larger
_WIDTH_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


class _MappedMmio(Mmio):
    """An :class:`Mmio` window handed out by a :class:`RegionMapping`.

    It holds the mapping (so the pages stay mapped while the window lives),
    is registered with it by weak reference (so ``mapping.close()`` closes it
    before unmapping), and so is every window made from it with ``window()``.
    """

    def __init__(self, mapping: RegionMapping, address: int, length: int) -> None:
        # A writable buffer over the mapped bytes; Mmio keeps the buffer view
        # (and so this object) until close(). No bytes are copied.
        super().__init__((ctypes.c_char * length).from_address(address))
        self.mapping = mapping
        mapping._adopt(self)

    def window(self, offset: int, length: int) -> Mmio:
        checked = super().window(offset, length)  # bounds, alignment and closed checks
        address = checked.address
        checked.close()
        return _MappedMmio(self.mapping, address, length)


class RegionMapping:
    """A region mapped into this process: ``address`` .. ``address + length``.

    The whole region's span is reserved with an inaccessible anonymous mapping
    and only the allowed areas are mapped from the device over it (so a
    register at region offset ``x`` is at ``address + x``, and touching an
    excluded area, such as an MSI-X table, faults instead of reaching the
    device).

    Registers are reached through the Cython MMIO accessors (:class:`pmd.Mmio`:
    one volatile load or store of the exact width, with the io barrier of
    ``rte_read16``/``rte_write16``): ``mmio(offset, length)`` gives a checked
    window inside one mapped area, and ``read``/``write`` here go through the
    same accessors. ``close()`` closes every window it handed out (and every
    window made from those), then unmaps (idempotent): no window outlives the
    mapping, and a closed window raises instead of touching unmapped memory.
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
        if length > _MAX_REGION_SPAN or file_offset < 0 or file_offset + length > 1 << 63:
            raise vfio_error(
                f"region {region}: {length:#x} bytes at file offset {file_offset:#x} cannot be mapped "
                "(larger than an address space, or past the largest file offset); the device described it wrongly",
                _errno.EINVAL,
            )
        self.region = region
        self.length = length
        self.areas: tuple[SparseArea, ...] = tuple(areas)
        self._closed = True  # until the areas are mapped
        self._windows: weakref.WeakSet[Mmio] = weakref.WeakSet()
        self._area_windows: list[Mmio] = []
        span = (length + page - 1) // page * page
        self._span = span
        try:  # the whole span, inaccessible, so the areas land at their offsets
            base = mmap_raw(0, span, PROT_NONE, _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS, -1, 0)
        except OSError as exc:
            raise vfio_error(
                f"cannot reserve {span:#x} bytes of address space for region {region}: {exc.strerror}", exc.errno
            ) from exc
        try:
            for area in self.areas:
                size = (area.size + page - 1) // page * page
                mmap_raw(
                    base + area.offset,
                    size,
                    _mmap.PROT_READ | _mmap.PROT_WRITE,
                    _mmap.MAP_SHARED | MAP_FIXED,
                    fd,
                    file_offset + area.offset,
                )
        except OSError as exc:
            munmap_raw(base, span)
            raise vfio_error(
                f"cannot mmap region {region} (offset {file_offset:#x}, areas "
                f"{[(hex(a.offset), hex(a.size)) for a in self.areas]}): {exc.strerror}",
                exc.errno,
            ) from exc
        self.address = base
        self._closed = False
        # One window per area for read()/write(); owned here (no reference back: no cycle).
        self._area_windows = [Mmio.from_address(base + a.offset, a.size, None) for a in self.areas]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close every window handed out, then unmap the region. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for window in list(self._windows):
            window.close()
        self._windows.clear()
        for window in self._area_windows:
            window.close()
        self._area_windows = []
        munmap_raw(self.address, self._span)

    def __enter__(self) -> RegionMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.address:#x}"
        return f"<RegionMapping region {self.region} length {self.length:#x} {state}>"

    def _adopt(self, window: Mmio) -> None:
        if self._closed:  # cannot happen through mmio(); a window of a closed window fails earlier
            window.close()
            raise QueueStateError(f"region {self.region} mapping is closed")
        self._windows.add(window)

    @property
    def open_windows(self) -> int:
        """How many windows handed out by :meth:`mmio` (or made from them) are still open."""
        return sum(1 for w in self._windows if not w.closed)

    def _area_index(self, offset: int, size: int) -> int:
        """Index of the mapped area holding ``[offset, offset + size)``, or a ValueError saying why not."""
        if offset < 0 or size <= 0 or offset + size > self.length:
            raise ValueError(
                f"[{offset:#x}, {offset + size:#x}) is outside region {self.region} (length {self.length:#x})"
            )
        for i, area in enumerate(self.areas):
            if area.offset <= offset and offset + size <= area.end:
                return i
        mapped = ", ".join(f"[{a.offset:#x}, {a.end:#x})" for a in self.areas)
        raise ValueError(
            f"[{offset:#x}, {offset + size:#x}) of region {self.region} is not inside one mapped area "
            f"(mapped: {mapped}); the rest is not mapped (an MSI-X table, typically)"
        )

    def mmio(self, offset: int = 0, length: int | None = None) -> Mmio:
        """A :class:`pmd.Mmio` window on ``[offset, offset + length)`` of the region.

        The window must lie inside one mapped area; ``length=None`` runs to the
        end of the area that holds ``offset``. The window keeps this mapping
        alive and is closed by :meth:`close` (as is every ``window()`` of it).
        """
        if self._closed:
            raise QueueStateError(f"region {self.region} mapping is closed")
        if length is None:
            area = self.areas[self._area_index(offset, 1)]
            length = area.end - offset
        self._area_index(offset, length)
        return _MappedMmio(self, self.address + offset, length)

    def _check(self, offset: int, width: int) -> tuple[Mmio, int]:
        if self._closed:
            raise QueueStateError(f"region {self.region} mapping is closed")
        if width not in _WIDTH_FORMATS:
            raise ValueError(f"access width must be 1, 2, 4 or 8 bytes, not {width}")
        if offset < 0 or offset + width > self.length or offset % width:
            raise ValueError(
                f"{width}-byte access at {offset:#x} is outside region {self.region} "
                f"(length {self.length:#x}) or not naturally aligned"
            )
        for window, area in zip(self._area_windows, self.areas):
            if area.offset <= offset and offset + width <= area.end:
                return window, offset - area.offset
        raise ValueError(f"offset {offset:#x} of region {self.region} is in an area that is not mapped")

    def read(self, offset: int, width: int) -> int:
        """One aligned load of ``width`` bytes (1, 2, 4, 8) at ``offset`` (``Mmio.read8`` .. ``read64``)."""
        window, at = self._check(offset, width)
        if width == 1:
            return int(window.read8(at))
        if width == 2:
            return int(window.read16(at))
        if width == 4:
            return int(window.read32(at))
        return int(window.read64(at))

    def write(self, offset: int, width: int, value: int) -> None:
        """One aligned store of ``width`` bytes at ``offset`` (``Mmio.write8`` .. ``write64``)."""
        window, at = self._check(offset, width)
        if width == 1:
            window.write8(at, value)
        elif width == 2:
            window.write16(at, value)
        elif width == 4:
            window.write32(at, value)
        else:
            window.write64(at, value)


@dataclass(frozen=True)
class MemoryMapping:
    """What :meth:`DeviceAccess.map_memory` did for one :class:`pmd.DmaMemory`.

    ``runs`` are the DMA mappings made, ``(vaddr, iova, size)`` each: one for
    an IOMMU, one per physically contiguous stretch in no-IOMMU mode.
    ``how`` is ``"identity"`` (IOVA = virtual address), ``"allocated"`` (an
    IOVA chosen inside the IOMMU's ranges) or ``"physical"`` (no-IOMMU mode).
    """

    memory: DmaMemory
    iova: int  # IOVA of the memory's first byte
    runs: tuple[tuple[int, int, int], ...]
    how: str

    @property
    def size(self) -> int:
        return sum(run[2] for run in self.runs)


_Access = TypeVar("_Access", bound="DeviceAccess")


class _Shift:
    """IOVA translator for memory mapped at one IOVA: ``vaddr + delta`` (a class, so it has a repr)."""

    def __init__(self, delta: int) -> None:
        self.delta = delta

    def __call__(self, vaddr: int) -> int:
        return vaddr + self.delta

    def __repr__(self) -> str:
        return f"<IOVA = vaddr {'+' if self.delta >= 0 else '-'} {abs(self.delta):#x}>"


class DeviceAccess(abc.ABC):
    """Access to one PCI device's config space, regions, DMA and interrupts.

    Implementations: :class:`pmd.driver.access.vfio.VfioAccess` (kernel VFIO),
    :class:`pmd.driver.access.vfio_user.VfioUserAccess` (vfio-user) and, for tests,
    :class:`pmd.backends.local.LocalAccess`. Everything a PCI virtio transport needs goes
    through here.
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

    def _check_range(self, info: RegionInfo, offset: int, size: int, write: bool) -> None:
        """For region_read/region_write: ``[offset, offset + size)`` inside region
        ``info`` (ValueError), and the region readable or writable (EACCES)."""
        if size < 0 or offset < 0 or offset + size > info.size:
            raise ValueError(
                f"{self.name} region {info.index}: access [{offset:#x}, {offset + size:#x}) "
                f"outside the region (size {info.size:#x})"
            )
        if not (info.writable if write else info.readable):
            raise vfio_error(
                f"{self.name} region {info.index} is not {'writable' if write else 'readable'} "
                f"(flags {info.describe_flags()})",
                _errno.EACCES,
            )

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

    # --- the device going away ---

    def on_lost(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Have ``callback(reason)`` called once, from another thread, if the device
        goes away under the driver; returns a function that cancels it.

        The data path never asks the device anything (rings in shared memory, a
        doorbell by store), so without this a driver whose device vanished would
        just see empty rings. A vfio-user server can exit at any time; a kernel
        VFIO device cannot vanish under an open device fd, so the default never
        calls ``callback``.
        """
        return lambda: None

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

    @property
    def dma_mappings(self) -> dict[int, tuple[int, int]]:
        """IOVA -> (virtual address, size) of the DMA mappings made through this object.

        Implementations that track their mappings override this; :meth:`map_memory`
        keeps clear of them when it picks an IOVA.
        """
        return {}

    def iova_ranges(self) -> tuple[tuple[int, int], ...] | None:
        """The inclusive IOVA ranges the device may be given; ``None`` when any IOVA will do."""
        return None

    def iova_alignment(self) -> int:
        """The smallest IOVA page: DMA mappings start and end on multiples of it."""
        return _mmap.PAGESIZE

    # --- DMA of pmd's own memory (transport-neutral) ---

    def _memory_table(self) -> dict[int, MemoryMapping]:
        # Created on first use so that implementations need not call an __init__ here.
        table: dict[int, MemoryMapping] | None = self.__dict__.get("_mapped_memory")
        if table is None:
            table = {}
            self.__dict__["_mapped_memory"] = table
        return table

    @property
    def mapped_memories(self) -> tuple[MemoryMapping, ...]:
        """Every :class:`pmd.DmaMemory` mapped with :meth:`map_memory` and not yet unmapped."""
        return tuple(self._memory_table().values())

    def map_memory(self, memory: DmaMemory) -> int:
        """Make all of ``memory`` reachable by the device; return the IOVA of its first byte.

        The IOVA is chosen here, from the device's IOVA mode:

        - ``"va"`` (an IOMMU): IOVA = virtual address when the whole memory lies
          in one of :meth:`iova_ranges`; otherwise (QEMU's 39-bit emulated IOMMU
          cannot translate ``0x7f...`` addresses) the lowest free IOVA inside the
          ranges, aligned to the memory's page size (:func:`choose_iova`), clear
          of everything this object has mapped;
        - ``"pa"`` (no IOMMU): the physical address of each page (the memory must
          be locked), mapped as physically contiguous stretches.

        Then the memory is told (``memory.set_iova_translator``), so a
        :class:`pmd.PacketPool` or :class:`pmd.Virtqueue` created in it *after*
        this call gives the device these IOVAs. :meth:`unmap_memory` undoes it;
        ``close()`` undoes it for every memory still mapped. While mapped, the
        memory is kept alive by this object.
        """
        if self.closed:
            raise vfio_error(f"{self.name} is closed: cannot map DMA memory", _errno.EBADF)
        table = self._memory_table()
        if id(memory) in table:
            raise vfio_error(
                f"{memory!r} is already mapped for {self.name} at IOVA {table[id(memory)].iova:#x}",
                _errno.EEXIST,
            )
        base, size = memory.address, memory.size  # a closed memory raises QueueStateError here
        translator: Callable[[int], int] | None
        if self.iova_mode == "pa":
            runs, translator = self._physical_runs(memory)
            how = "physical"
        else:
            taken = [(iova, n) for iova, (_vaddr, n) in self.dma_mappings.items()]
            taken += [(run[1], run[2]) for entry in table.values() for run in entry.runs]
            align = max(memory.page_size, self.iova_alignment())
            first = choose_iova(size, self.iova_ranges(), taken, align=align, identity=base)
            runs = [(base, first, size)]
            how = "identity" if first == base else "allocated"
            translator = None if how == "identity" else _Shift(first - base)
        done: list[tuple[int, int, int]] = []
        try:
            for run in runs:
                self._dma_map_memory(memory, *run)
                done.append(run)
            memory.set_iova_translator(translator)
        except BaseException:
            for _vaddr, iova, n in reversed(done):
                try:
                    self.dma_unmap(iova, n)
                except (OSError, ValueError):
                    pass
            raise
        entry = MemoryMapping(memory, int(memory.iova(0)), tuple(runs), how)
        table[id(memory)] = entry
        return entry.iova

    def _physical_runs(self, memory: DmaMemory) -> tuple[list[tuple[int, int, int]], Callable[[int], int]]:
        """No-IOMMU mode: ``(vaddr, physical address, size)`` of each physically contiguous stretch."""
        if not memory.locked:
            raise vfio_error(
                f"{self.name} uses physical addresses (no IOMMU), so the pages of {memory!r} must stay "
                "where they are: create it with DmaMemory(..., lock=True)",
                _errno.EINVAL,
            )
        page, base = memory.page_size, memory.address
        phys = [self.iova_for(base + i * page) for i in range(memory.size // page)]
        runs: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(phys) + 1):
            if i == len(phys) or phys[i] != phys[i - 1] + page:
                runs.append((base + start * page, phys[start], (i - start) * page))
                start = i
        by_page = {base + i * page: p for i, p in enumerate(phys)}
        return runs, by_page.__getitem__

    def _dma_map_memory(self, memory: DmaMemory, vaddr: int, iova: int, size: int) -> None:
        """One DMA mapping for :meth:`map_memory` (implementations may map differently)."""
        self.dma_map(vaddr, iova, size, memory.fd, vaddr - memory.address)

    def unmap_memory(self, memory: DmaMemory) -> None:
        """Undo :meth:`map_memory`: the DMA mappings go, and the memory's IOVAs are its addresses again."""
        table = self._memory_table()
        entry = table.get(id(memory))
        if entry is None:
            raise vfio_error(f"{memory!r} is not mapped for {self.name} (map_memory first)", _errno.ENOENT)
        del table[id(memory)]
        try:
            for _vaddr, iova, n in reversed(entry.runs):
                self.dma_unmap(iova, n)
        finally:
            if not memory.closed:
                memory.set_iova_translator(None)

    def _forget_memory(self) -> None:
        """For ``close()``: drop the :meth:`map_memory` records (the DMA mappings go with the
        container) and give each memory still open its own addresses back as IOVAs."""
        table = self._memory_table()
        entries = list(table.values())
        table.clear()
        for entry in entries:
            if not entry.memory.closed:
                entry.memory.set_iova_translator(None)

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
