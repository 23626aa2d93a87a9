"""An in-process loopback: pmd's driver queues against the device side of the
same rings, in one process and one thread.

What the driver transmits (:mod:`pmd.driver._tx`), the device side
(:func:`pmd.sim._tx.tx_to_rx`) takes from the tx ring and writes into buffers
of the rx ring, exactly as a device would by DMA (through IOVAs and DMA
windows), and the driver receives (:mod:`pmd.driver._rx`). It is the test bed
of the data path and the baseline of ``bench/loopback.py``; the built-in device
(a separate process over vfio-user) builds on the same device-side code. It
stands above both sides, as :mod:`pmd.backends` does.
"""

from __future__ import annotations

from typing import Any, Callable

from .driver._pool import PacketPool
from .driver._rx import RxQueue
from .driver._tx import MAX_TX_CHAIN, TxQueue
from .driver._virtqueue import Virtqueue, indirect_table_bytes, ring_size
from .memory import DmaMemory
from .sim._dma import DmaWindows
from .sim._tx import tx_to_rx
from .sim._virtqueue import DeviceQueue


class Loopback:
    """Driver rx/tx queues wired to a device-side loopback.

    ``Loopback(queue_size=256, n_buffers=None, buffer_size=2048, event_idx=False,
    iova_translator=None, hdr_len=12, strict=False, packed=False, in_order=False,
    indirect=False)``

    ``driver_rx`` and ``driver_tx`` are the driver's queues; ``device_rx`` and
    ``device_tx`` the device's view of the same rings; ``step()`` runs the
    device once. ``n_buffers`` defaults to enough for both rings plus a burst
    backlog. ``iova_translator`` (``vaddr -> iova`` per page) makes the device
    see addresses different from the driver's virtual ones, as with a real
    IOMMU. ``packed`` lays both rings out packed (Virtio 1.2 2.8), on both sides;
    ``in_order`` runs both sides with VIRTIO_F_IN_ORDER (2.7.9, 2.8.9): the device
    returns each transmit burst with one used entry.
    ``indirect`` is VIRTIO_F_INDIRECT_DESC on both sides: the driver puts a
    multi-buffer transmit chain in an indirect table (2.7.5.3, 2.8.7), the
    device follows it.
    """

    def __init__(
        self,
        queue_size: int = 256,
        n_buffers: int | None = None,
        buffer_size: int = 2048,
        *,
        event_idx: bool = False,
        iova_translator: Callable[[int], int] | None = None,
        hdr_len: int = 12,
        strict: bool = False,
        mergeable: bool = False,
        max_packet_len: int = 9216,
        packed: bool = False,
        in_order: bool = False,
        indirect: bool = False,
    ) -> None:
        self._closed = False
        if n_buffers is None:
            n_buffers = 4 * queue_size + 512
        ring = ring_size(queue_size, packed=packed)
        ind_max = min(MAX_TX_CHAIN, queue_size) if indirect and queue_size >= 2 else 0
        size = 2 * (ring + 4096) + n_buffers * buffer_size + (1 << 16) + indirect_table_bytes(queue_size, ind_max)
        self.memory = DmaMemory(size, lock=False, name="pmd-loopback")
        try:
            if iova_translator is not None:
                self.memory.set_iova_translator(iova_translator)
            self.pool = PacketPool(self.memory, n_buffers, buffer_size)
            rx_vq = Virtqueue(self.memory, queue_size, 0, event_idx=event_idx, packed=packed, in_order=in_order)
            tx_vq = Virtqueue(self.memory, queue_size, 1, event_idx=event_idx, packed=packed, in_order=in_order,
                              indirect_max=ind_max)
            self.driver_rx = RxQueue(rx_vq, self.pool, hdr_len=hdr_len, strict=strict,
                                     mergeable=mergeable, max_packet_len=max_packet_len)
            self.driver_tx = TxQueue(tx_vq, self.pool, hdr_len=hdr_len, strict=strict)
            self.windows = DmaWindows()
            self.windows.add_memory(self.memory)
            self.device_rx = DeviceQueue(self.windows, queue_size, rx_vq.desc_iova,
                                         rx_vq.avail_iova, rx_vq.used_iova, event_idx=event_idx, packed=packed,
                                         in_order=in_order)
            self.device_tx = DeviceQueue(self.windows, queue_size, tx_vq.desc_iova,
                                         tx_vq.avail_iova, tx_vq.used_iova, event_idx=event_idx, packed=packed,
                                         in_order=in_order, indirect=indirect)
            self.packed = packed
            self.in_order = in_order
            self.indirect = indirect
            self.device_rx.disable_notify()
            self.device_tx.disable_notify()
            self.hdr_len = hdr_len
            self.mergeable = mergeable
            self.driver_rx.fill()
        except BaseException:
            self.close()
            raise

    def step(self, budget: int = 256) -> int:
        """Run the device once: move up to ``budget`` packets from tx to rx.
        After close() the device queues raise QueueStateError."""
        return tx_to_rx(self.device_tx, self.device_rx, budget, self.hdr_len, self.mergeable)

    def stats(self) -> dict[str, Any]:
        """The counters of the four queues, by name: ``driver_rx``, ``driver_tx``, ``device_rx``, ``device_tx``."""
        return {
            "driver_rx": self.driver_rx.stats(),
            "driver_tx": self.driver_tx.stats(),
            "device_rx": self.device_rx.stats(),
            "device_tx": self.device_tx.stats(),
        }

    def close(self) -> None:
        """Release the queues, the pool and the memory. Idempotent; safe while
        another thread bursts on these queues (it gets QueueStateError)."""
        self._closed = True
        # Device side first, then the driver: each close waits for a burst in progress.
        for q in (getattr(self, "device_rx", None), getattr(self, "device_tx", None),
                  getattr(self, "driver_rx", None), getattr(self, "driver_tx", None)):
            if q is not None:
                q.close()
        windows = getattr(self, "windows", None)
        if windows is not None:
            windows.clear()
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
        self.memory.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
