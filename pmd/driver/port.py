"""The Port: one virtio-net device, opened, started, and bursting.

    with pmd.open_port("0000:00:03.0") as port:
        port.start(queue_pairs=1, queue_size=256)
        n = port.rx_burst(out, lengths)

A port drives one :class:`~pmd.driver.virtio.transport.Transport` and knows
nothing of how it reaches the device (PCI through kernel VFIO or vfio-user, or
no PCI at all): :func:`pmd.open_port` builds the transport. A port owns
everything it uses and releases it in reverse order on ``stop()``/``close()``,
on an error half-way through ``start()``, and at interpreter exit: the device is
reset first (so it stops DMA), then interrupts, queues, the control queue, DMA
mappings, memory, and the transport (with the device access it owns).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import DeviceError, PmdError, QueueStateError
from ..memory import DmaMemory
from ..abi import virtio as V, virtio_net as N
from ..abi.ethernet import format_mac, parse_mac, random_mac
from ..abi.virtio import NO_VECTOR
from ..abi.virtio_net import ctrl_queue_index, hdr_len_for, rx_queue_index, tx_queue_index
from . import interrupts
from ._pool import PacketPool
from ._rx import RxQueue
from ._tx import MAX_TX_CHAIN, TxQueue
from ._virtqueue import Virtqueue, indirect_table_bytes, ring_size
from .virtio.net import (ControlQueue, Link, LinkCallback, TransportControl, check_enable, link_from, negotiate,
                         read_net_config)
from .virtio.transport import ISR_CONFIG, ISR_QUEUE, Transport

log = logging.getLogger("pmd.port")

_open_ports: "weakref.WeakSet[Port]" = weakref.WeakSet()

#: The RSS key a port starts with (Microsoft's RSS verification key, which DPDK and
#: Linux test with too): fixed, so a flow lands on the same queue run after run.
DEFAULT_RSS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c"
                                "6a42b73bbeac01fa")


@atexit.register
def _close_all() -> None:
    for port in list(_open_ports):
        try:
            port.close()
        except Exception:  # pragma: no cover - best effort at exit
            log.exception("closing %s at exit", port.name)


class Port:
    """A virtio-net device driven by pmd. Build it with :func:`pmd.open_port`.

    ``Port(transport, disable=0, mac=None, name=None, owns_transport=True, enable=0)``:
    ``transport`` is the device's :class:`~pmd.driver.virtio.transport.Transport`;
    ``disable`` is a feature mask or names ("MRG_RXBUF,EVENT_IDX") pmd must not
    negotiate; ``enable`` names what pmd takes only when asked ("RING_PACKED"); ``mac`` replaces the device's address where the device allows it;
    ``owns_transport``: :meth:`close` closes the transport too.
    """

    def __init__(self, transport: Transport, *, disable: int | str = 0, mac: str | bytes | None = None,
                 name: str | None = None, owns_transport: bool = True, enable: int | str = 0) -> None:
        if not isinstance(transport, Transport):
            raise TypeError(f"Port drives a virtio Transport, not a {type(transport).__name__}; for a device "
                            "access (kernel VFIO, vfio-user, LocalAccess) use pmd.open_port(access)")
        self.transport = transport
        self.name = name or transport.name
        self._owns_transport = owns_transport
        self._disable = N.parse_features(disable)
        self._enable = N.parse_features(enable)
        check_enable(self._enable)             # an enable= naming what is not opt-in: say so now
        self._want_mac = parse_mac(mac) if mac is not None else None
        self._lock = threading.RLock()
        # The link callbacks have a lock of their own: the interrupt thread takes it,
        # and never the port lock, which stop() holds while it waits for that thread.
        self._callbacks_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._stats_base: tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]] | None = None
        self._link_callbacks: list[LinkCallback] = []
        self._resources: list[Callable[[], object]] = []   # undo actions of start(), run in reverse
        self._on_close: list[Callable[[], object]] = []    # after the transport is closed (after_close)
        #: what open_port started for this port, if anything (the built-in device's process)
        self.sim: Any = None
        self.features = 0
        self.device_features = 0
        self.hdr_len = 12
        self.mac = b""
        self.mtu: int | None = None
        self.max_queue_pairs = 1
        self.queue_pairs = 0
        self.pools: list[PacketPool] = []
        self.rxqs: list[RxQueue] = []
        self.txqs: list[TxQueue] = []
        self.memory: DmaMemory | None = None
        self.ctrl: ControlQueue | TransportControl | None = None
        # Per rx queue in rx-interrupt mode: its vector's eventfd (one object for
        # the queues that share a vector), the vector, and, when shared, a private
        # eventfd by which the sharer that drained an interrupt wakes the others.
        self._rx_events: list[interrupts.EventFd | None] = []
        self._rx_vectors: list[int] = []
        self._rx_wakes: list[interrupts.EventFd | None] = []
        self._config_event: interrupts.EventFd | None = None
        # MSI or INTx (no MSI-X): the one eventfd every source signals, the cause in ISR
        self._line_event: interrupts.EventFd | None = None
        #: how the device interrupts this port: "msix", "msi", "intx", "callfd" (vhost-user),
        #: "none"; None until started
        self.interrupt_mode: str | None = None
        self.config_interrupts = 0
        self.rx_interrupts = 0
        #: MSI/INTx interrupts whose ISR status named no cause (another device on a shared line)
        self.spurious_interrupts = 0
        self._link = Link(True)             # as last read (port.link or an interrupt)
        self._link_reported = Link(True)    # as the link callbacks last heard of it
        self._promisc: bool | None = None
        self._allmulti: bool | None = None
        self._cfg: Any = None                  # the device configuration read at start (NetConfig)
        self._rss: dict[str, Any] | None = None   # what set_rss last configured
        #: why the device went away under a started port (see :meth:`_device_lost`), else None
        self.lost: str | None = None
        try:
            transport.reset()
        except BaseException:
            if owns_transport:
                transport.close()
            raise
        _open_ports.add(self)

    # ------------------------------------------------------------------ start
    def start(self, queue_pairs: int = 1, queue_size: int = 256, *, n_buffers: int | None = None,
              buffer_size: int = 2048, rx_interrupts: bool = False, promiscuous: bool | None = None,
              hugepages: bool | None = None, max_packet_len: int | None = None) -> "Port":
        """Initialise the device (Virtio 1.2 3.1.1) and its queues; returns the port.

        ``queue_size`` is the ring size (a legacy device imposes its own; pass
        0 to take the device's maximum); ``n_buffers`` per queue pair defaults
        to twice the ring size plus 512. ``rx_interrupts`` gives each rx queue
        an interrupt for :meth:`rx_wait`: an MSI-X vector, or without MSI-X
        the device's one MSI or INTx interrupt, shared by every source.
        """
        with self._lock:
            self._check_open()
            if self._started:
                raise QueueStateError(f"port {self.name} is already started; stop() it first")
            if queue_pairs < 1:
                raise ValueError("queue_pairs must be at least 1")
            try:
                self._start(queue_pairs, queue_size, n_buffers, buffer_size, rx_interrupts, promiscuous,
                            hugepages, max_packet_len)
            except BaseException:
                try:
                    self.transport.add_status(V.STATUS_FAILED)   # 3.1.1 step 8: give up on the device
                except Exception:
                    pass
                self._teardown()
                raise
            self._started = True
        return self

    def _start(self, queue_pairs: int, queue_size: int, n_buffers: int | None, buffer_size: int,
               rx_interrupts: bool, promiscuous: bool | None, hugepages: bool | None,
               max_packet_len: int | None) -> None:
        t = self.transport
        t.reset()
        t.add_status(V.STATUS_ACKNOWLEDGE)
        t.add_status(V.STATUS_DRIVER)
        self.device_features = t.device_features()
        accepted = negotiate(self.device_features, transport_bits=t.feature_bits, disable=self._disable,
                             enable=self._enable, queue_pairs=queue_pairs)
        t.set_driver_features(accepted)
        if not t.legacy:
            t.add_status(V.STATUS_FEATURES_OK)
            if not t.get_status() & V.STATUS_FEATURES_OK:
                raise DeviceError(f"the device refused the features pmd accepted: "
                                  f"{', '.join(N.feature_names(accepted))} (FEATURES_OK did not stick, 3.1.1); "
                                  "turn some off with disable=")
        self.features = accepted
        self.hdr_len = hdr_len_for(accepted)

        # Interrupts before the device configuration: a legacy device moves its
        # configuration from offset 20 to 24 once MSI-X is on.
        self._setup_interrupts(queue_pairs if rx_interrupts else 0)
        cfg = read_net_config(t, accepted)
        self._cfg = cfg
        self.max_queue_pairs = cfg.max_queue_pairs
        if queue_pairs > cfg.max_queue_pairs:
            raise ValueError(f"{queue_pairs} queue pairs asked; the device has at most "
                             f"{cfg.max_queue_pairs}" + ("" if accepted & V.bit(N.NET_MQ)
                                                         else " (no VIRTIO_NET_F_MQ)"))
        self.mtu = cfg.mtu
        self._link = self._link_reported = link_from(cfg)
        # no MAC from the device: the one asked for, else the one picked at the last start, else a new one
        self.mac = cfg.mac if cfg.mac is not None else (self._want_mac or self.mac or random_mac())

        sizes = []
        for pair in range(queue_pairs):
            for index in (rx_queue_index(pair), tx_queue_index(pair)):
                top = t.queue_max_size(index)
                size = top if (queue_size == 0 or t.queue_size_fixed()) else queue_size
                if top == 0:
                    raise DeviceError(f"queue {index} does not exist on the device")
                if size > top:
                    raise ValueError(f"queue_size {size} is larger than the device allows ({top})")
                sizes.append(size)
        ctrl_index = ctrl_queue_index(accepted, cfg.max_queue_pairs)
        ctrl_size = 0
        if accepted & V.bit(N.NET_CTRL_VQ) and not t.serves_control:
            top = t.queue_max_size(ctrl_index)
            ctrl_size = top if t.queue_size_fixed() else min(64, top)
        per_pair = n_buffers if n_buffers is not None else 2 * max(sizes) + 512
        packed = bool(accepted & V.bit(V.RING_PACKED))
        # 2.7.5.3, 2.8.7: a transmit chain (header + buffers) goes in an indirect table of its own
        indirect = [min(MAX_TX_CHAIN, s) if accepted & V.bit(V.RING_INDIRECT_DESC) and s >= 2 else 0
                    for s in sizes[1::2]]
        total = sum(ring_size(s, t.ring_align, packed) + 4096 for s in sizes)
        total += sum(indirect_table_bytes(s, k) for s, k in zip(sizes[1::2], indirect))
        total += (ring_size(ctrl_size, t.ring_align, packed) + 4096 + ControlQueue.memory_needed()) if ctrl_size else 0
        total += queue_pairs * (per_pair * buffer_size + 4096) + (1 << 16)
        if hugepages is not False:
            total += queue_pairs * (2 << 20)   # each pool starts on a page: 2 MiB with huge pages

        self.memory = DmaMemory(total, hugepages=hugepages, lock=True, name=f"pmd-{self.name}")
        memory = self.memory
        self._resources.append(memory.close)
        # 6.1: with ACCESS_PLATFORM the device goes through the IOMMU (the IOVAs the
        # transport picks); without it, it is given physical addresses.
        self._resources.append(t.map_memory(memory, iommu=bool(accepted & V.bit(V.ACCESS_PLATFORM))))

        weak = not accepted & V.bit(V.ORDER_PLATFORM)
        event_idx = bool(accepted & V.bit(V.RING_EVENT_IDX))
        in_order = bool(accepted & V.bit(V.IN_ORDER))
        mergeable = bool(accepted & V.bit(N.NET_MRG_RXBUF))
        max_len = max_packet_len or ((self.mtu or 1500) + 18 if mergeable else 0)
        self._stats_base = None               # new queues count from 0
        for pair in range(queue_pairs):
            pool = PacketPool(memory, per_pair, buffer_size)
            self.pools.append(pool)
            rvq = Virtqueue(memory, sizes[2 * pair], rx_queue_index(pair), event_idx=event_idx,
                            weak_barriers=weak, align=t.ring_align, interrupts=False, packed=packed,
                            in_order=in_order)
            tvq = Virtqueue(memory, sizes[2 * pair + 1], tx_queue_index(pair), event_idx=event_idx,
                            weak_barriers=weak, align=t.ring_align, interrupts=False, packed=packed,
                            in_order=in_order, indirect_max=indirect[pair])
            rx_kw: dict[str, Any] = {"hdr_len": self.hdr_len, "mergeable": mergeable}
            if mergeable:
                rx_kw["max_packet_len"] = max(max_len, pool.data_room)
            rxq = RxQueue(rvq, pool, **rx_kw)
            txq = TxQueue(tvq, pool, hdr_len=self.hdr_len)
            self.rxqs.append(rxq)
            self.txqs.append(txq)
            self._resources.append(rxq.close)
            self._resources.append(txq.close)
            vector = self._rx_vector(pair)
            t.setup_queue(rx_queue_index(pair), rvq, vector)
            t.setup_queue(tx_queue_index(pair), tvq, NO_VECTOR)
        if ctrl_size:
            cvq = Virtqueue(memory, ctrl_size, ctrl_index, event_idx=event_idx, weak_barriers=weak,
                            align=t.ring_align, packed=packed, in_order=in_order)
            t.setup_queue(ctrl_index, cvq, NO_VECTOR)
            self.ctrl = ControlQueue(cvq, memory)
            self._resources.append(self.ctrl.close)
        elif accepted & V.bit(N.NET_CTRL_VQ):
            self.ctrl = TransportControl(t)
        if self._config_event is not None:
            t.set_config_vector(0)
        # DMA on before DRIVER_OK: over PCI the bus-master bit, without which a device
        # (QEMU) accepts every register write but never does DMA (docs/devices.md).
        t.enable_dma()
        t.add_status(V.STATUS_DRIVER_OK)
        self.queue_pairs = queue_pairs
        for rxq in self.rxqs:
            rxq.fill()
        if queue_pairs > 1:
            self.ctrl_command(N.CTRL_MQ, N.CTRL_MQ_VQ_PAIRS_SET, queue_pairs.to_bytes(2, "little"))
        self._rss = None
        if accepted & (V.bit(N.NET_RSS) | V.bit(N.NET_HASH_REPORT)):
            # 5.1.6.5.7: the last multiqueue command decides, so RSS_CONFIG after VQ_PAIRS_SET
            self._configure_rss(None, None, None)
        if self._want_mac is not None and cfg.mac is not None and self._want_mac != cfg.mac:
            self.ctrl_command(N.CTRL_MAC, N.CTRL_MAC_ADDR_SET, self._want_mac, need=N.NET_CTRL_MAC_ADDR)
            self.mac = self._want_mac
        if promiscuous is not None:
            # Not the property: it refuses a port that is not started, and this one
            # is started only when _start returns.
            self._rx_mode(N.CTRL_RX_PROMISC, promiscuous)
            self._promisc = bool(promiscuous)
        if self._config_event is not None:
            reg = interrupts.get_interrupt_thread().register(self._config_event, self._on_config_interrupt)
            self._resources.append(lambda: interrupts.get_interrupt_thread().unregister(reg))
        elif self._line_event is not None:
            line = interrupts.get_interrupt_thread().register(self._line_event, self._on_line_interrupt)
            self._resources.append(lambda: interrupts.get_interrupt_thread().unregister(line))
        # The data path never asks the device anything, so a device that goes away
        # (a vfio-user server that exits) would only show as empty rings: be told.
        self._resources.append(t.on_lost(self._device_lost))
        log.info("%s: started, %s, features %s, MAC %s, %d queue pair(s), %s rings", self.name, t.describe(),
                 ",".join(N.feature_names(accepted)), format_mac(self.mac), queue_pairs, self.ring_layout)

    @property
    def ring_layout(self) -> str:
        """"packed" when VIRTIO_F_RING_PACKED was negotiated (Virtio 1.2 2.8), else "split" (2.7)."""
        return "packed" if self.features & V.bit(V.RING_PACKED) else "split"

    def _setup_interrupts(self, rx_queues: int) -> None:
        t = self.transport
        mode = t.interrupt_mode()
        self.interrupt_mode = mode
        if mode in ("msi", "intx"):
            self._setup_line_interrupt(rx_queues, mode)
            return
        count = t.interrupt_vectors()
        if count == 0:
            if rx_queues:
                raise DeviceError("rx interrupts need an interrupt, and this device signals none "
                                  "(no MSI-X, MSI or INTx): start without rx_interrupts=True and poll")
            log.info("%s: no interrupts: link changes are seen only by reading port.link", self.name)
            return
        if rx_queues and count < 2:
            raise DeviceError("the device has a single MSI-X vector: no room for rx interrupts "
                              "(start without rx_interrupts=True)")
        self._resources.append(self._forget_rx_interrupts)
        self._config_event = interrupts.EventFd()
        self._resources.append(self._config_event.close)
        fds = [self._config_event.fileno()]
        # Vector 0: configuration changes; 1..: rx queues. With fewer vectors than
        # rx queues, queues share them (Virtio 1.2 4.1.5.1.2 lets the driver map
        # several queues to one vector): rx queue p uses vector 1 + p % (V - 1).
        n_vectors = min(rx_queues, count - 1)
        events = []
        for _ in range(n_vectors):
            ev = interrupts.EventFd()
            self._resources.append(ev.close)
            fds.append(ev.fileno())
            events.append(ev)
        sharers = [len(range(k, rx_queues, n_vectors)) for k in range(n_vectors)]
        for pair in range(rx_queues):
            k = pair % n_vectors
            wake = None
            if sharers[k] > 1:
                wake = interrupts.EventFd()
                self._resources.append(wake.close)
            self._rx_events.append(events[k])
            self._rx_vectors.append(1 + k)
            self._rx_wakes.append(wake)
        t.set_interrupts(fds)
        self._resources.append(t.disable_interrupts)

    def _setup_line_interrupt(self, rx_queues: int, mode: str) -> None:
        """No MSI-X: one interrupt (MSI, or the INTx line) for configuration changes and
        every queue. The interrupt thread reads the ISR status (4.1.4.5) to learn which,
        and passes a queue interrupt on to each rx queue's own eventfd, on which
        rx_wait sleeps as it does on an MSI-X vector. No vector register is written:
        queues and configuration keep VIRTIO_MSI_NO_VECTOR."""
        t = self.transport
        self._resources.append(self._forget_rx_interrupts)
        line = interrupts.EventFd()
        self._resources.append(line.close)
        for _ in range(rx_queues):
            ev = interrupts.EventFd()
            self._resources.append(ev.close)
            self._rx_events.append(ev)
            self._rx_vectors.append(NO_VECTOR)
            self._rx_wakes.append(None)
        t.set_interrupts([line.fileno()])
        self._resources.append(t.disable_interrupts)
        self._line_event = line
        log.info("%s: no MSI-X: %s, one interrupt for link changes%s, cause read from ISR",
                 self.name, mode.upper(), f" and {rx_queues} rx queue(s)" if rx_queues else "")

    def _forget_rx_interrupts(self) -> None:
        self._rx_vectors.clear()
        self._rx_wakes.clear()

    def _rx_vector(self, pair: int) -> int:
        return self._rx_vectors[pair] if pair < len(self._rx_vectors) else NO_VECTOR

    def _reset_device(self) -> None:
        try:
            self.transport.reset()
        except Exception as e:
            log.warning("%s: reset during cleanup failed: %s", self.name, e)

    # ------------------------------------------------------------------ stop/close
    def _teardown(self) -> None:
        # Queues are fenced first: a burst another thread is running finishes and
        # later ones raise QueueStateError, before rings, notify registers and
        # memory go. Then the device is reset, so it stops DMA and interrupts
        # before the memory and eventfds go; then start()'s steps are undone in reverse.
        # Not started from here on: a config interrupt arriving now is ignored
        # instead of waiting for the port lock we hold while we unregister it.
        self._started = False
        for q in (*self.rxqs, *self.txqs):
            q.fence()
        self._reset_device()
        while self._resources:
            undo = self._resources.pop()
            try:
                undo()
            except Exception as e:
                log.warning("%s: cleanup step failed: %s", self.name, e)
        self.rxqs.clear()
        self.txqs.clear()
        self.pools.clear()
        self._rx_events.clear()
        self._config_event = None
        self._line_event = None
        self.ctrl = None
        self.memory = None
        self.queue_pairs = 0
        self._started = False

    def stop(self) -> None:
        """Reset the device and release queues, interrupts and memory. The port can start again."""
        with self._lock:
            if self._started:
                self._teardown()

    def close(self) -> None:
        """stop(), then release the transport and what it owns of the device. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self.stop()
            self._closed = True
            try:
                if self._owns_transport:
                    self.transport.close()
            finally:
                for fn in self._on_close:
                    fn()
            _open_ports.discard(self)

    def after_close(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` once the port has closed its transport (open_port stops the
        built-in device's process this way)."""
        self._on_close.append(fn)

    @property
    def access(self) -> Any:
        """Deprecated: the device access under a PCI transport (``port.transport.access``)."""
        warnings.warn("Port.access is deprecated: a port drives a transport; use port.transport.access",
                      DeprecationWarning, stacklevel=2)
        return getattr(self.transport, "access", None)

    def __enter__(self) -> "Port":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise QueueStateError(f"port {self.name} is closed")

    def _check_started(self) -> None:
        self._check_open()
        if not self._started:
            raise QueueStateError(f"port {self.name} is not started: call port.start() first")

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (or :meth:`close`)."""
        return self._started

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: the device is reset and every resource released."""
        return self._closed

    # ------------------------------------------------------------------ data path
    def rx_queue(self, queue: int = 0) -> RxQueue:
        """Receive queue ``queue`` (0 to ``queue_pairs - 1``) of the started port."""
        self._check_started()
        if not 0 <= queue < len(self.rxqs):
            raise ValueError(f"rx queue {queue} does not exist (the port has {len(self.rxqs)})")
        return self.rxqs[queue]

    def tx_queue(self, queue: int = 0) -> TxQueue:
        """Transmit queue ``queue`` (0 to ``queue_pairs - 1``) of the started port."""
        self._check_started()
        if not 0 <= queue < len(self.txqs):
            raise ValueError(f"tx queue {queue} does not exist (the port has {len(self.txqs)})")
        return self.txqs[queue]

    def pool(self, queue: int = 0) -> PacketPool:
        """The packet pool shared by rx and tx queue ``queue`` (one per queue pair)."""
        self._check_started()
        return self.pools[queue]

    def rx_burst(self, out: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], queue: int = 0, *,
                 truncate: bool = False, timestamps: npt.NDArray[np.uint64] | None = None,
                 hashes: npt.NDArray[np.uint32] | None = None,
                 hash_types: npt.NDArray[np.uint16] | npt.NDArray[np.uint8] | None = None) -> int:
        """:meth:`RxQueue.rx_burst` on rx queue ``queue``: copy the packets that arrived into
        rows of ``out``, lengths into ``lengths``; returns how many."""
        return self.rx_queue(queue).rx_burst(out, lengths, truncate=truncate, timestamps=timestamps,
                                             hashes=hashes, hash_types=hash_types)

    def rx_burst_zc(self, ids: npt.NDArray[np.uint32], lengths: npt.NDArray[np.uint32], queue: int = 0, *,
                    timestamps: npt.NDArray[np.uint64] | None = None, hashes: npt.NDArray[np.uint32] | None = None,
                    hash_types: npt.NDArray[np.uint16] | npt.NDArray[np.uint8] | None = None) -> int:
        """:meth:`RxQueue.rx_burst_zc` on rx queue ``queue``: buffer ids of the packets that
        arrived (data in ``port.pool(queue).data[ids[i]]``) and their lengths; returns how many."""
        return self.rx_queue(queue).rx_burst_zc(ids, lengths, timestamps=timestamps, hashes=hashes,
                                                hash_types=hash_types)

    def tx_burst(self, packets: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], queue: int = 0) -> int:
        """:meth:`TxQueue.tx_burst` on tx queue ``queue``: send ``packets[i, :lengths[i]]``
        (copied into pool buffers); returns how many the ring took."""
        return self.tx_queue(queue).tx_burst(packets, lengths)

    def tx_burst_zc(self, ids: npt.NDArray[np.uint32], lengths: npt.NDArray[np.uint32], queue: int = 0) -> int:
        """:meth:`TxQueue.tx_burst_zc` on tx queue ``queue``: send pool buffers by id without a
        copy; returns how many the ring took (the rest stay the caller's)."""
        return self.tx_queue(queue).tx_burst_zc(ids, lengths)

    def rx_wait(self, queue: int = 0, timeout: float | None = None) -> bool:
        """Sleep until rx queue ``queue`` has packets or ``timeout`` passes (rx-interrupt mode).

        Enables the queue's interrupt, re-checks the ring (a packet that came
        before the device saw the enable would otherwise be slept through,
        2.7.7.2), waits on the vector's eventfd, then disables interrupts
        again. Returns True when packets are ready, False on timeout. When
        queues share a vector, an interrupt wakes every sharer (the one that
        drained the eventfd passes it on) and each re-checks its own ring.
        """
        rxq = self.rx_queue(queue)
        ev = self._rx_events[queue] if queue < len(self._rx_events) else None
        if ev is None:
            raise QueueStateError("rx interrupts are off: start the port with rx_interrupts=True")
        wake = self._rx_wakes[queue]
        vector = self._rx_vectors[queue]
        peers = [w for q, w in enumerate(self._rx_wakes)
                 if w is not None and q != queue and self._rx_vectors[q] == vector]
        fds = [ev] if wake is None else [ev, wake]
        timeout = interrupts._check_timeout(timeout, "rx_wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        vq = rxq.vq
        try:
            while True:
                if vq.fail_reason is not None:
                    raise DeviceError(f"rx queue {queue}: {vq.fail_reason}")
                if vq.enable_interrupts():
                    return True
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                counts = interrupts.wait_any(fds, left)
                if counts[0] and self._line_event is None:   # (MSI/INTx: counted from ISR)
                    self.rx_interrupts += 1
                    for peer in peers:      # the interrupt may have been for a sharer
                        peer.signal()
                if not any(counts):         # timed out
                    if vq.fail_reason is not None:
                        raise DeviceError(f"rx queue {queue}: {vq.fail_reason}")
                    return bool(vq.enable_interrupts())
        finally:
            vq.disable_interrupts()

    # ------------------------------------------------------------------ link
    @property
    def link(self) -> Link:
        """The link as the device reports it now (reads the device configuration)."""
        self._check_started()
        # Not what the callbacks were told: they compare with _link_reported,
        # so a change read here first is still reported to them.
        self._link = link_from(read_net_config(self.transport, self.features))
        return self._link

    def on_link_change(self, callback: LinkCallback) -> Callable[[], None]:
        """Call ``callback(link)`` from the interrupt thread when the link changes.
        Returns a function that removes it."""
        if not callable(callback):
            raise TypeError("on_link_change needs a callable taking a Link")
        with self._callbacks_lock:
            self._link_callbacks.append(callback)

        def remove() -> None:
            with self._callbacks_lock:
                if callback in self._link_callbacks:
                    self._link_callbacks.remove(callback)
        return remove

    def _device_lost(self, reason: str) -> None:
        """The access layer says the device is gone (from its watcher thread): stop
        every queue so the next burst raises DeviceError, and wake rx_wait sleepers."""
        msg = f"the device is gone ({reason}); close the port and open it again"
        log.error("%s: %s", self.name, msg)
        queues = [q.vq for q in (*self.rxqs, *self.txqs)]
        if self.ctrl is not None and self.ctrl.vq is not None:
            queues.append(self.ctrl.vq)
        for vq in queues:
            vq.fail(msg)
        # only now: whoever sees port.lost finds every queue stopped
        self.lost = msg
        for ev in [*self._rx_events, *self._rx_wakes]:
            if ev is not None and not ev.closed:
                try:
                    ev.signal()
                except (OSError, ValueError):
                    pass    # closed by a stop() running now

    def _on_line_interrupt(self, fd: int, count: int, arg: object) -> None:
        """MSI or INTx fired (on the interrupt thread). Read ISR, which clears it and,
        for INTx, deasserts the line (4.1.4.5); unmask the line; then serve the causes.
        ISR is the device's word: bits other than 0 and 1 are ignored, and no cause at
        all is an interrupt of another device on a shared line, counted and dropped."""
        t = self.transport
        isr = t.read_isr()
        t.unmask_interrupt()            # after the read: the line is deasserted by now
        causes = isr & (ISR_QUEUE | ISR_CONFIG)
        if not causes:
            self.spurious_interrupts += 1
            return
        if causes & ISR_QUEUE:
            events = list(self._rx_events)
            if events:
                self.rx_interrupts += 1
            for ev in events:           # which queue is not said: each re-checks its ring
                if ev is not None and not ev.closed:
                    try:
                        ev.signal()
                    except (OSError, ValueError):
                        pass            # closed by a stop() running now
        if causes & ISR_CONFIG:
            self._on_config_interrupt(fd, count, arg)

    def _on_config_interrupt(self, fd: int, count: int, arg: object) -> None:
        self.config_interrupts += 1
        if not self._started:
            return
        link = link_from(read_net_config(self.transport, self.features))
        self._link = link
        if link != self._link_reported:
            self._link_reported = link
            with self._callbacks_lock:
                callbacks = list(self._link_callbacks)
            for cb in callbacks:
                cb(link)

    # ------------------------------------------------------------------ control queue
    def ctrl_command(self, cls: int, cmd: int, data: bytes = b"", *, need: int = N.NET_CTRL_VQ) -> None:
        """Send one control-queue command (class ``cls``, command ``cmd``, ``data``; Virtio 1.2
        5.1.6.5) and wait for the device's ack; :class:`PmdError` when the device did not
        negotiate feature bit ``need`` or refused the command."""
        self._check_open()
        if self.ctrl is None or not self.features & V.bit(need):
            raise PmdError(f"the device did not negotiate VIRTIO_NET_F_{N.FEATURE_NAMES.get(need, need)}: "
                           "this setting cannot be changed on it")
        self.ctrl.command(cls, cmd, data)

    def _rx_mode(self, cmd: int, on: bool) -> None:
        self.ctrl_command(N.CTRL_RX, cmd, bytes([1 if on else 0]), need=N.NET_CTRL_RX)

    @property
    def promiscuous(self) -> bool | None:
        """Receive frames for every address (CTRL_RX). None until set: the device's default."""
        return self._promisc

    @promiscuous.setter
    def promiscuous(self, on: bool) -> None:
        self._check_started()
        self._rx_mode(N.CTRL_RX_PROMISC, on)
        self._promisc = bool(on)

    @property
    def allmulticast(self) -> bool | None:
        """Receive every multicast frame (CTRL_RX). None until set: the device's default."""
        return self._allmulti

    @allmulticast.setter
    def allmulticast(self, on: bool) -> None:
        self._check_started()
        self._rx_mode(N.CTRL_RX_ALLMULTI, on)
        self._allmulti = bool(on)

    def set_mac_filter(self, unicast: Sequence[str | bytes], multicast: Sequence[str | bytes] = ()) -> None:
        """Accept frames to these addresses (5.1.6.5.2 VIRTIO_NET_CTRL_MAC_TABLE_SET);
        the port's own MAC is always accepted."""
        self._check_started()
        uni = [parse_mac(m) for m in unicast]
        multi = [parse_mac(m) for m in multicast]
        data = (len(uni).to_bytes(4, "little") + b"".join(uni)
                + len(multi).to_bytes(4, "little") + b"".join(multi))
        self.ctrl_command(N.CTRL_MAC, N.CTRL_MAC_TABLE_SET, data, need=N.NET_CTRL_RX)

    # ------------------------------------------------------------------ RSS (5.1.6.5.7)
    def set_rss(self, key: bytes | None = None, table: Sequence[int] | None = None,
                hash_types: int | str | None = None) -> None:
        """Set receive-side scaling (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, Virtio 1.2 5.1.6.5.7.1):
        the Toeplitz ``key`` (bytes, 1 to ``rss_max_key_size``), the indirection ``table``
        (rx queue numbers below ``queue_pairs``, a power-of-two count up to
        ``rss_max_indirection_table_length``: a packet goes to ``table[hash % len]``) and
        the ``hash_types`` hashed (a mask or names, "IPv4,TCPv4,UDPv4"; packets of no
        enabled type go to queue 0). None keeps what is set; the port starts with
        :data:`DEFAULT_RSS_KEY`, the queues in turn over the longest table, every type
        the device supports. With HASH_REPORT but no RSS, ``key`` and ``hash_types`` are
        sent with HASH_CONFIG (the hash is reported, packets are not steered)."""
        self._check_started()
        with self._lock:
            self._configure_rss(key, table, hash_types)

    def _configure_rss(self, key: bytes | None, table: Sequence[int] | None, hash_types: int | str | None) -> None:
        cfg = self._cfg
        rss_on = bool(self.features & V.bit(N.NET_RSS))
        if not self.features & (V.bit(N.NET_RSS) | V.bit(N.NET_HASH_REPORT)):
            raise PmdError("VIRTIO_NET_F_RSS and HASH_REPORT were not negotiated: pmd takes them for several "
                           "queue pairs on a device that offers them (start(queue_pairs=2) or more, and not "
                           "disable='RSS'); see port.features")
        old = self._rss or {}
        if key is None:
            key = old.get("key", DEFAULT_RSS_KEY[:cfg.rss_max_key_size])
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError(f"key must be bytes, got {type(key).__name__}")
        key = bytes(key)
        if not 1 <= len(key) <= cfg.rss_max_key_size:
            raise ValueError(f"the key has {len(key)} bytes; the device takes 1 to {cfg.rss_max_key_size} "
                             f"(rss_max_key_size); the usual RSS key is 40 bytes")
        if hash_types is None:
            types = old.get("hash_types", cfg.supported_hash_types)
        else:
            types = N.parse_hash_types(hash_types)
        if types & ~cfg.supported_hash_types:
            raise ValueError(f"hash types {', '.join(N.hash_type_names(types & ~cfg.supported_hash_types))} are not "
                             f"supported by the device (supported_hash_types: "
                             f"{', '.join(N.hash_type_names(cfg.supported_hash_types)) or 'none'})")
        if not rss_on:
            if table is not None:
                raise PmdError("an indirection table needs VIRTIO_NET_F_RSS, which was not negotiated (the device "
                               "offers only HASH_REPORT): set key and hash_types alone")
            self.ctrl_command(N.CTRL_MQ, N.CTRL_MQ_HASH_CONFIG, N.hash_config(types, key),
                              need=N.NET_HASH_REPORT)
            self._rss = {"key": key, "hash_types": types, "table": [], "steering": False}
            return
        if table is None:
            entries = old.get("table")
            if entries is None:
                longest = 1 << (cfg.rss_max_table_length.bit_length() - 1)    # a power of two
                length = min(longest, N.RSS_MIN_TABLE_LENGTH)
                entries = [i % self.queue_pairs for i in range(length)]
        else:
            try:
                entries = [int(q) for q in table]
            except (TypeError, ValueError):
                raise TypeError("table must be a sequence of rx queue numbers (ints)") from None
        n = len(entries)
        if n == 0 or n & (n - 1) or n > cfg.rss_max_table_length:
            raise ValueError(f"the table has {n} entries; it needs a power of two from 1 to "
                             f"{cfg.rss_max_table_length} (rss_max_indirection_table_length, 5.1.6.5.7.1)")
        bad = [q for q in entries if not 0 <= q < self.queue_pairs]
        if bad:
            raise ValueError(f"table entry {bad[0]} is not an rx queue of this port (0 to {self.queue_pairs - 1}); "
                             "start with more queue_pairs or name only those")
        data = N.rss_config(types, entries, 0, self.queue_pairs, key)
        self.ctrl_command(N.CTRL_MQ, N.CTRL_MQ_RSS_CONFIG, data, need=N.NET_RSS)
        self._rss = {"key": key, "hash_types": types, "table": entries, "steering": True}

    @property
    def rss(self) -> dict[str, Any] | None:
        """What RSS and the hash report are set to, None when neither was negotiated:
        ``steering`` (the table chooses the queue), ``hash_report`` (the header carries
        the hash: ``rx_burst(..., hashes=)``), ``key``, ``hash_types`` (names),
        ``table`` and ``entries``."""
        if self._rss is None or not self._started:
            return None
        r = self._rss
        return {"steering": r["steering"], "hash_report": bool(self.features & V.bit(N.NET_HASH_REPORT)),
                "key": r["key"], "hash_types": N.hash_type_names(r["hash_types"]), "table": list(r["table"]),
                "entries": len(r["table"])}

    def info(self) -> dict[str, Any]:
        """What the port runs with: name, MAC, negotiated features (names), header length,
        queue pairs, ring layout, MTU, link, RSS (:attr:`rss`, None when off) and the interrupt
        mode (:attr:`interrupt_mode`: "msix", "msi", "intx", "callfd" or "none")."""
        self._check_open()
        return {"name": self.name, "started": self._started, "mac": format_mac(self.mac) if self.mac else None,
                "features": N.feature_names(self.features), "hdr_len": self.hdr_len,
                "queue_pairs": self.queue_pairs, "max_queue_pairs": self.max_queue_pairs,
                "ring": self.ring_layout, "mtu": self.mtu, "link": self._link if self._started else None,
                "rss": self.rss, "interrupts": self.interrupt_mode or self.transport.interrupt_mode()}

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Per-queue and port totals: packets, bytes, drops (runts among them), bad used
        entries, chains the queues did not build, notifications, interrupts, control commands."""
        rx, tx, port = self._raw_stats()
        if self._stats_base is not None and len(self._stats_base[0]) == len(rx):
            brx, btx, bport = self._stats_base
            rx = [_since(q, b) for q, b in zip(rx, brx)]
            tx = [_since(q, b) for q, b in zip(tx, btx)]
            port = _since(port, bport)

        def total(qs: list[dict[str, Any]], key: str) -> int:
            return sum(int(q.get(key, 0)) for q in qs)

        bad = sum(total(qs, k) for qs in (rx, tx) for k in ("bad_used_id", "used_not_in_flight",
                                                               "bad_used_len", "bad_used_idx"))
        return {
            "rx_packets": total(rx, "packets"), "rx_bytes": total(rx, "bytes"),
            "rx_dropped": total(rx, "dropped"), "rx_runt": total(rx, "runt"),
            "rx_foreign_chains": total(rx, "foreign_chains"), "tx_packets": total(tx, "packets"),
            "tx_bytes": total(tx, "bytes"), "tx_ring_full": total(tx, "ring_full"),
            "tx_foreign_chains": total(tx, "foreign_chains"),
            "device_errors": bad, "notifications": total(rx, "notifications") + total(tx, "notifications"),
            **port, "rx_queues": rx, "tx_queues": tx,
        }

    def _raw_stats(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
        port = {"config_interrupts": self.config_interrupts, "rx_interrupts": self.rx_interrupts,
                "spurious_interrupts": self.spurious_interrupts,
                "control_commands": self.ctrl.commands if self.ctrl else 0,
                "control_timeouts": self.ctrl.timeouts if self.ctrl else 0,
                "control_late_completions": self.ctrl.late_completions if self.ctrl else 0}
        return [q.stats() for q in self.rxqs], [q.stats() for q in self.txqs], port

    def reset_stats(self) -> None:
        """Count from now on (DPDK's ``rte_eth_stats_reset`` and ``xstats_reset``): what
        :meth:`stats` and :meth:`xstats` report afterwards starts at 0. The queues keep
        counting underneath (a burst in another thread loses nothing); ``start()``
        begins at 0 too, with new queues."""
        self._stats_base = self._raw_stats()

    def xstats(self) -> dict[str, int]:
        """Every counter under a stable name, as DPDK's extended statistics have them.

        First DPDK's basic names (``rx_good_packets``, ``tx_good_packets``,
        ``rx_good_bytes``, ``tx_good_bytes``, ``rx_errors``, ``tx_errors``,
        ``rx_mbuf_allocation_errors``), then per queue ``rx_q<i>_packets``,
        ``rx_q<i>_bytes``, ``rx_q<i>_errors`` and the same for tx, then every other
        counter of every queue as ``rx_q<i>_<counter>`` / ``tx_q<i>_<counter>`` (each
        kind of bad device behaviour: ``bad_used_id``, ``used_not_in_flight``,
        ``bad_used_len``, ``bad_used_idx``, ``bad_num_buffers``, ``runt``, ...), then
        the port's own (interrupts, control commands). Errors are what the device did
        wrong or sent malformed; a drop the caller asked for (a full tx ring, a
        truncation) is not one. Since :meth:`reset_stats` or ``start()``."""
        s = self.stats()
        rxs, txs = s["rx_queues"], s["tx_queues"]
        out = {"rx_good_packets": s["rx_packets"], "tx_good_packets": s["tx_packets"],
               "rx_good_bytes": s["rx_bytes"], "tx_good_bytes": s["tx_bytes"],
               "rx_errors": sum(_errors(q, RX_ERRORS) for q in rxs),
               "tx_errors": sum(_errors(q, TX_ERRORS) for q in txs),
               "rx_mbuf_allocation_errors": sum(int(q.get("no_buffer", 0)) for q in rxs)}
        for side, qs, errs in (("rx", rxs, RX_ERRORS), ("tx", txs, TX_ERRORS)):
            for i, q in enumerate(qs):
                out[f"{side}_q{i}_packets"] = int(q["packets"])
                out[f"{side}_q{i}_bytes"] = int(q["bytes"])
                out[f"{side}_q{i}_errors"] = _errors(q, errs)
        for side, qs in (("rx", rxs), ("tx", txs)):
            for i, q in enumerate(qs):
                for k, v in q.items():
                    if k not in ("packets", "bytes") and isinstance(v, int) and not isinstance(v, bool):
                        out[f"{side}_q{i}_{k}"] = v
        for k in ("config_interrupts", "rx_interrupts", "spurious_interrupts", "control_commands", "control_timeouts",
                  "control_late_completions"):
            out[k] = int(s[k])
        return out

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("started" if self._started else "stopped")
        return f"<Port {self.name} {self.transport.kind if hasattr(self, 'transport') else ''} {state}>"


# What counts in rx_errors / tx_errors (xstats): the device's bad used entries, and
# frames it sent malformed (a runt, a num_buffers that does not add up).
_USED_ERRORS = ("bad_used_id", "used_not_in_flight", "bad_used_len", "bad_used_idx", "notify_errors")
RX_ERRORS = _USED_ERRORS + ("runt", "bad_num_buffers")
TX_ERRORS = _USED_ERRORS


def _errors(q: dict[str, Any], keys: tuple[str, ...]) -> int:
    return sum(int(q.get(k, 0)) for k in keys)


def _since(now: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Counters of ``now`` less ``base`` (values that are not counters as they are)."""
    return {k: v - base.get(k, 0) if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in now.items()}


__all__ = ["Port", "Link"]
