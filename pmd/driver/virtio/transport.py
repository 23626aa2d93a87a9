"""The virtio transport interface: DPDK's ``virtio_ops``, in Python.

A transport knows how to reach one virtio device's status, features, queues,
notifications, ISR and device configuration; the device logic above it
(:mod:`pmd.driver.virtio.net`, the Port) does not know whether it talks to the
modern PCI interface (capabilities and MMIO, Virtio 1.2 4.1.4), the legacy one
(I/O BAR0 registers, 4.1.4.8 "Legacy Interfaces") or something with no PCI at
all (vhost-user). The PCI transports are :mod:`pmd.driver.virtio.pci`.

Every value read from the device is untrusted: sizes, offsets and vectors are
checked here before use.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ...errors import DeviceError
from ...abi.virtio import NO_VECTOR
from .._virtqueue import Virtqueue

if TYPE_CHECKING:
    from ...memory import DmaMemory

GENERATION_RETRIES = 64

# What read_isr() returns, whatever the transport: PCI's ISR status (4.1.4.5) and
# MMIO's InterruptStatus (4.2.2) have the same two bits.
ISR_QUEUE = 1 << 0      # a used buffer notification
ISR_CONFIG = 1 << 1     # a configuration change


class Transport(abc.ABC):
    """One virtio device, as a driver sees it through its transport.

    Everything the virtio-net logic and the Port do to a device goes through
    here: the registers of 4.1.4.3 (status, features, queues, configuration)
    and what a port needs around them (interrupt vectors, DMA memory, the device
    going away). The PCI transports implement it over a device access; a
    transport with no PCI (vhost-user) implements it over its session.
    """

    #: "modern", "legacy", ...
    kind: str
    #: what a port on this device is called when nobody names it (a PCI address, a socket)
    name: str = "virtio"
    #: a legacy interface (3.1.2 "Legacy Interface: Device Initialization"): no FEATURES_OK step
    legacy: bool = False
    #: ring alignment the transport needs (legacy: 4096 for the used ring)
    ring_align: int = 4096
    #: highest feature bit the transport can carry (legacy: 31)
    feature_bits: int = 64
    #: the transport carries out control commands itself (:meth:`control_command`) and the
    #: port builds no control virtqueue: vhost-user, whose back-ends run the data queues
    #: only (DPDK's virtio-user answers the control queue in the front-end too)
    serves_control: bool = False

    # ---- status (2.1) ----
    @abc.abstractmethod
    def get_status(self) -> int: ...

    @abc.abstractmethod
    def set_status(self, status: int) -> None:
        """Write the whole status byte (the caller ORs in new bits)."""

    def add_status(self, bits: int) -> None:
        self.set_status(self.get_status() | bits)

    def reset(self, timeout: float = 1.0) -> None:
        """Write 0 to the status and wait until the device reads back 0 (4.1.4.3.2, 2.4)."""
        self.set_status(0)
        deadline = time.monotonic() + timeout
        delay = 1e-5
        while self.get_status() != 0:
            if time.monotonic() > deadline:
                raise DeviceError(f"device did not finish its reset within {timeout} s "
                                  f"(status still {self.get_status():#04x}); the device may be hung: "
                                  "reset it from the host (VFIO reset or unbind/rebind)")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    # ---- features (2.2) ----
    @abc.abstractmethod
    def device_features(self) -> int: ...

    @abc.abstractmethod
    def set_driver_features(self, features: int) -> None: ...

    # ---- queues ----
    @abc.abstractmethod
    def num_queues(self) -> int:
        """Queues the device has (legacy devices do not say: an upper bound)."""

    @abc.abstractmethod
    def queue_max_size(self, index: int) -> int:
        """Largest ring the device accepts for queue ``index``; 0 if the queue does not exist."""

    @abc.abstractmethod
    def setup_queue(self, index: int, vq: Virtqueue, vector: int = NO_VECTOR) -> None:
        """Tell the device where ``vq``'s ring is, wire its notification, enable it."""

    @abc.abstractmethod
    def queue_size_fixed(self) -> bool:
        """True when the ring size is the device's (legacy), not the driver's choice."""

    # ---- interrupts ----
    @abc.abstractmethod
    def set_config_vector(self, vector: int) -> None:
        """Route configuration-change interrupts to MSI-X ``vector`` (NO_VECTOR: none).
        Raises DeviceError when the device refuses it (reads back NO_VECTOR)."""

    @abc.abstractmethod
    def read_isr(self) -> int:
        """Read (and so clear) the ISR status: bit 0 queue, bit 1 configuration change."""

    # ---- device configuration (4.1.4.6, 2.5) ----
    @abc.abstractmethod
    def config_generation(self) -> int: ...

    @abc.abstractmethod
    def _read_config(self, offset: int, width: int) -> int: ...

    @abc.abstractmethod
    def write_config(self, offset: int, width: int, value: int) -> None: ...

    @abc.abstractmethod
    def device_config_length(self) -> int: ...

    def read_config(self, fields: list[tuple[int, int]]) -> list[int]:
        """Read several fields ``(offset, width)`` as one consistent snapshot.

        2.5.1: read the generation, the fields, the generation again, and retry
        if it changed (the device updated the configuration meanwhile).
        """
        length = self.device_config_length()
        for offset, width in fields:
            if width not in (1, 2, 4) or offset < 0 or offset + width > length:
                raise DeviceError(f"device config field at {offset} ({width} bytes) is outside the "
                                  f"{length}-byte device configuration")
        for _ in range(GENERATION_RETRIES):
            before = self.config_generation()
            values = [self._read_config(o, w) for o, w in fields]
            if self.config_generation() == before:
                return values
        raise DeviceError(f"device configuration kept changing over {GENERATION_RETRIES} reads "
                          "(config_generation never stable); the device is misbehaving")

    def read_config_bytes(self, offset: int, length: int) -> bytes:
        """Bytes of the device configuration, read a byte at a time inside one generation."""
        return bytes(self.read_config([(offset + i, 1) for i in range(length)]))

    # ---- control commands, where the transport serves them (serves_control) ----
    def control_command(self, cls: int, cmd: int, data: bytes) -> int:
        """Carry out one control command (5.1.6.5); returns its ack (VIRTIO_NET_OK or _ERR)."""
        raise DeviceError(f"the {self.kind} transport does not carry out control commands: "
                          "they go through the device's control virtqueue")

    # ---- interrupt vectors (4.1.5.1.2: queues may share one; one for configuration changes) ----
    def interrupt_vectors(self) -> int:
        """How many interrupt vectors the device can signal; 0: none (the driver polls).
        In the "msi" and "intx" modes: 1, the one interrupt everything shares."""
        return 0

    def interrupt_mode(self) -> str:
        """How the device interrupts: "msix" (a vector per source, routed through the
        config and queue vector registers, 4.1.5.1.2), "msi" or "intx" (one interrupt
        for every source; the cause is in the ISR status, 4.1.4.5, and the vector
        registers are left at VIRTIO_MSI_NO_VECTOR), or "none" (the driver polls).
        A transport with per-source eventfds of its own says what it uses."""
        return "msix" if self.interrupt_vectors() else "none"

    def unmask_interrupt(self) -> None:
        """Re-arm a level-triggered interrupt (INTx: VFIO masks the line when it fires)
        after the ISR status was read; nothing to do in the other modes."""

    def set_interrupts(self, fds: Sequence[int]) -> None:
        """Signal vector ``i`` on the eventfd ``fds[i]``."""
        raise DeviceError(f"the {self.kind} transport signals no interrupts: poll the device")

    def disable_interrupts(self) -> None:
        """Signal nothing any more (undoes :meth:`set_interrupts`)."""

    # ---- the driver's memory ----
    def map_memory(self, memory: DmaMemory, *, iommu: bool) -> Callable[[], None]:
        """Let the device reach ``memory`` by DMA; returns what undoes it.

        ``iommu``: VIRTIO_F_ACCESS_PLATFORM was negotiated (6.1), so the device
        reaches memory through the platform's address translation; without it
        the device uses the addresses it is given as they are. Afterwards the
        memory gives the addresses the device must be given (its IOVAs).
        """
        raise NotImplementedError(f"the {self.kind} transport cannot give the device DMA memory")

    def enable_dma(self) -> None:
        """Let the device start DMA, before DRIVER_OK (nothing to do unless the transport gates it)."""

    def on_lost(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Have ``callback(reason)`` called once, from another thread, if the device goes
        away under the driver; returns a function that cancels it. The data path never
        asks the device anything, so without this a lost device shows only as empty rings."""
        return lambda: None

    # ---- lifetime ----
    @abc.abstractmethod
    def close(self) -> None:
        """Release what the transport holds (and what it owns of the device). Idempotent."""

    def describe(self) -> str:
        return f"{self.kind} virtio transport"


def check_queue_size(index: int, size: int, maximum: int) -> None:
    if maximum == 0:
        raise DeviceError(f"queue {index} does not exist on this device (its size reads 0)")
    if size > maximum:
        raise ValueError(f"queue {index}: {size} entries asked, the device allows at most {maximum}; "
                         f"use queue_size <= {maximum}")
    if size & (size - 1):
        raise ValueError(f"queue size must be a power of two, got {size}")


__all__ = ["Transport", "GENERATION_RETRIES", "ISR_CONFIG", "ISR_QUEUE", "check_queue_size"]
