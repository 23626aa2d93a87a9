"""The virtio-pci function of the built-in device: what its BAR0 registers do (Virtio 1.2 4.1.4).

BAR0 (64 KiB, laid out in :mod:`pmd.sim.pci_config`) holds the common
configuration (4.1.4.3), the ISR status (4.1.4.5), the device configuration
window (4.1.4.6, its contents are virtio-net's: :mod:`pmd.sim.net`), the notify
area (4.1.4.4) and the MSI-X table and PBA (PCI 3.0 6.8.2). This module is the
register file and its rules, as a part (:class:`VirtioPciFunction`) of the
device model (:class:`pmd.sim.model.VirtioNetModel`), which holds the state and
runs the engine:

- common configuration, field by field at its own width (4.1.3.1, the layout of
  :data:`pmd.abi.virtio_pci.COMMON_CFG`), 64-bit fields also as two halves;
  read-only fields and bad widths are counted, never obeyed;
- device status (2.1, 3.1.1): ACKNOWLEDGE, DRIVER, FEATURES_OK only when the
  driver's features are acceptable, DRIVER_OK only after FEATURES_OK, 0 resets;
- queues: size (a power of two up to the maximum; any size with RING_PACKED,
  2.8.10.1), MSI-X vector (NO_VECTOR when out of range), ring addresses, enable
  (rings checked against the DMA windows; split rings, or packed ones when
  VIRTIO_F_RING_PACKED was negotiated, 2.8);
- notifications and configuration changes (ISR bit 1, the config vector).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import DeviceError
from ..abi import virtio as V
from ..abi.virtio import NO_VECTOR
from ..abi.virtio_pci import COMMON_CFG_BY_OFFSET, COMMON_CFG_STRUCT, ISR_CONFIG, QUEUE_DESC
from . import pci_config as C
from ._virtqueue import DeviceQueue

if TYPE_CHECKING:
    import mmap

    from .dma import DmaMap
    from .engine import Engine

__all__ = ["QueueRegs", "Counters", "VirtioPciFunction"]

log = logging.getLogger("pmd.sim")


@dataclass
class QueueRegs:
    """One queue's registers as the driver programs them (4.1.4.3)."""

    size: int
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


@dataclass
class Counters:
    bad_register_writes: int = 0
    bad_status_writes: int = 0
    refused_features: int = 0
    refused_driver_ok: int = 0
    bad_ring_addresses: int = 0
    bad_notifications: int = 0
    notifications: int = 0
    config_interrupts: int = 0
    resets: int = 0
    dma_maps: int = 0
    dma_unmaps: int = 0
    queues_retired: dict[str, int] = field(default_factory=dict)


class VirtioPciFunction:
    """The BAR0 registers of a virtio-pci device and what writing them does.

    A part of :class:`pmd.sim.model.VirtioNetModel`, which holds the state
    named below and provides the hooks; every method runs under the model's lock.
    """

    # the state of the device model this is part of
    name: str
    counters: Counters
    status: int
    features: int
    offered: int
    driver_features: int
    device_feature_select: int
    driver_feature_select: int
    config_msix_vector: int
    config_generation: int
    isr: int
    queue_select: int
    queues: list[QueueRegs]
    num_queues: int
    max_queue_size: int
    msix_vectors: int
    device_queues: dict[int, DeviceQueue]
    dma: DmaMap
    engine: Engine
    _cfg_lock: threading.Lock
    _irq_fds: list[int]
    intx: bool
    _queue_irq: int
    _raise_intx_locked: Callable[[], None]
    _msix_table: bytearray
    _bar: mmap.mmap
    # and its hooks (the model's, and virtio-net's: pmd.sim.net)
    _device_reset: Callable[[], None]
    _update_engine: Callable[[], None]
    _needs_reset: Callable[[str], None]
    _engine_paused: Callable[[], AbstractContextManager[None]]
    _queue_role: Callable[[int], tuple[str, int] | None]
    _accept_features: Callable[[], bool]
    _device_config: Callable[[], bytes]

    def _config_changed(self, bump: bool = True) -> None:
        """The device configuration changed: new generation, ISR bit 1, config vector (4.1.4.5)."""
        with self._cfg_lock:
            if bump:
                self.config_generation = (self.config_generation + 1) & 0xFF
            if not self.status & V.STATUS_DRIVER_OK:
                return
            self.isr |= ISR_CONFIG
            if self.intx:                    # no MSI-X: the line, the cause in ISR
                self.counters.config_interrupts += 1
                self._raise_intx_locked()
                return
            vector = self.config_msix_vector
            fd = self._irq_fds[vector] if vector < len(self._irq_fds) else -1
            self.counters.config_interrupts += 1
            if fd >= 0:
                try:
                    os.write(fd, (1).to_bytes(8, "little"))
                except OSError as e:
                    log.warning("%s: config interrupt on fd %d failed: %s", self.name, fd, e)

    # ------------------------------------------------------------------ BAR0
    def _bar0_read(self, offset: int, size: int) -> bytes:
        area = self._area(offset, size)
        if area == "common":
            snap = self._common_snapshot()
            return snap[offset - C.COMMON_OFFSET:offset - C.COMMON_OFFSET + size]
        if area == "isr":
            with self._cfg_lock:
                value, self.isr = self.isr, 0          # 4.1.4.5: reading clears
            return bytes([value])
        if area == "device":
            cfg = self._device_config()
            return cfg[offset - C.DEVICE_OFFSET:offset - C.DEVICE_OFFSET + size]
        if area == "notify":
            return bytes(self._bar[offset:offset + size])
        if area == "msix":
            rel = offset - C.MSIX_TABLE_OFFSET
            return bytes(self._msix_table[rel:rel + size])
        return bytes(size)          # the PBA (nothing pending: we never mask) and unused space

    def _bar0_write(self, offset: int, data: bytes) -> None:
        area = self._area(offset, len(data))
        if area == "common":
            self._common_write(offset - C.COMMON_OFFSET, data)
        elif area == "notify":
            self._bar[offset:offset + len(data)] = data
            self._notify(offset - C.NOTIFY_OFFSET, data)
        elif area == "msix":
            rel = offset - C.MSIX_TABLE_OFFSET
            self._msix_table[rel:rel + len(data)] = data
        else:
            # ISR and device configuration are read-only for a modern driver (5.1.4).
            self.counters.bad_register_writes += 1

    def _area(self, offset: int, size: int) -> str:
        if size <= 0 or offset < 0 or offset + size > C.BAR0_SIZE:
            raise ValueError(f"BAR0 access of {size} bytes at {offset:#x} is outside the {C.BAR0_SIZE:#x}-byte BAR")
        areas = (("common", C.COMMON_OFFSET, C.COMMON_LENGTH), ("isr", C.ISR_OFFSET, C.ISR_LENGTH),
                 ("device", C.DEVICE_OFFSET, C.DEVICE_LENGTH), ("notify", C.NOTIFY_OFFSET, C.NOTIFY_LENGTH),
                 ("msix", C.MSIX_TABLE_OFFSET, 16 * self.msix_vectors),
                 ("pba", C.MSIX_PBA_OFFSET, 8 * ((self.msix_vectors + 63) // 64)))
        for name, start, length in areas:
            if start <= offset and offset + size <= start + length:
                return name
            if offset < start + length and start < offset + size:
                raise ValueError(f"BAR0 access of {size} bytes at {offset:#x} straddles the {name} "
                                 f"structure [{start:#x}, {start + length:#x})")
        return "unused"

    def _pci_cfg_read(self, bar: int, offset: int, size: int) -> bytes:
        return self._bar0_read(offset, size)

    def _pci_cfg_write(self, bar: int, offset: int, data: bytes) -> None:
        self._bar0_write(offset, data)

    # ---- common configuration ----
    def _selected(self) -> QueueRegs | None:
        return self.queues[self.queue_select] if self.queue_select < self.num_queues else None

    def _common_snapshot(self) -> bytes:
        q = self._selected()
        sel = self.device_feature_select
        device_feature = (self.offered >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        dsel = self.driver_feature_select
        driver_feature = (self.driver_features >> (32 * dsel)) & 0xFFFFFFFF if dsel < 2 else 0
        # The fields in the order of the spec's table (pmd.abi.virtio_pci.COMMON_CFG).
        return COMMON_CFG_STRUCT.pack(
            self.device_feature_select, device_feature, self.driver_feature_select, driver_feature,
            self.config_msix_vector, self.num_queues, self.status, self.config_generation,
            self.queue_select, q.size if q else 0, q.msix_vector if q else NO_VECTOR,
            1 if q and q.enabled else 0, self.queue_select if q else 0,
            q.desc if q else 0, q.driver if q else 0, q.device if q else 0)

    def _common_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        value = int.from_bytes(data, "little")
        fld = COMMON_CFG_BY_OFFSET.get(offset)
        half = 0
        if fld is None and offset - 4 in COMMON_CFG_BY_OFFSET and COMMON_CFG_BY_OFFSET[offset - 4].width == 8:
            fld, half = COMMON_CFG_BY_OFFSET[offset - 4], 1
        # 4.1.3.1: each field at its own width; 64-bit fields also as two 32-bit halves.
        if fld is None or not (size == fld.width or (fld.width == 8 and size == 4)) or (half and size != 4):
            self.counters.bad_register_writes += 1
            return
        if fld.access == "ro":               # device_feature, num_queues, config_generation, queue_notify_off
            self.counters.bad_register_writes += 1
            return
        if fld.offset >= QUEUE_DESC:         # queue_desc, queue_driver, queue_device
            self._queue_address(fld.name[len("queue_"):], value, size, half)
            return
        getattr(self, f"_w_{fld.name}")(value)

    def _w_device_feature_select(self, value: int) -> None:
        self.device_feature_select = value

    def _w_driver_feature_select(self, value: int) -> None:
        self.driver_feature_select = value

    def _w_driver_feature(self, value: int) -> None:
        # Only between DRIVER and FEATURES_OK (3.1.1 steps 4-5); bits above 63 do not exist.
        if not self.status & V.STATUS_DRIVER or self.status & V.STATUS_FEATURES_OK or self.driver_feature_select > 1:
            self.counters.bad_register_writes += 1
            return
        shift = 32 * self.driver_feature_select
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _valid_vector(self, value: int) -> int:
        return value if value == NO_VECTOR or value < self.msix_vectors else NO_VECTOR

    def _w_config_msix_vector(self, value: int) -> None:
        self.config_msix_vector = self._valid_vector(value)       # reads back NO_VECTOR when refused

    def _w_queue_select(self, value: int) -> None:
        self.queue_select = value

    def _w_queue_size(self, value: int) -> None:
        q = self._selected()
        # 2.7: a split ring's size is a power of two; a packed one's need not be (2.8.10.1).
        any_size = bool(self.features & V.bit(V.RING_PACKED))
        if q is None or q.enabled or not 0 < value <= self.max_queue_size or (value & (value - 1) and not any_size):
            self.counters.bad_register_writes += 1
            return
        q.size = value

    def _w_queue_msix_vector(self, value: int) -> None:
        q = self._selected()
        if q is None:
            self.counters.bad_register_writes += 1
            return
        with self._engine_paused():
            q.msix_vector = self._valid_vector(value)
            self._rewire_queue_vectors()

    def _queue_address(self, which: str, value: int, size: int, half: int) -> None:
        q = self._selected()
        if q is None or q.enabled:
            self.counters.bad_register_writes += 1
            return
        old = getattr(q, which)
        if size == 8:
            new = value
        elif half:
            new = (old & 0xFFFFFFFF) | (value << 32)
        else:
            new = (old & ~0xFFFFFFFF) | value
        setattr(q, which, new)

    def _w_queue_enable(self, value: int) -> None:
        index = self.queue_select
        q = self._selected()
        if q is None or value != 1 or q.enabled:
            # 4.1.4.3.2: the driver MUST NOT write 0 (queue reset is not offered).
            self.counters.bad_register_writes += 1
            return
        if not self.status & V.STATUS_FEATURES_OK:
            self.counters.bad_register_writes += 1
            self._needs_reset(f"queue {index} enabled before FEATURES_OK (3.1.1 step 7 comes after step 5)")
            return
        if self._queue_role(index) is None:
            self.counters.bad_register_writes += 1
            self._needs_reset(f"queue {index} does not exist with the negotiated features")
            return
        try:
            # Packed (2.8): driver and device are then the two event suppression structures.
            dq = DeviceQueue(self.dma.windows, q.size, q.desc, q.driver, q.device,
                             event_idx=bool(self.features & V.bit(V.RING_EVENT_IDX)), weak_barriers=True,
                             packed=bool(self.features & V.bit(V.RING_PACKED)),
                             in_order=bool(self.features & V.bit(V.IN_ORDER)),
                             indirect=bool(self.features & V.bit(V.RING_INDIRECT_DESC)))
        except (DeviceError, ValueError) as e:
            self.counters.bad_ring_addresses += 1
            self._needs_reset(f"queue {index}: {e}")
            return
        with self._engine_paused():
            q.enabled = True
            self.device_queues[index] = dq
            self._rewire_queue_vectors()

    def _rewire_queue_vectors(self) -> None:
        """Give each device queue the eventfd of its MSI-X vector (only while the engine is stopped).
        Without MSI-X every queue signals the INTx thread, which sets ISR bit 0 (4.1.4.5)."""
        for index, dq in self.device_queues.items():
            if self.intx:
                dq.set_interrupt_eventfd(self._queue_irq)
                continue
            vector = self.queues[index].msix_vector
            fd = self._irq_fds[vector] if vector < len(self._irq_fds) else -1
            dq.set_interrupt_eventfd(fd)

    # ---- device status (2.1, 3.1.1) ----
    def _w_device_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._device_reset()
            return
        old = self.status
        driver_bits = old & ~V.STATUS_DEVICE_NEEDS_RESET
        if driver_bits & ~value:
            # 2.1.2: the driver MUST NOT clear a status bit (except by writing 0).
            self.counters.bad_status_writes += 1
            return
        new_bits = value & ~old & ~V.STATUS_DEVICE_NEEDS_RESET
        status = old
        order = (V.STATUS_ACKNOWLEDGE, V.STATUS_DRIVER, V.STATUS_FEATURES_OK, V.STATUS_DRIVER_OK)
        for bit in order:
            if not new_bits & bit:
                continue
            if bit == V.STATUS_DRIVER and not status & V.STATUS_ACKNOWLEDGE:
                self.counters.bad_status_writes += 1
                continue
            if bit == V.STATUS_FEATURES_OK:
                if not status & V.STATUS_DRIVER or not self._accept_features():
                    self.counters.refused_features += 1
                    continue
                self.features = self.driver_features
            if bit == V.STATUS_DRIVER_OK and not status & V.STATUS_FEATURES_OK:
                # 3.1.1: DRIVER_OK only after FEATURES_OK; the device does not go live.
                self.counters.refused_driver_ok += 1
                continue
            status |= bit
        if new_bits & V.STATUS_FAILED:
            status |= V.STATUS_FAILED
        if new_bits & ~(V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK | V.STATUS_DRIVER_OK
                        | V.STATUS_FAILED):
            self.counters.bad_status_writes += 1           # reserved bits
        self.status = status
        self._update_engine()

    # ---- notifications ----
    def _notify(self, rel: int, data: bytes) -> None:
        index = rel // C.NOTIFY_OFF_MULTIPLIER
        value = int.from_bytes(data[:2], "little")
        if rel % C.NOTIFY_OFF_MULTIPLIER or index >= self.num_queues or value != index:
            self.counters.bad_notifications += 1
            return
        self.counters.notifications += 1
        self.engine.kick()
