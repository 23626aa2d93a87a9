"""The front-end of a vhost-user session: pmd shares its rings and memory with a back-end.

A vhost-user back-end (DPDK's ``net_vhost``, a software switch) runs the device side of
virtio-net in another process. pmd, the *front-end*, tells it over a UNIX socket where
the rings are and which memory they point into, and hands it eventfds for
notifications (QEMU ``docs/interop/vhost-user.rst``; wire format in
:mod:`pmd.abi.vhost_user`). Then both sides work on the shared rings with no message
per packet. This module is the session, not a virtio transport: a
``VhostUserTransport`` is built on it (see docs/vhost-user.md).

The messages, in the order DPDK's virtio-user sends them::

    connect() / listen()+accept()   client mode, or server mode (the back-end connects)
    SET_OWNER                       the session starts ("VHOST_USER_SET_OWNER")
    GET_FEATURES                    virtio features offered, bit 30 = protocol features
    GET_PROTOCOL_FEATURES           when bit 30 is offered
    SET_PROTOCOL_FEATURES           offered & wanted (MQ, REPLY_ACK, CONFIG, STATUS)
    GET_QUEUE_NUM                   with MQ: how many queue pairs
    negotiate(wanted)  -> SET_FEATURES
    set_mtu(mtu)       -> NET_SET_MTU (with NET_MTU: the MTU the port was opened with)
    set_memory(memory) -> SET_MEM_TABLE   the DmaMemory's memfd, one region
    setup_queue(...)   -> SET_VRING_CALL, _NUM, _BASE, _ADDR, _KICK
    enable_queue(...)  -> SET_VRING_ENABLE
    set_status(...)    -> SET_STATUS (with STATUS; DPDK's back-end waits for DRIVER_OK)
    stop_queue(...)    -> SET_VRING_ENABLE 0, GET_VRING_BASE (the ring stops)
    get_config(...)    -> GET_CONFIG (with CONFIG)

With REPLY_ACK negotiated every request that has no reply of its own carries
NEED_REPLY and waits for the back-end's verdict. There are no message ids: the next
message from the back-end is the answer. So every request has a deadline (``timeout``,
1 s by default; ``memory_timeout``, 5 s, for SET_MEM_TABLE, which makes the back-end
map the memory), and any reply that breaks the protocol (a wrong request code, bad
flags, a wrong size, an fd nobody asked for, no reply in time, the socket closed)
ends the session: the socket is closed at once and every later call fails with
``EPIPE`` saying why ("Communication": a front-end that receives a wrong reply closes
the connection). A well-formed refusal (a REPLY_ACK status other than 0, an empty
GET_CONFIG reply) fails only that call.

**Addresses.** vhost-user has two address spaces: descriptors hold *guest physical
addresses*, ring addresses and the memory table's ``userspace_addr`` are the
front-end's *user* (virtual) addresses ("Memory access"). pmd gives each region
``guest_phys_addr = userspace_addr = its virtual address``: the IOVA of DmaMemory's
default (identity) translator, the one pmd writes into descriptors. Then every pointer
means the same in both spaces, ``Virtqueue.desc_iova`` is also the ring's user
address, and nothing is translated; DPDK's virtio-user does the same (IOVA as VA,
``guest_phys_addr = userspace_addr``). :meth:`set_memory` refuses memory with another
translator.

**State kept for a reconnect.** Each queue's size, ring addresses, eventfds (pmd's own
duplicates) and base (the avail index it started from, and the one ``GET_VRING_BASE``
returned) stay in :attr:`queues`, the memory in :attr:`memory_regions` and the
negotiated features in :attr:`features`: what a restarted back-end needs replayed.
In server mode :meth:`reconnect` takes the next back-end that connects to the kept
listener and replays it all (``SET_VRING_BASE`` with the base each ring resumes from),
as DPDK's virtio-user does in server mode; :meth:`forget` drops it when the rings it
describes are gone.

A watcher thread notices the back-end going away (``POLLRDHUP``, within a second)
and calls the :meth:`on_lost` callbacks. ``close()`` (idempotent, also at interpreter
exit) stops the started rings while the back-end still answers (1 s at most), then
releases every fd, the watcher thread and, in server mode, the socket file.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from ..memory import DmaMemory
from ..sockets import Identity, bind_socket, check_path, remove_socket, remove_stale
from .session import LossWatcher, Session
from ..abi import vhost_user as v
from ..abi.virtio import STATUS_DRIVER_OK
from ..abi.vhost_user import VhostUserError, vhost_user_error

__all__ = [
    "VhostUserFrontend",
    "QueueState",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MEMORY_TIMEOUT",
    "DEFAULT_ACCEPT_TIMEOUT",
    "WANTED_PROTOCOL_FEATURES",
    "MAX_QUEUE_PAIRS",
    "testpmd_command",
]

log = logging.getLogger("pmd.driver.vhost_user")

DEFAULT_TIMEOUT = 1.0  # a back-end on the same host answers a control message in microseconds
DEFAULT_MEMORY_TIMEOUT = 5.0  # SET_MEM_TABLE: the back-end maps (DPDK: and populates) all of it
DEFAULT_ACCEPT_TIMEOUT = 10.0
_CLOSE_BUDGET = 1.0  # seconds close() may spend stopping rings while the back-end answers

#: what pmd asks for when offered: the ones DPDK's virtio-user uses (MQ, REPLY_ACK, STATUS), CONFIG,
#: and NET_MTU (to tell the back-end the MTU the port was opened with)
WANTED_PROTOCOL_FEATURES = (
    1 << v.VHOST_USER_PROTOCOL_F_MQ
    | 1 << v.VHOST_USER_PROTOCOL_F_NET_MTU
    | 1 << v.VHOST_USER_PROTOCOL_F_REPLY_ACK
    | 1 << v.VHOST_USER_PROTOCOL_F_CONFIG
    | 1 << v.VHOST_USER_PROTOCOL_F_STATUS
)
#: a net device's vrings come in pairs and their index has 8 bits (SET_VRING_KICK)
MAX_QUEUE_PAIRS = v.MAX_VRINGS // 2
#: features this front-end never accepts: dirty logging (migration) and IOTLB translation
_NEVER = 1 << v.VHOST_F_LOG_ALL | 1 << v.VIRTIO_F_IOMMU_PLATFORM | 1 << v.VHOST_USER_F_PROTOCOL_FEATURES
_STATUS_MAX = 0xFF
_GONE = "the backend closed the connection (it exited or crashed)"


def testpmd_command(path: str, *, client: bool = False) -> str:
    """The ``dpdk-testpmd`` line that serves a vhost-user back-end at ``path`` (docs/vhost-user.md)."""
    mode = ",client=1" if client else ""
    return (
        "dpdk-testpmd --no-pci --no-huge -m 1024 --file-prefix vhost "
        f"--vdev net_vhost0,iface={path},queues=1{mode} -- --forward-mode=io --stats-period 1"
    )


@dataclass(frozen=True)
class QueueState:
    """What the back-end was told about one vring; enough to tell a restarted back-end again."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    kick_fd: int  # pmd's duplicate of the kick eventfd, -1 for none (the back-end polls)
    call_fd: int  # pmd's duplicate of the call eventfd, -1 for none (the front-end polls)
    base: int  # the avail index the ring (re)started from, then the one GET_VRING_BASE returned
    started: bool
    enabled: bool


# ---------------------------------------------------------------------------
# the connection: one request at a time, the reply checked
# ---------------------------------------------------------------------------


class _Connection(Session):
    """The socket and the request/reply machinery; no reference to the front-end (for the finalizer)."""

    protocol = "vhost-user"
    kind = "vhost-user"
    log = log
    gone = _GONE
    what_breaks = "the session with the backend"
    remedy = "close this front-end and start a new session"

    def __init__(self, sock: socket.socket, name: str, timeout: float) -> None:
        super().__init__(sock, name, timeout, threading.RLock())
        self.reply_ack = False  # NEED_REPLY on requests without a reply of their own
        self.protocol_features = 0
        self.sent: collections.deque[str] = collections.deque(maxlen=256)  # names, for traces and tests

    def error(self, message: str, err: int) -> VhostUserError:
        return vhost_user_error(message, err)

    def fail(self, what: str, text: str, err: int = errno.EPROTO) -> VhostUserError:
        """Break the session over a reply that breaks the protocol and say so."""
        self.break_(text)
        return vhost_user_error(f"vhost-user {self.name}: {what}: {text}; the session is closed", err)

    def request(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        what: str,
        reply: bool = False,
        timeout: float | None = None,
    ) -> v.Message | None:
        """Send one request; return its reply (``reply``: a request answered with a payload of its own).

        Without a reply of its own, the request carries NEED_REPLY when REPLY_ACK is
        negotiated and the back-end's verdict is checked here; ``None`` is returned.
        The returned reply has been checked for framing, flags, request code and fds.
        """
        with self.lock:
            sock = self.sock
            if sock is None or self.broken is not None or self.closed:
                raise self.unusable(what)
            name = v.request_name(request)
            need_reply = self.reply_ack and not reply
            limit = self.timeout if timeout is None else timeout
            deadline = v.deadline_after(limit)
            self.requests += 1
            self.sent.append(name)
            try:
                v.send_message(sock, v.encode_message(request, payload, need_reply=need_reply), fds, deadline)
            except TimeoutError:
                raise self.fail(what, f"the backend did not take {name} within {limit} s (it is stuck)",
                                errno.ETIMEDOUT) from None
            except OSError as exc:
                raise self.fail(what, f"the backend is gone ({exc.strerror or exc} while sending {name}): it exited "
                                "or closed the connection", exc.errno or errno.EPIPE) from None
            if not (reply or need_reply):
                return None
            try:
                msg = v.recv_message(sock, deadline=deadline, max_payload=v.MAX_PAYLOAD_SIZE, max_fds=v.MAX_FDS)
            except v.MessageError as exc:
                if exc.errno == errno.ETIMEDOUT:
                    raise self.fail(what, f"no reply to {name} within {limit} s: the backend is stuck, or does not "
                                    f"implement {name} (on a busy host give it longer: timeout=)",
                                    errno.ETIMEDOUT) from None
                raise self.fail(what, f"bad reply to {name}: {exc}", exc.errno or errno.EPROTO) from None
            if msg is None:
                raise self.fail(what, f"the backend closed the connection instead of answering {name} (it exited, "
                                "crashed, or refused the request)", errno.ECONNRESET)
            try:
                v.check_reply(msg, request)
                if msg.fds or msg.fds_truncated:
                    raise v.message_error(f"the reply to {name} came with file descriptors, which no reply pmd "
                                          "asks for carries (closed)")
            except v.MessageError as exc:
                msg.close_fds()
                raise self.fail(what, str(exc)) from None
            if reply:
                return msg
            try:
                status = v.decode_reply_ack(msg.payload, name)
            except v.MessageError as exc:
                raise self.fail(what, str(exc)) from None
            if status:
                # Well framed, so the session goes on; DPDK's back-end closes it after a failure anyway.
                raise vhost_user_error(
                    f"vhost-user {self.name}: {what}: the backend refused {name} (REPLY_ACK status {status}); "
                    "its log says why",
                    errno.EREMOTEIO,
                )
            return None


class _Resources:
    """Everything a front-end holds, released by ``release`` (no reference to the front-end)."""

    def __init__(self, conn: _Connection | None = None) -> None:
        self.conn = conn
        self.queues: dict[int, QueueState] = {}
        self.memories: list[DmaMemory] = []
        # a view of each memory in the table: keeps its mapping (so its address) until the next
        # table replaces it (see set_memory)
        self.mapped: list[object] = []
        self.listener: socket.socket | None = None
        self.socket_file: tuple[str, Identity] | None = None  # the file we made, to remove only it
        self.watcher: LossWatcher | None = None
        self.packed = False
        self.released = False

    def drop_queue_fds(self, state: QueueState | None) -> None:
        if state is not None:
            v.close_fds([fd for fd in (state.kick_fd, state.call_fd) if fd >= 0])

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.watcher is not None:  # our own close is no loss: stop watching first
            self.watcher.stop()
            self.watcher = None
        conn = self.conn
        if conn is not None:
            conn.end(lambda: self._stop_rings(conn))
            conn.close()
        for state in self.queues.values():
            self.drop_queue_fds(state)
        self.queues.clear()
        self.memories.clear()
        self.mapped.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.socket_file is not None:
            remove_socket(*self.socket_file)
            self.socket_file = None

    def _stop_rings(self, conn: _Connection) -> None:
        """GET_VRING_BASE for every started ring, so the back-end lets go of pmd's memory first."""
        deadline = time.monotonic() + _CLOSE_BUDGET
        for index, state in sorted(self.queues.items()):
            left = deadline - time.monotonic()
            if not state.started or left <= 0 or conn.broken is not None:
                continue
            try:
                msg = conn.request(v.VHOST_USER_GET_VRING_BASE, v.encode_vring_state(index, 0), reply=True,
                                   what=f"close: stop vring {index}", timeout=left)
                if msg is not None:
                    v.decode_vring_state(msg.payload, "GET_VRING_BASE reply")
            except VhostUserError as exc:
                log.debug("vhost-user %s: close: %s", conn.name, exc)


# ---------------------------------------------------------------------------
# sockets
# ---------------------------------------------------------------------------


def _connect_socket(path: str, timeout: float, wait: float) -> socket.socket:
    check_path(path, vhost_user_error)
    give_up = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() < give_up:  # the back-end may be starting (it binds, then listens)
                time.sleep(0.02)
                continue
            if isinstance(exc, FileNotFoundError):
                raise vhost_user_error(
                    f"no vhost-user backend at {path} (the socket does not exist): start one first, for example "
                    f"`{testpmd_command(path)}`; or let the backend connect to pmd instead "
                    "(VhostUserFrontend.listen, and client=1 on the backend)",
                    errno.ENOENT,
                ) from None
            raise vhost_user_error(
                f"nothing listens on {path}: the backend that made the socket has exited (a stale socket file); "
                f"start it again, for example `{testpmd_command(path)}`",
                errno.ECONNREFUSED,
            ) from None
        except PermissionError as exc:
            sock.close()
            raise vhost_user_error(
                f"permission denied connecting to {path}: run as the user that started the backend (or root), "
                "or give the socket file write permission for this user",
                exc.errno or errno.EACCES,
            ) from None
        except OSError as exc:
            sock.close()
            raise vhost_user_error(
                f"cannot connect to the vhost-user backend at {path}: {exc.strerror or exc}", exc.errno or errno.EIO
            ) from None


def _listen_socket(path: str, mode: int, res: _Resources) -> socket.socket:
    """Bind and listen at ``path`` with exactly ``mode``; the file is recorded in ``res`` for removal."""
    check_path(path, vhost_user_error)
    remove_stale(path, "something listens on it (a vhost-user backend in server mode?); connect to it with "
                 "VhostUserFrontend.connect, or choose another path", vhost_user_error)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    res.listener = sock
    # Exactly ``mode``, never through a symlink planted after bind (pmd.sockets).
    res.socket_file = (path, bind_socket(sock, path, mode, "vhost-user socket", vhost_user_error))
    sock.listen(1)
    return sock


# ---------------------------------------------------------------------------
# the front-end
# ---------------------------------------------------------------------------


class VhostUserFrontend:
    """One vhost-user session, front-end side (see the module documentation).

    ``VhostUserFrontend.connect(path)`` (client mode: the back-end listens),
    ``VhostUserFrontend.listen(path)`` (server mode: pmd listens and accepts one
    back-end), ``VhostUserFrontend.from_socket(sock)`` (a connected stream socket, e.g.
    one end of a socketpair). Each returns after the handshake: SET_OWNER, features,
    protocol features and, with MQ, the number of queue pairs.

    ``protocol_features`` limits what pmd asks for (default
    :data:`WANTED_PROTOCOL_FEATURES`); ``timeout`` is the deadline of each request,
    ``memory_timeout`` that of SET_MEM_TABLE.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str = "vhost-user",
        timeout: float = DEFAULT_TIMEOUT,
        memory_timeout: float = DEFAULT_MEMORY_TIMEOUT,
        protocol_features: int = WANTED_PROTOCOL_FEATURES,
        _res: _Resources | None = None,
    ) -> None:
        if timeout <= 0 or memory_timeout <= 0:
            raise ValueError(f"timeouts must be positive, not {timeout} and {memory_timeout}")
        self.name = name
        self.timeout = timeout
        self.memory_timeout = memory_timeout
        self._conn = _Connection(sock, name, timeout)
        if _res is None:
            _res = _Resources(self._conn)
        else:
            _res.conn = self._conn
        self._res = _res
        self._finalizer = weakref.finalize(self, _res.release)
        self._wanted_protocol = protocol_features
        self.backend_features = 0  #: GET_FEATURES as offered, bit 30 included
        self.offered_protocol_features = 0  #: GET_PROTOCOL_FEATURES as offered
        self.queue_num: int | None = None  #: GET_QUEUE_NUM as answered (with MQ)
        self.features: int | None = None  #: negotiated virtio features (None before negotiate)
        self._status = 0
        self._mtu: int | None = None  # as sent with NET_SET_MTU, replayed by reconnect
        self._regions: list[v.MemoryRegion] = []
        try:
            self._handshake()
        except BaseException:
            self._finalizer()
            raise
        self._last_protocol = self._conn.protocol_features  # what a reconnect must offer again

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        memory_timeout: float = DEFAULT_MEMORY_TIMEOUT,
        protocol_features: int = WANTED_PROTOCOL_FEATURES,
        wait: float = 0.0,
    ) -> VhostUserFrontend:
        """Client mode: connect to the back-end listening at ``path`` (``wait``: seconds to
        keep trying while the socket is missing or refuses, for a back-end still starting)."""
        spath = os.fspath(path)
        sock = _connect_socket(spath, timeout, wait)
        return cls(sock, name=spath, timeout=timeout, memory_timeout=memory_timeout,
                   protocol_features=protocol_features)

    @classmethod
    def listen(
        cls,
        path: str | os.PathLike[str],
        *,
        accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT,
        timeout: float = DEFAULT_TIMEOUT,
        memory_timeout: float = DEFAULT_MEMORY_TIMEOUT,
        protocol_features: int = WANTED_PROTOCOL_FEATURES,
        mode: int = 0o600,
    ) -> VhostUserFrontend:
        """Server mode: create the socket ``path`` (mode 0600), wait at most ``accept_timeout``
        seconds for one back-end to connect (DPDK: ``client=1``), then do the handshake.

        The listening socket stays open until ``close()`` (a restarted back-end can
        connect again); the socket file is removed at ``close()``.
        """
        spath = os.fspath(path)
        if accept_timeout <= 0:
            raise ValueError(f"accept_timeout must be positive, not {accept_timeout}")
        res = _Resources()
        try:
            listener = _listen_socket(spath, mode, res)
            listener.settimeout(accept_timeout)
            try:
                sock, _addr = listener.accept()
            except (TimeoutError, socket.timeout):
                raise vhost_user_error(
                    f"no vhost-user backend connected to {spath} within {accept_timeout} s: start one in client "
                    f"mode, for example `{testpmd_command(spath, client=True)}`",
                    errno.ETIMEDOUT,
                ) from None
        except BaseException:
            res.release()
            raise
        return cls(sock, name=spath, timeout=timeout, memory_timeout=memory_timeout,
                   protocol_features=protocol_features, _res=res)

    @classmethod
    def from_socket(
        cls,
        sock: socket.socket,
        *,
        name: str = "vhost-user",
        timeout: float = DEFAULT_TIMEOUT,
        memory_timeout: float = DEFAULT_MEMORY_TIMEOUT,
        protocol_features: int = WANTED_PROTOCOL_FEATURES,
    ) -> VhostUserFrontend:
        """Use a connected ``AF_UNIX`` stream socket (the front-end owns it from now on)."""
        return cls(sock, name=name, timeout=timeout, memory_timeout=memory_timeout,
                   protocol_features=protocol_features)

    # --- server mode: a back-end that comes back ---------------------------------------------

    def wait_for_backend(self, timeout: float) -> bool:
        """Server mode: whether a back-end is waiting to be accepted on the kept listener,
        after at most ``timeout`` seconds (a poll: nothing is accepted)."""
        listener = self._res.listener
        if self._res.released or listener is None:
            raise vhost_user_error(f"vhost-user {self.name}: not listening (server mode only, and not closed)",
                                   errno.EINVAL)
        try:
            return bool(select.select([listener], [], [], max(0.0, timeout))[0])
        except (OSError, ValueError):      # closed under the poll
            return False

    def reconnect(self, bases: Mapping[int, int] | None = None, *, accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT) -> None:
        """Server mode, once the back-end has gone: accept the next one that connects to the
        kept listener and tell it what the old one was told: the handshake, the features,
        the memory table, every ring that ran (``bases[index]``: the avail index it resumes
        from, by default the saved one), its enable state, and the device status.

        Raises :class:`VhostUserError`: ``ETIMEDOUT`` when nobody connected within
        ``accept_timeout``; ``EISCONN`` while the old back-end is still connected; and, with
        the new session broken, when the new back-end cannot take what the old one had
        (fewer features or queue pairs, a refused request). ``reconnect`` may be called
        again for the next back-end."""
        res = self._res
        listener = res.listener
        if res.released or listener is None:
            raise vhost_user_error(f"vhost-user {self.name}: reconnect needs server mode (listen()) and an open "
                                   "front-end", errno.EINVAL)
        if self._conn.sock is not None and self._conn.alive():
            raise vhost_user_error(f"vhost-user {self.name}: the backend is still connected", errno.EISCONN)
        bases = dict(bases or {})
        listener.settimeout(accept_timeout)
        try:
            sock, _addr = listener.accept()
        except (TimeoutError, socket.timeout):
            raise vhost_user_error(f"no vhost-user backend connected to {self.name} within {accept_timeout} s",
                                   errno.ETIMEDOUT) from None
        except OSError as exc:
            raise vhost_user_error(f"vhost-user {self.name}: accept failed: {exc.strerror or exc}",
                                   exc.errno or errno.EIO) from None
        if res.watcher is not None:         # it watched the old connection, and fired
            res.watcher.stop()
            res.watcher = None
        self._conn.close()
        self._conn = res.conn = _Connection(sock, self.name, self.timeout)
        features, status = self.features, self._status
        protocol = self._last_protocol
        queues = dict(res.queues)
        try:
            self._handshake()
            fewer = protocol & ~self._conn.protocol_features
            if fewer:
                raise self._conn.fail("resume", f"the backend that connected lacks protocol features {fewer:#x} "
                                                "the session relies on")
            if features is not None:
                missing = features & ~self.device_features
                if missing:
                    raise self._conn.fail("resume", f"the backend that connected lacks features {missing:#x} "
                                                    "the session negotiated; restart the port on it")
                # the new back-end runs no ring yet: they are started again below
                for index, state in queues.items():
                    res.queues[index] = replace(state, started=False, enabled=False)
                self.negotiate(features)
                if self._mtu is not None:
                    self.set_mtu(self._mtu)
                if status:
                    self.set_status(status & ~STATUS_DRIVER_OK)
                if res.memories:
                    self.set_memory(res.memories)
                for index, state in sorted(queues.items()):
                    if not state.started:
                        continue
                    if index >= 2 * self.max_queue_pairs:
                        raise self._conn.fail("resume", f"the backend that connected has {self.max_queue_pairs} "
                                                        f"queue pair(s); vring {index} ran before")
                    self.setup_queue(index, state.size, state.desc, state.avail, state.used,
                                     state.kick_fd if state.kick_fd >= 0 else None,
                                     state.call_fd if state.call_fd >= 0 else None,
                                     base=bases.get(index, state.base))
                    if state.enabled:
                        self.enable_queue(index)
            if status:
                self.set_status(status)
            if features is None:
                # nothing was replayed: what the next reconnect needs is what this back-end gave.
                # Otherwise it stays what the replayed state was set up with (no ratchet up to a
                # back-end that happened to offer more).
                self._last_protocol = self._conn.protocol_features
        except BaseException as exc:
            self._conn.break_(f"resuming on the backend that connected failed: {exc}")
            raise
        log.info("vhost-user %s: a backend connected again; %d ring(s) resumed", self.name,
                 sum(q.started for q in queues.values()))

    def forget(self) -> None:
        """Drop the saved rings, memory and status (their memory is going away), so a later
        :meth:`reconnect` replays only the handshake. Needs no back-end."""
        res = self._res
        with self._conn.lock:
            for state in res.queues.values():
                res.drop_queue_fds(state)
            res.queues.clear()
            res.memories = []
            res.mapped = []
            self._regions = []
            self._status = 0
            self._mtu = None
            self.features = None

    def _u64(self, request: int, what: str) -> int:
        msg = self._conn.request(request, what=what, reply=True)
        assert msg is not None
        try:
            return v.decode_u64(msg.payload, f"{v.request_name(request)} reply")
        except v.MessageError as exc:
            raise self._conn.fail(what, str(exc)) from None

    def _handshake(self) -> None:
        conn = self._conn
        # "VHOST_USER_SET_OWNER: issued when a new connection is established"; DPDK sends it first.
        conn.request(v.VHOST_USER_SET_OWNER, what="start the session (SET_OWNER)")
        self.backend_features = self._u64(v.VHOST_USER_GET_FEATURES, "read the backend's features")
        negotiated = 0
        if self.backend_features >> v.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # "Back-ends that report VHOST_USER_F_PROTOCOL_FEATURES must support this message
            # even before VHOST_USER_SET_FEATURES was called."
            self.offered_protocol_features = self._u64(v.VHOST_USER_GET_PROTOCOL_FEATURES,
                                                       "read the backend's protocol features")
            negotiated = self.offered_protocol_features & self._wanted_protocol
            conn.request(v.VHOST_USER_SET_PROTOCOL_FEATURES, v.encode_u64(negotiated),
                         what="set the protocol features")
            conn.protocol_features = negotiated
            # REPLY_ACK applies from the next request on: SET_PROTOCOL_FEATURES itself went without.
            conn.reply_ack = bool(negotiated >> v.VHOST_USER_PROTOCOL_F_REPLY_ACK & 1)
        if negotiated >> v.VHOST_USER_PROTOCOL_F_MQ & 1:
            count = self._u64(v.VHOST_USER_GET_QUEUE_NUM, "read the number of queues")
            if not 1 <= count <= MAX_QUEUE_PAIRS:
                raise conn.fail("read the number of queues",
                                f"GET_QUEUE_NUM answered {count}; a net backend has 1 to {MAX_QUEUE_PAIRS} queue pairs")
            self.queue_num = count
        log.debug("vhost-user %s: connected: features %#x, protocol features %#x of %#x offered, queues %s",
                  self.name, self.backend_features, negotiated, self.offered_protocol_features, self.queue_num)

    # --- state ----------------------------------------------------------------------------

    def _live(self, what: str) -> _Connection:
        conn = self._conn
        if self._res.released or conn.closed:
            raise vhost_user_error(f"vhost-user {self.name} is closed: cannot {what}", errno.EBADF)
        if conn.broken is not None or conn.sock is None:
            raise conn.unusable(what)
        return conn

    @property
    def closed(self) -> bool:
        return self._res.released

    @property
    def broken(self) -> str | None:
        """Why the session was given up, or ``None`` while it works."""
        return self._conn.broken

    @property
    def alive(self) -> bool:
        """Whether the back-end is still connected (no request: a poll of the socket)."""
        return not self._res.released and self._conn.alive()

    @property
    def server_mode(self) -> bool:
        return self._res.socket_file is not None

    @property
    def device_features(self) -> int:
        """The virtio features the back-end offers (bit 30, the protocol-features flag, removed)."""
        return self.backend_features & ~(1 << v.VHOST_USER_F_PROTOCOL_FEATURES)

    @property
    def protocol_features(self) -> int:
        """The protocol features negotiated (offered and wanted)."""
        return self._conn.protocol_features

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self._conn.protocol_features >> bit & 1)

    @property
    def max_queue_pairs(self) -> int:
        """Queue pairs the back-end takes: GET_QUEUE_NUM with MQ, else 1.

        DPDK's vhost library answers its own limit (128), not the ``queues=`` the port
        was configured with: the port uses only its first ``queues`` pairs.
        """
        return self.queue_num if self.queue_num is not None else 1

    @property
    def queues(self) -> dict[int, QueueState]:
        return dict(self._res.queues)

    @property
    def memory_regions(self) -> list[v.MemoryRegion]:
        return list(self._regions)

    @property
    def requests(self) -> int:
        """How many requests were sent."""
        return self._conn.requests

    @property
    def sent_requests(self) -> list[str]:
        """The names of the last (up to 256) requests sent, oldest first."""
        return list(self._conn.sent)

    @property
    def peer_pid(self) -> int | None:
        """The back-end's process id (SO_PEERCRED), when the socket is still open."""
        sock = self._conn.sock
        if sock is None:
            return None
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid = int(struct.unpack("3i", creds)[0])
        return pid or None

    def on_lost(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(reason)`` once, from a watcher thread, when the back-end goes away
        (exits, closes the connection) or the session breaks; returns a function that
        cancels it. The watcher starts with the first callback and stops at ``close()``;
        a callback added after the loss is called at once."""
        res = self._res
        if res.released:
            raise vhost_user_error(f"vhost-user {self.name} is closed: cannot watch it", errno.EBADF)
        if res.watcher is None:
            if self._conn.sock is None:  # already broken: nothing to watch, say so now
                callback(self._conn.broken or "the session is broken")
                return lambda: None
            res.watcher = LossWatcher(self._conn)
        return res.watcher.add(callback)

    def close(self) -> None:
        """Stop the started rings (within a second, while the back-end answers), then release everything."""
        self._finalizer()
        self._regions = []

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("broken" if self.broken else "connected")
        return f"<VhostUserFrontend {self.name} {state}>"

    # --- features ------------------------------------------------------------------------

    def negotiate(self, wanted: int) -> int:
        """SET_FEATURES with ``wanted`` & offered; returns what was accepted (the virtio bits).

        Dirty logging (``VHOST_F_LOG_ALL``) and ``VIRTIO_F_IOMMU_PLATFORM`` (IOTLB
        messages) are never accepted. Bit 30 goes along whenever the back-end offered it,
        as DPDK's virtio-user does: with it rings start disabled and are enabled by
        SET_VRING_ENABLE ("Ring states").
        """
        if not 0 <= wanted <= (1 << 64) - 1:
            raise ValueError(f"feature mask {wanted:#x} does not fit 64 bits")
        conn = self._live("negotiate features")
        with conn.lock:
            if any(q.started for q in self._res.queues.values()):
                raise vhost_user_error(f"vhost-user {self.name}: features cannot change while rings run; stop the "
                                       "queues first", errno.EBUSY)
            accepted = wanted & self.device_features & ~_NEVER
            value = accepted | (self.backend_features & 1 << v.VHOST_USER_F_PROTOCOL_FEATURES)
            conn.request(v.VHOST_USER_SET_FEATURES, v.encode_u64(value), what=f"set features {accepted:#x}")
            self.features = accepted
            self._res.packed = bool(accepted >> v.VIRTIO_F_RING_PACKED & 1)
            return accepted

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (with VHOST_USER_PROTOCOL_F_NET_MTU): the MTU the front-end reports to
        its driver (Virtio 1.2 5.1.4 ``mtu``), so the back-end can size its buffers for it."""
        if not 68 <= mtu <= 0xFFFF:
            raise ValueError(f"an MTU is 68 to 65535 (Virtio 1.2 5.1.4.1), not {mtu}")
        conn = self._live("set the MTU")
        if not self.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_NET_MTU):
            raise vhost_user_error(f"vhost-user {self.name}: the backend did not offer VHOST_USER_PROTOCOL_F_NET_MTU",
                                   errno.ENOTSUP)
        conn.request(v.VHOST_USER_NET_SET_MTU, v.encode_u64(mtu), what=f"set the MTU to {mtu}")
        self._mtu = mtu

    # --- device status ("VHOST_USER_SET_STATUS", Virtio 1.2 2.1) ------------------------

    def set_status(self, status: int) -> None:
        """The virtio device status: SET_STATUS with STATUS negotiated, else only remembered.

        DPDK's back-end starts the device only once DRIVER_OK is set when STATUS was
        negotiated; without STATUS it starts when the rings are ready.
        """
        if not 0 <= status <= _STATUS_MAX:
            raise ValueError(f"device status {status:#x} does not fit 8 bits")
        conn = self._live("set the device status")
        if self.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_STATUS):
            conn.request(v.VHOST_USER_SET_STATUS, v.encode_u64(status), what=f"set device status {status:#x}")
        self._status = status

    def get_status(self) -> int:
        """GET_STATUS with STATUS negotiated (FEATURES_OK cleared there means the back-end refused
        the features), else the status last set."""
        conn = self._live("read the device status")
        if not self.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_STATUS):
            return self._status
        msg = conn.request(v.VHOST_USER_GET_STATUS, what="read the device status", reply=True)
        assert msg is not None
        try:
            return v.decode_status(msg.payload, "GET_STATUS reply")
        except v.MessageError as exc:
            raise conn.fail("read the device status", str(exc)) from None

    # --- configuration space ("VHOST_USER_GET_CONFIG") --------------------------------------

    def get_config(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtio device configuration at ``offset`` (needs CONFIG)."""
        conn = self._live("read the device configuration")
        if not self.has_protocol_feature(v.VHOST_USER_PROTOCOL_F_CONFIG):
            raise vhost_user_error(
                f"vhost-user {self.name}: the backend did not offer VHOST_USER_PROTOCOL_F_CONFIG, so its device "
                "configuration (MAC, status, MTU) cannot be read; use defaults (DPDK's vhost library offers CONFIG "
                "only for vDPA devices)",
                errno.ENOTSUP,
            )
        if not (1 <= length <= v.VHOST_USER_MAX_CONFIG_SIZE and 0 <= offset <= v.VHOST_USER_MAX_CONFIG_SIZE - length):
            raise ValueError(f"a config read of {length} bytes at {offset} must lie within the first "
                             f"{v.VHOST_USER_MAX_CONFIG_SIZE} bytes")
        what = f"read {length} bytes of device configuration at {offset}"
        msg = conn.request(v.VHOST_USER_GET_CONFIG, v.encode_config(offset, bytes(length)), what=what, reply=True)
        assert msg is not None
        if not msg.payload:  # "uses zero length of payload to indicate an error"
            raise vhost_user_error(f"vhost-user {self.name}: {what}: the backend refused GET_CONFIG", errno.EREMOTEIO)
        try:
            cfg = v.decode_config(msg.payload, "GET_CONFIG reply")
            if (cfg.offset, cfg.size) != (offset, length):
                raise v.message_error(f"GET_CONFIG reply is for {cfg.size} bytes at {cfg.offset}, "
                                      f"not {length} at {offset}")
        except v.MessageError as exc:
            raise conn.fail(what, str(exc)) from None
        return cfg.data

    # --- memory ("VHOST_USER_SET_MEM_TABLE", "Memory access") ----------------------------------

    def set_memory(self, memory: DmaMemory | Sequence[DmaMemory]) -> None:
        """SET_MEM_TABLE: the back-end maps each DmaMemory from its memfd.

        One region per memory (at most 8): ``guest_phys_addr = userspace_addr`` = its
        address, ``mmap_offset`` 0, its whole size. The memory must use IOVA = virtual
        address (DmaMemory's default translator; see the module documentation) and be
        sealed against shrinking (it always is). Rings must be stopped.
        """
        memories = [memory] if isinstance(memory, DmaMemory) else list(memory)
        if not 1 <= len(memories) <= v.VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"vhost-user takes 1 to {v.VHOST_MEMORY_BASELINE_NREGIONS} memory regions, "
                             f"not {len(memories)}")
        regions = []
        for m in memories:
            if m.closed:
                raise ValueError(f"{m.name} is closed")
            if m.iova(0) != m.address or not m.iova_contiguous:
                raise ValueError(
                    f"{m.name}: vhost-user needs IOVA = virtual address (DmaMemory's default translator): ring "
                    "addresses are user addresses and descriptors guest addresses, and pmd makes them the same; "
                    "do not set an IOVA translator on memory shared with a vhost-user backend"
                )
            if not m.sealed:
                raise ValueError(f"{m.name} is not sealed against shrinking: the backend could be killed by SIGBUS")
            regions.append(v.MemoryRegion(m.address, m.size, m.address, 0))
        payload = v.encode_memory_table(regions)  # ValueError for overlapping memories
        conn = self._live("set the memory table")
        with conn.lock:
            if any(q.started for q in self._res.queues.values()):
                raise vhost_user_error(f"vhost-user {self.name}: the memory table cannot change while rings run; "
                                       "stop the queues first", errno.EBUSY)
            total = sum(m.size for m in memories)
            conn.request(v.VHOST_USER_SET_MEM_TABLE, payload, [m.fd for m in memories],
                         what=f"share {len(regions)} memory region(s), {total:#x} bytes", timeout=self.memory_timeout)
            self._res.memories = memories
            # DPDK's vhost library compares a new table with the old one by addresses and sizes
            # only ("memory regions not changed"): memory mapped where an older table's was
            # would be taken for the old memfd, and the back-end would keep using the old
            # pages. Keeping every shared memory mapped until its table is replaced means a
            # new memory never lands at a shared one's address.
            self._res.mapped = [m.view(0, 1) for m in memories]
            self._regions = regions

    def _check_ring_area(self, what: str, address: int, size: int, align: int) -> None:
        if address % align:
            raise ValueError(f"{what} at {address:#x} is not {align}-byte aligned (Virtio 1.2 2.7)")
        for r in self._regions:
            if r.userspace_addr <= address and address + size <= r.user_end:
                return
        raise ValueError(
            f"{what} [{address:#x}, +{size:#x}) is not inside the memory shared with set_memory() "
            f"({', '.join(f'[{r.userspace_addr:#x}, +{r.memory_size:#x})' for r in self._regions) or 'none'})"
        )

    # --- queues ("VHOST_USER_SET_VRING_*", "Ring states") --------------------------------------

    def _check_index(self, index: int) -> None:
        limit = 2 * self.max_queue_pairs
        if not 0 <= index < limit:
            raise ValueError(f"vring {index}: the backend has {self.max_queue_pairs} queue pair(s), "
                             f"vrings 0..{limit - 1}")

    def setup_queue(
        self,
        index: int,
        size: int,
        desc: int,
        avail: int,
        used: int,
        kick_fd: int | None,
        call_fd: int | None,
        *,
        base: int = 0,
    ) -> None:
        """Start vring ``index``: SET_VRING_CALL, NUM, BASE, ADDR, then KICK (DPDK's order).

        ``desc``/``avail``/``used`` are user addresses inside the shared memory (with
        pmd's IOVA = VA, ``vq.desc_iova`` and friends). ``kick_fd`` is the eventfd pmd
        signals after adding buffers (``vq.set_notify_eventfd``), ``call_fd`` the one
        the back-end signals after using them; ``None`` sends the no-fd flag (the other
        side polls). pmd keeps duplicates of both until ``close()``. ``base`` is the
        avail index to start from (0 for a new ring; the saved one to resume). With
        protocol features negotiated the ring starts disabled: :meth:`enable_queue`.
        """
        self._check_index(index)
        if size < 1 or size > v.MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"vring size must be a power of two from 1 to {v.MAX_QUEUE_SIZE}, not {size}")
        if not 0 <= base <= 0xFFFFFFFF:
            raise ValueError(f"vring base {base} does not fit 32 bits")
        for name, fd in (("kick_fd", kick_fd), ("call_fd", call_fd)):
            if fd is not None and (not isinstance(fd, int) or fd < 0):
                raise ValueError(f"{name} must be an open eventfd or None, not {fd!r}")
        conn = self._live(f"set up vring {index}")
        with conn.lock:
            if self.features is None:
                raise vhost_user_error(f"vhost-user {self.name}: negotiate() the features before setting up vrings",
                                       errno.EINVAL)
            if not self._regions:
                raise vhost_user_error(f"vhost-user {self.name}: set_memory() before setting up vrings", errno.EINVAL)
            old = self._res.queues.get(index)
            if old is not None and old.started:
                raise vhost_user_error(f"vhost-user {self.name}: vring {index} is running; stop_queue() it first",
                                       errno.EBUSY)
            if self._res.packed:   # Virtio 1.2 2.8.13: the ring, then two 4-byte event areas
                self._check_ring_area(f"vring {index} descriptor ring", desc, 16 * size, 16)
                self._check_ring_area(f"vring {index} driver event area", avail, 4, 4)
                self._check_ring_area(f"vring {index} device event area", used, 4, 4)
            else:
                self._check_ring_area(f"vring {index} descriptor table", desc, 16 * size, 16)
                self._check_ring_area(f"vring {index} avail ring", avail, 6 + 2 * size, 2)
                self._check_ring_area(f"vring {index} used ring", used, 6 + 8 * size, 4)
            dups: list[int] = []
            try:
                kick = self._dup(kick_fd, dups)
                call = self._dup(call_fd, dups)
                # "make sure VHOST_SET_VRING_CALL come firstly" (DPDK virtio-user: older back-ends
                # allocate the vring on it) and KICK last (the ring starts on it).
                conn.request(v.VHOST_USER_SET_VRING_CALL, v.encode_vring_file(index, call >= 0),
                             [call] if call >= 0 else [], what=f"vring {index}: call eventfd")
                conn.request(v.VHOST_USER_SET_VRING_NUM, v.encode_vring_state(index, size),
                             what=f"vring {index}: size {size}")
                conn.request(v.VHOST_USER_SET_VRING_BASE, v.encode_vring_state(index, base),
                             what=f"vring {index}: base {base}")
                conn.request(v.VHOST_USER_SET_VRING_ADDR, v.encode_vring_addr(v.VringAddr(index, 0, desc, used, avail)),
                             what=f"vring {index}: addresses")
                conn.request(v.VHOST_USER_SET_VRING_KICK, v.encode_vring_file(index, kick >= 0),
                             [kick] if kick >= 0 else [], what=f"vring {index}: kick eventfd")
            except BaseException:
                v.close_fds(dups)
                raise
            self._res.drop_queue_fds(old)
            enabled = not self.backend_features >> v.VHOST_USER_F_PROTOCOL_FEATURES & 1  # "Ring states"
            self._res.queues[index] = QueueState(index, size, desc, avail, used, kick, call, base, True, enabled)

    @staticmethod
    def _dup(fd: int | None, dups: list[int]) -> int:
        if fd is None:
            return -1
        try:
            copy = os.dup(fd)  # close-on-exec, as every fd Python creates
        except OSError as exc:
            raise ValueError(f"eventfd {fd} is not an open file descriptor ({exc.strerror})") from None
        dups.append(copy)
        try:
            kind = os.readlink(f"/proc/self/fd/{copy}")
        except OSError:
            return copy  # no /proc: take it on trust
        if kind != "anon_inode:[eventfd]":
            # the back-end writes 8-byte counters into it: a file or a socket would be corrupted
            raise ValueError(f"fd {fd} is not an eventfd ({kind}); create one with os.eventfd or "
                             "pmd.driver.interrupts.EventFd")
        return copy

    def enable_queue(self, index: int, on: bool = True) -> None:
        """SET_VRING_ENABLE: a disabled ring is processed without side effects ("Ring states").

        Only with protocol features negotiated; without them rings are always enabled
        and ``enable_queue(i, True)`` does nothing.
        """
        self._check_index(index)
        conn = self._live(f"{'enable' if on else 'disable'} vring {index}")
        with conn.lock:
            if not self.backend_features >> v.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                if on:
                    return
                raise vhost_user_error(f"vhost-user {self.name}: the backend has no protocol features, so rings "
                                       "cannot be disabled (stop_queue() stops one)", errno.ENOTSUP)
            conn.request(v.VHOST_USER_SET_VRING_ENABLE, v.encode_vring_state(index, int(on)),
                         what=f"{'enable' if on else 'disable'} vring {index}")
            state = self._res.queues.get(index)
            if state is not None:
                self._res.queues[index] = replace(state, enabled=on)

    def stop_queue(self, index: int) -> int:
        """Disable vring ``index``, then GET_VRING_BASE: the back-end stops it and answers the
        next avail index it would have processed, which is returned and kept (the base to
        resume from). For a packed ring the 32-bit value holds both indices
        (:func:`pmd.abi.vhost_user.decode_packed_base`)."""
        self._check_index(index)
        conn = self._live(f"stop vring {index}")
        with conn.lock:
            state = self._res.queues.get(index)
            if state is None or not state.started:
                raise vhost_user_error(f"vhost-user {self.name}: vring {index} is not running", errno.EINVAL)
            if state.enabled and self.backend_features >> v.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                self.enable_queue(index, False)  # DPDK's virtio-user disables before it stops
            what = f"stop vring {index}"
            msg = conn.request(v.VHOST_USER_GET_VRING_BASE, v.encode_vring_state(index, 0), what=what, reply=True)
            assert msg is not None
            try:
                got = v.decode_vring_state(msg.payload, "GET_VRING_BASE reply")
                if got.index != index:
                    raise v.message_error(f"GET_VRING_BASE reply is for vring {got.index}, not {index}")
                base = got.num if self._res.packed else v.decode_split_base(got.num, "GET_VRING_BASE reply")
            except v.MessageError as exc:
                raise conn.fail(what, str(exc)) from None
            self._res.queues[index] = replace(self._res.queues[index], base=base, started=False, enabled=False)
            return base
