"""PCI discovery (sysfs) and configuration-space parsing.

Two halves, both pure Python and standard library only:

* **sysfs**: PCI addresses, the device list under ``/sys/bus/pci/devices``
  (or ``$SYSFS_PCI_DEVICES``, as DPDK's ``rte_pci_get_sysfs_path()`` reads it),
  each device's ids, driver, IOMMU group, NUMA node and network interfaces,
  the ``pmd status`` rows, and bind/unbind through ``driver_override``.
* **config space**: the header, the six BARs, the capability list, MSI, MSI-X,
  PCI Express and the virtio vendor capabilities, parsed from bytes that came
  from anywhere (a sysfs ``config`` file, a VFIO config region, a vfio-user
  server, a fixture). The bytes are untrusted: every pointer and length is
  checked, a looping list raises, and nothing is read outside the data.

References: PCI Local Bus Specification 3.0 (6.1 header, 6.2.5 BARs,
6.7 capability list, 6.8 MSI/MSI-X), PCI Express Base 4.0 (7.5.3 PCIe
capability, 7.6 extended capabilities), Virtio 1.2 (4.1.2 ids, 4.1.4
virtio structure capabilities).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .errors import ConfigSpaceError, PmdError

__all__ = [
    "DEFAULT_SYSFS_PCI_DEVICES",
    "VFIO_PCI",
    "VIRTIO_VENDOR_ID",
    "PciAddress",
    "parse_address",
    "sysfs_pci_devices",
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
    "format_status",
    "Bar",
    "Capability",
    "VendorCapability",
    "VirtioPciCap",
    "MsiCapability",
    "MsixCapability",
    "PcieCapability",
    "ExtendedCapability",
    "ConfigSpace",
    "parse_config",
    "VirtioStructures",
    "select_virtio_structures",
    "format_info",
    "device_name",
]


class NoSuchDeviceError(PmdError, LookupError):
    """No PCI device with that address under the sysfs root."""


class DeviceBusyError(PmdError, RuntimeError):
    """The device carries a network interface that is up; moving it would cut the host off."""


# ---------------------------------------------------------------------------
# PCI addresses
# ---------------------------------------------------------------------------

# domain:bus:device.function, all hex; the domain is optional (then 0), as
# lspci and DPDK's rte_pci_addr_parse accept. Linux domains can exceed 16 bits
# (VMD uses 0x10000 and up), so up to 8 hex digits are allowed there.
_ADDRESS_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?"
    r"(?P<bus>[0-9a-fA-F]{1,2}):(?P<device>[0-9a-fA-F]{1,2})\.(?P<function>[0-7])$"
)
_ADDRESS_FORMAT = "DDDD:BB:DD.F or BB:DD.F (hex; device 00-1f, function 0-7), e.g. 0000:00:03.0"


@dataclass(frozen=True, order=True)
class PciAddress:
    """A PCI function address; ``str()`` gives the full ``0000:00:03.0`` form sysfs uses."""

    domain: int
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        # PCI 3.0 3.2.2.3.1: 8-bit bus, 5-bit device, 3-bit function.
        limits = (("domain", self.domain, 0xFFFFFFFF), ("bus", self.bus, 0xFF),
                  ("device", self.device, 0x1F), ("function", self.function, 0x7))
        for name, value, limit in limits:
            if not 0 <= value <= limit:
                raise ValueError(f"PCI {name} {value:#x} out of range 0..{limit:#x}; "
                                 f"expected {_ADDRESS_FORMAT}")

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``0000:00:03.0`` or ``00:03.0``; a bad string raises ``ValueError``."""
        match = _ADDRESS_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"bad PCI address {text!r}; expected {_ADDRESS_FORMAT}")
        return cls(int(match["domain"] or "0", 16), int(match["bus"], 16),
                   int(match["device"], 16), int(match["function"], 16))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"


def parse_address(text: str | PciAddress) -> PciAddress:
    """A ``PciAddress`` from a string (or the address itself)."""
    return text if isinstance(text, PciAddress) else PciAddress.parse(text)


# ---------------------------------------------------------------------------
# sysfs
# ---------------------------------------------------------------------------

DEFAULT_SYSFS_PCI_DEVICES = "/sys/bus/pci/devices"
VFIO_PCI = "vfio-pci"
VIRTIO_VENDOR_ID = 0x1AF4  # Virtio 1.2 4.1.2: Red Hat, Inc. (formerly Qumranet)
PCI_CLASS_NETWORK = 0x02
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


def _link_name(path: Path) -> str | None:
    """Last component of a symlink's target, without following it (the target may not exist)."""
    try:
        return os.path.basename(os.readlink(path).rstrip("/"))
    except OSError:  # missing, or not a link
        return None


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
        if child.is_dir() and not child.is_symlink() and not _ADDRESS_RE.match(child.name):
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
        return _is_virtio(self.vendor_id, self.device_id)

    @property
    def is_virtio_net(self) -> bool:
        return _is_virtio_net(self.vendor_id, self.device_id, self.subsystem_id)

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
    group = _link_name(path / "iommu_group")
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
        driver=_link_name(path / "driver"),
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
                       "machine's device, or pass root= to pmd.pci.bind/unbind from Python")
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


def format_status(rows: Iterable[StatusRow]) -> str:
    """The rows as text, usable devices first, in the manner of ``dpdk-devbind.py --status``."""
    rows = list(rows)
    out: list[str] = []
    for title, usable in (("Devices pmd can use now", True),
                          ("Devices pmd cannot use", False)):
        out += [title, "=" * len(title)]
        group = [r for r in rows if r.usable == usable]
        if not group:
            out.append("<none>")
        for r in group:
            ifaces = ",".join(f"{i}*" if i in r.active_interfaces else i for i in r.interfaces)
            text = (f"{r.address} '{r.name}' {r.vendor_device} drv={r.driver or '-'} "
                    f"group={'-' if r.iommu_group is None else r.iommu_group}")
            if ifaces:
                text += f" if={ifaces}"
            out.append(f"{text}  ({r.reason})")
        out.append("")
    if any(r.active_interfaces for r in rows):
        out.append("* interface is up")
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

# Virtio 1.2 5 (device types); modern PCI device id = 0x1040 + type (4.1.2).
_VIRTIO_TYPES = {1: "net", 2: "block", 3: "console", 4: "entropy", 5: "balloon",
                 8: "scsi", 9: "9p", 16: "gpu", 18: "input", 19: "vsock",
                 20: "crypto", 26: "fs", 27: "pmem", 41: "sound"}
# 4.1.2.3: transitional devices 0x1000..0x103f; these are their types.
_VIRTIO_TRANSITIONAL = {0x1000: 1, 0x1001: 2, 0x1002: 5, 0x1003: 3, 0x1004: 8,
                        0x1005: 4, 0x1009: 9}
_VIRTIO_NET_TYPE = 1

_PCI_CLASSES = {0x00: "unclassified", 0x01: "mass storage controller",
                0x02: "network controller", 0x03: "display controller",
                0x04: "multimedia controller", 0x05: "memory controller",
                0x06: "bridge", 0x07: "communication controller",
                0x08: "system peripheral", 0x09: "input device", 0x0C: "serial bus controller",
                0xFF: "unassigned class"}
_PCI_SUBCLASSES = {(0x02, 0x00): "ethernet", (0x06, 0x00): "host bridge",
                   (0x06, 0x04): "PCI bridge", (0x01, 0x00): "SCSI", (0x01, 0x08): "NVMe"}


def _is_virtio(vendor: int, device: int) -> bool:
    # Virtio 1.2 4.1.2: vendor 0x1af4, device 0x1000 through 0x107f.
    return vendor == VIRTIO_VENDOR_ID and 0x1000 <= device <= 0x107F


def _virtio_type(device: int, subsystem_id: int | None) -> int | None:
    if device >= 0x1040:
        return device - 0x1040
    # 4.1.2.3: a transitional device carries its type in the subsystem device id.
    return _VIRTIO_TRANSITIONAL.get(device, subsystem_id)


def _is_virtio_net(vendor: int, device: int, subsystem_id: int | None) -> bool:
    return _is_virtio(vendor, device) and _virtio_type(device, subsystem_id) == _VIRTIO_NET_TYPE


def device_name(vendor: int, device: int, subsystem_id: int | None = None) -> str:
    """A short human name: ``virtio-net (modern)``; ``8086:0d57`` for what we do not know."""
    if _is_virtio(vendor, device):
        vtype = _virtio_type(device, subsystem_id)
        kind = "modern" if device >= 0x1040 else "transitional"
        name = _VIRTIO_TYPES.get(vtype, f"type {vtype}") if vtype is not None else "unknown"
        return f"virtio-{name} ({kind})"
    return f"{vendor:04x}:{device:04x}"


def _class_name(class_code: int) -> str:
    base, sub = class_code >> 16, (class_code >> 8) & 0xFF
    name = _PCI_CLASSES.get(base, f"class {base:#04x}")
    subname = _PCI_SUBCLASSES.get((base, sub))
    return f"{name}, {subname}" if subname else name


# ---------------------------------------------------------------------------
# Configuration space
# ---------------------------------------------------------------------------

# PCI 3.0 6.1 (type 0/1 header offsets).
PCI_VENDOR_ID = 0x00
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10  # 6.2.3: bit 4, a capability list exists
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_STD_HEADER_SIZE = 0x40
PCI_CFG_SPACE_SIZE = 0x100
PCI_CFG_SPACE_EXP_SIZE = 0x1000
# Linux PCI_FIND_CAP_TTL: 48 dword-aligned slots between 0x40 and 0x100.
PCI_FIND_CAP_TTL = 48
# Linux: (4096 - 256) / 8 extended capabilities at most.
PCI_FIND_EXT_CAP_TTL = (PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE) // 8

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
VIRTIO_PCI_CAP_VENDOR_CFG = 9

_CAP_NAMES = {0x01: "Power Management", 0x02: "AGP", 0x03: "VPD", 0x04: "Slot ID",
              0x05: "MSI", 0x06: "CompactPCI hot swap", 0x07: "PCI-X",
              0x08: "HyperTransport", 0x09: "Vendor Specific", 0x0A: "Debug port",
              0x0C: "PCI hot-plug", 0x0D: "Bridge subsystem vendor ID", 0x0E: "AGP 8x",
              0x0F: "Secure device", 0x10: "PCI Express", 0x11: "MSI-X",
              0x12: "SATA", 0x13: "Advanced Features", 0x14: "Enhanced Allocation"}
_VIRTIO_CFG_NAMES = {1: "common config", 2: "notify", 3: "ISR", 4: "device config",
                     5: "PCI config access", 8: "shared memory", 9: "vendor config"}
_PCIE_PORT_TYPES = {0: "endpoint", 1: "legacy endpoint", 4: "root port",
                    5: "upstream switch port", 6: "downstream switch port",
                    7: "PCIe-to-PCI bridge", 8: "PCI-to-PCIe bridge",
                    9: "root complex integrated endpoint", 10: "root complex event collector"}
_EXT_CAP_NAMES = {0x01: "AER", 0x02: "VC", 0x03: "Device Serial Number",
                  0x04: "Power Budgeting", 0x0B: "Vendor Specific", 0x0D: "ACS",
                  0x0E: "ARI", 0x10: "SR-IOV", 0x15: "Resizable BAR", 0x18: "LTR",
                  0x19: "Secondary PCIe", 0x1E: "L1 PM Substates", 0x25: "Data Link Feature",
                  0x26: "Physical Layer 16 GT/s", 0x27: "Lane Margining"}


def _u8(data: bytes, pos: int) -> int:
    return data[pos]


def _u16(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("<H", data, pos)[0])


def _u32(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("<I", data, pos)[0])


@dataclass(frozen=True)
class Bar:
    """A decoded Base Address Register (PCI 3.0 6.2.5.1).

    The size is not in these bytes (it takes the all-ones write that sizing
    does); VFIO region info or sysfs ``resource`` provide it.
    """

    index: int  # BAR number 0..5
    pos: int  # config offset of its (low) register
    raw: int  # register value; for a 64-bit BAR the two registers, high << 32
    io: bool  # bit 0: I/O space
    is_64bit: bool  # bits 2:1 == 0b10, takes the next BAR register too
    prefetchable: bool  # bit 3
    mem_type: int  # bits 2:1 for a memory BAR
    address: int

    @property
    def memory(self) -> bool:
        return not self.io

    @property
    def kind(self) -> str:
        if self.io:
            return "I/O"
        width = "64-bit" if self.is_64bit else "32-bit"
        if self.mem_type == 0b01:
            width = "32-bit, below 1M"
        return f"memory, {width}, {'prefetchable' if self.prefetchable else 'non-prefetchable'}"


@dataclass(frozen=True)
class Capability:
    """One entry of the capability list (PCI 3.0 6.7)."""

    pos: int  # where it sits in config space
    cap_id: int
    next_ptr: int  # masked next pointer; 0 ends the list

    @property
    def name(self) -> str:
        return _CAP_NAMES.get(self.cap_id, f"capability {self.cap_id:#04x}")


@dataclass(frozen=True)
class VendorCapability(Capability):
    """A vendor-specific capability (id 0x09) of a device that is not virtio."""

    cap_len: int  # PCI 3.0 Appendix H: the third byte is the length


@dataclass(frozen=True)
class VirtioPciCap(Capability):
    """``struct virtio_pci_cap`` (Virtio 1.2 4.1.4), on a virtio device."""

    cap_len: int
    cfg_type: int
    bar: int
    id: int
    offset: int  # of the structure inside the BAR
    length: int
    notify_off_multiplier: int | None = None  # notify only (4.1.4.4)

    @property
    def cfg_name(self) -> str:
        return _VIRTIO_CFG_NAMES.get(self.cfg_type, f"reserved cfg_type {self.cfg_type}")

    @property
    def bar_valid(self) -> bool:
        # 4.1.4: 0x0-0x5 name a BAR, the rest are reserved and the driver MUST
        # ignore the structure.
        return 0 <= self.bar <= 5


@dataclass(frozen=True)
class MsiCapability(Capability):
    """MSI (PCI 3.0 6.8.1)."""

    control: int
    enabled: bool
    multiple_message_capable: int  # log2 of the vectors the function asks for
    multiple_message_enable: int
    is_64bit: bool
    per_vector_masking: bool

    @property
    def vectors(self) -> int:
        return 1 << self.multiple_message_capable

    @property
    def size(self) -> int:
        return _msi_size(self.control)


def _msi_size(control: int) -> int:
    # 6.8.1: 10 bytes, +4 for a 64-bit address, +10 for mask and pending bits.
    size = 14 if control & 0x80 else 10
    if control & 0x100:
        size += 10
    return size


@dataclass(frozen=True)
class MsixCapability(Capability):
    """MSI-X (PCI 3.0 6.8.2): where the vector table and pending-bit array live."""

    control: int
    table_size: int  # number of vectors: (control & 0x7ff) + 1
    enabled: bool  # control bit 15
    function_mask: bool  # control bit 14
    table_bir: int
    table_offset: int
    pba_bir: int
    pba_offset: int

    @property
    def table_bytes(self) -> int:
        return 16 * self.table_size  # 6.8.2.6: 16 bytes per entry

    @property
    def pba_bytes(self) -> int:
        return 8 * ((self.table_size + 63) // 64)  # 6.8.2.7: one bit per vector, qwords


@dataclass(frozen=True)
class PcieCapability(Capability):
    """PCI Express capability (PCIe Base 7.5.3): version and device/port type."""

    version: int
    port_type: int

    @property
    def port_type_name(self) -> str:
        return _PCIE_PORT_TYPES.get(self.port_type, f"port type {self.port_type}")


@dataclass(frozen=True)
class ExtendedCapability:
    """An extended capability header in the 4 KiB PCIe space (PCIe Base 7.6.3)."""

    pos: int
    cap_id: int
    version: int
    next_ptr: int

    @property
    def name(self) -> str:
        return _EXT_CAP_NAMES.get(self.cap_id, f"extended capability {self.cap_id:#06x}")


@dataclass(frozen=True)
class ConfigSpace:
    """A parsed configuration space. Build it with ``parse_config(data)``."""

    data: bytes = field(repr=False)
    vendor_id: int
    device_id: int
    command: int
    status: int
    revision: int
    class_code: int  # 24 bits
    cache_line_size: int
    header_type: int  # as read, bit 7 = multi-function
    subsystem_vendor_id: int | None  # type 0 header only
    subsystem_id: int | None
    interrupt_line: int
    interrupt_pin: int  # 0 none, 1..4 INTA..INTD
    bars: tuple[Bar, ...]  # implemented registers; a 64-bit BAR hides the next index
    bar_count: int  # BAR registers in this header layout: 6 (type 0) or 2 (type 1)
    capabilities: tuple[Capability, ...]
    capabilities_read: bool  # False when only the 64-byte header was available
    extended_capabilities: tuple[ExtendedCapability, ...]

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def base_class(self) -> int:
        return self.class_code >> 16

    @property
    def subclass(self) -> int:
        return (self.class_code >> 8) & 0xFF

    @property
    def prog_if(self) -> int:
        return self.class_code & 0xFF

    @property
    def layout(self) -> int:
        return self.header_type & 0x7F

    @property
    def multifunction(self) -> bool:
        return bool(self.header_type & 0x80)

    @property
    def is_virtio(self) -> bool:
        return _is_virtio(self.vendor_id, self.device_id)

    @property
    def name(self) -> str:
        return device_name(self.vendor_id, self.device_id, self.subsystem_id)

    def bar(self, index: int) -> Bar | None:
        """The BAR whose register is ``index``; None for the upper half of a 64-bit BAR."""
        return next((b for b in self.bars if b.index == index), None)

    def find(self, cap_id: int) -> list[Capability]:
        return [c for c in self.capabilities if c.cap_id == cap_id]

    @property
    def msix(self) -> MsixCapability | None:
        return next((c for c in self.capabilities if isinstance(c, MsixCapability)), None)

    @property
    def msi(self) -> MsiCapability | None:
        return next((c for c in self.capabilities if isinstance(c, MsiCapability)), None)

    @property
    def pcie(self) -> PcieCapability | None:
        return next((c for c in self.capabilities if isinstance(c, PcieCapability)), None)

    @property
    def virtio_caps(self) -> tuple[VirtioPciCap, ...]:
        return tuple(c for c in self.capabilities if isinstance(c, VirtioPciCap))


def _parse_bars(data: bytes, count: int) -> tuple[Bar, ...]:
    bars = []
    index = 0
    while index < count:
        pos = PCI_BASE_ADDRESS_0 + 4 * index
        raw = _u32(data, pos)
        if raw & 0x1:
            # 6.2.5.1: I/O BAR, bit 1 reserved, address in bits 31:2.
            bars.append(Bar(index, pos, raw, True, False, False, 0, raw & ~0x3 & 0xFFFFFFFF))
            index += 1
            continue
        mem_type = (raw >> 1) & 0x3
        prefetchable = bool(raw & 0x8)
        if mem_type == 0b10:
            # A 64-bit BAR consumes the next register for the upper 32 bits.
            if index + 1 >= count:
                raise ConfigSpaceError(
                    f"BAR{index} at {pos:#04x} is a 64-bit memory BAR (raw {raw:#010x}) "
                    f"but it is the last BAR register; there is no upper half")
            high = _u32(data, pos + 4)
            full = raw | (high << 32)
            bars.append(Bar(index, pos, full, False, True, prefetchable, mem_type,
                            full & ~0xF))
            index += 2
            continue
        # 0b00 is 32-bit; 0b01 (below 1M, PCI 2.x) and 0b11 (reserved) are read
        # as 32-bit, the way Linux's decode_bar() does, rather than refusing the device.
        bars.append(Bar(index, pos, raw, False, False, prefetchable, mem_type, raw & ~0xF))
        index += 1
    return tuple(bars)


def _need(data: bytes, pos: int, size: int, what: str, why: str = "") -> None:
    """The capability must fit in the data; ``why`` says where the size came from."""
    if pos + size > len(data):
        raise ConfigSpaceError(
            f"{what} at {pos:#x} needs {size} bytes{f' ({why})' if why else ''} but the "
            f"config space ends at {len(data):#x}, {pos + size - len(data)} bytes short")


def _parse_virtio_cap(data: bytes, pos: int, next_ptr: int) -> VirtioPciCap:
    # Virtio 1.2 4.1.4: struct virtio_pci_cap is 16 bytes; the notify
    # capability adds notify_off_multiplier (20) and the PCI config access
    # capability adds pci_cfg_data[4] (20, 4.1.4.9).
    _need(data, pos, 3, "virtio capability")
    cap_len = _u8(data, pos + 2)
    if cap_len < 16:
        raise ConfigSpaceError(f"virtio capability at {pos:#x}: cap_len {cap_len} is shorter "
                               f"than struct virtio_pci_cap (16 bytes, Virtio 1.2 4.1.4)")
    _need(data, pos, cap_len, "virtio capability", "its cap_len")
    cfg_type = _u8(data, pos + 3)
    if cfg_type in (VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_PCI_CFG) and cap_len < 20:
        raise ConfigSpaceError(
            f"virtio {_VIRTIO_CFG_NAMES[cfg_type]} capability at {pos:#x}: cap_len {cap_len} "
            f"< 20 (Virtio 1.2 4.1.4.4 / 4.1.4.9)")
    multiplier = _u32(data, pos + 16) if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG else None
    return VirtioPciCap(pos, PCI_CAP_ID_VNDR, next_ptr, cap_len, cfg_type,
                        bar=_u8(data, pos + 4), id=_u8(data, pos + 5),
                        offset=_u32(data, pos + 8), length=_u32(data, pos + 12),
                        notify_off_multiplier=multiplier)


def _parse_capability(data: bytes, pos: int, cap_id: int, next_ptr: int,
                      virtio: bool, bar_count: int) -> Capability:
    if cap_id == PCI_CAP_ID_VNDR:
        if virtio:
            return _parse_virtio_cap(data, pos, next_ptr)
        _need(data, pos, 3, "vendor-specific capability")
        cap_len = _u8(data, pos + 2)
        if cap_len < 3:
            raise ConfigSpaceError(f"vendor-specific capability at {pos:#x}: length {cap_len} "
                                   f"< 3 (PCI 3.0 Appendix H)")
        _need(data, pos, cap_len, "vendor-specific capability", "its length byte")
        return VendorCapability(pos, cap_id, next_ptr, cap_len)
    if cap_id == PCI_CAP_ID_MSIX:
        _need(data, pos, 12, "MSI-X capability")
        control = _u16(data, pos + 2)
        table, pba = _u32(data, pos + 4), _u32(data, pos + 8)
        # 6.8.2.4/6.8.2.5: BIR in bits 2:0 names BAR 0..5 (6, 7 reserved);
        # the offset is the rest, qword aligned.
        for what, bir in (("table", table & 0x7), ("PBA", pba & 0x7)):
            if bir >= bar_count:
                raise ConfigSpaceError(f"MSI-X capability at {pos:#x}: {what} BIR {bir} names "
                                       f"no BAR (this header has BAR0..BAR{bar_count - 1})")
        return MsixCapability(pos, cap_id, next_ptr, control,
                              table_size=(control & 0x7FF) + 1,
                              enabled=bool(control & 0x8000),
                              function_mask=bool(control & 0x4000),
                              table_bir=table & 0x7, table_offset=table & ~0x7,
                              pba_bir=pba & 0x7, pba_offset=pba & ~0x7)
    if cap_id == PCI_CAP_ID_MSI:
        _need(data, pos, 4, "MSI capability")
        control = _u16(data, pos + 2)
        _need(data, pos, _msi_size(control), "MSI capability",
              f"message control {control:#06x}")
        return MsiCapability(pos, cap_id, next_ptr, control,
                             enabled=bool(control & 0x1),
                             multiple_message_capable=(control >> 1) & 0x7,
                             multiple_message_enable=(control >> 4) & 0x7,
                             is_64bit=bool(control & 0x80),
                             per_vector_masking=bool(control & 0x100))
    if cap_id == PCI_CAP_ID_EXP:
        _need(data, pos, 4, "PCI Express capability")
        flags = _u16(data, pos + 2)
        version = flags & 0xF
        # PCIe Base 7.5.3: version 1 ends after Root Status (0x24), version 2
        # adds the "2" registers up to 0x3c.
        _need(data, pos, 0x3C if version >= 2 else 0x24, "PCI Express capability",
              f"version {version}")
        return PcieCapability(pos, cap_id, next_ptr, version, (flags >> 4) & 0xF)
    if cap_id == PCI_CAP_ID_PM:
        _need(data, pos, 8, "Power Management capability")  # PCI PM 1.2 3.2
    return Capability(pos, cap_id, next_ptr)


def _walk_capabilities(data: bytes, virtio: bool, bar_count: int) -> tuple[Capability, ...]:
    # 6.7: the pointer at 0x34 and every next pointer have their low two bits
    # reserved (masked off), 0 ends the list, and a capability cannot sit in
    # the 64-byte header. A visited set catches any loop at once; the TTL is
    # the same bound Linux uses, a second guard that the list is finite.
    caps: list[Capability] = []
    visited: set[int] = set()
    where, pos = PCI_CAPABILITY_LIST, _u8(data, PCI_CAPABILITY_LIST) & 0xFC
    while pos:
        if pos < PCI_STD_HEADER_SIZE:
            raise ConfigSpaceError(f"capability pointer at {where:#x} is {pos:#x}, inside the "
                                   f"64-byte header (must be 0 or >= 0x40, PCI 3.0 6.7)")
        if pos in visited:
            raise ConfigSpaceError(f"capability list loops: pointer at {where:#x} goes back "
                                   f"to {pos:#x}")
        if len(caps) >= PCI_FIND_CAP_TTL:
            raise ConfigSpaceError(f"capability list longer than {PCI_FIND_CAP_TTL} entries "
                                   f"(at {pos:#x})")
        _need(data, pos, 2, "capability", f"pointed to from {where:#x}")
        visited.add(pos)
        cap_id, next_ptr = _u8(data, pos), _u8(data, pos + 1) & 0xFC
        caps.append(_parse_capability(data, pos, cap_id, next_ptr, virtio, bar_count))
        where, pos = pos + 1, next_ptr
    return tuple(caps)


def _walk_extended(data: bytes) -> tuple[ExtendedCapability, ...]:
    # PCIe Base 7.6.3: the list starts at 0x100; a zero header means none;
    # all ones is what a config read of a missing device returns.
    caps: list[ExtendedCapability] = []
    visited: set[int] = set()
    where, pos = -1, PCI_CFG_SPACE_SIZE
    while pos:
        if pos < PCI_CFG_SPACE_SIZE:
            raise ConfigSpaceError(f"extended capability at {where:#x} points to {pos:#x}, "
                                   f"below 0x100 (PCIe Base 7.6.3)")
        if pos in visited:
            raise ConfigSpaceError(f"extended capability list loops: {where:#x} goes back "
                                   f"to {pos:#x}")
        if len(caps) >= PCI_FIND_EXT_CAP_TTL:
            raise ConfigSpaceError(f"extended capability list longer than "
                                   f"{PCI_FIND_EXT_CAP_TTL} entries (at {pos:#x})")
        _need(data, pos, 4, "extended capability")
        visited.add(pos)
        header = _u32(data, pos)
        if header in (0, 0xFFFFFFFF) and pos == PCI_CFG_SPACE_SIZE:
            break
        next_ptr = (header >> 20) & 0xFFC
        caps.append(ExtendedCapability(pos, header & 0xFFFF, (header >> 16) & 0xF, next_ptr))
        where, pos = pos, next_ptr
    return tuple(caps)


def parse_config(data: bytes | bytearray | memoryview) -> ConfigSpace:
    """Parse a configuration space of 64, 256 or 4096 bytes.

    64 bytes is the header alone (what sysfs gives a non-root reader): the
    header and BARs are parsed and ``capabilities_read`` is False. Any other
    size, and every malformed pointer or length, raises ``ConfigSpaceError``
    naming the offset.
    """
    data = bytes(data)
    if len(data) not in (PCI_STD_HEADER_SIZE, PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE):
        raise ConfigSpaceError(
            f"config space is {len(data)} bytes; expected 64 (header only), 256 (PCI) or "
            f"4096 (PCIe). A shorter file is truncated"
            + ("" if len(data) >= PCI_STD_HEADER_SIZE else
               f": the header alone needs 64 bytes, it ends at {len(data):#x}"))
    vendor = _u16(data, PCI_VENDOR_ID)
    if vendor == 0xFFFF:
        raise ConfigSpaceError("vendor id at 0x0 is 0xffff: no device answered "
                               "(a config read of an absent function returns all ones)")
    header_type = _u8(data, PCI_HEADER_TYPE)
    layout = header_type & 0x7F
    # 6.1: layout 0 is an endpoint with six BARs, 1 a PCI-to-PCI bridge with
    # two (its subsystem ids live in a capability, not at 0x2c).
    if layout == 0:
        bar_count = 6
        subsystem: tuple[int | None, int | None] = (_u16(data, PCI_SUBSYSTEM_VENDOR_ID),
                                                    _u16(data, PCI_SUBSYSTEM_VENDOR_ID + 2))
    elif layout == 1:
        bar_count, subsystem = 2, (None, None)
    else:
        raise ConfigSpaceError(f"header type {header_type:#04x} at 0xe: layout {layout} is not "
                               f"supported (0 = endpoint, 1 = PCI-to-PCI bridge)")
    device = _u16(data, 0x02)
    status = _u16(data, PCI_STATUS)
    class_rev = _u32(data, 0x08)
    bars = _parse_bars(data, bar_count)
    header_only = len(data) == PCI_STD_HEADER_SIZE
    caps: tuple[Capability, ...] = ()
    if status & PCI_STATUS_CAP_LIST and not header_only:
        caps = _walk_capabilities(data, _is_virtio(vendor, device), bar_count)
    ext = _walk_extended(data) if len(data) == PCI_CFG_SPACE_EXP_SIZE else ()
    return ConfigSpace(
        data=data, vendor_id=vendor, device_id=device,
        command=_u16(data, PCI_COMMAND), status=status,
        revision=class_rev & 0xFF, class_code=class_rev >> 8,
        cache_line_size=_u8(data, 0x0C), header_type=header_type,
        subsystem_vendor_id=subsystem[0], subsystem_id=subsystem[1],
        interrupt_line=_u8(data, PCI_INTERRUPT_LINE),
        interrupt_pin=_u8(data, PCI_INTERRUPT_LINE + 1),
        bars=bars, bar_count=bar_count, capabilities=caps,
        capabilities_read=not header_only, extended_capabilities=ext)


# --- choosing the virtio structures ---------------------------------------------

# Minimum length and offset alignment of each structure, as Linux's
# vp_modern_probe() passes them to vp_modern_map_capability(): common config
# is at least the 0x38 bytes every field up to queue_device takes (4.1.4.3).
_VIRTIO_MINLEN_ALIGN = {VIRTIO_PCI_CAP_COMMON_CFG: (0x38, 4),
                        VIRTIO_PCI_CAP_NOTIFY_CFG: (2, 2),
                        VIRTIO_PCI_CAP_ISR_CFG: (1, 1),
                        VIRTIO_PCI_CAP_DEVICE_CFG: (0, 4)}


@dataclass(frozen=True)
class VirtioStructures:
    """The virtio structures a driver uses: the first usable capability of each type."""

    common: VirtioPciCap | None
    notify: VirtioPciCap | None
    isr: VirtioPciCap | None
    device: VirtioPciCap | None  # optional: not every device type has config
    pci_cfg: VirtioPciCap | None

    @property
    def missing(self) -> tuple[str, ...]:
        """Required structures that are absent (Linux needs common, notify and ISR)."""
        return tuple(name for name in ("common", "notify", "isr") if getattr(self, name) is None)

    @property
    def modern(self) -> bool:
        return not self.missing


def select_virtio_structures(config: ConfigSpace,
                             bar_sizes: Mapping[int, int] | None = None) -> VirtioStructures:
    """Pick the structures the way Linux's ``virtio_pci_find_capability()`` does.

    For each cfg_type the first capability in list order wins (Virtio 1.2
    4.1.4: "the driver SHOULD use the first instance"), skipping those whose
    ``bar`` is reserved (> 5, which 4.1.4 says to ignore) or does not name a
    memory BAR (an I/O BAR, or the upper half of a 64-bit one). When
    ``bar_sizes`` is given (from VFIO region info or sysfs ``resource``), a BAR
    of size 0 is skipped too, as Linux checks ``pci_resource_len``. A chosen
    structure that is shorter or less aligned than Linux accepts raises
    ``ConfigSpaceError``. The PCI config access capability is reported as found:
    its bar/offset/length are a window the driver writes (4.1.4.9).
    """
    chosen: dict[int, VirtioPciCap] = {}
    for cap in config.virtio_caps:
        if cap.cfg_type in chosen:
            continue
        if cap.cfg_type == VIRTIO_PCI_CAP_PCI_CFG:
            chosen[cap.cfg_type] = cap
            continue
        if cap.cfg_type not in _VIRTIO_MINLEN_ALIGN or not cap.bar_valid:
            continue
        bar = config.bar(cap.bar)
        if bar is None or not bar.memory:
            continue
        if bar_sizes is not None and not bar_sizes.get(cap.bar):
            continue
        chosen[cap.cfg_type] = cap
    for cfg_type, cap in chosen.items():
        if cfg_type not in _VIRTIO_MINLEN_ALIGN:
            continue
        minlen, align = _VIRTIO_MINLEN_ALIGN[cfg_type]
        if cap.length < minlen:
            raise ConfigSpaceError(f"virtio {cap.cfg_name} capability at {cap.pos:#x}: length "
                                   f"{cap.length:#x} < {minlen:#x}")
        if cap.offset % align:
            raise ConfigSpaceError(f"virtio {cap.cfg_name} capability at {cap.pos:#x}: offset "
                                   f"{cap.offset:#x} is not {align}-byte aligned")
        if bar_sizes is not None and cap.offset + cap.length > bar_sizes[cap.bar]:
            raise ConfigSpaceError(
                f"virtio {cap.cfg_name} capability at {cap.pos:#x}: BAR{cap.bar} + "
                f"{cap.offset:#x} len {cap.length:#x} runs past the BAR "
                f"({bar_sizes[cap.bar]:#x} bytes)")
    return VirtioStructures(common=chosen.get(VIRTIO_PCI_CAP_COMMON_CFG),
                            notify=chosen.get(VIRTIO_PCI_CAP_NOTIFY_CFG),
                            isr=chosen.get(VIRTIO_PCI_CAP_ISR_CFG),
                            device=chosen.get(VIRTIO_PCI_CAP_DEVICE_CFG),
                            pci_cfg=chosen.get(VIRTIO_PCI_CAP_PCI_CFG))


# --- human-readable -------------------------------------------------------------

def _command_bits(command: int) -> str:
    # 6.2.2: bit 0 I/O space, 1 memory space, 2 bus master, 10 INTx disable.
    names = [(0x1, "I/O"), (0x2, "memory"), (0x4, "bus master"), (0x400, "INTx disabled")]
    bits = [n for bit, n in names if command & bit]
    return ", ".join(bits) if bits else "nothing enabled"


def _status_bits(status: int) -> str:
    names = [(0x8, "interrupt pending"), (0x10, "capability list"), (0x20, "66 MHz")]
    bits = [n for bit, n in names if status & bit]
    return ", ".join(bits) if bits else "-"


def _cap_detail(cap: Capability) -> str:
    if isinstance(cap, VirtioPciCap):
        text = f"virtio {cap.cfg_name}"
        if cap.cfg_type == VIRTIO_PCI_CAP_PCI_CFG:
            return text + f" (window, driver-written: BAR{cap.bar} + {cap.offset:#x} " \
                          f"len {cap.length:#x})"
        text += f": BAR{cap.bar} + {cap.offset:#x} len {cap.length:#x}"
        if cap.notify_off_multiplier is not None:
            text += f", notify_off_multiplier {cap.notify_off_multiplier}"
        if not cap.bar_valid:
            text += " (reserved BAR value: ignored, Virtio 1.2 4.1.4)"
        return text + (f", id {cap.id}" if cap.id else "")
    if isinstance(cap, MsixCapability):
        return (f"{cap.table_size} vectors, {'enabled' if cap.enabled else 'disabled'}"
                f"{', function masked' if cap.function_mask else ''}; "
                f"table BAR{cap.table_bir} + {cap.table_offset:#x}, "
                f"PBA BAR{cap.pba_bir} + {cap.pba_offset:#x}")
    if isinstance(cap, MsiCapability):
        return (f"{cap.vectors} vectors, {'enabled' if cap.enabled else 'disabled'}, "
                f"{'64' if cap.is_64bit else '32'}-bit address"
                f"{', per-vector masking' if cap.per_vector_masking else ''}")
    if isinstance(cap, PcieCapability):
        return f"version {cap.version}, {cap.port_type_name}"
    if isinstance(cap, VendorCapability):
        return f"length {cap.cap_len}"
    return ""


def format_info(config: ConfigSpace | bytes | bytearray | memoryview, *,
                bar_sizes: Mapping[int, int] | None = None, title: str | None = None) -> str:
    """A config space as text: header, BARs, the capability chain, virtio structures, MSI-X.

    Backs ``pmd info --config FILE``. ``bar_sizes`` (BAR index -> bytes) adds
    sizes, which config bytes alone cannot give.
    """
    cs = config if isinstance(config, ConfigSpace) else parse_config(config)
    out: list[str] = []
    ids = f"{cs.vendor_id:04x}:{cs.device_id:04x}"
    head = ids if cs.name == ids else f"{ids} {cs.name}"
    out.append(f"{title}: {head}" if title else head)
    out.append(f"  class {cs.class_code:06x} ({_class_name(cs.class_code)}), "
               f"revision {cs.revision:#04x}, {cs.size} bytes of config space")
    layout = {0: "endpoint", 1: "PCI-to-PCI bridge"}[cs.layout]
    out.append(f"  header type {cs.header_type:#04x} ({layout}"
               f"{', multi-function' if cs.multifunction else ''})")
    out.append(f"  command {cs.command:#06x} ({_command_bits(cs.command)}), "
               f"status {cs.status:#06x} ({_status_bits(cs.status)})")
    if cs.subsystem_vendor_id is not None:
        out.append(f"  subsystem {cs.subsystem_vendor_id:04x}:{cs.subsystem_id:04x}")
    pin = "none" if cs.interrupt_pin == 0 else (
        f"INT{'ABCD'[cs.interrupt_pin - 1]}" if cs.interrupt_pin <= 4 else f"{cs.interrupt_pin}")
    out.append(f"  interrupt pin {pin}, line {cs.interrupt_line}")

    out.append("BARs (PCI 3.0 6.2.5.1)")
    index = 0
    while index < cs.bar_count:
        bar = cs.bar(index)
        pos = PCI_BASE_ADDRESS_0 + 4 * index
        if bar is None:
            out.append(f"  BAR{index} {pos:#04x}  upper half of BAR{index - 1}")
        elif bar.raw == 0:
            out.append(f"  BAR{index} {pos:#04x}  not set")
        else:
            size = bar_sizes.get(index) if bar_sizes else None
            out.append(f"  BAR{index} {pos:#04x}  {bar.kind} at {bar.address:#x}"
                       + (f", {size:#x} bytes" if size else ""))
        index += 1

    if not cs.capabilities_read:
        out.append("Capabilities: not read; only the 64-byte header is here "
                   "(sysfs gives more to root only)")
    elif not cs.status & PCI_STATUS_CAP_LIST:
        out.append("Capabilities: none (status bit 4 clear)")
    else:
        first = cs.data[PCI_CAPABILITY_LIST] & 0xFC
        out.append(f"Capabilities (PCI 3.0 6.7; list at 0x34 -> {first:#x})")
        if not cs.capabilities:
            out.append("  <empty>")
        for cap in cs.capabilities:
            detail = _cap_detail(cap)
            nxt = f"-> {cap.next_ptr:#x}" if cap.next_ptr else "-> end"
            out.append(f"  {cap.pos:#04x} [{cap.cap_id:#04x}] {cap.name:<16} {nxt:<8}"
                       + (f" {detail}" if detail else ""))
    for ext in cs.extended_capabilities:
        out.append(f"  {ext.pos:#05x} [{ext.cap_id:#06x}] {ext.name} v{ext.version}")

    if cs.virtio_caps:
        out.append("Virtio structures (Virtio 1.2 4.1.4; first usable of each type)")
        try:
            vs = select_virtio_structures(cs, bar_sizes)
        except ConfigSpaceError as exc:
            out.append(f"  unusable: {exc}")
        else:
            for name in ("common", "notify", "isr", "device"):
                cap = getattr(vs, name)
                if cap is None:
                    out.append(f"  {name:<7} missing")
                    continue
                text = (f"  {name:<7} BAR{cap.bar} + {cap.offset:#x} len {cap.length:#x} "
                        f"(capability at {cap.pos:#x})")
                if cap.notify_off_multiplier is not None:
                    text += f", notify_off_multiplier {cap.notify_off_multiplier}"
                out.append(text)
            if vs.pci_cfg is not None:
                out.append(f"  pci_cfg capability at {vs.pci_cfg.pos:#x}")
            if vs.missing:
                out.append(f"  not a modern device: {', '.join(vs.missing)} missing "
                           f"(Linux falls back to legacy virtio-pci)")
    msix = cs.msix
    if msix is not None:
        out.append(f"MSI-X (PCI 3.0 6.8.2): {msix.table_size} vectors, "
                   f"{'enabled' if msix.enabled else 'disabled'}; "
                   f"table BAR{msix.table_bir} + {msix.table_offset:#x} "
                   f"({msix.table_bytes:#x} bytes), "
                   f"PBA BAR{msix.pba_bir} + {msix.pba_offset:#x} ({msix.pba_bytes:#x} bytes)")
    return "\n".join(out) + "\n"
