"""The PCI configuration space of the built-in virtio-net device.

256 bytes shaped like the real modern virtio-net device in
``tests/data/pci-config/0000_00_03_0_1af4_1041.bin`` (Firecracker's):

```
0x00  vendor 1af4  device 1041  command  status (capability list)
0x08  revision 01  class 020000 (network, ethernet)
0x10  BAR0: 64-bit non-prefetchable memory BAR of 64 KiB (BAR1 is its upper half)
0x2c  subsystem 1af4:1100     0x34 capabilities at 0x40     0x3d no INTx pin
0x40  virtio common cfg   BAR0 + 0x0000 len 0x38     (Virtio 1.2 4.1.4.3)
0x50  virtio ISR          BAR0 + 0x2000 len 0x1      (4.1.4.5)
0x60  virtio device cfg   BAR0 + 0x4000 len 0x100    (4.1.4.6)
0x70  virtio notify       BAR0 + 0x6000 len 0x1000, notify_off_multiplier 4 (4.1.4.4)
0x84  virtio PCI cfg access (a window onto the BARs through config space, 4.1.4.9)
0x98  MSI-X: N vectors, table BAR0 + 0x8000, PBA BAR0 + 0x9000 (PCI 3.0 6.8.2)
```

Writes are validated byte by byte against a write mask, as QEMU's ``wmask``
does: only the command register (memory space, bus master, parity, SERR,
INTx disable), the BAR0/BAR1 address bits (so the all-ones write of BAR sizing
reads back the size mask) and the driver-written fields of the PCI cfg access
capability change; everything else is read-only and a write to it is counted
in ``ignored_writes``. A read or write outside the 256 bytes raises.
"""

from __future__ import annotations

import struct
from typing import Callable

from ..abi.pci import (
    PCI_BASE_ADDRESS_0,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_CLASS_REVISION,
    PCI_CFG_SPACE_SIZE,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_PARITY,
    PCI_COMMAND_SERR,
    PCI_INTERRUPT_PIN,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    VIRTIO_MODERN_DEVICE_ID_BASE,
    VIRTIO_NET_DEVICE_TYPE,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_VENDOR_ID,
)
from ..abi.virtio_pci import COMMON_CFG_LEN

# --- identity ---
VENDOR_ID = VIRTIO_VENDOR_ID
DEVICE_ID = VIRTIO_MODERN_DEVICE_ID_BASE + VIRTIO_NET_DEVICE_TYPE   # 0x1041, a modern-only device (4.1.2.1)
SUBSYSTEM_VENDOR_ID = VIRTIO_VENDOR_ID
SUBSYSTEM_ID = 0x1100
REVISION = 0x01                 # >= 1 for a modern-only device (4.1.2.1)
CLASS_CODE = 0x020000           # network controller, ethernet

CONFIG_SIZE = PCI_CFG_SPACE_SIZE

# --- header registers the device lays out (PCI 3.0 6.2) ---
PCI_BAR0 = PCI_BASE_ADDRESS_0
PCI_BAR1 = PCI_BASE_ADDRESS_0 + 4
# command bits a driver may change: memory space, bus master, parity, SERR, INTx disable
COMMAND_WRITABLE = (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY | PCI_COMMAND_SERR
                    | PCI_COMMAND_INTX_DISABLE)

# --- BAR0 layout ---
BAR0_SIZE = 0x10000
BAR0_FLAGS = 0x4                # memory, 64-bit (bits 2:1 = 0b10), not prefetchable
BAR0_DEFAULT_ADDRESS = 0xFE000000
COMMON_OFFSET, COMMON_LENGTH = 0x0000, COMMON_CFG_LEN
ISR_OFFSET, ISR_LENGTH = 0x2000, 0x1
DEVICE_OFFSET, DEVICE_LENGTH = 0x4000, 0x100
NOTIFY_OFFSET, NOTIFY_LENGTH = 0x6000, 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x8000
MSIX_PBA_OFFSET = 0x9000
MSIX_MAX_VECTORS = (MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) // 16     # 256: the table must end before the PBA

# --- where the capabilities sit ---
CAP_COMMON = 0x40
CAP_ISR = 0x50
CAP_DEVICE = 0x60
CAP_NOTIFY = 0x70
CAP_PCI_CFG = 0x84
CAP_MSIX = 0x98
# struct virtio_pci_cfg_cap (4.1.4.9): cap.bar at +4, cap.offset at +8, cap.length at +12, pci_cfg_data at +16
PCI_CFG_BAR = CAP_PCI_CFG + 4
PCI_CFG_OFFSET = CAP_PCI_CFG + 8
PCI_CFG_LENGTH = CAP_PCI_CFG + 12
PCI_CFG_DATA = CAP_PCI_CFG + 16
MSIX_CONTROL = CAP_MSIX + 2

#: the PCI cfg access window reaches the BARs through these (set by the device model)
BarRead = Callable[[int, int, int], bytes]          # (bar, offset, size) -> bytes
BarWrite = Callable[[int, int, bytes], None]        # (bar, offset, data)


# Bytes where writing read-only bits is normal and not worth counting: the
# status register (its error bits are write-one-to-clear), the BARs and the
# expansion ROM BAR (sizing writes all ones to every one of them).
_SILENT = bytes(1 if PCI_STATUS <= pos < PCI_STATUS + 2 or PCI_BAR0 <= pos < PCI_BAR0 + 24
                or PCI_ROM_ADDRESS <= pos < PCI_ROM_ADDRESS + 4 else 0
                for pos in range(CONFIG_SIZE))


def _virtio_cap(cfg_type: int, next_ptr: int, offset: int, length: int, *, cap_len: int = 16,
                extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap (4.1.4): vndr, next, len, cfg_type, bar, id, padding[2], offset, length."""
    return struct.pack("<BBBBBB2xII", PCI_CAP_ID_VNDR, next_ptr, cap_len, cfg_type, 0, 0, offset,
                       length) + extra


class PciConfig:
    """``PciConfig(msix_vectors=4)``: the device's configuration space with write semantics.

    ``read(offset, size)`` / ``write(offset, data)`` are what the vfio-user
    server forwards for region 7. ``bar_read`` / ``bar_write`` (set by the
    device model) serve the PCI cfg access capability's data window.
    """

    def __init__(self, msix_vectors: int = 4) -> None:
        # 0: no MSI-X capability at all (QEMU's vectors=0); the device interrupts on INTA#.
        if not 0 <= msix_vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X vectors must be 0 (none: INTx) to {MSIX_MAX_VECTORS} (the table at BAR0+"
                             f"{MSIX_TABLE_OFFSET:#x} must end before the PBA at {MSIX_PBA_OFFSET:#x})")
        self.msix_vectors = msix_vectors
        self.ignored_writes = 0
        self.bar_read: BarRead | None = None
        self.bar_write: BarWrite | None = None
        self._data = bytearray(CONFIG_SIZE)
        self._wmask = bytearray(CONFIG_SIZE)
        self._build()
        self._reset_values = bytes(self._data)

    # ---- layout ----
    def _build(self) -> None:
        d = self._data
        struct.pack_into("<HHHH", d, PCI_VENDOR_ID, VENDOR_ID, DEVICE_ID, 0, PCI_STATUS_CAP_LIST)
        struct.pack_into("<I", d, PCI_CLASS_REVISION, CLASS_CODE << 8 | REVISION)
        struct.pack_into("<II", d, PCI_BAR0, BAR0_DEFAULT_ADDRESS | BAR0_FLAGS, 0)
        struct.pack_into("<HH", d, PCI_SUBSYSTEM_VENDOR_ID, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID)
        d[PCI_CAPABILITY_LIST] = CAP_COMMON
        caps = [
            (CAP_COMMON, _virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, CAP_ISR, COMMON_OFFSET, COMMON_LENGTH)),
            (CAP_ISR, _virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, CAP_DEVICE, ISR_OFFSET, ISR_LENGTH)),
            (CAP_DEVICE, _virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, CAP_NOTIFY, DEVICE_OFFSET, DEVICE_LENGTH)),
            (CAP_NOTIFY, _virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, CAP_PCI_CFG, NOTIFY_OFFSET, NOTIFY_LENGTH,
                                     cap_len=20, extra=struct.pack("<I", NOTIFY_OFF_MULTIPLIER))),
            # 4.1.4.9: bar/offset/length are written by the driver to pick what pci_cfg_data reaches.
            (CAP_PCI_CFG, _virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, CAP_MSIX if self.msix_vectors else 0, 0, 0,
                                      cap_len=20, extra=bytes(4))),
        ]
        if self.msix_vectors:
            # 6.8.2: control = table size - 1; table and PBA offsets with BIR 0 in the low 3 bits.
            caps.append((CAP_MSIX, struct.pack("<BBHII", PCI_CAP_ID_MSIX, 0, self.msix_vectors - 1,
                                               MSIX_TABLE_OFFSET | 0, MSIX_PBA_OFFSET | 0)))
        else:
            d[PCI_INTERRUPT_PIN] = 1            # INTA#: the only interrupt left
        for pos, body in caps:
            d[pos:pos + len(body)] = body
        m = self._wmask
        struct.pack_into("<H", m, PCI_COMMAND, COMMAND_WRITABLE)
        # BAR0: address bits 31..16 (a 64 KiB BAR); bits 3:0 are the read-only type.
        struct.pack_into("<I", m, PCI_BAR0, ~(BAR0_SIZE - 1) & 0xFFFFFFFF)
        struct.pack_into("<I", m, PCI_BAR1, 0xFFFFFFFF)
        m[PCI_CFG_BAR] = 0xFF
        struct.pack_into("<III", m, PCI_CFG_OFFSET, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)

    # ---- state the device model reflects ----
    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self._data, PCI_COMMAND)[0])

    @property
    def bus_master(self) -> bool:
        return bool(self.command & PCI_COMMAND_MASTER)

    def set_msix_enabled(self, on: bool) -> None:
        """The MSI-X enable bit shows whether the driver gave the device its vectors (SET_IRQS)."""
        if not self.msix_vectors:
            return
        control = (self.msix_vectors - 1) | (PCI_MSIX_FLAGS_ENABLE if on else 0)
        struct.pack_into("<H", self._data, MSIX_CONTROL, control)

    def reset(self) -> None:
        """Back to power-on values (a new client)."""
        self._data[:] = self._reset_values

    def snapshot(self) -> bytes:
        return bytes(self._data)

    # ---- access ----
    @staticmethod
    def _check(offset: int, size: int) -> None:
        if size <= 0 or offset < 0 or offset + size > CONFIG_SIZE:
            raise ValueError(f"config space access of {size} bytes at {offset:#x} is outside the "
                             f"{CONFIG_SIZE}-byte configuration space")

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        if offset < PCI_CFG_DATA + 4 and PCI_CFG_DATA < offset + size:
            self._refresh_cfg_data()
        return bytes(self._data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        ignored = False
        for i, value in enumerate(data):
            pos = offset + i
            mask = self._wmask[pos]
            if (value ^ self._data[pos]) & ~mask & 0xFF and not _SILENT[pos]:
                ignored = True          # tried to change a read-only bit
            self._data[pos] = (self._data[pos] & ~mask) | (value & mask)
        if ignored:
            self.ignored_writes += 1
        if offset < PCI_CFG_DATA + 4 and PCI_CFG_DATA < offset + len(data):
            self._write_cfg_data()

    # ---- the PCI cfg access window (4.1.4.9) ----
    def _window(self) -> tuple[int, int, int] | None:
        bar = self._data[PCI_CFG_BAR]
        off, length = struct.unpack_from("<II", self._data, PCI_CFG_OFFSET)
        # 4.1.4.9.1: length 1, 2 or 4, offset a multiple of it.
        if bar != 0 or length not in (1, 2, 4) or off % length:
            return None
        return bar, off, length

    def _refresh_cfg_data(self) -> None:
        window = self._window()
        if window is None or self.bar_read is None:
            return
        bar, off, length = window
        try:
            value = self.bar_read(bar, off, length)
        except ValueError:
            value = b""
        self._data[PCI_CFG_DATA:PCI_CFG_DATA + 4] = value.ljust(4, b"\0")[:4]

    def _write_cfg_data(self) -> None:
        window = self._window()
        if window is None or self.bar_write is None:
            self.ignored_writes += 1
            return
        bar, off, length = window
        try:
            self.bar_write(bar, off, bytes(self._data[PCI_CFG_DATA:PCI_CFG_DATA + length]))
        except ValueError:
            self.ignored_writes += 1


__all__ = ["PciConfig", "CONFIG_SIZE", "BAR0_SIZE", "VENDOR_ID", "DEVICE_ID"]
