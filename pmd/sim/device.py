"""The built-in virtio-net device: a vfio-user device model (Virtio 1.2, 4.1 and 5.1).

:class:`VirtioNetModel` implements :class:`pmd.vfio_user.model.DeviceModel`:
the server asks it about regions and IRQs and forwards region reads and
writes, ``SET_IRQS`` and ``DMA_MAP``/``DMA_UNMAP``. The model plays the device
side of everything a virtio-net driver does:

- **BAR0** (64 KiB, 64-bit memory BAR). The common configuration (0x0000),
  ISR (0x2000) and device configuration (0x4000) are *message-only*: they have
  register semantics (``queue_select`` changes what ``queue_size`` shows; a
  read of ISR clears it), so every access reaches the model. The **notify
  area** (0x6000-0x6fff) is mmap-able, backed by a memfd: a doorbell written
  through the mapping costs the driver no message; the device polls its rings
  anyway. The MSI-X table (0x8000) and PBA (0x9000) are message-only too.
- **Device status** (2.1, 3.1.1): ACKNOWLEDGE, DRIVER, FEATURES_OK only when the
  driver's features are a subset of the offer and consistent (5.1.3.1), else
  FEATURES_OK does not stick; DRIVER_OK only after FEATURES_OK; 0 resets (the
  engine stops, queues are forgotten, DMA mappings and IRQ fds stay).
- **Queues**: select, size (a power of two up to the maximum), MSI-X vector
  (NO_VECTOR when out of range), notify offset, ring addresses; enabling a
  queue checks its rings lie inside the driver's DMA mappings: a bad address
  sets DEVICE_NEEDS_RESET (64), is counted, and is never followed.
- **Device configuration** (5.1.4): MAC, status (LINK_UP), max_virtqueue_pairs,
  MTU; ``config_generation`` moves with every change (2.5).
- **Interrupts**: MSI-X by writing the eventfds the driver gave (``SET_IRQS``):
  configuration changes on the config vector; queue vectors by the device
  queues themselves when the driver did not suppress them.
- **Control queue** (5.1.6.5): RX_PROMISC, RX_ALLMULTI, MAC_TABLE_SET,
  MAC_ADDR_SET, MQ_VQ_PAIRS_SET, every field checked (VIRTIO_NET_ERR otherwise).
- **The data path** is :class:`pmd.sim.engine.Engine`, the wire behind it one of
  :mod:`pmd.sim.wires`.

Calls come from the vfio-user server's thread; :meth:`set_link` and
:meth:`stats` may come from another (the control socket): one lock orders
them. The engine thread never takes that lock, so stopping it under the lock
cannot deadlock; what it shares with the model (the MAC, the generation) is
under a second, innermost lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from .._device import DeviceQueue
from ..errors import DeviceError
from ..shm import create_sealed_memfd
from ..virtio import features as F
from . import config as C
from .dma import DmaMap
from .engine import Engine, Plan, QueuePairPlan, RxFilter, mac_key
from .wires import LoopbackWire, Wire

if TYPE_CHECKING:
    from ..vfio_user.model import RegionSpec

log = logging.getLogger("pmd.sim")

# ---- VFIO ABI (include/uapi/linux/vfio.h; vfio-user uses the same numbers) ----
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_NUM_IRQS = 5
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSIX_IRQ_INDEX = 2
REGION_READ, REGION_WRITE, REGION_MMAP = 1, 2, 4
IRQ_INFO_EVENTFD, IRQ_INFO_NORESIZE = 1, 8

NO_VECTOR = 0xFFFF

# ---- struct virtio_pci_common_cfg (4.1.4.3): offset -> (width, name) ----
COMMON_FIELDS: dict[int, tuple[int, str]] = {
    0x00: (4, "device_feature_select"), 0x04: (4, "device_feature"),
    0x08: (4, "driver_feature_select"), 0x0C: (4, "driver_feature"),
    0x10: (2, "config_msix_vector"), 0x12: (2, "num_queues"),
    0x14: (1, "device_status"), 0x15: (1, "config_generation"),
    0x16: (2, "queue_select"), 0x18: (2, "queue_size"),
    0x1A: (2, "queue_msix_vector"), 0x1C: (2, "queue_enable"),
    0x1E: (2, "queue_notify_off"), 0x20: (8, "queue_desc"),
    0x28: (8, "queue_driver"), 0x30: (8, "queue_device"),
}
_COMMON_BY_NAME = {name: off for off, (_w, name) in COMMON_FIELDS.items()}

# ---- what the device offers (each can be turned off) ----
OFFERED_NAMES = ("VERSION_1", "ACCESS_PLATFORM", "MAC", "STATUS", "MRG_RXBUF", "CTRL_VQ", "CTRL_RX",
                 "MQ", "EVENT_IDX", "MTU", "CTRL_MAC_ADDR")
OFFERED = F.parse(",".join(OFFERED_NAMES))
# 5.1.3.1: features that need the control queue.
NEEDS_CTRL_VQ = (F.bit(F.NET_CTRL_RX) | F.bit(F.NET_CTRL_VLAN) | F.bit(F.NET_GUEST_ANNOUNCE)
                 | F.bit(F.NET_MQ) | F.bit(F.NET_CTRL_MAC_ADDR))
MAC_TABLE_MAX = 64          # entries per table (QEMU's MAC_TABLE_ENTRIES)
DEFAULT_MAC = bytes.fromhex("02504d440001")     # locally administered, "PMD"


@dataclass
class SimOptions:
    """What the device is: ``mac``, ``queue_pairs`` (max_virtqueue_pairs), ``queue_size``
    (the largest ring a queue accepts), ``mtu``, ``msix_vectors`` (default: config +
    one per queue), ``features_off`` (names or a mask), ``link_up`` at power-on."""

    mac: bytes = DEFAULT_MAC
    queue_pairs: int = 1
    queue_size: int = 1024
    mtu: int = 1500
    msix_vectors: int | None = None
    features_off: int | str = 0
    link_up: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.mac, str):
            from ..virtio.net import parse_mac
            self.mac = parse_mac(self.mac)
        if len(self.mac) != 6 or self.mac[0] & 1 or self.mac == bytes(6):
            raise ValueError(f"device MAC must be a unicast address, not {self.mac.hex(':')}")
        if not 1 <= self.queue_pairs <= 0x8000 or 2 * self.queue_pairs + 1 > C.NOTIFY_LENGTH // 4:
            raise ValueError(f"queue_pairs must be 1 to {(C.NOTIFY_LENGTH // 4 - 1) // 2} "
                             "(every queue needs a doorbell in the 4 KiB notify area)")
        if not 2 <= self.queue_size <= 32768 or self.queue_size & (self.queue_size - 1):
            raise ValueError("queue_size must be a power of two from 2 to 32768 (2.7)")
        if not 68 <= self.mtu <= 65535:
            raise ValueError("mtu must be 68 to 65535 (5.1.4.1)")
        if self.msix_vectors is None:
            self.msix_vectors = min(2 * self.queue_pairs + 2, C.MSIX_MAX_VECTORS)
        self.features_off = F.parse(self.features_off)
        if self.features_off & ~OFFERED:
            raise ValueError(f"cannot turn off {', '.join(F.names(self.features_off & ~OFFERED))}: "
                             f"not offered (offered: {', '.join(OFFERED_NAMES)})")
        if self.features_off & F.bit(F.VERSION_1):
            raise ValueError("VERSION_1 cannot be turned off: this is a modern-only device (0x1041)")

    @property
    def offered(self) -> int:
        off = int(self.features_off)
        offered = OFFERED & ~off
        if not offered & F.bit(F.NET_CTRL_VQ):
            offered &= ~NEEDS_CTRL_VQ
        return offered


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


class VirtioNetModel:
    """``VirtioNetModel(options=None, wire=None, **option_fields)``: one virtio-net device.

    ``wire`` defaults to :class:`pmd.sim.wires.LoopbackWire`; the model owns it
    (``close()`` closes it). Everything here also works without a server:
    tests drive ``region_read``/``region_write`` directly, and
    :class:`pmd.sim.local.LocalAccess` puts pmd's own driver on top in-process.
    """

    def __init__(self, options: SimOptions | None = None, wire: Wire | None = None, *,
                 name: str = "pmd-sim", **kw: Any) -> None:
        self.options = options if options is not None else SimOptions(**kw)
        if options is not None and kw:
            raise TypeError("give either options or option keywords, not both")
        o = self.options
        self.name = name
        self.offered = o.offered
        self.max_pairs = o.queue_pairs
        self.num_queues = 2 * o.queue_pairs + (1 if self.offered & F.bit(F.NET_CTRL_VQ) else 0)
        assert o.msix_vectors is not None
        self.msix_vectors = o.msix_vectors
        self.max_frame = max(2048, (o.mtu + 18 + 63) // 64 * 64)     # Ethernet + VLAN tag
        self.pci = C.PciConfig(self.msix_vectors)
        self.pci.bar_read = self._pci_cfg_read
        self.pci.bar_write = self._pci_cfg_write
        self.counters = Counters()
        self.dma = DmaMap()
        self.wire: Wire = wire if wire is not None else LoopbackWire()
        self._lock = threading.RLock()
        self._cfg_lock = threading.Lock()      # innermost: MAC, link, generation, ISR
        self._closed = False
        # BAR0's mmap-able part: a memfd holding the notify area (at its BAR offset), sealed
        # before the driver gets it: a driver that truncated it would SIGBUS this process.
        self._bar_fd = create_sealed_memfd(f"{name}-bar0", C.BAR0_SIZE)
        self._bar = mmap.mmap(self._bar_fd, C.BAR0_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._irq_fds: list[int] = [-1] * self.msix_vectors
        self._msix_table = bytearray(16 * self.msix_vectors)
        for v in range(self.msix_vectors):
            self._msix_table[16 * v + 12] = 1          # vector control: masked until programmed
        # device configuration (5.1.4)
        self.mac = o.mac
        self.link_up = o.link_up
        self.config_generation = 0
        self.isr = 0
        self.rx_filter = RxFilter(o.mac)
        self.engine = Engine(self.wire, self.rx_filter, self._control, name=f"{name}-engine",
                             row_width=self.max_frame, on_error=self._engine_failed)
        self.engine.link_up = o.link_up
        self.wire.bind(self)
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        """Virtio reset (2.4): everything the driver set goes; DMA maps and IRQ fds stay."""
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.features = 0                 # negotiated: valid once FEATURES_OK stuck
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.queues = [QueueRegs(self.options.queue_size) for _ in range(self.num_queues)]
        self.device_queues: dict[int, DeviceQueue] = {}
        self.needs_reset_reason = ""
        self.features_refusal = ""
        with self._cfg_lock:
            self.isr = 0
            if self.mac != self.options.mac:
                self.mac = self.options.mac
                self.config_generation = (self.config_generation + 1) & 0xFF
        f = self.rx_filter
        f.mac, f.promiscuous, f.allmulti = self.mac, True, False
        f.unicast.clear()
        f.multicast.clear()
        self.engine.active_pairs = 1

    def _retire_queues(self) -> None:
        for dq in self.device_queues.values():
            for key, value in dq.stats().items():
                if isinstance(value, int) and not isinstance(value, bool):
                    self.counters.queues_retired[key] = self.counters.queues_retired.get(key, 0) + value
        self.device_queues.clear()

    def _device_reset(self) -> None:
        self.engine.stop()
        self.engine.flush()
        self.wire.flush()
        self._retire_queues()
        self._reset_state()
        self.counters.resets += 1

    @contextlib.contextmanager
    def _engine_paused(self) -> Iterator[None]:
        """Stop the data path while queues, DMA windows or interrupt fds change."""
        self.engine.stop()
        try:
            yield
        finally:
            self._update_engine()

    def _live(self) -> bool:
        s = self.status
        return (bool(s & F.STATUS_DRIVER_OK) and not s & (F.STATUS_DEVICE_NEEDS_RESET | F.STATUS_FAILED)
                and self.pci.bus_master and not self._closed)

    def _update_engine(self) -> None:
        if not self._live():
            self.engine.stop()
            return
        if self.engine.running:
            return
        pairs: dict[int, QueuePairPlan] = {}
        ctrl = None
        for index, dq in sorted(self.device_queues.items()):
            role = self._queue_role(index)
            if role is None:
                continue
            kind, pair = role
            if kind == "ctrl":
                ctrl = dq
                continue
            p = pairs.setdefault(pair, QueuePairPlan(pair, None, None))
            if kind == "rx":
                p.rx = dq
            else:
                p.tx = dq
        plan = Plan(sorted(pairs.values(), key=lambda p: p.index), ctrl, hdr_len=12,
                    mergeable=bool(self.features & F.bit(F.NET_MRG_RXBUF)))
        self.engine.start(plan)

    def _needs_reset(self, reason: str) -> None:
        """2.1.2: DEVICE_NEEDS_RESET, and a configuration change notification once DRIVER_OK."""
        log.warning("%s: device needs reset: %s", self.name, reason)
        self.needs_reset_reason = reason
        self.status |= F.STATUS_DEVICE_NEEDS_RESET
        self.engine.stop()
        if self.status & F.STATUS_DRIVER_OK:
            self._config_changed(bump=False)

    def _engine_failed(self, exc: BaseException) -> None:
        """The data path died (a wire error, a bug): 2.1.2 DEVICE_NEEDS_RESET so the
        driver hears of it. Runs on the engine thread: no lock, no engine.stop()."""
        self.needs_reset_reason = f"device data path failed: {exc!r}"
        self.status |= F.STATUS_DEVICE_NEEDS_RESET
        if self.status & F.STATUS_DRIVER_OK:
            self._config_changed(bump=False)

    def _config_changed(self, bump: bool = True) -> None:
        """The device configuration changed: new generation, ISR bit 1, config vector (4.1.4.5)."""
        with self._cfg_lock:
            if bump:
                self.config_generation = (self.config_generation + 1) & 0xFF
            if not self.status & F.STATUS_DRIVER_OK:
                return
            self.isr |= 2
            vector = self.config_msix_vector
            fd = self._irq_fds[vector] if vector < len(self._irq_fds) else -1
            self.counters.config_interrupts += 1
            if fd >= 0:
                try:
                    os.write(fd, (1).to_bytes(8, "little"))
                except OSError as e:
                    log.warning("%s: config interrupt on fd %d failed: %s", self.name, fd, e)

    # ------------------------------------------------------------------ DeviceModel
    def device_info(self) -> tuple[int, int, int]:
        return VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET, VFIO_PCI_NUM_REGIONS, VFIO_PCI_NUM_IRQS

    def region_spec(self, index: int) -> RegionSpec:
        from ..vfio_user.model import RegionSpec

        if index == 0:
            return RegionSpec(C.BAR0_SIZE, REGION_READ | REGION_WRITE | REGION_MMAP,
                              [(C.NOTIFY_OFFSET, C.NOTIFY_LENGTH)], self._bar_fd, 0)
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            return RegionSpec(C.CONFIG_SIZE, REGION_READ | REGION_WRITE)
        return RegionSpec(0, 0)

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        with self._lock:
            if index == VFIO_PCI_CONFIG_REGION_INDEX:
                return self.pci.read(offset, size)
            if index == 0:
                return self._bar0_read(offset, size)
            raise ValueError(f"region {index} is not implemented (size 0)")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        with self._lock:
            if index == VFIO_PCI_CONFIG_REGION_INDEX:
                master = self.pci.bus_master
                self.pci.write(offset, bytes(data))
                if self.pci.bus_master != master:
                    self._update_engine()
                return
            if index == 0:
                self._bar0_write(offset, bytes(data))
                return
            raise ValueError(f"region {index} is not implemented (size 0)")

    def irq_info(self, index: int) -> tuple[int, int]:
        if index == VFIO_PCI_MSIX_IRQ_INDEX:
            return self.msix_vectors, IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE
        return 0, 0                 # no INTx pin (like the real device), no MSI

    def set_irqs(self, index: int, start: int, fds: list[int] | None) -> None:
        with self._lock:
            if index != VFIO_PCI_MSIX_IRQ_INDEX:
                if fds:
                    raise OSError(errno.EINVAL, f"IRQ index {index} has no interrupts (only MSI-X, index 2)")
                return
            if fds is not None and (start < 0 or start + len(fds) > self.msix_vectors):
                raise OSError(errno.EINVAL, f"vectors {start}..{start + len(fds) - 1} outside the device's "
                                            f"{self.msix_vectors} MSI-X vectors")
            with self._engine_paused():
                if fds is None:
                    old = [fd for fd in self._irq_fds if fd >= 0]
                    self._irq_fds = [-1] * self.msix_vectors
                else:
                    old = []
                    for k, fd in enumerate(fds):
                        if self._irq_fds[start + k] >= 0 and self._irq_fds[start + k] != fd:
                            old.append(self._irq_fds[start + k])
                        self._irq_fds[start + k] = fd
                self._rewire_queue_vectors()
                for fd in old:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.pci.set_msix_enabled(any(fd >= 0 for fd in self._irq_fds))

    def dma_map(self, iova: int, size: int, fd: int, fd_offset: int, prot: int) -> None:
        with self._lock, self._engine_paused():
            # Paused: the window table is not to change under a translation in progress.
            self.dma.map(iova, size, fd, fd_offset, prot)
            self.counters.dma_maps += 1

    def dma_unmap(self, iova: int, size: int) -> None:
        with self._lock:
            mapping = self.dma.mappings.get(iova)
            if mapping is None or mapping.size != size:
                raise OSError(errno.ENOENT, f"no DMA mapping {iova:#x}+{size:#x}")
            with self._engine_paused():
                # A live queue whose ring is in this range would point at unmapped memory:
                # the driver pulled memory from under the device. Drop those queues.
                doomed = [i for i, q in self.device_queues.items()
                          if any(iova <= a < iova + size for a in (self.queues[i].desc, self.queues[i].driver,
                                                                  self.queues[i].device))]
                if doomed:
                    for i in doomed:
                        del self.device_queues[i]
                    self.counters.bad_ring_addresses += 1
                    self._needs_reset(f"DMA range {iova:#x}+{size:#x} unmapped under live queues {doomed}")
                self.dma.unmap(iova, size)
                self.counters.dma_unmaps += 1

    def reset(self) -> None:
        """VFIO device reset: the virtio device resets; DMA maps and IRQ fds stay."""
        with self._lock:
            self._device_reset()

    def client_gone(self) -> None:
        """The driver went away: reset the device, drop its DMA maps and IRQ fds, and
        put the configuration space back to power-on values, ready for the next one."""
        with self._lock:
            self._device_reset()
            self.dma.clear()
            for fd in self._irq_fds:
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._irq_fds = [-1] * self.msix_vectors
            self.pci.reset()
            self._bar[C.NOTIFY_OFFSET:C.NOTIFY_OFFSET + C.NOTIFY_LENGTH] = bytes(C.NOTIFY_LENGTH)

    # ------------------------------------------------------------------ beyond the protocol
    def set_link(self, up: bool) -> None:
        """Link up or down (5.1.4 status LINK_UP), with a configuration change interrupt.
        While down, what the driver sends is dropped and nothing is received."""
        with self._lock:
            if bool(up) == self.link_up:
                return
            with self._cfg_lock:
                self.link_up = bool(up)
            self.engine.link_up = bool(up)
            if self.offered & F.bit(F.NET_STATUS):
                self._config_changed()

    @property
    def bar_fd(self) -> int:
        return self._bar_fd

    @property
    def irq_fds(self) -> tuple[int, ...]:
        return tuple(self._irq_fds)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            queues = {i: dq.stats() for i, dq in self.device_queues.items()}
            totals = dict(self.counters.queues_retired)
            for st in queues.values():
                for key, value in st.items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        totals[key] = totals.get(key, 0) + value
            c = self.counters
            return {
                "status": self.status, "features": self.features, "link_up": self.link_up,
                "mac": self.mac.hex(":"), "config_generation": self.config_generation,
                "engine": self.engine.stats(), "wire": self.wire.stats(),
                "queues": {str(i): st for i, st in queues.items()},
                "bad_descriptors": totals.get("bad_descriptors", 0),
                "dropped": totals.get("dropped", 0), "interrupts": totals.get("interrupts", 0),
                "tx_packets": self.engine.tx_packets, "rx_packets": self.engine.rx_packets,
                "rx_filtered": self.engine.rx_filtered,
                "promiscuous": self.rx_filter.promiscuous, "allmulti": self.rx_filter.allmulti,
                "active_pairs": self.engine.active_pairs,
                "bad_register_writes": c.bad_register_writes, "bad_status_writes": c.bad_status_writes,
                "refused_features": c.refused_features, "refused_driver_ok": c.refused_driver_ok,
                "bad_ring_addresses": c.bad_ring_addresses, "bad_notifications": c.bad_notifications,
                "notifications": c.notifications, "config_interrupts": c.config_interrupts,
                "resets": c.resets, "dma_mappings": len(self.dma), "ignored_config_writes": self.pci.ignored_writes,
                "needs_reset_reason": self.needs_reset_reason, "features_refusal": self.features_refusal,
            }

    def close(self) -> None:
        """Stop, drop DMA maps and IRQ fds, close the wire and the BAR memfd. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self.client_gone()
            self._closed = True
            self.wire.close()
            self._bar.close()
            os.close(self._bar_fd)
            self._bar_fd = -1

    def __enter__(self) -> "VirtioNetModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        return struct.pack(
            "<IIIIHHBBHHHHHQQQ",
            self.device_feature_select, device_feature, self.driver_feature_select, driver_feature,
            self.config_msix_vector, self.num_queues, self.status, self.config_generation,
            self.queue_select, q.size if q else 0, q.msix_vector if q else NO_VECTOR,
            1 if q and q.enabled else 0, self.queue_select if q else 0,
            q.desc if q else 0, q.driver if q else 0, q.device if q else 0)

    def _common_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        value = int.from_bytes(data, "little")
        fld = COMMON_FIELDS.get(offset)
        half = 0
        if fld is None and offset - 4 in COMMON_FIELDS and COMMON_FIELDS[offset - 4][0] == 8:
            fld, half = COMMON_FIELDS[offset - 4], 1
        # 4.1.3.1: each field at its own width; 64-bit fields also as two 32-bit halves.
        if fld is None or not (size == fld[0] or (fld[0] == 8 and size == 4)) or (half and size != 4):
            self.counters.bad_register_writes += 1
            return
        name = fld[1]
        if name in ("queue_desc", "queue_driver", "queue_device"):
            self._queue_address(name[6:], value, size, half)
            return
        handler = getattr(self, f"_w_{name}", None)
        if handler is None:                  # read-only: device_feature, num_queues, generation, notify_off
            self.counters.bad_register_writes += 1
            return
        handler(value)

    def _w_device_feature_select(self, value: int) -> None:
        self.device_feature_select = value

    def _w_driver_feature_select(self, value: int) -> None:
        self.driver_feature_select = value

    def _w_driver_feature(self, value: int) -> None:
        # Only between DRIVER and FEATURES_OK (3.1.1 steps 4-5); bits above 63 do not exist.
        if not self.status & F.STATUS_DRIVER or self.status & F.STATUS_FEATURES_OK or self.driver_feature_select > 1:
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
        if q is None or q.enabled or not 0 < value <= self.options.queue_size or value & (value - 1):
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

    def _queue_role(self, index: int) -> tuple[str, int] | None:
        """5.1.2: receiveq1, transmitq1, ... receiveqN, transmitqN, controlq, by negotiated features."""
        mq = bool(self.features & F.bit(F.NET_MQ))
        pairs = self.max_pairs if mq else 1
        if index < 2 * pairs:
            return ("rx" if index % 2 == 0 else "tx"), index // 2
        if self.features & F.bit(F.NET_CTRL_VQ) and index == (2 * self.max_pairs if mq else 2):
            return "ctrl", 0
        return None

    def _w_queue_enable(self, value: int) -> None:
        index = self.queue_select
        q = self._selected()
        if q is None or value != 1 or q.enabled:
            # 4.1.4.3.2: the driver MUST NOT write 0 (queue reset is not offered).
            self.counters.bad_register_writes += 1
            return
        if not self.status & F.STATUS_FEATURES_OK:
            self.counters.bad_register_writes += 1
            self._needs_reset(f"queue {index} enabled before FEATURES_OK (3.1.1 step 7 comes after step 5)")
            return
        if self._queue_role(index) is None:
            self.counters.bad_register_writes += 1
            self._needs_reset(f"queue {index} does not exist with the negotiated features")
            return
        try:
            dq = DeviceQueue(self.dma.windows, q.size, q.desc, q.driver, q.device,
                             event_idx=bool(self.features & F.bit(F.RING_EVENT_IDX)), weak_barriers=True)
        except (DeviceError, ValueError) as e:
            self.counters.bad_ring_addresses += 1
            self._needs_reset(f"queue {index}: {e}")
            return
        with self._engine_paused():
            q.enabled = True
            self.device_queues[index] = dq
            self._rewire_queue_vectors()

    def _rewire_queue_vectors(self) -> None:
        """Give each device queue the eventfd of its MSI-X vector (only while the engine is stopped)."""
        for index, dq in self.device_queues.items():
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
        driver_bits = old & ~F.STATUS_DEVICE_NEEDS_RESET
        if driver_bits & ~value:
            # 2.1.2: the driver MUST NOT clear a status bit (except by writing 0).
            self.counters.bad_status_writes += 1
            return
        new_bits = value & ~old & ~F.STATUS_DEVICE_NEEDS_RESET
        status = old
        order = (F.STATUS_ACKNOWLEDGE, F.STATUS_DRIVER, F.STATUS_FEATURES_OK, F.STATUS_DRIVER_OK)
        for bit in order:
            if not new_bits & bit:
                continue
            if bit == F.STATUS_DRIVER and not status & F.STATUS_ACKNOWLEDGE:
                self.counters.bad_status_writes += 1
                continue
            if bit == F.STATUS_FEATURES_OK:
                if not status & F.STATUS_DRIVER or not self._accept_features():
                    self.counters.refused_features += 1
                    continue
                self.features = self.driver_features
            if bit == F.STATUS_DRIVER_OK and not status & F.STATUS_FEATURES_OK:
                # 3.1.1: DRIVER_OK only after FEATURES_OK; the device does not go live.
                self.counters.refused_driver_ok += 1
                continue
            status |= bit
        if new_bits & F.STATUS_FAILED:
            status |= F.STATUS_FAILED
        if new_bits & ~(F.STATUS_ACKNOWLEDGE | F.STATUS_DRIVER | F.STATUS_FEATURES_OK | F.STATUS_DRIVER_OK
                        | F.STATUS_FAILED):
            self.counters.bad_status_writes += 1           # reserved bits
        self.status = status
        self._update_engine()

    def _accept_features(self) -> bool:
        """FEATURES_OK: a subset of the offer and consistent (5.1.3.1), else refused."""
        f = self.driver_features
        why = ""
        if f & ~self.offered:
            why = f"features not offered: {', '.join(F.names(f & ~self.offered))}"
        elif not f & F.bit(F.VERSION_1):
            why = "VERSION_1 not accepted (a modern-only device, 4.1.2.1)"
        elif self.offered & F.bit(F.ACCESS_PLATFORM) and not f & F.bit(F.ACCESS_PLATFORM):
            why = "ACCESS_PLATFORM not accepted: the device reaches memory only through DMA mappings (6.1)"
        elif f & NEEDS_CTRL_VQ and not f & F.bit(F.NET_CTRL_VQ):
            why = f"{', '.join(F.names(f & NEEDS_CTRL_VQ))} without CTRL_VQ (5.1.3.1)"
        self.features_refusal = why
        if why:
            log.info("%s: FEATURES_OK refused: %s", self.name, why)
        return not why

    # ---- notifications ----
    def _notify(self, rel: int, data: bytes) -> None:
        index = rel // C.NOTIFY_OFF_MULTIPLIER
        value = int.from_bytes(data[:2], "little")
        if rel % C.NOTIFY_OFF_MULTIPLIER or index >= self.num_queues or value != index:
            self.counters.bad_notifications += 1
            return
        self.counters.notifications += 1
        self.engine.kick()

    # ---- device configuration (5.1.4) ----
    def _device_config(self) -> bytes:
        with self._cfg_lock:
            mac, up = self.mac, self.link_up
        status = F.NET_S_LINK_UP if up or not self.offered & F.bit(F.NET_STATUS) else 0
        mtu = self.options.mtu if self.offered & F.bit(F.NET_MTU) else 0
        # mac[6], status, max_virtqueue_pairs, mtu, speed (unknown), duplex (unknown)
        cfg = mac + struct.pack("<HHHIB", status, self.max_pairs, mtu, 0xFFFFFFFF, 0xFF)
        return cfg.ljust(C.DEVICE_LENGTH, b"\0")

    # ---- control queue (5.1.6.5), called on the engine thread ----
    def _control(self, cls: int, cmd: int, data: bytes) -> int:
        ok, err = F.CTRL_OK, F.CTRL_ERR
        feats = self.features
        if cls == F.CTRL_RX and feats & F.bit(F.NET_CTRL_RX):
            if cmd in (F.CTRL_RX_PROMISC, F.CTRL_RX_ALLMULTI) and len(data) == 1 and data[0] in (0, 1):
                if cmd == F.CTRL_RX_PROMISC:
                    self.rx_filter.promiscuous = bool(data[0])
                else:
                    self.rx_filter.allmulti = bool(data[0])
                return ok
            return err
        if cls == F.CTRL_MAC and cmd == F.CTRL_MAC_TABLE_SET and feats & F.bit(F.NET_CTRL_RX):
            tables = self._parse_mac_tables(data)
            if tables is None:
                return err
            self.rx_filter.unicast = {mac_key(m) for m in tables[0]}
            self.rx_filter.multicast = {mac_key(m) for m in tables[1]}
            return ok
        if cls == F.CTRL_MAC and cmd == F.CTRL_MAC_ADDR_SET and feats & F.bit(F.NET_CTRL_MAC_ADDR):
            if len(data) != 6 or data[0] & 1 or data == bytes(6):
                return err
            with self._cfg_lock:
                if data != self.mac:
                    self.mac = bytes(data)
                    self.config_generation = (self.config_generation + 1) & 0xFF
            self.rx_filter.mac = bytes(data)
            return ok
        if cls == F.CTRL_MQ and cmd == F.CTRL_MQ_VQ_PAIRS_SET and feats & F.bit(F.NET_MQ):
            if len(data) != 2:
                return err
            pairs = int.from_bytes(data, "little")
            # 5.1.6.5.5: 1 (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN) to max_virtqueue_pairs.
            if not 1 <= pairs <= self.max_pairs:
                return err
            self.engine.active_pairs = pairs
            return ok
        return err

    @staticmethod
    def _parse_mac_tables(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
        """5.1.6.5.2: le32 entries + macs (unicast), then le32 entries + macs (multicast), nothing after."""
        tables: list[list[bytes]] = []
        pos = 0
        for multicast in (False, True):
            if pos + 4 > len(data):
                return None
            n = int.from_bytes(data[pos:pos + 4], "little")
            pos += 4
            if n > MAC_TABLE_MAX or pos + 6 * n > len(data):
                return None
            macs = [bytes(data[pos + 6 * i:pos + 6 * i + 6]) for i in range(n)]
            if any(bool(m[0] & 1) != multicast for m in macs):
                return None
            tables.append(macs)
            pos += 6 * n
        if pos != len(data):
            return None
        return tables[0], tables[1]


__all__ = ["VirtioNetModel", "SimOptions", "OFFERED", "OFFERED_NAMES", "COMMON_FIELDS", "NO_VECTOR",
           "DEFAULT_MAC"]
