"""The vhost-user transport: a virtio device with no PCI, over a vhost-user session.

DPDK's ``net_virtio_user`` drives a vhost-user back-end (DPDK's vhost library,
OVS-DPDK, VPP) with the same virtio-net driver as a PCI device; this is pmd's
equivalent. What the PCI transports do with registers, this one does with
messages of its :class:`~pmd.driver.vhost_user.VhostUserFrontend` session (QEMU
``docs/interop/vhost-user.rst``):

============================  ============================================
Transport                     vhost-user
============================  ============================================
status (2.1)                  SET_STATUS / GET_STATUS with STATUS, else kept here;
                              0 stops every started ring first (GET_VRING_BASE),
                              so the back-end lets go of the memory
features (2.2)                GET_FEATURES / SET_FEATURES
queues                        SET_VRING_CALL, _NUM, _BASE, _ADDR, _KICK, _ENABLE
notifications                 the kick eventfd (``Virtqueue.set_notify_eventfd``)
interrupt vectors             one eventfd per vector, given as a ring's call fd
DMA memory                    SET_MEM_TABLE with the DmaMemory's memfd
device configuration          GET_CONFIG with CONFIG, else none
the device going away         the session's watcher (POLLRDHUP)
============================  ============================================

The control queue is not a ring here: a vhost-user back-end runs the data queues only,
so, as DPDK's virtio-user does, the transport carries out control commands itself
(``serves_control``). It offers CTRL_VQ and MQ when the back-end takes several queue
pairs (VHOST_USER_PROTOCOL_F_MQ, GET_QUEUE_NUM), answers the device configuration's
``max_virtqueue_pairs`` with that number, and carries out VQ_PAIRS_SET (5.1.6.5.5) as
SET_VRING_ENABLE per ring: until then only the first pair runs. CTRL_VQ never reaches the
back-end's SET_FEATURES.

What vhost-user cannot carry is not offered to the driver above: the receive filters and
MAC setting of the control queue (RX mode, MAC table, VLAN: a vhost-user back-end delivers
every frame, so acking them would be a lie); the fields of the device configuration (MAC,
link status, MTU) when the back-end has no CONFIG (DPDK's vhost library offers it for
vDPA devices only): the port then picks a MAC and the link is up.
``VIRTIO_F_ACCESS_PLATFORM`` would need IOTLB messages pmd does not send.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ...abi import virtio as V
from ...abi import virtio_net as N
from ...abi import vhost_user as v
from ...abi.virtio import NO_VECTOR
from ...errors import DeviceError
from ...memory import DmaMemory
from .._virtqueue import Virtqueue
from ..vhost_user import VhostUserFrontend
from .transport import Transport, check_queue_size

__all__ = ["VhostUserTransport", "NOT_CARRIED", "SERVED", "CONFIG_FEATURES"]

#: features a vhost-user back-end does not serve and the transport does not either: the
#: control queue's filters and MAC setting, and ACCESS_PLATFORM (IOTLB messages)
NOT_CARRIED = (V.bit(N.NET_CTRL_RX) | V.bit(N.NET_CTRL_VLAN) | V.bit(N.NET_CTRL_MAC_ADDR)
               | V.bit(N.NET_GUEST_ANNOUNCE) | V.bit(N.NET_CTRL_GUEST_OFFLOADS) | V.bit(V.ACCESS_PLATFORM))
#: features the transport serves itself when the back-end takes several queue pairs
SERVED = V.bit(N.NET_CTRL_VQ) | V.bit(N.NET_MQ)
#: features whose fields live in the device configuration: offered only with CONFIG
CONFIG_FEATURES = V.bit(N.NET_MAC) | V.bit(N.NET_STATUS) | V.bit(N.NET_MTU) | V.bit(N.NET_SPEED_DUPLEX)
#: the configuration up to max_virtqueue_pairs, which the transport answers itself (5.1.4)
_PAIRS_CONFIG_LENGTH = N.NET_CFG_MAX_QUEUE_PAIRS + 2

class VhostUserTransport(Transport):
    """A virtio-net device behind a vhost-user back-end.

    ``VhostUserTransport(frontend, owns_frontend=True)``: ``frontend`` is a session
    already open (:meth:`VhostUserFrontend.connect` or :meth:`~VhostUserFrontend.listen`);
    :meth:`close` closes it when the transport owns it.
    """

    kind = "vhost-user"
    serves_control = True

    def __init__(self, frontend: VhostUserFrontend, *, owns_frontend: bool = True) -> None:
        if not isinstance(frontend, VhostUserFrontend):
            raise TypeError(f"VhostUserTransport takes a VhostUserFrontend, not a {type(frontend).__name__}")
        self.frontend = frontend
        self.name = frontend.name
        self._owns = owns_frontend
        self._kicks: dict[int, int] = {}        # queue -> the eventfd pmd writes to notify it
        self._vectors: list[int] = []           # vector -> eventfd (set_interrupts)
        self._pairs = 1                         # queue pairs running (VQ_PAIRS_SET; 5.1.6.5.5)
        self._closed = False

    # ---- status ----
    def get_status(self) -> int:
        return self.frontend.get_status()

    def set_status(self, status: int) -> None:
        if status == 0:
            self._stop_rings()
            self._pairs = 1
        self.frontend.set_status(status)

    def _stop_rings(self) -> None:
        """GET_VRING_BASE for every started ring: the back-end stops touching them (and the
        memory they point into) before the driver frees it."""
        for index, state in sorted(self.frontend.queues.items()):
            if state.started and not self.frontend.broken:
                self.frontend.stop_queue(index)
        # The kick eventfds stay open until replaced or closed: a queue not yet closed
        # may still point at one, and a closed fd number could name another file.

    # ---- features ----
    def device_features(self) -> int:
        offered = self.frontend.device_features & ~NOT_CARRIED & ~SERVED
        if not self.frontend.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_CONFIG):
            offered &= ~CONFIG_FEATURES
        if self.frontend.max_queue_pairs > 1:
            offered |= SERVED
        return offered

    def set_driver_features(self, features: int) -> None:
        extra = features & ~self.device_features()
        if extra:
            raise DeviceError(f"features {extra:#x} were not offered by the vhost-user backend")
        # CTRL_VQ is the transport's, not the back-end's; MQ goes along where it was offered
        self.frontend.negotiate(features & ~SERVED | features & self.frontend.device_features & V.bit(N.NET_MQ))

    # ---- queues ----
    def num_queues(self) -> int:
        return 2 * self.frontend.max_queue_pairs

    def queue_max_size(self, index: int) -> int:
        return v.MAX_QUEUE_SIZE if 0 <= index < self.num_queues() else 0

    def queue_size_fixed(self) -> bool:
        return False

    def setup_queue(self, index: int, vq: Virtqueue, vector: int = NO_VECTOR) -> None:
        check_queue_size(index, vq.size, self.queue_max_size(index))
        if vector != NO_VECTOR and not 0 <= vector < len(self._vectors):
            raise DeviceError(f"queue {index}: interrupt vector {vector} was not set up "
                              f"({len(self._vectors)} vectors)")
        call = self._vectors[vector] if vector != NO_VECTOR else None
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.frontend.setup_queue(index, vq.size, vq.desc_iova, vq.avail_iova, vq.used_iova, kick, call)
            if index // 2 < self._pairs:    # the others wait for VQ_PAIRS_SET (5.1.6.5.5)
                self.frontend.enable_queue(index)
        except BaseException:
            os.close(kick)
            raise
        old = self._kicks.pop(index, None)
        if old is not None:
            os.close(old)
        self._kicks[index] = kick
        vq.set_notify_eventfd(kick)

    # ---- the control queue, served here ----
    def control_command(self, cls: int, cmd: int, data: bytes) -> int:
        """VQ_PAIRS_SET (5.1.6.5.5) as SET_VRING_ENABLE: the first ``n`` pairs run, the rest
        stop being processed; every other command is refused (it is never offered)."""
        if (cls, cmd) != (N.CTRL_MQ, N.CTRL_MQ_VQ_PAIRS_SET) or len(data) != 2:
            return N.CTRL_ERR
        pairs = int.from_bytes(data, "little")
        queues = self.frontend.queues
        # 5.1.6.5.5: 1 to max_virtqueue_pairs; the rings of each pair must have been set up
        if not 1 <= pairs <= self.frontend.max_queue_pairs or any(
                not (i in queues and queues[i].started) for i in range(2 * pairs)):
            return N.CTRL_ERR
        for index, state in sorted(queues.items()):
            if state.started and state.enabled != (index // 2 < pairs):
                self.frontend.enable_queue(index, index // 2 < pairs)
        self._pairs = pairs
        return N.CTRL_OK

    # ---- interrupts: one eventfd per vector, handed to the rings as call fds ----
    def interrupt_vectors(self) -> int:
        # vector 0 (configuration changes) is never signalled: a vhost-user back-end
        # reports none to a front-end that does not serve back-end requests
        return 1 + self.num_queues()

    def set_interrupts(self, fds: Sequence[int]) -> None:
        self._vectors = list(fds)

    def disable_interrupts(self) -> None:
        self._vectors = []

    def set_config_vector(self, vector: int) -> None:
        if vector != NO_VECTOR and not 0 <= vector < len(self._vectors):
            raise DeviceError(f"configuration vector {vector} was not set up ({len(self._vectors)} vectors)")

    def read_isr(self) -> int:
        return 0

    # ---- device configuration ----
    def config_generation(self) -> int:
        return 0   # GET_CONFIG reads a range at once: no generation to compare

    def device_config_length(self) -> int:
        if self.frontend.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_CONFIG):
            return N.NET_CFG_LENGTH
        return _PAIRS_CONFIG_LENGTH if self.frontend.max_queue_pairs > 1 else 0

    def _read_config(self, offset: int, width: int) -> int:
        if self.frontend.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_CONFIG):
            raw = bytearray(self.frontend.get_config(offset, width))
        else:
            raw = bytearray(width)
        # max_virtqueue_pairs is the transport's (it serves MQ): GET_QUEUE_NUM, not the back-end's field
        pairs = self.frontend.max_queue_pairs.to_bytes(2, "little")
        for i in range(width):
            if 0 <= offset + i - N.NET_CFG_MAX_QUEUE_PAIRS < 2:
                raw[i] = pairs[offset + i - N.NET_CFG_MAX_QUEUE_PAIRS]
        return int.from_bytes(raw, "little")

    def write_config(self, offset: int, width: int, value: int) -> None:
        raise DeviceError("the vhost-user transport does not write the device configuration (SET_CONFIG)")

    # ---- memory and the device going away ----
    def map_memory(self, memory: DmaMemory, *, iommu: bool) -> Callable[[], None]:
        if iommu:
            raise DeviceError("vhost-user with VIRTIO_F_ACCESS_PLATFORM (IOTLB messages) is not supported")
        # The session keeps the memory mapped until the next table (set_memory says why);
        # the rings in it are stopped by the reset before the port frees it.
        self.frontend.set_memory(memory)
        return lambda: None

    def on_lost(self, callback: Callable[[str], object]) -> Callable[[], None]:
        return self.frontend.on_lost(callback)

    # ---- lifetime ----
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._owns:
                self.frontend.close()   # stops the started rings while the back-end answers
        finally:
            for fd in self._kicks.values():
                os.close(fd)
            self._kicks.clear()
            self._vectors = []

    def describe(self) -> str:
        return f"vhost-user virtio transport ({self.name})"
