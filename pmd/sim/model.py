"""The built-in virtio-net device: a vfio-user device model (Virtio 1.2, 4.1 and 5.1).

:class:`VirtioNetModel` implements :class:`pmd.sim.server.DeviceModel`: the
server asks it about regions and IRQs and forwards region reads and writes,
``SET_IRQS`` and ``DMA_MAP``/``DMA_UNMAP``. It is made of two parts and the
state they share:

- :class:`pmd.sim.virtio_pci.VirtioPciFunction`: BAR0's registers (the common
  configuration, device status, queues, ISR, notifications, the MSI-X table);
- :class:`pmd.sim.net.VirtioNetFunction`: what makes it a network card (the
  features offered, the queues, the device configuration, the control queue);

and here, the device around them:

- **Regions**: BAR0 (64 KiB, 64-bit memory BAR) and the configuration space
  (:mod:`pmd.sim.pci_config`). The common configuration, ISR and device
  configuration are *message-only*: they have register semantics
  (``queue_select`` changes what ``queue_size`` shows; a read of ISR clears
  it), so every access reaches the model. The **notify area** is mmap-able,
  backed by a sealed memfd: a doorbell written through the mapping costs the
  driver no message; the device polls its rings anyway.
- **Interrupts**: MSI-X by writing the eventfds the driver gave (``SET_IRQS``).
- **DMA**: the driver's memory mapped into DMA windows (:class:`pmd.sim.dma.DmaMap`);
  a range unmapped under a live queue sets DEVICE_NEEDS_RESET.
- **Reset and the engine**: 0 in device status resets (the engine stops, queues
  are forgotten, DMA mappings and IRQ fds stay); the data path is
  :class:`pmd.sim.engine.Engine`, started at DRIVER_OK with bus mastering on,
  the wire behind it one of :mod:`pmd.sim.wires`.

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
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from ..memory.seals import create_sealed_memfd
from ..abi import virtio as V, virtio_net as N
from ..abi.ethernet import parse_mac
from ..abi.vfio import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    PCI_INTX_IRQ_INDEX,
    PCI_CONFIG_REGION_INDEX,
    PCI_MSIX_IRQ_INDEX,
    PCI_NUM_IRQS,
    PCI_NUM_REGIONS,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
)
from ..abi.virtio import NO_VECTOR
from ..abi.virtio_pci import ISR_QUEUE
from . import pci_config as C
from ._virtqueue import DeviceQueue
from .dma import DmaMap
from .engine import Engine, Plan, QueuePairPlan, RxFilter
from .net import DEFAULT_MAC, MULTIQUEUE_ONLY, OFFERED, OFFERED_NAMES, VirtioNetFunction
from .server import RegionSpec
from .virtio_pci import Counters, QueueRegs, VirtioPciFunction
from .wires import LoopbackWire, Wire

log = logging.getLogger("pmd.sim")


@dataclass
class SimOptions:
    """What the device is: ``mac``, ``queue_pairs`` (max_virtqueue_pairs), ``queue_size``
    (the largest ring a queue accepts), ``mtu``, ``msix_vectors`` (default: config +
    one per queue; 0: no MSI-X capability, the device interrupts on INTx as QEMU's
    ``vectors=0`` does), ``features_off`` (names or a mask), ``link_up`` at power-on."""

    mac: bytes = DEFAULT_MAC
    queue_pairs: int = 1
    queue_size: int = 1024
    mtu: int = 1500
    msix_vectors: int | None = None
    features_off: int | str = 0
    link_up: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.mac, str):
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
        self.features_off = N.parse_features(self.features_off)
        if self.features_off & ~OFFERED:
            raise ValueError(f"cannot turn off {', '.join(N.feature_names(self.features_off & ~OFFERED))}: "
                             f"not offered (offered: {', '.join(OFFERED_NAMES)})")
        if self.features_off & V.bit(V.VERSION_1):
            raise ValueError("VERSION_1 cannot be turned off: this is a modern-only device (0x1041)")

    @property
    def offered(self) -> int:
        off = int(self.features_off)
        offered = OFFERED & ~off
        if self.queue_pairs == 1:
            offered &= ~MULTIQUEUE_ONLY
        if not offered & V.bit(N.NET_CTRL_VQ):
            offered &= ~N.NEEDS_CTRL_VQ
        return offered


class VirtioNetModel(VirtioPciFunction, VirtioNetFunction):
    """``VirtioNetModel(options=None, wire=None, **option_fields)``: one virtio-net device.

    ``wire`` defaults to :class:`pmd.sim.wires.LoopbackWire`; the model owns it
    (``close()`` closes it). Everything here also works without a server:
    tests drive ``region_read``/``region_write`` directly, and
    :class:`pmd.backends.local.LocalAccess` puts pmd's own driver on top in-process.
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
        self.max_queue_size = o.queue_size
        self.mtu = o.mtu
        self.num_queues = 2 * o.queue_pairs + (1 if self.offered & V.bit(N.NET_CTRL_VQ) else 0)
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
        # Without MSI-X: INTx, level-triggered and masked when it fires, as VFIO does it
        # (vfio_intx_handler): the line is up while ISR is not 0 (4.1.4.5).
        self.intx = self.msix_vectors == 0
        self.intx_interrupts = 0
        self._intx_fd = -1              # the driver's eventfd (SET_IRQS on the INTx index)
        self._intx_masked = False
        self._intx_thread: threading.Thread | None = None
        self._queue_irq = -1            # what the device queues signal; the INTx thread turns it into ISR bit 0
        self._intx_stop = -1
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
        if self.intx:
            self._start_intx(name)

    def _start_intx(self, name: str) -> None:
        """The INTx thread and its two eventfds; nothing is left behind if one fails."""
        try:
            self._queue_irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._intx_stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            thread = threading.Thread(target=self._intx_loop, name=f"{name}-intx", daemon=True)
            thread.start()
        except BaseException:
            for fd in (self._queue_irq, self._intx_stop):
                if fd >= 0:
                    os.close(fd)
            self._queue_irq = self._intx_stop = -1
            self.close()
            raise
        self._intx_thread = thread

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
        self.engine.rss.reset()

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
        return (bool(s & V.STATUS_DRIVER_OK) and not s & (V.STATUS_DEVICE_NEEDS_RESET | V.STATUS_FAILED)
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
        plan = Plan(sorted(pairs.values(), key=lambda p: p.index), ctrl, hdr_len=N.hdr_len_for(self.features),
                    mergeable=bool(self.features & V.bit(N.NET_MRG_RXBUF)))
        self.engine.start(plan)

    def _needs_reset(self, reason: str) -> None:
        """2.1.2: DEVICE_NEEDS_RESET, and a configuration change notification once DRIVER_OK."""
        log.warning("%s: device needs reset: %s", self.name, reason)
        self.needs_reset_reason = reason
        self.status |= V.STATUS_DEVICE_NEEDS_RESET
        self.engine.stop()
        if self.status & V.STATUS_DRIVER_OK:
            self._config_changed(bump=False)

    def _engine_failed(self, exc: BaseException) -> None:
        """The data path died (a wire error, a bug): 2.1.2 DEVICE_NEEDS_RESET so the
        driver hears of it. Runs on the engine thread: no lock, no engine.stop()."""
        self.needs_reset_reason = f"device data path failed: {exc!r}"
        self.status |= V.STATUS_DEVICE_NEEDS_RESET
        if self.status & V.STATUS_DRIVER_OK:
            self._config_changed(bump=False)

    # ------------------------------------------------------------------ DeviceModel
    def device_info(self) -> tuple[int, int, int]:
        return VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET, PCI_NUM_REGIONS, PCI_NUM_IRQS

    def region_spec(self, index: int) -> RegionSpec:
        if index == 0:
            return RegionSpec(C.BAR0_SIZE, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_MMAP,
                              [(C.NOTIFY_OFFSET, C.NOTIFY_LENGTH)], self._bar_fd, 0)
        if index == PCI_CONFIG_REGION_INDEX:
            return RegionSpec(C.CONFIG_SIZE, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE)
        return RegionSpec(0, 0)

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        with self._lock:
            if index == PCI_CONFIG_REGION_INDEX:
                return self.pci.read(offset, size)
            if index == 0:
                return self._bar0_read(offset, size)
            raise ValueError(f"region {index} is not implemented (size 0)")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        with self._lock:
            if index == PCI_CONFIG_REGION_INDEX:
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
        if index == PCI_MSIX_IRQ_INDEX and self.msix_vectors:
            return self.msix_vectors, IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE
        if index == PCI_INTX_IRQ_INDEX and self.intx:
            return 1, IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
        return 0, 0                 # no INTx pin when there is MSI-X (like the real device), no MSI

    # ---- INTx (no MSI-X) ----
    def _raise_intx_locked(self) -> None:
        """The line is up while ISR is not 0; fire (and mask, as VFIO does) unless masked.
        Caller holds _cfg_lock."""
        if self.isr and not self._intx_masked and self._intx_fd >= 0:
            self._intx_masked = True
            self.intx_interrupts += 1
            try:
                os.eventfd_write(self._intx_fd, 1)
            except OSError as e:
                log.warning("%s: INTx on fd %d failed: %s", self.name, self._intx_fd, e)

    def unmask_irq(self, index: int, start: int = 0, count: int = 1) -> None:
        """VFIO_IRQ_SET_ACTION_UNMASK: INTx fires again at once if ISR is still not 0."""
        if index != PCI_INTX_IRQ_INDEX or not self.intx or start != 0 or count != 1:
            raise OSError(errno.EINVAL, f"IRQ index {index} {start}..{start + count - 1} cannot be unmasked "
                                        "(only INTx 0, on a device without MSI-X)")
        with self._cfg_lock:
            self._intx_masked = False
            self._raise_intx_locked()

    def _intx_loop(self) -> None:
        """A device queue interrupted (its eventfd is _queue_irq): set ISR bit 0, raise INTx."""
        import select
        poller = select.poll()
        poller.register(self._queue_irq, select.POLLIN)
        poller.register(self._intx_stop, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._intx_stop in ready:
                return
            try:
                os.eventfd_read(self._queue_irq)
            except BlockingIOError:
                continue
            with self._cfg_lock:
                if self.status & V.STATUS_DRIVER_OK:
                    self.isr |= ISR_QUEUE
                    self._raise_intx_locked()

    def _set_intx(self, fds: list[int] | None) -> None:
        if fds is not None and len(fds) != 1:
            raise OSError(errno.EINVAL, "INTx is one interrupt: give one eventfd")
        with self._cfg_lock:
            old, self._intx_fd = self._intx_fd, (fds[0] if fds else -1)
            self._intx_masked = False
        if old >= 0 and old != self._intx_fd:
            with contextlib.suppress(OSError):
                os.close(old)

    def set_irqs(self, index: int, start: int, fds: list[int] | None) -> None:
        with self._lock:
            if index == PCI_INTX_IRQ_INDEX and self.intx:
                if fds is not None and start != 0:
                    raise OSError(errno.EINVAL, "INTx has one interrupt, 0")
                self._set_intx(fds)
                return
            if index != PCI_MSIX_IRQ_INDEX or not self.msix_vectors:
                if fds:
                    raise OSError(errno.EINVAL, f"IRQ index {index} has no interrupts "
                                                f"(only {'INTx, index 0' if self.intx else 'MSI-X, index 2'})")
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
            self._set_intx(None)
            self.pci.reset()
            self._bar[C.NOTIFY_OFFSET:C.NOTIFY_OFFSET + C.NOTIFY_LENGTH] = bytes(C.NOTIFY_LENGTH)

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
                "intx_interrupts": self.intx_interrupts,
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
            if self._intx_thread is not None:
                os.eventfd_write(self._intx_stop, 1)
                self._intx_thread.join(5)
                os.close(self._intx_stop)
                os.close(self._queue_irq)
                self._intx_thread = None
            self.wire.close()
            self._bar.close()
            os.close(self._bar_fd)
            self._bar_fd = -1

    def __enter__(self) -> "VirtioNetModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["VirtioNetModel", "SimOptions", "OFFERED", "OFFERED_NAMES", "NO_VECTOR", "DEFAULT_MAC"]
