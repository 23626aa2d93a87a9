"""This host's PCI devices as sysfs shows them, and moving them between drivers.

The one sysfs reader of pmd: the device list under ``/sys/bus/pci/devices``
(or ``$SYSFS_PCI_DEVICES``, as DPDK's ``rte_pci_get_sysfs_path()`` reads it),
each device's ids, driver, IOMMU group, NUMA node and network interfaces, the
``pmd status`` rows, and bind/unbind through ``driver_override``. Kernel VFIO
(:mod:`pmd.driver.access.vfio`) finds a device's group and driver here.

Attributes are read without blocking, only from regular files, up to 64 KiB;
writes never follow a symbolic link (below, at bind/unbind).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import PmdError
from ..abi.pci import (
    ADDRESS_RE,
    PCI_CLASS_NETWORK,
    VIRTIO_VENDOR_ID,
    PciAddress,
    device_name,
    is_virtio,
    is_virtio_net,
    parse_address,
)

__all__ = [
    "DEFAULT_SYSFS_PCI_DEVICES",
    "VFIO_PCI",
    "sysfs_pci_devices",
    "link_name",
    "is_vfio_driver",
    "group_members",
    "PciDevice",
    "NoSuchDeviceError",
    "DeviceBusyError",
    "read_device",
    "scan",
    "iommu_group",
    "bind",
    "unbind",
    "StatusRow",
    "status_rows",
]


class NoSuchDeviceError(PmdError, LookupError):
    """No PCI device with that address under the sysfs root."""


class DeviceBusyError(PmdError, RuntimeError):
    """The device carries a network interface that is up; moving it would cut the host off."""


DEFAULT_SYSFS_PCI_DEVICES = "/sys/bus/pci/devices"
VFIO_PCI = "vfio-pci"
_VFIO_DRIVERS = (VFIO_PCI,)  # vendor variants are named <vendor>_vfio_pci or <vendor>-vfio-pci
_IFF_UP = 0x1  # include/uapi/linux/if.h


def sysfs_pci_devices(root: str | os.PathLike[str] | None = None) -> Path:
    """The sysfs PCI device directory: ``root``, else ``$SYSFS_PCI_DEVICES``, else /sys.

    Same rule as DPDK's ``rte_pci_get_sysfs_path()``, so one fake tree serves
    both; an empty variable counts as unset.
    """
    if root is not None:
        return Path(root)
    return Path(os.environ.get("SYSFS_PCI_DEVICES") or DEFAULT_SYSFS_PCI_DEVICES)


_ATTRIBUTE_LIMIT = 1 << 16  # a sysfs attribute is a page at most (config space: 4096 bytes)


def _read_attribute(path: Path) -> bytes:
    """A sysfs attribute's bytes. Opened without blocking and checked to be a
    regular file, read up to a limit: where the tree is not sysfs, a FIFO would
    hang the read and a device node (/dev/zero) would never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file: not a sysfs attribute")
        chunks: list[bytes] = []
        total = 0
        while total <= _ATTRIBUTE_LIMIT:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > _ATTRIBUTE_LIMIT:
            raise ValueError(f"{path} holds more than {_ATTRIBUTE_LIMIT} bytes: not a sysfs attribute")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_text(path: Path) -> str | None:
    try:
        return _read_attribute(path).decode(errors="replace").strip()
    except FileNotFoundError:
        return None


def _read_hex_optional(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text, 16)
    except ValueError:
        raise ValueError(f"{path}: expected a hex number, read {text!r}") from None


def _read_hex(path: Path) -> int:
    value = _read_hex_optional(path)
    if value is None:
        raise NoSuchDeviceError(f"{path} is missing: not a PCI device directory")
    return value


def link_name(path: Path) -> str | None:
    """Last component of a symlink's target, without following it (the target may not exist);
    None when ``path`` is missing or not a link (a device's ``driver``, ``iommu_group``)."""
    try:
        return os.path.basename(os.readlink(path).rstrip("/"))
    except OSError:  # missing, or not a link
        return None


def is_vfio_driver(driver: str | None) -> bool:
    """vfio-pci, or a vendor's variant of it (``<vendor>_vfio_pci``, ``<vendor>-vfio-pci``)."""
    return driver is not None and (driver in _VFIO_DRIVERS or driver.replace("-", "_").endswith("vfio_pci"))


def group_members(device_path: Path) -> list[tuple[str, str | None]]:
    """(address, driver) of every device in the IOMMU group of the device at ``device_path``."""
    members_dir = Path(os.path.realpath(device_path / "iommu_group")) / "devices"
    try:
        names = sorted(os.listdir(members_dir))
    except OSError:
        return []
    return [(n, link_name(members_dir / n / "driver")) for n in names]


def _interfaces(path: Path) -> list[Path]:
    """Network interface directories of a device.

    Drivers put them under ``net/`` directly (most NICs) or under a child bus
    device (virtio-pci: ``virtio2/net/eth0``). dpdk-devbind walks the whole
    subtree; we look one level down only, and skip child PCI functions, so a
    bridge does not report the interfaces of the devices behind it.
    """
    found: list[Path] = []
    candidates = [path / "net"]
    try:
        children = sorted(path.iterdir())
    except OSError:
        children = []
    for child in children:
        if child.is_dir() and not child.is_symlink() and not ADDRESS_RE.match(child.name):
            candidates.append(child / "net")
    for net in candidates:
        if net.is_dir():
            found.extend(sorted(p for p in net.iterdir()))
    return found


def _interface_up(iface: Path) -> bool:
    """IFF_UP in the interface's flags; unreadable flags count as up (refuse rather than cut)."""
    text = _read_text(iface / "flags")
    try:
        return text is None or bool(int(text, 16) & _IFF_UP)
    except ValueError:
        return True


@dataclass(frozen=True)
class PciDevice:
    """One PCI function as sysfs describes it (read once, not kept up to date)."""

    address: PciAddress
    path: Path
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int | None
    subsystem_id: int | None
    class_code: int  # 24 bits: base class, subclass, programming interface
    driver: str | None  # basename of the ``driver`` link; None when unbound
    iommu_group: int | None  # last component of the ``iommu_group`` link
    numa_node: int  # -1 when unknown
    driver_override: str | None  # None when unset ("(null)" in sysfs)
    interfaces: tuple[str, ...]
    active_interfaces: tuple[str, ...]  # those with IFF_UP set

    @property
    def config_path(self) -> Path:
        return self.path / "config"

    @property
    def base_class(self) -> int:
        return self.class_code >> 16

    @property
    def is_network(self) -> bool:
        return self.base_class == PCI_CLASS_NETWORK

    @property
    def is_virtio(self) -> bool:
        return is_virtio(self.vendor_id, self.device_id)

    @property
    def is_virtio_net(self) -> bool:
        return is_virtio_net(self.vendor_id, self.device_id, self.subsystem_id)

    @property
    def name(self) -> str:
        return device_name(self.vendor_id, self.device_id, self.subsystem_id)

    def read_config(self) -> bytes:
        """The config space as sysfs gives it (only 64 bytes unless root: Linux pci-sysfs.c)."""
        return _read_attribute(self.config_path)

    def bar_sizes(self) -> dict[int, int]:
        """BAR index -> size from the ``resource`` file (readable without root)."""
        text = _read_text(self.path / "resource") or ""
        sizes: dict[int, int] = {}
        for index, line in enumerate(text.splitlines()[:6]):
            parts = line.split()
            if len(parts) >= 2:
                start, end = int(parts[0], 16), int(parts[1], 16)
                if end > start:
                    sizes[index] = end - start + 1
        return sizes


def read_device(address: str | PciAddress,
                root: str | os.PathLike[str] | None = None) -> PciDevice:
    """Read one device from sysfs; ``NoSuchDeviceError`` when it is not there."""
    addr = parse_address(address)
    base = sysfs_pci_devices(root)
    path = base / str(addr)
    if not path.is_dir():
        raise NoSuchDeviceError(f"no PCI device {addr} under {base} "
                                f"(`pmd status` lists the devices there)")
    vendor = _read_hex(path / "vendor")
    device = _read_hex(path / "device")
    class_code = _read_hex(path / "class")
    group = link_name(path / "iommu_group")
    numa = _read_text(path / "numa_node")
    override = _read_text(path / "driver_override")
    ifaces = _interfaces(path)
    return PciDevice(
        address=addr,
        path=path,
        vendor_id=vendor,
        device_id=device,
        subsystem_vendor_id=_read_hex_optional(path / "subsystem_vendor"),
        subsystem_id=_read_hex_optional(path / "subsystem_device"),
        class_code=class_code,
        driver=link_name(path / "driver"),
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        numa_node=int(numa) if numa is not None and re.fullmatch(r"-?\d+", numa) else -1,
        driver_override=None if override in (None, "", "(null)") else override,
        interfaces=tuple(i.name for i in ifaces),
        active_interfaces=tuple(i.name for i in ifaces if _interface_up(i)),
    )


def scan(root: str | os.PathLike[str] | None = None) -> list[PciDevice]:
    """Every PCI device under the sysfs root, sorted by address.

    Entries whose names are not PCI addresses are skipped; a missing root is
    an empty list (a container without /sys/bus/pci has no devices).
    """
    base = sysfs_pci_devices(root)
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    devices = []
    for name in names:
        try:
            addr = PciAddress.parse(name)
        except ValueError:
            continue
        try:
            devices.append(read_device(addr, base))
        except NoSuchDeviceError:
            continue
    return sorted(devices, key=lambda d: d.address)


def iommu_group(address: str | PciAddress,
                root: str | os.PathLike[str] | None = None) -> int | None:
    """The device's IOMMU group number (DPDK ``rte_vfio_get_group_num``); None without one."""
    return read_device(address, root).iommu_group


# --- bind / unbind (write into sysfs; tests only ever point them at a fake tree) ---
#
# Who may say where pmd writes: the caller (``root=``), and the environment only
# when pmd is not privileged. Root with a preserved environment (sudo -E, or a
# sudoers env_keep) would otherwise write where whoever set SYSFS_PCI_DEVICES
# chose: a tree whose driver_override is a symlink to /etc/shadow.
#
# Under /sys itself the links on the way (bus/pci/devices/X -> ../../../devices/...,
# X/driver -> .../drivers/D) are the kernel's, and only root can change sysfs, so
# following them is what the kernel means. The file written is always a regular
# attribute, never a link: O_NOFOLLOW (open(2)) refuses a last component that is
# one, and fstat refuses anything but a regular file (a FIFO, a device node), so
# a tree that is not sysfs cannot redirect the write.

def _privileged() -> bool:
    """Root, or set-user-ID: the environment may be someone else's."""
    return os.geteuid() == 0 or os.geteuid() != os.getuid()


def _write_root(root: str | os.PathLike[str] | None) -> Path:
    """The device directory bind/unbind read and write: ``root`` when given; else
    as :func:`sysfs_pci_devices`, except that a privileged process refuses a
    ``SYSFS_PCI_DEVICES`` other than /sys's (honoured for reading only)."""
    if root is not None:
        return Path(root)
    env = os.environ.get("SYSFS_PCI_DEVICES")
    if env and _privileged() and os.path.normpath(env) != DEFAULT_SYSFS_PCI_DEVICES:
        raise PmdError(f"SYSFS_PCI_DEVICES={env} is set and pmd runs as root: pmd reads devices there "
                       "but never writes where an environment variable points (with sudo -E whoever set "
                       "it would choose the files root writes); unset it (sudo without -E) to bind this "
                       "machine's device, or pass root= to pmd.driver.sysfs.bind/unbind from Python")
    return sysfs_pci_devices(None)


def _write_sysfs(path: Path, value: str) -> None:
    # No O_CREAT: sysfs attributes exist or the write is wrong; never create a
    # file the kernel did not. O_NOFOLLOW and O_NONBLOCK: see above (a FIFO
    # would block the open).
    flags = os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, f"refusing to write {value!r} to {path}: it is a symbolic link "
                          "(a sysfs attribute never is; this is not the kernel's sysfs)") from exc
        if exc.errno == errno.ENXIO:     # a FIFO nobody reads (O_NONBLOCK)
            raise OSError(exc.errno, f"refusing to write {value!r} to {path}: not a regular file "
                          "(a sysfs attribute is one)") from exc
        hint = " (needs root)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        raise type(exc)(exc.errno, f"cannot open {path} to write {value!r}: "
                        f"{exc.strerror}{hint}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"refusing to write {value!r} to {path}: not a regular file "
                          "(a sysfs attribute is one)")
        os.write(fd, value.encode())
    except OSError as exc:
        if exc.strerror and exc.strerror.startswith("refusing"):
            raise
        raise type(exc)(exc.errno, f"writing {value!r} to {path} failed: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _refuse_active(device: PciDevice, force: bool) -> None:
    # dpdk-devbind refuses to unbind an interface with routes ("*Active*");
    # we refuse any interface that is administratively up.
    if device.active_interfaces and not force:
        names = ", ".join(device.active_interfaces)
        raise DeviceBusyError(
            f"{device.address} carries network interface {names}, which is up; "
            f"unbinding it would take it away from the host. Bring it down "
            f"(ip link set {device.active_interfaces[0]} down) or force it (--force; force=True).")


def bind(address: str | PciAddress, driver: str = VFIO_PCI,
         root: str | os.PathLike[str] | None = None, *, force: bool = False) -> str | None:
    """Move a device to ``driver`` through ``driver_override``; returns the previous driver.

    The sequence in the kernel's sysfs-bus-pci documentation: write the driver
    name to ``driver_override``, unbind from the current driver, then ask the
    bus to probe (``drivers_probe``), which now only matches ``driver``.
    """
    addr = parse_address(address)        # a bad address is the first thing to say
    base = _write_root(root)
    device = read_device(addr, base)
    if device.driver == driver:
        return driver
    _refuse_active(device, force)
    _write_sysfs(device.path / "driver_override", driver)
    if device.driver is not None:
        _write_sysfs(device.path / "driver" / "unbind", str(device.address))
    _write_sysfs(base.parent / "drivers_probe", str(device.address))
    return device.driver


def unbind(address: str | PciAddress, root: str | os.PathLike[str] | None = None, *,
           force: bool = False, reprobe: bool = True) -> str | None:
    """Unbind a device, clear its ``driver_override``, and (``reprobe``) let its kernel driver take it back.

    Returns the driver it was bound to.
    """
    addr = parse_address(address)
    base = _write_root(root)
    device = read_device(addr, base)
    if device.driver is not None:
        _refuse_active(device, force)
        _write_sysfs(device.path / "driver" / "unbind", str(device.address))
    # An empty line clears driver_override (drivers/pci/pci-sysfs.c).
    _write_sysfs(device.path / "driver_override", "\n")
    if reprobe:
        _write_sysfs(base.parent / "drivers_probe", str(device.address))
    return device.driver


# --- status -------------------------------------------------------------------

@dataclass(frozen=True)
class StatusRow:
    """One line of ``pmd status``: a network or virtio device and whether pmd can open it now."""

    address: PciAddress
    vendor_id: int
    device_id: int
    name: str
    driver: str | None
    iommu_group: int | None
    interfaces: tuple[str, ...]
    active_interfaces: tuple[str, ...]
    usable: bool
    reason: str  # why not; or, when usable, the group file

    @property
    def vendor_device(self) -> str:
        return f"{self.vendor_id:04x}:{self.device_id:04x}"


def _usability(device: PciDevice, vfio_dir: Path) -> tuple[bool, str]:
    addr = device.address
    if not device.is_virtio_net:
        what = device.name if device.is_virtio else "not a virtio device"
        return False, f"{what}: pmd drives only virtio-net"
    if device.driver != VFIO_PCI:
        now = f"bound to {device.driver}" if device.driver else "bound to no driver"
        if device.active_interfaces:
            now += f", interface {', '.join(device.active_interfaces)} is up"
        return False, f"{now}; `pmd bind {addr}` moves it to {VFIO_PCI}"
    if device.iommu_group is None:
        return False, ("bound to vfio-pci but in no IOMMU group: enable the IOMMU "
                       "(intel_iommu=on / amd_iommu=on) or vfio no-IOMMU mode")
    group = vfio_dir / str(device.iommu_group)
    noiommu = vfio_dir / f"noiommu-{device.iommu_group}"
    for path, note in ((group, ""), (noiommu, " (no-IOMMU mode)")):
        if os.path.exists(path):
            if not os.access(path, os.R_OK | os.W_OK):
                return False, f"no permission on {path}: run as root or give your user access"
            return True, f"{path}{note}"
    return False, f"{group} does not exist (is the vfio-pci module loaded?)"


def status_rows(root: str | os.PathLike[str] | None = None, *,
                vfio_dir: str | os.PathLike[str] = "/dev/vfio") -> list[StatusRow]:
    """Network-class and virtio devices, with driver, group and usability (``dpdk-devbind --status``).

    Usable means: a virtio-net device, bound to vfio-pci, whose group file
    (``/dev/vfio/<group>`` or ``noiommu-<group>``) exists and is read-writable.
    """
    rows = []
    for device in scan(root):
        if not (device.is_network or device.vendor_id == VIRTIO_VENDOR_ID):
            continue
        usable, reason = _usability(device, Path(vfio_dir))
        rows.append(StatusRow(device.address, device.vendor_id, device.device_id, device.name,
                              device.driver, device.iommu_group, device.interfaces,
                              device.active_interfaces, usable, reason))
    return rows
