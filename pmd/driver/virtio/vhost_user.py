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
the device going away         the session's watcher (POLLRDHUP); in server mode
                              the link goes down and a back-end that connects
                              again resumes the rings (reconnect)
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
vDPA devices only): the port then picks a MAC and the link is up. An MTU can be given
(``mtu=``, as DPDK's virtio-user takes one): the transport then offers VIRTIO_NET_F_MTU
with it, and tells the back-end with NET_SET_MTU where it has NET_MTU.
``VIRTIO_F_ACCESS_PLATFORM`` would need IOTLB messages pmd does not send.

**Reconnect** (server mode, as DPDK's virtio-user with ``server=1``): the transport offers
STATUS and answers the link itself. When the back-end goes away the link goes down (the
configuration interrupt: link callbacks run within a second); the rings stay as they
are, so bursts move nothing and nothing fails. A thread waits on the kept listener; when
a back-end connects, the session replays the handshake, features, memory table and every
ring with ``SET_VRING_BASE`` = the used index in the ring (what the device had
completed; the entries after it are processed again, none is skipped), then the link
comes up. A port stopped meanwhile only drops what would have been replayed.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence

from ...abi import virtio as V
from ...abi import virtio_net as N
from ...abi import vhost_user as v
from ...abi.virtio import NO_VECTOR
from ...abi.vhost_user import VhostUserError
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
#: how often the reconnect thread looks for a back-end (and for close())
_RECONNECT_POLL = 0.2

log = logging.getLogger("pmd.driver.virtio.vhost_user")


def _ring_base(vq: Virtqueue, state: tuple[int, int | None]) -> int:
    """SET_VRING_BASE's value for a ring to start at ``state``: split, the avail index;
    packed, the position with its wrap counter, as both the avail and the used index
    ("Vring descriptor indices for packed virtqueues")."""
    pos, wrap = state
    if not vq.packed:
        return pos
    return v.encode_packed_base(v.PackedBase(pos, bool(wrap), pos, bool(wrap)))


class VhostUserTransport(Transport):
    """A virtio-net device behind a vhost-user back-end.

    ``VhostUserTransport(frontend, owns_frontend=True, reconnect=None)``: ``frontend`` is a
    session already open (:meth:`VhostUserFrontend.connect` or
    :meth:`~VhostUserFrontend.listen`); :meth:`close` closes it when the transport owns it.
    ``reconnect`` (server mode only; its default there) resumes on a back-end that connects
    again instead of reporting the device lost; ``mtu`` is the MTU the device reports.
    """

    kind = "vhost-user"
    serves_control = True

    def __init__(self, frontend: VhostUserFrontend, *, owns_frontend: bool = True,
                 reconnect: bool | None = None, mtu: int | None = None) -> None:
        if not isinstance(frontend, VhostUserFrontend):
            raise TypeError(f"VhostUserTransport takes a VhostUserFrontend, not a {type(frontend).__name__}")
        if mtu is not None and not (isinstance(mtu, int) and N.MIN_MTU <= mtu <= 0xFFFF):
            raise ValueError(f"mtu must be 68 to 65535 (Virtio 1.2 5.1.4.1), not {mtu!r}")
        #: the MTU the device reports (VIRTIO_NET_F_MTU), as the port was opened with it
        self.mtu = mtu
        if reconnect and not frontend.server_mode:
            raise ValueError("reconnect needs server mode (VhostUserFrontend.listen, open_port(..., server=True)): "
                             "in client mode a back-end that comes back is connected to by a new port")
        self.frontend = frontend
        self.name = frontend.name
        self._owns = owns_frontend
        self.reconnect = frontend.server_mode if reconnect is None else bool(reconnect)
        #: back-ends resumed on after the first one went away
        self.reconnects = 0
        # One lock over everything that talks to the session: the port's calls and the
        # reconnect thread's replay never interleave.
        self._lock = threading.RLock()
        self._kicks: dict[int, int] = {}        # queue -> the eventfd pmd writes to notify it
        self._vqs: dict[int, Virtqueue] = {}    # queue -> its ring, for the bases of a reconnect
        self._memory: DmaMemory | None = None
        self._vectors: list[int] = []           # vector -> eventfd (set_interrupts)
        self._pairs = 1                         # queue pairs running (VQ_PAIRS_SET; 5.1.6.5.5)
        self._status = 0                        # as last set, for while the back-end is away
        self._config = bytearray(N.NET_CFG_LENGTH)   # as last read, for while it is away
        self._connected = True
        self._stop = threading.Event()
        self._resumer: threading.Thread | None = None
        self._closed = False
        self._snapshot()
        if self.reconnect:
            frontend.on_lost(self._backend_gone)

    def _snapshot(self) -> None:
        """What the session's back-end offers, taken when it connects: the device the port
        sees stays the same while a new back-end is being tried (and refused)."""
        fe = self.frontend
        self._has_config = fe.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_CONFIG)
        self._max_pairs = fe.max_queue_pairs
        self._backend_offers = fe.device_features
        offered = self._backend_offers & ~NOT_CARRIED & ~SERVED
        if not self._has_config:
            offered &= ~CONFIG_FEATURES
        if self._max_pairs > 1:
            offered |= SERVED
        if self.reconnect:
            offered |= V.bit(N.NET_STATUS)      # the transport reports the link
        if self.mtu is not None:
            offered |= V.bit(N.NET_MTU)         # and the MTU it was given
        self._offered = offered

    @property
    def connected(self) -> bool:
        """Whether a back-end is there (in server mode, False while waiting for one to come back)."""
        return self._connected and self.frontend.broken is None and not self.frontend.closed

    def _away(self, what: str) -> DeviceError:
        if self.reconnect:
            return DeviceError(f"cannot {what}: the vhost-user backend of {self.name} went away and pmd is "
                               "waiting for one to connect again (port.link comes up when it does)")
        return DeviceError(f"cannot {what}: the vhost-user backend of {self.name} went away; close the port "
                           "and open it again")

    # ---- status ----
    def get_status(self) -> int:
        with self._lock:
            if not self.connected:
                return self._status
            return self.frontend.get_status()

    def set_status(self, status: int) -> None:
        with self._lock:
            if status == 0:
                self._reset_rings()
                return
            if not self.connected:
                raise self._away(f"set the device status to {status:#x}")
            self.frontend.set_status(status)
            self._status = status

    def _reset_rings(self) -> None:
        """Status 0: GET_VRING_BASE for every started ring, so the back-end stops touching
        them (and the memory they point into) before the driver frees it. With the back-end
        gone there is nothing to stop: the session forgets the rings instead, so a back-end
        that connects later is not told of memory that no longer exists."""
        self._pairs = 1
        self._status = 0
        self._vqs.clear()
        self._memory = None
        try:
            if self.connected:
                for index, state in sorted(self.frontend.queues.items()):
                    if state.started:
                        self.frontend.stop_queue(index)
                self.frontend.set_status(0)
                return
        except VhostUserError as exc:   # it went away just now
            log.info("%s: reset: %s", self.name, exc)
        self.frontend.forget()
        # The kick eventfds stay open until replaced or closed: a queue not yet closed
        # may still point at one, and a closed fd number could name another file.

    # ---- features ----
    def device_features(self) -> int:
        return self._offered

    def set_driver_features(self, features: int) -> None:
        with self._lock:
            extra = features & ~self.device_features()
            if extra:
                raise DeviceError(f"features {extra:#x} were not offered by the vhost-user backend")
            if not self.connected:
                raise self._away("negotiate features")
            # what the transport serves stays here: CTRL_VQ and a STATUS it answers never reach
            # the back-end; MQ and STATUS go along where it offered them
            own = V.bit(N.NET_MQ) | V.bit(N.NET_STATUS) | V.bit(N.NET_MTU)
            accepted = self.frontend.negotiate(features & ~SERVED & ~own | features & self._backend_offers & own)
            if (self.mtu is not None and accepted & V.bit(N.NET_MTU)
                    and self.frontend.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_NET_MTU)):
                self.frontend.set_mtu(self.mtu)

    # ---- queues ----
    def num_queues(self) -> int:
        return 2 * self._max_pairs

    def queue_max_size(self, index: int) -> int:
        return v.MAX_QUEUE_SIZE if 0 <= index < self.num_queues() else 0

    def queue_size_fixed(self) -> bool:
        return False

    def setup_queue(self, index: int, vq: Virtqueue, vector: int = NO_VECTOR) -> None:
        check_queue_size(index, vq.size, self.queue_max_size(index))
        with self._lock:
            if vector != NO_VECTOR and not 0 <= vector < len(self._vectors):
                raise DeviceError(f"queue {index}: interrupt vector {vector} was not set up "
                                  f"({len(self._vectors)} vectors)")
            if not self.connected:
                raise self._away(f"set up queue {index}")
            call = self._vectors[vector] if vector != NO_VECTOR else None
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self.frontend.setup_queue(index, vq.size, vq.desc_iova, vq.avail_iova, vq.used_iova, kick, call,
                                          base=_ring_base(vq, vq.avail_state))
                if index // 2 < self._pairs:    # the others wait for VQ_PAIRS_SET (5.1.6.5.5)
                    self.frontend.enable_queue(index)
            except BaseException:
                os.close(kick)
                raise
            old = self._kicks.pop(index, None)
            if old is not None:
                os.close(old)
            self._kicks[index] = kick
            self._vqs[index] = vq
            vq.set_notify_eventfd(kick)

    # ---- the control queue, served here ----
    def control_command(self, cls: int, cmd: int, data: bytes) -> int:
        """VQ_PAIRS_SET (5.1.6.5.5) as SET_VRING_ENABLE: the first ``n`` pairs run, the rest
        stop being processed; every other command is refused (it is never offered)."""
        if (cls, cmd) != (N.CTRL_MQ, N.CTRL_MQ_VQ_PAIRS_SET) or len(data) != 2:
            return N.CTRL_ERR
        pairs = int.from_bytes(data, "little")
        with self._lock:
            if not self.connected:
                raise self._away("set the number of queue pairs")
            queues = self.frontend.queues
            # 5.1.6.5.5: 1 to max_virtqueue_pairs; the rings of each pair must have been set up
            if not 1 <= pairs <= self._max_pairs or any(
                    not (i in queues and queues[i].started) for i in range(2 * pairs)):
                return N.CTRL_ERR
            for index, state in sorted(queues.items()):
                if state.started and state.enabled != (index // 2 < pairs):
                    self.frontend.enable_queue(index, index // 2 < pairs)
            self._pairs = pairs
            return N.CTRL_OK

    # ---- interrupts: one eventfd per vector, handed to the rings as call fds ----
    def interrupt_vectors(self) -> int:
        # vector 0 (configuration changes) is signalled by the transport itself, for the
        # link of a reconnecting session: a back-end reports none to a front-end that
        # serves no back-end requests
        return 1 + self.num_queues()

    def interrupt_mode(self) -> str:
        # not PCI: each ring has a call eventfd of its own, as a vector of MSI-X would
        return "callfd"

    def set_interrupts(self, fds: Sequence[int]) -> None:
        with self._lock:
            self._vectors = list(fds)

    def disable_interrupts(self) -> None:
        with self._lock:
            self._vectors = []

    def set_config_vector(self, vector: int) -> None:
        if vector != NO_VECTOR and not 0 <= vector < len(self._vectors):
            raise DeviceError(f"configuration vector {vector} was not set up ({len(self._vectors)} vectors)")

    def read_isr(self) -> int:
        return 0

    def _signal_config(self) -> None:
        """A configuration change (the link): vector 0, while the port has it set up."""
        with self._lock:
            if self._vectors:
                try:
                    os.eventfd_write(self._vectors[0], 1)
                except OSError as exc:
                    log.warning("%s: cannot signal the link change: %s", self.name, exc)

    # ---- device configuration ----
    def config_generation(self) -> int:
        return 0   # GET_CONFIG reads a range at once: no generation to compare

    def device_config_length(self) -> int:
        if self._has_config:
            return N.NET_CFG_LENGTH
        if self.mtu is not None:
            return N.NET_CFG_MTU + 2
        return _PAIRS_CONFIG_LENGTH if self.reconnect or self._max_pairs > 1 else 0

    def read_config(self, fields: list[tuple[int, int]]) -> list[int]:
        with self._lock:                # one back-end's answers, not a reconnect's half-way state
            return super().read_config(fields)

    def _read_config(self, offset: int, width: int) -> int:
        with self._lock:
            here = self._connected
            if self._has_config and self.connected:
                try:
                    self._config[offset:offset + width] = self.frontend.get_config(offset, width)
                except VhostUserError:
                    if not self.reconnect:
                        raise
                    here = False        # gone, and the watcher has not said so yet: as last read, link down
            image = bytearray(self._config if self._has_config else bytes(N.NET_CFG_LENGTH))
            # what the transport answers itself: max_virtqueue_pairs (it serves MQ) and, when
            # it reconnects, the link (down while no back-end is there)
            image[N.NET_CFG_MAX_QUEUE_PAIRS:N.NET_CFG_MAX_QUEUE_PAIRS + 2] = self._max_pairs.to_bytes(2, "little")
            if self.mtu is not None:
                image[N.NET_CFG_MTU:N.NET_CFG_MTU + 2] = self.mtu.to_bytes(2, "little")
            if self.reconnect:
                at = slice(N.NET_CFG_STATUS, N.NET_CFG_STATUS + 2)
                own = self._has_config and self._backend_offers & V.bit(N.NET_STATUS)
                status = int.from_bytes(image[at], "little") if own else N.NET_S_LINK_UP
                if not here:
                    status &= ~N.NET_S_LINK_UP
                image[at] = status.to_bytes(2, "little")
            return int.from_bytes(image[offset:offset + width], "little")

    def write_config(self, offset: int, width: int, value: int) -> None:
        raise DeviceError("the vhost-user transport does not write the device configuration (SET_CONFIG)")

    # ---- memory and the device going away ----
    def map_memory(self, memory: DmaMemory, *, iommu: bool) -> Callable[[], None]:
        if iommu:
            raise DeviceError("vhost-user with VIRTIO_F_ACCESS_PLATFORM (IOTLB messages) is not supported")
        with self._lock:
            if not self.connected:
                raise self._away("share the memory")
            # The session keeps the memory mapped until the next table (set_memory says why);
            # the rings in it are stopped by the reset before the port frees it.
            self.frontend.set_memory(memory)
            self._memory = memory
        return lambda: None

    def on_lost(self, callback: Callable[[str], object]) -> Callable[[], None]:
        if self.reconnect:
            # not a loss: the link goes down and the session resumes on the next back-end
            return lambda: None
        return self.frontend.on_lost(callback)

    # ---- reconnect (server mode) ----
    def _backend_gone(self, reason: str) -> None:
        """The watcher: the back-end went away. Link down, then wait for the next one."""
        with self._lock:
            if self._stop.is_set() or not self._connected:
                return
            self._connected = False
            log.warning("%s: %s; the link is down until a backend connects to %s again", self.name, reason,
                        self.name)
            self._signal_config()
            self._resumer = threading.Thread(target=self._resume, daemon=True,
                                             name=f"vhost-user-reconnect {self.name}")
            self._resumer.start()

    def _bases(self) -> dict[int, int]:
        """Per started ring, where the device had got to, read from the ring: the used
        index (split, Virtio 1.2 2.7.8), or the position and wrap counter past its last
        used descriptor (packed, 2.8); a restarted back-end resumes there (SET_VRING_BASE)."""
        memory = self._memory
        if memory is None or memory.closed:
            return {}
        return {index: _ring_base(vq, vq.used_frontier()) for index, vq in self._vqs.items() if not vq.closed}

    def _resume(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.frontend.wait_for_backend(_RECONNECT_POLL):
                    continue
            except VhostUserError:
                return                      # closed
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._resume_on_next()
                except (VhostUserError, ValueError) as exc:
                    if getattr(exc, "errno", None) != errno.ETIMEDOUT:
                        log.warning("%s: a backend connected, but the session could not resume on it: %s; "
                                    "waiting for another", self.name, exc)
                    continue
                self._connected = True
                self.reconnects += 1
                log.info("%s: a backend connected again; the link is up", self.name)
                self._signal_config()
                self.frontend.on_lost(self._backend_gone)   # may call it at once: then it starts anew
                return

    def _resume_on_next(self) -> None:
        """Replay the session on the back-end that connected (the session refuses one that
        offers less than the old one: features, protocol features, queue pairs in use)."""
        self.frontend.reconnect(self._bases(), accept_timeout=_RECONNECT_POLL)
        if not self._vqs:               # the port is stopped: its next start sees the new back-end
            self._snapshot()

    # ---- lifetime ----
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._lock:
            pass                        # a replay under way finishes; none starts after _stop
        try:
            if self._owns:
                self.frontend.close()   # stops the started rings while the back-end answers
        finally:
            resumer = self._resumer
            if resumer is not None and resumer is not threading.current_thread():
                resumer.join()
            with self._lock:
                for fd in self._kicks.values():
                    os.close(fd)
                self._kicks.clear()
                self._vqs.clear()
                self._vectors = []

    def describe(self) -> str:
        return f"vhost-user virtio transport ({self.name})"
