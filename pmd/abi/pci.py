"""PCI configuration space, as vocabulary: addresses, registers, capabilities, parsed from bytes.

Pure Python and standard library only. The bytes come from anywhere (a sysfs
``config`` file, a VFIO config region, a vfio-user server, a fixture) and are
untrusted: every pointer and length is checked, a looping list raises, and
nothing is read outside the data. The virtio vendor capabilities (Virtio 1.2
4.1.4) are decoded here with the rest of the list; the structures they point to
are :mod:`pmd.abi.virtio_pci`.

- :class:`PciAddress`: ``domain:bus:device.function``, ONE syntax for everything
  that names a device (sysfs, kernel VFIO, the CLI);
- the header's register offsets and bits (the command register, BARs, the
  capability pointer), which the driver's device access and the built-in device's
  configuration space use alike;
- :func:`parse_config`: header, the six BARs, the capability list, MSI, MSI-X,
  PCI Express and the virtio vendor capabilities; :func:`device_name`.

References: PCI Local Bus Specification 3.0 (6.1 header, 6.2.5 BARs,
6.7 capability list, 6.8 MSI/MSI-X), PCI Express Base 4.0 (7.5.3 PCIe
capability, 7.6 extended capabilities), Virtio 1.2 (4.1.2 ids, 4.1.4
virtio structure capabilities).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from ..errors import ConfigSpaceError

__all__ = [
    "VIRTIO_VENDOR_ID",
    "PCI_CLASS_NETWORK",
    "PciAddress",
    "parse_address",
    "ADDRESS_RE",
    "PCI_VENDOR_ID",
    "PCI_DEVICE_ID",
    "PCI_COMMAND",
    "PCI_COMMAND_IO",
    "PCI_COMMAND_MEMORY",
    "PCI_COMMAND_MASTER",
    "PCI_COMMAND_PARITY",
    "PCI_COMMAND_SERR",
    "PCI_COMMAND_INTX_DISABLE",
    "PCI_STATUS",
    "PCI_STATUS_CAP_LIST",
    "PCI_CLASS_REVISION",
    "PCI_HEADER_TYPE",
    "PCI_BASE_ADDRESS_0",
    "PCI_BASE_ADDRESS_SPACE_IO",
    "PCI_SUBSYSTEM_VENDOR_ID",
    "PCI_ROM_ADDRESS",
    "PCI_CAPABILITY_LIST",
    "PCI_INTERRUPT_LINE",
    "PCI_INTERRUPT_PIN",
    "PCI_STD_HEADER_SIZE",
    "PCI_CFG_SPACE_SIZE",
    "PCI_CFG_SPACE_EXP_SIZE",
    "PCI_FIND_CAP_TTL",
    "PCI_FIND_EXT_CAP_TTL",
    "PCI_CAP_ID_PM",
    "PCI_CAP_ID_MSI",
    "PCI_CAP_ID_VNDR",
    "PCI_CAP_ID_EXP",
    "PCI_CAP_ID_MSIX",
    "PCI_MSIX_FLAGS_ENABLE",
    "PCI_MSIX_FLAGS_MASKALL",
    "PCI_MSIX_FLAGS_QSIZE",
    "VIRTIO_PCI_CAP_COMMON_CFG",
    "VIRTIO_PCI_CAP_NOTIFY_CFG",
    "VIRTIO_PCI_CAP_ISR_CFG",
    "VIRTIO_PCI_CAP_DEVICE_CFG",
    "VIRTIO_PCI_CAP_PCI_CFG",
    "VIRTIO_PCI_CAP_SHARED_MEMORY_CFG",
    "VIRTIO_PCI_CAP_VENDOR_CFG",
    "VIRTIO_NET_DEVICE_TYPE",
    "VIRTIO_MODERN_DEVICE_ID_BASE",
    "is_virtio",
    "is_transitional",
    "virtio_type",
    "is_virtio_net",
    "device_name",
    "class_name",
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
]


# ---------------------------------------------------------------------------
# PCI addresses
# ---------------------------------------------------------------------------

# domain:bus:device.function, all hex; the domain is optional (then 0), as
# lspci and DPDK's rte_pci_addr_parse accept. Linux domains can exceed 16 bits
# (VMD uses 0x10000 and up), so up to 8 hex digits are allowed there.
ADDRESS_RE = re.compile(
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
        match = ADDRESS_RE.match(text.strip()) if isinstance(text, str) else None
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
# Names
# ---------------------------------------------------------------------------

VIRTIO_VENDOR_ID = 0x1AF4  # Virtio 1.2 4.1.2: Red Hat, Inc. (formerly Qumranet)
VIRTIO_MODERN_DEVICE_ID_BASE = 0x1040   # 4.1.2: a modern device's id is 0x1040 + its type
VIRTIO_NET_DEVICE_TYPE = 1              # 5: network card
PCI_CLASS_NETWORK = 0x02

# Virtio 1.2 5 (device types); modern PCI device id = 0x1040 + type (4.1.2).
_VIRTIO_TYPES = {1: "net", 2: "block", 3: "console", 4: "entropy", 5: "balloon",
                 8: "scsi", 9: "9p", 16: "gpu", 18: "input", 19: "vsock",
                 20: "crypto", 26: "fs", 27: "pmem", 41: "sound"}
# 4.1.2.3: transitional devices 0x1000..0x103f; these are their types.
_VIRTIO_TRANSITIONAL = {0x1000: 1, 0x1001: 2, 0x1002: 5, 0x1003: 3, 0x1004: 8,
                        0x1005: 4, 0x1009: 9}

_PCI_CLASSES = {0x00: "unclassified", 0x01: "mass storage controller",
                0x02: "network controller", 0x03: "display controller",
                0x04: "multimedia controller", 0x05: "memory controller",
                0x06: "bridge", 0x07: "communication controller",
                0x08: "system peripheral", 0x09: "input device", 0x0C: "serial bus controller",
                0xFF: "unassigned class"}
_PCI_SUBCLASSES = {(0x02, 0x00): "ethernet", (0x06, 0x00): "host bridge",
                   (0x06, 0x04): "PCI bridge", (0x01, 0x00): "SCSI", (0x01, 0x08): "NVMe"}


def is_virtio(vendor: int, device: int) -> bool:
    """Virtio 1.2 4.1.2: vendor 0x1af4, device 0x1000 through 0x107f."""
    return vendor == VIRTIO_VENDOR_ID and 0x1000 <= device <= 0x107F


def is_transitional(device: int) -> bool:
    """4.1.2.3: ids 0x1000-0x103f are transitional devices, which keep the legacy interface."""
    return 0x1000 <= device < VIRTIO_MODERN_DEVICE_ID_BASE


def virtio_type(device: int, subsystem_id: int | None) -> int | None:
    """The virtio device type (5) of a virtio PCI device id."""
    if device >= VIRTIO_MODERN_DEVICE_ID_BASE:
        return device - VIRTIO_MODERN_DEVICE_ID_BASE
    # 4.1.2.3: a transitional device carries its type in the subsystem device id.
    return _VIRTIO_TRANSITIONAL.get(device, subsystem_id)


def is_virtio_net(vendor: int, device: int, subsystem_id: int | None) -> bool:
    return is_virtio(vendor, device) and virtio_type(device, subsystem_id) == VIRTIO_NET_DEVICE_TYPE


def device_name(vendor: int, device: int, subsystem_id: int | None = None) -> str:
    """A short human name: ``virtio-net (modern)``; ``8086:0d57`` for what we do not know."""
    if is_virtio(vendor, device):
        vtype = virtio_type(device, subsystem_id)
        kind = "modern" if device >= VIRTIO_MODERN_DEVICE_ID_BASE else "transitional"
        name = _VIRTIO_TYPES.get(vtype, f"type {vtype}") if vtype is not None else "unknown"
        return f"virtio-{name} ({kind})"
    return f"{vendor:04x}:{device:04x}"


def class_name(class_code: int) -> str:
    """``network controller, ethernet`` for class code 0x020000."""
    base, sub = class_code >> 16, (class_code >> 8) & 0xFF
    name = _PCI_CLASSES.get(base, f"class {base:#04x}")
    subname = _PCI_SUBCLASSES.get((base, sub))
    return f"{name}, {subname}" if subname else name


# ---------------------------------------------------------------------------
# Configuration space
# ---------------------------------------------------------------------------

# PCI 3.0 6.1 (type 0/1 header offsets).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04          # 16 bits (6.2.2)
PCI_COMMAND_IO = 1 << 0
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2  # bus master: the device may issue DMA
PCI_COMMAND_PARITY = 1 << 6
PCI_COMMAND_SERR = 1 << 8
PCI_COMMAND_INTX_DISABLE = 1 << 10
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10  # 6.2.3: bit 4, a capability list exists
PCI_CLASS_REVISION = 0x08   # revision in the low byte, the 24-bit class code above it
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10   # six 32-bit BAR registers follow
PCI_BASE_ADDRESS_SPACE_IO = 0x01  # 6.2.5.1: bit 0 of a BAR: 1 = I/O space, 0 = memory
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D       # 1..4: INTA#..INTD#, 0: none
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
# 6.8.2.3: MSI-X message control
PCI_MSIX_FLAGS_QSIZE = 0x07FF       # table size - 1
PCI_MSIX_FLAGS_MASKALL = 1 << 14
PCI_MSIX_FLAGS_ENABLE = 1 << 15

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
        return is_virtio(self.vendor_id, self.device_id)

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
                              table_size=(control & PCI_MSIX_FLAGS_QSIZE) + 1,
                              enabled=bool(control & PCI_MSIX_FLAGS_ENABLE),
                              function_mask=bool(control & PCI_MSIX_FLAGS_MASKALL),
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
    device = _u16(data, PCI_DEVICE_ID)
    status = _u16(data, PCI_STATUS)
    class_rev = _u32(data, PCI_CLASS_REVISION)
    bars = _parse_bars(data, bar_count)
    header_only = len(data) == PCI_STD_HEADER_SIZE
    caps: tuple[Capability, ...] = ()
    if status & PCI_STATUS_CAP_LIST and not header_only:
        caps = _walk_capabilities(data, is_virtio(vendor, device), bar_count)
    ext = _walk_extended(data) if len(data) == PCI_CFG_SPACE_EXP_SIZE else ()
    return ConfigSpace(
        data=data, vendor_id=vendor, device_id=device,
        command=_u16(data, PCI_COMMAND), status=status,
        revision=class_rev & 0xFF, class_code=class_rev >> 8,
        cache_line_size=_u8(data, 0x0C), header_type=header_type,
        subsystem_vendor_id=subsystem[0], subsystem_id=subsystem[1],
        interrupt_line=_u8(data, PCI_INTERRUPT_LINE),
        interrupt_pin=_u8(data, PCI_INTERRUPT_PIN),
        bars=bars, bar_count=bar_count, capabilities=caps,
        capabilities_read=not header_only, extended_capabilities=ext)


