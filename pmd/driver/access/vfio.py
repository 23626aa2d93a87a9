"""Kernel VFIO: a PCI device bound to ``vfio-pci``, driven from this process.

The sequence (``include/uapi/linux/vfio.h``; DPDK ``lib/eal/linux/eal_vfio.c``
and ``drivers/bus/pci/linux/pci_vfio.c`` do the same in C)::

    sysfs: <SYSFS_PCI_DEVICES>/<addr>/iommu_group -> .../iommu_groups/<n>
    container = open("/dev/vfio/vfio")
        VFIO_GET_API_VERSION == VFIO_API_VERSION (0)
        VFIO_CHECK_EXTENSION(TYPE1v2 | TYPE1 | NOIOMMU)
    group = open("/dev/vfio/<n>")            (no-IOMMU mode: "/dev/vfio/noiommu-<n>")
        VFIO_GROUP_GET_STATUS: VIABLE (every device of the group bound to vfio-pci or to nothing)
        VFIO_GROUP_SET_CONTAINER(&container)
    container: VFIO_SET_IOMMU(type)
    device = VFIO_GROUP_GET_DEVICE_FD(group, "<addr>")
        VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO (each region, with capabilities),
        VFIO_DEVICE_GET_IRQ_INFO
    config space and I/O BARs: pread/pwrite(device, region.offset + x)
    memory BARs: mmap(device, region.offset + area.offset) for each allowed (sparse) area
    DMA: VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA on the container; map_memory() picks the IOVA
         (the virtual address when the IOMMU reaches it, else a free one inside its IOVA ranges)
    interrupts: VFIO_DEVICE_SET_IRQS(MSI-X, DATA_EVENTFD | ACTION_TRIGGER, eventfds)

:class:`VfioAccess` owns all of it and gives it back in reverse order on
``close()``, when ``open`` fails half-way, and at interpreter exit. The ABI
(ioctl numbers, structures, info parsers) is :mod:`pmd.abi.vfio`; the device's
group and driver come from :mod:`pmd.driver.sysfs`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import resource
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import VfioError, vfio_error
from ...abi.pci import PCI_CAP_ID_MSIX, PCI_CAPABILITY_LIST, PCI_MSIX_FLAGS_QSIZE, PCI_STATUS, PCI_STATUS_CAP_LIST, PciAddress
from ...abi.vfio import (
    IOCTL_NAMES,
    IOMMU_TYPE_NAMES,
    IRQ_INDEX_NAMES,
    PCI_BAR0_REGION_INDEX,
    PCI_BAR5_REGION_INDEX,
    PCI_CONFIG_REGION_INDEX,
    VFIO_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_GET_API_VERSION,
    VFIO_GROUP_FLAGS_VIABLE,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_GROUP_UNSET_CONTAINER,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_NOIOMMU_IOMMU,
    VFIO_SET_IOMMU,
    VFIO_TYPE1_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    DeviceInfo,
    IrqInfo,
    RegionInfo,
    SparseArea,
    areas_without,
    build_irq_set,
    build_irq_set_eventfds,
    parse_cap_chain,
    parse_device_info,
    parse_irq_info,
    parse_region_info,
    vfio_device_info,
    vfio_group_status,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info,
    vfio_irq_info,
    vfio_region_info,
)
from ..sysfs import group_members, is_vfio_driver, link_name, sysfs_pci_devices
from . import DeviceAccess, RegionMapping
from .pagemap import virt_to_phys

if TYPE_CHECKING:
    from ...memory import DmaMemory

__all__ = ["VFIO_DEV_DIR", "VFIO_CONTAINER_PATH", "IommuInfo", "VfioAccess", "iommu_group_of", "open_container"]

log = logging.getLogger("pmd.vfio")

VFIO_DEV_DIR = "/dev/vfio"
VFIO_CONTAINER_PATH = "/dev/vfio/vfio"
VFIO_NOIOMMU_MODE = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"
_MAX_INFO_SIZE = 1 << 20  # no info reply is anywhere near this; a larger argsz is a bug


def _pci_address(address: str) -> str:
    """``0000:00:03.0`` from any form :class:`pmd.abi.pci.PciAddress` reads, else a VfioError."""
    try:
        return str(PciAddress.parse(address))
    except ValueError:
        raise vfio_error(
            f"{address!r} is not a PCI address: expected DOMAIN:BUS:DEVICE.FUNCTION such as "
            "0000:00:03.0 (or BUS:DEVICE.FUNCTION such as 00:03.0); `pmd status` lists devices",
            errno.EINVAL,
        ) from None


def _bind_hint(address: str, driver: str | None) -> str:
    unbind = f"echo {address} > /sys/bus/pci/drivers/{driver}/unbind; " if driver else ""
    return (
        f"bind it to vfio-pci: `pmd bind {address}`, or by hand: modprobe vfio-pci; {unbind}"
        f"echo vfio-pci > /sys/bus/pci/devices/{address}/driver_override; "
        f"echo {address} > /sys/bus/pci/drivers_probe"
    )


def _device_dir(address: str, sysfs_root: str | None) -> Path:
    devdir = sysfs_pci_devices(sysfs_root) / address
    if not devdir.is_dir():
        raise vfio_error(
            f"no PCI device {address} (nothing at {devdir}); `pmd status` lists the devices of this machine",
            errno.ENODEV,
        )
    return devdir


def iommu_group_of(address: str, sysfs_root: str | None = None) -> int:
    """The IOMMU group number of a device (its ``iommu_group`` link in sysfs), or an error saying how to get one."""
    address = _pci_address(address)
    devdir = _device_dir(address, sysfs_root)
    link = devdir / "iommu_group"
    name = link_name(link)
    if name is None:
        driver = link_name(devdir / "driver")
        bound = f"bound to {driver}" if driver else "not bound to any driver"
        raise vfio_error(
            f"{address} has no IOMMU group ({link} does not exist; it is {bound}). "
            "With an IOMMU (intel_iommu=on / amd_iommu=on on the kernel command line) every device has one; "
            "without an IOMMU, load vfio with enable_unsafe_noiommu_mode=1 and binding it to vfio-pci "
            f"creates a no-IOMMU group. Then {_bind_hint(address, driver)}",
            errno.ENODEV,
        )
    if not name.isdigit():
        raise vfio_error(f"{link} points to {name!r}, which is not a group number", errno.EINVAL)
    return int(name)


def open_container(path: str = VFIO_CONTAINER_PATH) -> int:
    """Open the VFIO container and check its API version; returns the fd (caller closes it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise vfio_error(
            f"{path} does not exist: VFIO is not available in this kernel (not built, or not loaded: "
            "`modprobe vfio-pci`; the kernel needs CONFIG_VFIO and CONFIG_VFIO_PCI)",
            errno.ENOENT,
        ) from None
    except PermissionError as exc:
        raise vfio_error(f"permission denied opening {path}: run as root or make it readable and writable for this user", exc.errno) from None
    except OSError as exc:
        raise vfio_error(f"cannot open {path}: {exc.strerror}", exc.errno) from exc
    try:
        version = fcntl.ioctl(fd, VFIO_GET_API_VERSION, 0)
        if version != VFIO_API_VERSION:
            raise vfio_error(
                f"{path}: VFIO API version {version}, pmd speaks version {VFIO_API_VERSION}", errno.EPROTO
            )
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, VfioError):
            raise
        raise vfio_error(f"VFIO_GET_API_VERSION on {path} failed: {exc.strerror}", exc.errno) from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def _ioctl(fd: int, request: int, arg: int | bytes | bytearray, what: str) -> int:
    """``ioctl`` returning the kernel's integer result; a mutable ``bytearray`` is updated in place.

    (``fcntl.ioctl`` given immutable bytes returns a copy of the buffer instead
    of the result: ``VFIO_GROUP_GET_DEVICE_FD`` needs the result, so buffers
    always go in as a bytearray with ``mutate_flag=True``.)
    """
    name = IOCTL_NAMES.get(request, hex(request))
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        buf = arg if isinstance(arg, bytearray) else bytearray(arg)
        result: int = fcntl.ioctl(fd, request, buf, True)
        return result
    except OSError as exc:
        raise vfio_error(f"{name} ({what}) failed: {exc.strerror}", exc.errno) from exc


def _info_ioctl(fd: int, request: int, request_bytes: bytes, what: str) -> bytearray:
    """An INFO ioctl with ``argsz`` growth: when the kernel asks for a larger buffer (for the
    capability chain), repeat with the size it asked for."""
    buf = bytearray(request_bytes)
    for _ in range(4):
        struct.pack_into("=I", buf, 0, len(buf))
        _ioctl(fd, request, buf, what)
        (argsz,) = struct.unpack_from("=I", buf, 0)
        if argsz <= len(buf):
            return buf
        if argsz > _MAX_INFO_SIZE:
            raise vfio_error(f"{IOCTL_NAMES.get(request)} ({what}) asks for an absurd {argsz}-byte buffer", errno.E2BIG)
        grown = bytearray(argsz)
        grown[: len(request_bytes)] = request_bytes  # input fields (index, ...)
        buf = grown
    raise vfio_error(f"{IOCTL_NAMES.get(request)} ({what}): the kernel kept asking for a larger buffer", errno.E2BIG)


@dataclass(frozen=True)
class IommuInfo:
    """``VFIO_IOMMU_GET_INFO`` (type1): supported IOMMU page sizes and the valid IOVA ranges."""

    flags: int
    iova_pgsizes: int
    iova_ranges: tuple[tuple[int, int], ...]  # inclusive (start, end)

    @property
    def min_page_size(self) -> int:
        return self.iova_pgsizes & -self.iova_pgsizes if self.iova_pgsizes else mmap.PAGESIZE

    def contains(self, iova: int, size: int) -> bool:
        if not self.iova_ranges:
            return True
        return any(start <= iova and iova + size - 1 <= end for start, end in self.iova_ranges)


# Devices opened by this process (address -> owner): a second open gets a clear error
# before the kernel's bare EBUSY.
_open_addresses: set[str] = set()

_libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded into this process
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class _Resources:
    """Everything a VfioAccess holds, released in reverse order; no reference to the device
    itself, so ``weakref.finalize`` can run it at exit or collection."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.container_fd = -1
        self.group_fd = -1
        self.device_fd = -1
        self.group_attached = False
        self.registry: set[str] | None = None  # where this device's address is registered as open
        self.mappings: list[RegionMapping] = []
        self.dma: dict[int, tuple[int, int]] = {}  # iova -> (vaddr, size)
        self.locked: dict[int, int] = {}  # vaddr -> size (mlocked for no-IOMMU DMA)
        self.irqs: dict[int, int] = {}  # irq index -> vectors enabled
        self.closed = False

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        problems: list[str] = []
        if self.device_fd >= 0:
            for index in reversed(list(self.irqs)):
                try:
                    buf = build_irq_set(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)
                    fcntl.ioctl(self.device_fd, VFIO_DEVICE_SET_IRQS, buf, True)
                except OSError as exc:
                    problems.append(f"disable IRQ index {index}: {exc.strerror}")
        self.irqs.clear()
        if self.container_fd >= 0:
            for iova, (_vaddr, size) in reversed(list(self.dma.items())):
                try:
                    unmap = vfio_iommu_type1_dma_unmap(
                        argsz=ctypes.sizeof(vfio_iommu_type1_dma_unmap), flags=0, iova=iova, size=size
                    )
                    fcntl.ioctl(self.container_fd, VFIO_IOMMU_UNMAP_DMA, bytearray(bytes(unmap)), True)
                except OSError as exc:
                    problems.append(f"unmap DMA at IOVA {iova:#x}: {exc.strerror}")
        self.dma.clear()
        for vaddr, size in reversed(list(self.locked.items())):
            _libc.munlock(vaddr, size)
        self.locked.clear()
        for mapping in reversed(self.mappings):
            try:
                mapping.close()
            except OSError as exc:
                problems.append(f"unmap region {mapping.region}: {exc.strerror}")
        self.mappings.clear()
        if self.device_fd >= 0:
            os.close(self.device_fd)
            self.device_fd = -1
        if self.group_fd >= 0:
            if self.group_attached:
                try:
                    fcntl.ioctl(self.group_fd, VFIO_GROUP_UNSET_CONTAINER, 0)
                except OSError as exc:
                    problems.append(f"VFIO_GROUP_UNSET_CONTAINER: {exc.strerror}")
            os.close(self.group_fd)
            self.group_fd = -1
        if self.container_fd >= 0:
            os.close(self.container_fd)
            self.container_fd = -1
        if self.registry is not None:
            self.registry.discard(self.address)
            self.registry = None
        if problems:
            log.warning("closing VFIO device %s: %s", self.address, "; ".join(problems))


class VfioAccess(DeviceAccess):
    """One PCI device opened through kernel VFIO, with its own container and group.

    ``VfioAccess.open("0000:00:03.0")`` (or ``VfioAccess("00:03.0")``); use as a
    context manager or call ``close()``. ``iommu_type`` forces
    :data:`VFIO_TYPE1v2_IOMMU`, :data:`VFIO_TYPE1_IOMMU` or
    :data:`VFIO_NOIOMMU_IOMMU`; by default the group decides (``noiommu-<n>``
    groups use no-IOMMU mode) and type1v2 is preferred over type1.
    ``sysfs_root`` defaults to ``$SYSFS_PCI_DEVICES`` or ``/sys/bus/pci/devices``;
    ``dev_dir`` is where the VFIO character devices are (``/dev/vfio``).
    """

    def __init__(
        self,
        address: str,
        *,
        sysfs_root: str | None = None,
        dev_dir: str = VFIO_DEV_DIR,
        iommu_type: int | None = None,
    ) -> None:
        self.address = _pci_address(address)
        self.name = self.address
        self._sysfs_root = sysfs_root
        self._res = _Resources(self.address)
        self._finalizer = weakref.finalize(self, self._res.release)
        self._regions: dict[int, RegionInfo] = {}
        self._irq_infos: dict[int, IrqInfo] = {}
        self._iommu_info: IommuInfo | None = None
        try:
            self._open(dev_dir, iommu_type)
        except BaseException:
            self._finalizer()  # partial cleanup, reverse order
            raise

    @classmethod
    def open(
        cls,
        address: str,
        *,
        sysfs_root: str | None = None,
        dev_dir: str = VFIO_DEV_DIR,
        iommu_type: int | None = None,
    ) -> VfioAccess:
        """Open ``address`` through kernel VFIO (see the class documentation)."""
        return cls(address, sysfs_root=sysfs_root, dev_dir=dev_dir, iommu_type=iommu_type)

    # --- opening -----------------------------------------------------------

    def _open(self, dev_dir: str, iommu_type: int | None) -> None:
        address, res = self.address, self._res
        if address in _open_addresses:
            raise vfio_error(
                f"{address} is already open in this process: close the other VfioAccess first "
                "(a VFIO group can be opened once)",
                errno.EBUSY,
            )
        self.group = iommu_group_of(address, self._sysfs_root)
        driver = link_name(_device_dir(address, self._sysfs_root) / "driver")
        if not is_vfio_driver(driver):
            state = f"bound to {driver}" if driver else "not bound to any driver"
            raise vfio_error(f"{address} is {state}, not vfio-pci: {_bind_hint(address, driver)}", errno.ENODEV)

        container_path = os.path.join(dev_dir, "vfio")
        res.container_fd = open_container(container_path)

        group_path = os.path.join(dev_dir, str(self.group))
        noiommu_path = os.path.join(dev_dir, f"noiommu-{self.group}")
        self.noiommu = False
        try:
            res.group_fd = os.open(group_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                res.group_fd = os.open(noiommu_path, os.O_RDWR | os.O_CLOEXEC)
                self.noiommu = True
                group_path = noiommu_path
            except FileNotFoundError:
                raise vfio_error(
                    f"neither {group_path} nor {noiommu_path} exists: IOMMU group {self.group} of {address} "
                    f"is not a VFIO group (is vfio-pci loaded and the device bound to it?); "
                    f"{_bind_hint(address, None)}",
                    errno.ENOENT,
                ) from None
            except OSError as exc:
                raise self._group_open_error(noiommu_path, exc) from None
        except OSError as exc:
            raise self._group_open_error(group_path, exc) from None
        self.group_path = group_path

        status = bytearray(bytes(vfio_group_status(argsz=ctypes.sizeof(vfio_group_status), flags=0)))
        _ioctl(res.group_fd, VFIO_GROUP_GET_STATUS, status, group_path)
        flags = vfio_group_status.from_buffer_copy(bytes(status)).flags
        if not flags & VFIO_GROUP_FLAGS_VIABLE:
            raise self._not_viable_error()

        iommu = self._choose_iommu(iommu_type)
        container = bytearray(struct.pack("=i", res.container_fd))
        _ioctl(res.group_fd, VFIO_GROUP_SET_CONTAINER, container, f"{group_path} into the container")
        res.group_attached = True
        try:
            fcntl.ioctl(res.container_fd, VFIO_SET_IOMMU, iommu)
        except OSError as exc:
            raise vfio_error(
                f"VFIO_SET_IOMMU ({IOMMU_TYPE_NAMES.get(iommu, iommu)}) for group {self.group} failed: "
                f"{exc.strerror}",
                exc.errno,
            ) from exc
        self.iommu_type = iommu

        name = bytearray(address.encode() + b"\0")
        try:
            dev_fd = fcntl.ioctl(res.group_fd, VFIO_GROUP_GET_DEVICE_FD, name, True)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise vfio_error(
                    f"{address} is already open (VFIO_GROUP_GET_DEVICE_FD: device busy): another process "
                    "(QEMU, DPDK, another pmd) or another part of this one holds it; close it first",
                    errno.EBUSY,
                ) from exc
            raise vfio_error(f"VFIO_GROUP_GET_DEVICE_FD ({address}) failed: {exc.strerror}", exc.errno) from exc
        if dev_fd < 0:
            raise vfio_error(f"VFIO_GROUP_GET_DEVICE_FD ({address}) returned {dev_fd}", errno.EIO)
        res.device_fd = dev_fd
        _open_addresses.add(address)
        res.registry = _open_addresses

        buf = _info_ioctl(dev_fd, VFIO_DEVICE_GET_INFO, bytes(vfio_device_info()), address)
        self._device_info = parse_device_info(bytes(buf))
        if not self._device_info.is_pci:
            raise vfio_error(f"{address}: VFIO says this is not a PCI device (flags {self._device_info.flags:#x})", errno.ENODEV)
        for index in range(self._device_info.num_regions):
            self.region_info(index)
        if PCI_CONFIG_REGION_INDEX not in self._regions or self._regions[PCI_CONFIG_REGION_INDEX].size == 0:
            raise vfio_error(f"{address}: VFIO reports no PCI configuration space region", errno.ENODEV)
        log.debug(
            "opened %s: group %s (%s), %s, %d regions, %d IRQ indexes",
            address,
            self.group,
            group_path,
            IOMMU_TYPE_NAMES.get(iommu, iommu),
            self._device_info.num_regions,
            self._device_info.num_irqs,
        )

    def _group_open_error(self, path: str, exc: OSError) -> VfioError:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return vfio_error(
                f"permission denied opening {path}: run as root, or give this user the group file "
                f"(chown $USER {path}) and a large enough locked-memory limit (ulimit -l) for DMA",
                exc.errno,
            )
        if exc.errno == errno.EBUSY:
            return vfio_error(
                f"{path} is busy: IOMMU group {self.group} ({self.address}) is already open in another "
                "process (QEMU, DPDK, another pmd); close it there first",
                errno.EBUSY,
            )
        return vfio_error(f"cannot open {path}: {exc.strerror}", exc.errno)

    def _not_viable_error(self) -> VfioError:
        members = group_members(sysfs_pci_devices(self._sysfs_root) / self.address)
        others = [
            f"{addr} ({'driver ' + drv if drv else 'no driver'})"
            for addr, drv in members
            if addr != self.address and not is_vfio_driver(drv)
        ]
        listing = ", ".join(others) if others else "(sysfs lists none; check /sys/kernel/iommu_groups)"
        binds = "; ".join(f"`pmd bind {addr}`" for addr, drv in members if addr != self.address and drv)
        return vfio_error(
            f"IOMMU group {self.group} of {self.address} is not viable: every device in the group must be "
            f"bound to vfio-pci (or to no driver) before any of them can be used. Other devices in the group: "
            f"{listing}. Bind them to vfio-pci ({binds or 'pmd bind ADDR'}), or unbind them from their "
            "drivers, but never a device this machine needs (its disks, its network)",
            errno.EPERM,
        )

    def _choose_iommu(self, requested: int | None) -> int:
        fd = self._res.container_fd

        def supported(ext: int) -> bool:
            try:
                return fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, ext) > 0
            except OSError:
                return False

        if requested is not None:
            if not supported(requested):
                raise vfio_error(
                    f"the VFIO container does not support IOMMU type {IOMMU_TYPE_NAMES.get(requested, requested)}",
                    errno.ENOTSUP,
                )
            return requested
        if self.noiommu:
            if not supported(VFIO_NOIOMMU_IOMMU):
                raise vfio_error(
                    f"group {self.group_path} is a no-IOMMU group but the container refuses VFIO_NOIOMMU_IOMMU: "
                    f"load vfio with enable_unsafe_noiommu_mode=1 (see {VFIO_NOIOMMU_MODE}); the kernel "
                    "needs CONFIG_VFIO_NOIOMMU",
                    errno.ENOTSUP,
                )
            return VFIO_NOIOMMU_IOMMU
        for ext in (VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU):
            if supported(ext):
                return ext
        raise vfio_error(
            "the VFIO container supports neither the type1v2 nor the type1 IOMMU (modprobe vfio_iommu_type1); "
            "other IOMMU types (sPAPR) are not supported by pmd",
            errno.ENOTSUP,
        )

    # --- state -------------------------------------------------------------

    def _live(self) -> _Resources:
        if self._res.closed:
            raise vfio_error(f"VFIO device {self.address} is closed", errno.EBADF)
        return self._res

    @property
    def closed(self) -> bool:
        return self._res.closed

    @property
    def device_fd(self) -> int:
        return self._res.device_fd

    @property
    def group_fd(self) -> int:
        return self._res.group_fd

    @property
    def container_fd(self) -> int:
        return self._res.container_fd

    @property
    def device_info(self) -> DeviceInfo:
        return self._device_info

    @property
    def enabled_irqs(self) -> dict[int, int]:
        """IRQ index -> number of vectors currently set up."""
        return dict(self._res.irqs)

    @property
    def dma_mappings(self) -> dict[int, tuple[int, int]]:
        """IOVA -> (virtual address, size) of every DMA mapping made through this device."""
        return dict(self._res.dma)

    def close(self) -> None:
        self._forget_memory()  # map_memory records; the DMA mappings themselves go in release()
        self._finalizer()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"group {getattr(self, 'group', '?')}"
        return f"<VfioAccess {self.address} {state}>"

    # --- regions -----------------------------------------------------------

    def region_info(self, index: int) -> RegionInfo:
        cached = self._regions.get(index)
        if cached is not None:
            return cached
        res = self._live()
        if not 0 <= index < self._device_info.num_regions:
            raise ValueError(f"{self.address} has regions 0..{self._device_info.num_regions - 1}, not {index}")
        request = bytes(vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=index))
        try:
            buf = _info_ioctl(res.device_fd, VFIO_DEVICE_GET_REGION_INFO, request, f"{self.address} region {index}")
        except VfioError as exc:
            # vfio-pci answers EINVAL for regions a device does not have (VGA on a NIC)
            if exc.errno != errno.EINVAL:
                raise
            info = RegionInfo(index=index, flags=0, offset=0, size=0)
        else:
            info = parse_region_info(bytes(buf))
        self._regions[index] = info
        return info

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        res = self._live()
        info = self.region_info(index)
        self._check_range(info, offset, size, write=False)
        try:
            data = os.pread(res.device_fd, size, info.offset + offset)
        except OSError as exc:
            raise vfio_error(
                f"{self.address} region {index}: read of {size} bytes at {offset:#x} failed: {exc.strerror}",
                exc.errno,
            ) from exc
        if len(data) != size:
            raise vfio_error(
                f"{self.address} region {index}: short read at {offset:#x} ({len(data)} of {size} bytes)", errno.EIO
            )
        return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        res = self._live()
        info = self.region_info(index)
        self._check_range(info, offset, len(data), write=True)
        try:
            done = os.pwrite(res.device_fd, data, info.offset + offset)
        except OSError as exc:
            raise vfio_error(
                f"{self.address} region {index}: write of {len(data)} bytes at {offset:#x} failed: {exc.strerror}",
                exc.errno,
            ) from exc
        if done != len(data):
            raise vfio_error(
                f"{self.address} region {index}: short write at {offset:#x} ({done} of {len(data)} bytes)", errno.EIO
            )

    def _msix_table(self) -> tuple[int, int, int] | None:
        """(BAR, offset, size) of the MSI-X table from the config-space capability list, or None."""
        try:
            status = self.config_read_int(PCI_STATUS, 2)
            if not status & PCI_STATUS_CAP_LIST:
                return None
            pos = self.config_read_int(PCI_CAPABILITY_LIST, 1) & ~3
            seen: set[int] = set()
            while pos and pos not in seen and 0x40 <= pos <= 0xFC:
                seen.add(pos)
                cap_id = self.config_read_int(pos, 1)
                if cap_id == PCI_CAP_ID_MSIX:
                    control = self.config_read_int(pos + 2, 2)
                    table = self.config_read_int(pos + 4, 4)
                    return table & 7, table & ~7, ((control & PCI_MSIX_FLAGS_QSIZE) + 1) * 16
                pos = self.config_read_int(pos + 1, 1) & ~3
        except (VfioError, ValueError):
            return None
        return None

    def mmap_areas(self, index: int) -> tuple[SparseArea, ...]:
        """The areas of region ``index`` that :meth:`map_region` maps.

        The kernel's sparse-mmap capability decides when present. Without it
        (older kernels), the page-aligned span of an MSI-X table in this BAR
        is left out unless the kernel says the table is mappable, as DPDK does.
        """
        info = self.region_info(index)
        areas = info.mmap_areas()
        if not areas or info.sparse_areas is not None or info.msix_mappable:
            return areas
        msix = self._msix_table()
        if msix is None or msix[0] != index:
            return areas
        return areas_without(info.size, msix[1], msix[2])

    def map_region(self, index: int) -> RegionMapping:
        res = self._live()
        info = self.region_info(index)
        if info.size == 0:
            raise vfio_error(f"{self.address} has no region {index} (size 0: BAR not implemented)", errno.ENODEV)
        if PCI_BAR0_REGION_INDEX <= index <= PCI_BAR5_REGION_INDEX and self.is_io_bar(index):
            raise vfio_error(
                f"{self.address} BAR{index} is an I/O-space BAR: it cannot be mapped; use region_read/region_write",
                errno.EINVAL,
            )
        if not info.mmappable:
            raise vfio_error(
                f"{self.address} region {index} cannot be mmapped (flags {info.describe_flags()}); "
                "use region_read/region_write",
                errno.EINVAL,
            )
        areas = self.mmap_areas(index)
        if not areas:
            raise vfio_error(
                f"{self.address} region {index}: the kernel allows no part of it to be mapped "
                "(sparse mmap capability with no areas)",
                errno.EINVAL,
            )
        mapping = RegionMapping(index, res.device_fd, info.offset, info.size, areas)
        res.mappings.append(mapping)
        return mapping

    # --- DMA -----------------------------------------------------------------

    @property
    def iova_mode(self) -> str:
        return "pa" if self.iommu_type == VFIO_NOIOMMU_IOMMU else "va"

    def iova_for(self, vaddr: int) -> int:
        return virt_to_phys(vaddr) if self.iova_mode == "pa" else vaddr

    def iova_ranges(self) -> tuple[tuple[int, int], ...] | None:
        """The IOMMU's valid IOVA ranges (``None``: no-IOMMU mode, or a kernel that does not say)."""
        if self.iova_mode == "pa":
            return None
        return self.iommu_info().iova_ranges or None

    def iova_alignment(self) -> int:
        if self.iova_mode == "pa":
            return mmap.PAGESIZE
        return max(mmap.PAGESIZE, self.iommu_info().min_page_size)

    def _dma_map_memory(self, memory: DmaMemory, vaddr: int, iova: int, size: int) -> None:
        # No-IOMMU mode locks the pages it maps, and munlock does not nest: memory that
        # DmaMemory locked itself is not locked (nor later unlocked) here a second time.
        self._dma_map(vaddr, iova, size, lock=not memory.locked)

    def iommu_info(self) -> IommuInfo:
        """Page sizes and valid IOVA ranges of the type1 IOMMU (``VFIO_IOMMU_GET_INFO``)."""
        if self._iommu_info is not None:
            return self._iommu_info
        res = self._live()
        if self.iommu_type == VFIO_NOIOMMU_IOMMU:
            raise vfio_error("no-IOMMU mode has no IOMMU to describe: IOVAs are physical addresses", errno.ENOTSUP)
        fixed = ctypes.sizeof(vfio_iommu_type1_info)
        buf = _info_ioctl(res.container_fd, VFIO_IOMMU_GET_INFO, bytes(vfio_iommu_type1_info()), "container")
        info = vfio_iommu_type1_info.from_buffer_copy(bytes(buf[:fixed]))
        ranges: list[tuple[int, int]] = []
        if info.flags & VFIO_IOMMU_INFO_CAPS and info.cap_offset:
            for cap in parse_cap_chain(bytes(buf), int(info.cap_offset), fixed, "IOMMU info"):
                if cap.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE and len(cap.data) >= 8:
                    (nr,) = struct.unpack_from("=I", cap.data, 0)
                    nr = min(nr, (len(cap.data) - 8) // 16)
                    ranges.extend(struct.unpack_from("=QQ", cap.data, 8 + 16 * i) for i in range(nr))
        pgsizes = int(info.iova_pgsizes) if info.flags & VFIO_IOMMU_INFO_PGSIZES else 0
        self._iommu_info = IommuInfo(int(info.flags), pgsizes, tuple((int(a), int(b)) for a, b in ranges))
        return self._iommu_info

    def dma_map(self, vaddr: int, iova: int, size: int, fd: int = -1, fd_offset: int = 0) -> None:
        """Map ``size`` bytes at ``vaddr`` for device reads and writes at ``iova``.

        type1: ``VFIO_IOMMU_MAP_DMA`` (the kernel pins the pages). No-IOMMU:
        nothing to program; the pages are locked and ``iova`` must be their
        physical address (:meth:`iova_for`), contiguous over the range.
        ``fd``/``fd_offset`` are not needed by kernel VFIO.
        :meth:`map_memory` maps a whole :class:`pmd.DmaMemory` and picks the IOVA.
        """
        self._dma_map(vaddr, iova, size, lock=True)

    def _dma_map(self, vaddr: int, iova: int, size: int, lock: bool) -> None:
        res = self._live()
        page = mmap.PAGESIZE
        if size <= 0 or vaddr % page or iova % page or size % page:
            raise ValueError(
                f"DMA map needs page-aligned ({page:#x}) vaddr, iova and a positive page-multiple size; "
                f"got vaddr {vaddr:#x}, iova {iova:#x}, size {size:#x}"
            )
        for other, (_v, other_size) in res.dma.items():
            if iova < other + other_size and other < iova + size:
                raise vfio_error(
                    f"DMA map at IOVA [{iova:#x}, {iova + size:#x}) overlaps the mapping at "
                    f"[{other:#x}, {other + other_size:#x})",
                    errno.EEXIST,
                )
        if self.iommu_type == VFIO_NOIOMMU_IOMMU:
            self._noiommu_map(res, vaddr, iova, size, lock)
            return
        request = vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(vfio_iommu_type1_dma_map),
            flags=VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        try:
            fcntl.ioctl(res.container_fd, VFIO_IOMMU_MAP_DMA, bytearray(bytes(request)), True)
        except OSError as exc:
            raise self._dma_map_error(exc, vaddr, iova, size) from exc
        res.dma[iova] = (vaddr, size)

    def _dma_map_error(self, exc: OSError, vaddr: int, iova: int, size: int) -> VfioError:
        what = f"VFIO_IOMMU_MAP_DMA of {size:#x} bytes at vaddr {vaddr:#x} to IOVA {iova:#x} failed: {exc.strerror}"
        hint = ""
        if exc.errno == errno.ENOMEM:
            soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
            hint = (
                f"; the pages could not be pinned: the locked-memory limit (ulimit -l) is {limit}, "
                "raise it (or run as root)"
            )
        elif exc.errno == errno.EEXIST:
            hint = "; the IOVA range overlaps an existing DMA mapping in this container"
        elif exc.errno == errno.EFAULT:
            hint = "; the virtual address range is not mapped in this process"
        elif exc.errno == errno.ENOSPC:
            hint = "; too many DMA mappings (vfio_iommu_type1 dma_entry_limit): map larger regions"
        elif exc.errno == errno.EINVAL:
            try:
                info = self.iommu_info()
            except VfioError:
                info = None
            if info is not None and not info.contains(iova, size):
                ranges = ", ".join(f"[{a:#x}, {b:#x}]" for a, b in info.iova_ranges)
                hint = (
                    f"; the IOVA range lies outside what the IOMMU can address ({ranges}): "
                    "choose an IOVA inside it (IOVA = virtual address needs DMA memory mapped low enough)"
                )
            elif info is not None and info.min_page_size > mmap.PAGESIZE:
                hint = f"; the IOMMU's smallest page is {info.min_page_size:#x}: align to it"
        return vfio_error(what + hint, exc.errno)

    def _noiommu_map(self, res: _Resources, vaddr: int, iova: int, size: int, lock: bool = True) -> None:
        if lock and _libc.mlock(vaddr, size) != 0:
            err = ctypes.get_errno()
            raise vfio_error(
                f"cannot lock {size:#x} bytes at {vaddr:#x} for no-IOMMU DMA: {os.strerror(err)} "
                "(raise ulimit -l or run as root)",
                err,
            )
        try:
            page = mmap.PAGESIZE
            for off in range(0, size, page):
                phys = virt_to_phys(vaddr + off)
                if phys != iova + off:
                    raise vfio_error(
                        f"no-IOMMU DMA map: page {vaddr + off:#x} is at physical {phys:#x}, not {iova + off:#x}; "
                        "the range is not physically contiguous from the given IOVA (use iova_for() per page, "
                        "or hugepages)",
                        errno.EINVAL,
                    )
        except BaseException:
            if lock:
                _libc.munlock(vaddr, size)
            raise
        if lock:
            res.locked[vaddr] = size
        res.dma[iova] = (vaddr, size)

    def dma_unmap(self, iova: int, size: int) -> None:
        res = self._live()
        entry = res.dma.get(iova)
        if entry is None or entry[1] != size:
            known = ", ".join(f"{i:#x}+{s:#x}" for i, (_v, s) in res.dma.items()) or "none"
            raise vfio_error(
                f"no DMA mapping at IOVA {iova:#x} of size {size:#x} to unmap (mappings: {known})", errno.ENOENT
            )
        vaddr = entry[0]
        if self.iommu_type == VFIO_NOIOMMU_IOMMU:
            del res.dma[iova]
            if res.locked.pop(vaddr, None) is not None:
                _libc.munlock(vaddr, size)
            return
        request = bytearray(
            bytes(vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(vfio_iommu_type1_dma_unmap), iova=iova, size=size))
        )
        _ioctl(res.container_fd, VFIO_IOMMU_UNMAP_DMA, request, f"IOVA {iova:#x} size {size:#x}")
        del res.dma[iova]
        done = vfio_iommu_type1_dma_unmap.from_buffer_copy(bytes(request)).size
        if done != size:
            raise vfio_error(f"VFIO_IOMMU_UNMAP_DMA at IOVA {iova:#x}: unmapped {done:#x} of {size:#x} bytes", errno.EIO)

    # --- interrupts ------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        cached = self._irq_infos.get(index)
        if cached is not None:
            return cached
        res = self._live()
        if not 0 <= index < self._device_info.num_irqs:
            raise ValueError(f"{self.address} has IRQ indexes 0..{self._device_info.num_irqs - 1}, not {index}")
        buf = bytearray(bytes(vfio_irq_info(argsz=ctypes.sizeof(vfio_irq_info), index=index)))
        try:
            _ioctl(res.device_fd, VFIO_DEVICE_GET_IRQ_INFO, buf, f"{self.address} IRQ index {index}")
        except VfioError as exc:
            # vfio-pci answers EINVAL for indexes the device lacks (ERR on a conventional PCI device)
            if exc.errno != errno.EINVAL:
                raise
            info = IrqInfo(index=index, flags=0, count=0)
        else:
            info = parse_irq_info(bytes(buf))
        self._irq_infos[index] = info
        return info

    def set_irqs(self, index: int, start: int, fds: Sequence[int]) -> None:
        res = self._live()
        info = self.irq_info(index)
        if not fds:
            raise ValueError("set_irqs needs at least one eventfd (use disable_irqs to turn an index off)")
        if start < 0 or start + len(fds) > info.count:
            raise vfio_error(
                f"{self.address} {info.name} has {info.count} vector(s); cannot set {start}..{start + len(fds) - 1}",
                errno.EINVAL,
            )
        if not info.eventfd:
            raise vfio_error(f"{self.address} {info.name} does not signal through eventfds", errno.ENOTSUP)
        other = [IRQ_INDEX_NAMES.get(i, str(i)) for i in res.irqs if i != index]
        buf = build_irq_set_eventfds(index, start, fds)
        try:
            fcntl.ioctl(res.device_fd, VFIO_DEVICE_SET_IRQS, buf, True)
        except OSError as exc:
            hint = f"; {', '.join(other)} is enabled: disable it first" if other else ""
            raise vfio_error(
                f"VFIO_DEVICE_SET_IRQS ({self.address} {info.name} vectors {start}..{start + len(fds) - 1} "
                f"on eventfds {list(fds)}) failed: {exc.strerror}{hint}",
                exc.errno,
            ) from exc
        res.irqs[index] = max(res.irqs.get(index, 0), start + len(fds))

    def disable_irqs(self, index: int) -> None:
        res = self._live()
        info = self.irq_info(index)
        buf = build_irq_set(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)
        _ioctl(res.device_fd, VFIO_DEVICE_SET_IRQS, buf, f"{self.address} disable {info.name}")
        res.irqs.pop(index, None)

    def unmask_irq(self, index: int, start: int = 0, count: int = 1) -> None:
        res = self._live()
        info = self.irq_info(index)
        buf = build_irq_set(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, start, count)
        _ioctl(res.device_fd, VFIO_DEVICE_SET_IRQS, buf, f"{self.address} unmask {info.name}")

    # --- reset -------------------------------------------------------------------

    def reset(self) -> None:
        res = self._live()
        if not self._device_info.supports_reset:
            raise vfio_error(
                f"{self.address} does not support VFIO_DEVICE_RESET (VFIO_DEVICE_GET_INFO flags "
                f"{self._device_info.flags:#x} lack VFIO_DEVICE_FLAGS_RESET: no FLR or PM reset); the caller "
                "must reset it through the virtio device_status register (write 0, wait until it reads 0)",
                errno.ENOTSUP,
            )
        _ioctl(res.device_fd, VFIO_DEVICE_RESET, 0, self.address)

