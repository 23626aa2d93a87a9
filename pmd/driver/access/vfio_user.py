"""vfio-user client: a PCI device served by another process, reached over a UNIX socket.

``VfioUserAccess.connect(path)`` implements :class:`pmd.driver.access.DeviceAccess`
with vfio-user messages instead of kernel VFIO ioctls::

    connect(path)
    VERSION            propose 0.1 with {"capabilities": {"max_msg_fds", "max_data_xfer_size"}}
    DEVICE_GET_INFO    flags (RESET, PCI), number of regions and IRQ indexes
    DEVICE_GET_REGION_INFO  for every region: flags, size, mmap offset, sparse areas;
                            an mmap-able region's file comes with the reply (SCM_RIGHTS)
    config space and unmapped areas: REGION_READ / REGION_WRITE messages
    memory BARs: mmap(the region's fd, offset + area) for each sparse area (RegionMapping)
    DMA: DMA_MAP with the memory's fd (SCM_RIGHTS); map_memory() uses IOVA = virtual address
    interrupts: DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS with eventfds (SCM_RIGHTS)
    DEVICE_RESET

Every request waits for its reply at most ``timeout`` seconds (5 by default);
the reply must carry the request's message id and command, and an error reply
becomes a :class:`pmd.errors.VfioError` with the server's errno. A request that
times out, a reply that breaks the framing or the protocol, or a server that
closed the connection leaves the connection *broken*: the socket is closed at
once and every later request fails immediately, saying why. ``alive`` tells
without a request whether the server is still there.

One lock serialises request and reply, so the object may be shared by threads.
``close()`` (idempotent, also at interpreter exit) disables the interrupts and
undoes the DMA maps it made while the server still answers (one second at
most), unmaps the regions, and closes the region files and the socket.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import socket
import time
import weakref
from collections.abc import Callable, Sequence

from ...errors import VfioError, vfio_error
from ...memory.seals import require_sealed
from ...abi import vfio_user as p
from ...abi.vfio import (
    PCI_CONFIG_REGION_INDEX,
    PCI_NUM_IRQS,
    PCI_NUM_REGIONS,
    REGION_INFO_FLAG_MMAP,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    DeviceInfo,
    IrqInfo,
    RegionInfo,
)
from ..session import LossWatcher, Session
from . import DeviceAccess, RegionMapping

__all__ = ["VfioUserAccess", "DEFAULT_TIMEOUT"]

log = logging.getLogger("pmd.vfio_user.client")

DEFAULT_TIMEOUT = 5.0
_FIRST_REGION_INFO_ARGSZ = 1024
_CLOSE_BUDGET = 1.0  # seconds close() may spend telling the server to drop IRQs and DMA maps


class _Connection(Session):
    """The socket and the request/reply machinery; no reference to the device (for the finalizer)."""

    protocol = "vfio-user"
    kind = "vfio-user device"
    log = log
    gone = "the server closed the connection"
    what_breaks = "the connection to the server"
    remedy = "close this device and connect again"

    def __init__(self, sock: socket.socket, name: str, timeout: float) -> None:
        super().__init__(sock, name, timeout)
        self.next_id = 0
        self.peer_caps = p.Capabilities()
        self.max_size = p.max_message_size(p.MAX_DATA_XFER_SIZE)

    def error(self, message: str, err: int) -> VfioError:
        return vfio_error(message, err)

    # --- limits agreed in VERSION ---

    @property
    def max_xfer(self) -> int:
        return max(1, min(self.peer_caps.max_data_xfer_size, p.MAX_DATA_XFER_SIZE))

    @property
    def max_fds(self) -> int:
        return max(1, min(self.peer_caps.max_msg_fds, p.MAX_MSG_FDS))

    # --- request / reply ---

    def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        what: str,
        timeout: float | None = None,
    ) -> p.Message:
        with self.lock:
            return self.request_locked(command, payload, fds, what=what, timeout=timeout)

    def request_locked(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        what: str,
        timeout: float | None = None,
    ) -> p.Message:
        """One request and its reply (the caller holds ``lock``). The reply's fds are the caller's."""
        sock = self.sock
        if sock is None or self.broken is not None or self.closed:
            raise self.unusable(what)
        if len(fds) > self.max_fds:
            raise ValueError(f"{len(fds)} fds in one message; the server takes at most {self.max_fds}")
        limit = self.timeout if timeout is None else timeout
        deadline = p.deadline_after(limit)
        msg_id = self.next_id
        self.next_id = (msg_id + 1) & 0xFFFF
        self.requests += 1
        name = p.command_name(command)
        try:
            p.send_message(sock, p.encode_message(msg_id, command, payload), fds, deadline)
        except TimeoutError:
            self.break_(f"sending {name} took longer than {limit} s")
            raise vfio_error(
                f"vfio-user {self.name}: {what}: the server did not take the {name} request within {limit} s "
                "(it is stuck); the connection is closed",
                errno.ETIMEDOUT,
            ) from None
        except OSError as exc:
            self.break_(f"sending {name} failed: {exc.strerror or exc}")
            raise vfio_error(
                f"vfio-user {self.name}: {what}: the server is gone ({exc.strerror or exc} while sending {name}); "
                "it exited or crashed",
                exc.errno or errno.EPIPE,
            ) from None
        while True:
            try:
                reply = p.recv_message(sock, deadline=deadline, max_size=self.max_size, max_fds=p.MAX_MSG_FDS)
            except p.MessageError as exc:
                if exc.errno == errno.ETIMEDOUT:
                    self.break_(f"no reply to {name} within {limit} s")
                    raise vfio_error(
                        f"vfio-user {self.name}: {what}: no reply to {name} within {limit} s; the server is stuck "
                        "or gone, and the connection is closed",
                        errno.ETIMEDOUT,
                    ) from None
                self.break_(f"bad reply to {name}: {exc}")
                raise vfio_error(f"vfio-user {self.name}: {what}: {exc}; the connection is closed", exc.errno) from None
            if reply is None:
                self.break_(f"the server closed the connection while {name} waited for its reply")
                raise vfio_error(
                    f"vfio-user {self.name}: {what}: the server closed the connection before answering {name} "
                    "(it exited or crashed)",
                    errno.ECONNRESET,
                )
            try:
                p.check_flags(reply)
            except p.MessageError as exc:
                reply.close_fds()
                self.break_(str(exc))
                raise vfio_error(f"vfio-user {self.name}: {what}: {exc}; the connection is closed", errno.EPROTO) from None
            if not reply.is_reply:
                self._refuse_server_command(sock, reply)
                continue
            if reply.msg_id != msg_id or reply.command != command:
                reply.close_fds()
                text = (
                    f"the reply names {reply.name} id {reply.msg_id}, but the request was {name} id {msg_id}"
                )
                self.break_(text)
                raise vfio_error(f"vfio-user {self.name}: {what}: {text}; the connection is closed", errno.EPROTO)
            if reply.fds_truncated:
                raise vfio_error(
                    f"vfio-user {self.name}: {what}: the {name} reply carried more than {p.MAX_MSG_FDS} file "
                    "descriptors (discarded)",
                    errno.EPROTO,
                )
            if reply.is_error:
                reply.close_fds()
                err = reply.error if 0 < reply.error < 4096 else errno.EIO
                raise vfio_error(
                    f"vfio-user {self.name}: {what}: the server refused {name}: {os.strerror(err)} "
                    f"({errno.errorcode.get(err, err)})",
                    err,
                )
            return reply

    def _refuse_server_command(self, sock: socket.socket, msg: p.Message) -> None:
        """The server sent a command (DMA_READ/WRITE, ...): pmd shares its memory by fd and serves none."""
        log.warning("vfio-user %s: refusing %s from the server", self.name, msg.describe())
        msg.close_fds()
        if msg.no_reply:
            return
        data = p.encode_message(msg.msg_id, msg.command, b"", p.TYPE_REPLY | p.FLAG_ERROR, errno.ENOTSUP)
        try:
            p.send_message(sock, data, (), p.deadline_after(self.timeout))
        except OSError:
            pass  # the request in progress finds out


class _Resources:
    """Everything a VfioUserAccess holds, released in reverse order by ``release``."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.region_fds: dict[int, int] = {}  # region index -> fd from the server
        self.mappings: list[RegionMapping] = []
        self.dma: dict[int, tuple[int, int]] = {}  # iova -> (vaddr, size)
        self.irqs: dict[int, int] = {}  # irq index -> vectors set
        self.watcher: LossWatcher | None = None
        self.closed = False

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watcher is not None:  # our own close is no loss: stop watching first
            self.watcher.stop()
            self.watcher = None
        conn = self.conn
        conn.end(lambda: self._tell_server(conn))
        for mapping in reversed(self.mappings):
            mapping.close()
        self.mappings.clear()
        for fd in self.region_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.region_fds.clear()
        conn.close()

    def _tell_server(self, conn: _Connection) -> None:
        """Disable IRQs and undo DMA maps while the server answers (it also does so when we go)."""
        deadline = time.monotonic() + _CLOSE_BUDGET
        steps: list[tuple[int, bytes, str]] = []
        for index in reversed(list(self.irqs)):
            payload = p.encode_set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, index, 0, 0)
            steps.append((p.VFIO_USER_DEVICE_SET_IRQS, payload, f"disable IRQ index {index}"))
        for iova, (_vaddr, size) in reversed(list(self.dma.items())):
            steps.append((p.VFIO_USER_DMA_UNMAP, p.encode_dma_unmap(iova, size), f"DMA unmap {iova:#x}"))
        for command, payload, what in steps:
            left = deadline - time.monotonic()
            if left <= 0 or conn.broken is not None:
                break
            try:
                reply = conn.request_locked(command, payload, what=f"close: {what}", timeout=left)
                reply.close_fds()
            except VfioError as exc:
                log.debug("vfio-user %s: close: %s", conn.name, exc)
        self.irqs.clear()
        self.dma.clear()


class VfioUserAccess(DeviceAccess):
    """A device behind a vfio-user server (see the module documentation).

    ``VfioUserAccess.connect(path, timeout=5.0)``; ``from_socket(sock)`` takes
    an already connected stream socket (a socketpair in tests).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        sock: socket.socket | None = None,
        name: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if sock is None:
            if socket_path is None:
                raise ValueError("VfioUserAccess needs a socket path (or a connected socket)")
            self.socket_path: str | None = os.fspath(socket_path)
            sock = self._connect_socket(self.socket_path, timeout)
        else:
            self.socket_path = None if socket_path is None else os.fspath(socket_path)
        self.name = name or self.socket_path or "vfio-user"
        self.timeout = timeout
        self._conn = _Connection(sock, self.name, timeout)
        self._res = _Resources(self._conn)
        self._finalizer = weakref.finalize(self, self._res.release)
        self._regions: dict[int, RegionInfo] = {}
        self._irq_infos: dict[int, IrqInfo] = {}
        self.version: tuple[int, int] = (0, 0)
        try:
            self._open()
        except BaseException:
            self._finalizer()
            raise

    @classmethod
    def connect(cls, socket_path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> VfioUserAccess:
        """Connect to the vfio-user server at ``socket_path`` and learn the device."""
        return cls(socket_path, timeout=timeout)

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, name: str = "vfio-user", timeout: float = DEFAULT_TIMEOUT
    ) -> VfioUserAccess:
        """Use an already connected ``AF_UNIX`` stream socket (the device owns it from now on)."""
        return cls(None, timeout=timeout, sock=sock, name=name)

    @staticmethod
    def _connect_socket(path: str, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise vfio_error(
                f"no vfio-user server at {path} (the socket does not exist): start one first, "
                f"for example `pmd sim --socket {path}`",
                errno.ENOENT,
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise vfio_error(
                f"nothing listens on {path}: the vfio-user server that made it has exited (a stale socket file)",
                errno.ECONNREFUSED,
            ) from None
        except PermissionError as exc:
            sock.close()
            raise vfio_error(
                f"permission denied connecting to {path}: the socket is mode 0600 by default, so only the user "
                "that started the server (or root) may connect",
                exc.errno,
            ) from None
        except OSError as exc:
            sock.close()
            raise vfio_error(f"cannot connect to the vfio-user server at {path}: {exc.strerror or exc}", exc.errno) from None
        return sock

    # --- opening ----------------------------------------------------------------

    def _open(self) -> None:
        conn = self._conn
        ours = p.Capabilities(max_msg_fds=p.MAX_MSG_FDS, max_data_xfer_size=p.MAX_DATA_XFER_SIZE)
        try:
            reply = conn.request(
                p.VFIO_USER_VERSION,
                p.encode_version(p.VFIO_USER_MAJOR, p.VFIO_USER_MINOR, ours),
                what="version negotiation",
            )
        except VfioError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise vfio_error(
                    f"{exc}; a vfio-user server serves one client at a time and closes any other connection: "
                    "is another client connected?",
                    exc.errno,
                ) from None
            raise
        reply.close_fds()
        try:
            major, minor, caps = p.decode_version(reply.payload)
        except p.MessageError as exc:
            conn.break_(str(exc))
            raise vfio_error(f"vfio-user {self.name}: version negotiation: {exc}", errno.EPROTO) from None
        if major != p.VFIO_USER_MAJOR or minor > p.VFIO_USER_MINOR:
            conn.break_(f"server answered version {major}.{minor}")
            raise vfio_error(
                f"vfio-user {self.name}: the server answered protocol version {major}.{minor} to pmd's "
                f"{p.VFIO_USER_MAJOR}.{p.VFIO_USER_MINOR} (it must keep the major and not raise the minor)",
                errno.EPROTO,
            )
        self.version = (major, minor)
        conn.peer_caps = caps
        reply = conn.request(p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request(), what="device info")
        reply.close_fds()
        try:
            self._device_info = p.decode_device_info(reply.payload)
        except p.MessageError as exc:
            raise vfio_error(f"vfio-user {self.name}: {exc}", errno.EPROTO) from None
        if not self._device_info.is_pci:
            raise vfio_error(
                f"vfio-user {self.name}: the device is not a PCI device (flags {self._device_info.flags:#x})",
                errno.ENODEV,
            )
        if self._device_info.num_regions <= PCI_CONFIG_REGION_INDEX:
            raise vfio_error(
                f"vfio-user {self.name}: the device has {self._device_info.num_regions} regions, "
                "so no PCI configuration space (region 7)",
                errno.ENODEV,
            )
        for index in range(self._device_info.num_regions):
            self.region_info(index)
        if self._regions[PCI_CONFIG_REGION_INDEX].size == 0:
            raise vfio_error(f"vfio-user {self.name}: the configuration space region is empty", errno.ENODEV)
        log.debug(
            "connected to %s: vfio-user %d.%d, %d regions, %d IRQ indexes, max_data_xfer_size %d, max_msg_fds %d",
            self.name,
            major,
            minor,
            self._device_info.num_regions,
            self._device_info.num_irqs,
            caps.max_data_xfer_size,
            caps.max_msg_fds,
        )

    # --- state --------------------------------------------------------------------

    def _live(self) -> _Resources:
        if self._res.closed:
            raise vfio_error(f"vfio-user device {self.name} is closed", errno.EBADF)
        return self._res

    @property
    def closed(self) -> bool:
        return self._res.closed

    @property
    def alive(self) -> bool:
        """Whether the server is still connected (no request: a poll of the socket)."""
        return not self._res.closed and self._conn.alive()

    def on_lost(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(reason)`` once, from a watcher thread, when the server goes
        away (exits, closes the connection, or the connection breaks); returns a
        function that cancels it. The watcher starts with the first callback and
        stops at ``close()``. A callback added after the loss is called at once."""
        res = self._live()
        if res.watcher is None:
            res.watcher = LossWatcher(self._conn)
        return res.watcher.add(callback)

    def check_alive(self) -> None:
        """Raise :class:`VfioError` when the server is gone (for a watchdog on the data path)."""
        if not self.alive:
            raise self._conn.unusable("go on")

    @property
    def broken(self) -> str | None:
        """Why the connection was given up, or ``None`` while it works."""
        return self._conn.broken

    @property
    def server_capabilities(self) -> p.Capabilities:
        return self._conn.peer_caps

    @property
    def requests(self) -> int:
        """How many requests were sent (tests count messages with it)."""
        return self._conn.requests

    @property
    def device_info(self) -> DeviceInfo:
        return self._device_info

    @property
    def dma_mappings(self) -> dict[int, tuple[int, int]]:
        return dict(self._res.dma)

    @property
    def enabled_irqs(self) -> dict[int, int]:
        return dict(self._res.irqs)

    def close(self) -> None:
        self._forget_memory()
        self._finalizer()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("broken" if self.broken else "connected")
        return f"<VfioUserAccess {self.name} {state}>"

    # --- regions --------------------------------------------------------------------

    def region_info(self, index: int) -> RegionInfo:
        cached = self._regions.get(index)
        if cached is not None:
            return cached
        res = self._live()
        if not 0 <= index < self._device_info.num_regions:
            if 0 <= index < PCI_NUM_REGIONS:  # a PCI region the device does not count: size 0, as vfio-pci
                info = RegionInfo(index=index, flags=0, offset=0, size=0)
                self._regions[index] = info
                return info
            raise ValueError(f"{self.name} has regions 0..{self._device_info.num_regions - 1}, not {index}")
        argsz = _FIRST_REGION_INFO_ARGSZ
        for _attempt in range(2):
            try:
                reply = self._conn.request(
                    p.VFIO_USER_DEVICE_GET_REGION_INFO,
                    p.encode_region_info_request(index, argsz),
                    what=f"region {index} info",
                )
            except VfioError as exc:
                if exc.errno != errno.EINVAL or self._conn.broken is not None:
                    raise
                info = RegionInfo(index=index, flags=0, offset=0, size=0)  # as vfio-pci: no such region
                self._regions[index] = info
                return info
            fds = reply.take_fds()
            try:
                needed, info = p.decode_region_info(reply.payload, index)
                if len(fds) > 1:
                    raise p.message_error(f"region {index} info came with {len(fds)} file descriptors, not 0 or 1")
            except p.MessageError as exc:
                p.close_fds(fds)
                raise vfio_error(f"vfio-user {self.name}: {exc}", errno.EPROTO) from None
            if needed > len(reply.payload) and needed > argsz:
                p.close_fds(fds)
                if needed > p.MAX_INFO_SIZE:
                    raise vfio_error(
                        f"vfio-user {self.name}: region {index} info needs {needed} bytes (pmd takes {p.MAX_INFO_SIZE})",
                        errno.E2BIG,
                    )
                argsz = needed
                continue
            break
        else:
            raise vfio_error(f"vfio-user {self.name}: region {index} info kept growing", errno.EPROTO)
        if info.flags & REGION_INFO_FLAG_MMAP and info.size:
            if fds:
                fd = fds.pop()
                if index in res.region_fds:  # another thread asked at the same time: keep the first
                    fds.append(fd)
                else:
                    res.region_fds[index] = fd
            else:
                log.warning("vfio-user %s: region %d is marked mmap-able but no fd came: using messages", self.name, index)
                info = dataclasses.replace(info, flags=info.flags & ~REGION_INFO_FLAG_MMAP)
        p.close_fds(fds)
        self._regions[index] = info
        return info

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        self._live()
        info = self.region_info(index)
        self._check_range(info, offset, size, write=False)
        out = bytearray()
        step = self._conn.max_xfer
        while len(out) < size:
            at, n = offset + len(out), min(step, size - len(out))
            what = f"REGION_READ of {n} bytes at {at:#x} of region {index}"
            reply = self._conn.request(p.VFIO_USER_REGION_READ, p.encode_region_access(at, index, n), what=what)
            reply.close_fds()
            try:
                got = p.decode_region_access(reply.payload, f"{what}: reply", with_data=True, max_count=n)
                if (got.offset, got.region, got.count) != (at, index, n):
                    raise p.message_error(
                        f"{what}: the reply is for {got.count} bytes at {got.offset:#x} of region {got.region}"
                    )
            except p.MessageError as exc:
                raise vfio_error(f"vfio-user {self.name}: {exc}", errno.EPROTO) from None
            out += got.data
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._live()
        info = self.region_info(index)
        data = bytes(data)
        self._check_range(info, offset, len(data), write=True)
        step = self._conn.max_xfer
        done = 0
        while done < len(data):
            at, chunk = offset + done, data[done : done + step]
            what = f"REGION_WRITE of {len(chunk)} bytes at {at:#x} of region {index}"
            reply = self._conn.request(
                p.VFIO_USER_REGION_WRITE, p.encode_region_access(at, index, len(chunk), chunk), what=what
            )
            reply.close_fds()
            try:
                got = p.decode_region_access(reply.payload, f"{what}: reply", with_data=False, max_count=len(chunk))
                if (got.offset, got.region, got.count) != (at, index, len(chunk)):
                    raise p.message_error(
                        f"{what}: the reply is for {got.count} bytes at {got.offset:#x} of region {got.region}"
                    )
            except p.MessageError as exc:
                raise vfio_error(f"vfio-user {self.name}: {exc}", errno.EPROTO) from None
            done += len(chunk)

    def map_region(self, index: int) -> RegionMapping:
        res = self._live()
        info = self.region_info(index)
        if info.size == 0:
            raise vfio_error(f"{self.name} has no region {index} (size 0: BAR not implemented)", errno.ENODEV)
        if not info.mmappable:
            raise vfio_error(
                f"{self.name} region {index} cannot be mmapped (flags {info.describe_flags()}); "
                "use region_read/region_write",
                errno.EINVAL,
            )
        areas = info.mmap_areas()
        if not areas:
            raise vfio_error(
                f"{self.name} region {index}: the server allows no part of it to be mapped "
                "(sparse mmap capability with no areas); use region_read/region_write",
                errno.EINVAL,
            )
        fd = res.region_fds[index]
        if info.offset % mmap.PAGESIZE:
            raise vfio_error(
                f"{self.name} region {index}: mmap offset {info.offset:#x} is not page aligned", errno.EINVAL
            )
        # A file the server could shrink under the mapping would kill this process with SIGBUS:
        # it must be sealed (F_SEAL_SHRINK) and long enough; seals cannot be removed later.
        end = info.offset + max(a.end for a in areas)
        require_sealed(fd, end, f"{self.name} region {index}: the server's file")
        mapping = RegionMapping(index, fd, info.offset, info.size, areas)
        res.mappings.append(mapping)
        return mapping

    # --- DMA ----------------------------------------------------------------------------

    def dma_map(self, vaddr: int, iova: int, size: int, fd: int = -1, fd_offset: int = 0) -> None:
        """``DMA_MAP``: the server maps ``size`` bytes of ``fd`` at ``fd_offset`` and reaches them at ``iova``.

        vfio-user shares memory by file: ``fd`` is required (a :class:`pmd.DmaMemory`
        has one: :meth:`map_memory` passes it); ``vaddr`` is only recorded.
        """
        res = self._live()
        page = mmap.PAGESIZE
        if fd < 0:
            raise ValueError(
                "vfio-user DMA needs the memory's file descriptor (pmd.DmaMemory.fd): the server maps the "
                "memory from it (pmd does not serve DMA_READ/DMA_WRITE)"
            )
        if size <= 0 or iova % page or size % page or fd_offset % page or fd_offset < 0:
            raise ValueError(
                f"DMA map needs a page-aligned ({page:#x}) iova and file offset and a positive page-multiple "
                f"size; got iova {iova:#x}, offset {fd_offset:#x}, size {size:#x}"
            )
        if iova + size > 1 << 64:
            raise ValueError(f"DMA map [{iova:#x}, +{size:#x}) wraps past 2^64")
        for other, (_v, other_size) in res.dma.items():
            if iova < other + other_size and other < iova + size:
                raise vfio_error(
                    f"DMA map at IOVA [{iova:#x}, {iova + size:#x}) overlaps the mapping at "
                    f"[{other:#x}, {other + other_size:#x})",
                    errno.EEXIST,
                )
        reply = self._conn.request(
            p.VFIO_USER_DMA_MAP,
            p.encode_dma_map(iova, size, fd_offset),
            [fd],
            what=f"DMA_MAP of {size:#x} bytes at IOVA {iova:#x}",
        )
        reply.close_fds()
        res.dma[iova] = (vaddr, size)

    def dma_unmap(self, iova: int, size: int) -> None:
        res = self._live()
        entry = res.dma.get(iova)
        if entry is None or entry[1] != size:
            known = ", ".join(f"{i:#x}+{s:#x}" for i, (_v, s) in res.dma.items()) or "none"
            raise vfio_error(
                f"no DMA mapping at IOVA {iova:#x} of size {size:#x} to unmap (mappings: {known})", errno.ENOENT
            )
        what = f"DMA_UNMAP of {size:#x} bytes at IOVA {iova:#x}"
        try:
            reply = self._conn.request(p.VFIO_USER_DMA_UNMAP, p.encode_dma_unmap(iova, size), what=what)
        except VfioError:
            if self._conn.broken is not None:
                del res.dma[iova]  # the server drops every mapping when the connection goes
            raise
        reply.close_fds()
        del res.dma[iova]
        if reply.payload:  # the spec has the server echo the request; an empty reply is accepted too
            try:
                echo = p.decode_dma_unmap(reply.payload, f"{what}: reply")
            except p.MessageError as exc:
                raise vfio_error(f"vfio-user {self.name}: {exc}", errno.EPROTO) from None
            if (echo.address, echo.size) != (iova, size):
                raise vfio_error(
                    f"vfio-user {self.name}: {what}: the reply names {echo.size:#x} bytes at {echo.address:#x}",
                    errno.EPROTO,
                )

    # --- interrupts ---------------------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        cached = self._irq_infos.get(index)
        if cached is not None:
            return cached
        self._live()
        if not 0 <= index < self._device_info.num_irqs:
            if 0 <= index < PCI_NUM_IRQS:
                # A PCI interrupt kind the device does not count (a server reporting fewer than
                # vfio-pci's 5 indexes): it has none, as vfio-pci's EINVAL means on the kernel path.
                info = IrqInfo(index=index, flags=0, count=0)
                self._irq_infos[index] = info
                return info
            raise ValueError(f"{self.name} has IRQ indexes 0..{self._device_info.num_irqs - 1}, not {index}")
        reply = self._conn.request(
            p.VFIO_USER_DEVICE_GET_IRQ_INFO, p.encode_irq_info_request(index), what=f"IRQ index {index} info"
        )
        reply.close_fds()
        try:
            info = p.decode_irq_info(reply.payload, index)
        except p.MessageError as exc:
            raise vfio_error(f"vfio-user {self.name}: {exc}", errno.EPROTO) from None
        self._irq_infos[index] = info
        return info

    def set_irqs(self, index: int, start: int, fds: Sequence[int]) -> None:
        """``DEVICE_SET_IRQS`` (``DATA_EVENTFD | ACTION_TRIGGER``): vector ``start + i`` signals ``fds[i]``.

        ``-1`` in ``fds`` takes the eventfd away from that vector. Runs of real
        fds go in messages of at most the server's ``max_msg_fds``.
        """
        res = self._live()
        info = self.irq_info(index)
        if not fds:
            raise ValueError("set_irqs needs at least one eventfd (use disable_irqs to turn an index off)")
        if start < 0 or start + len(fds) > info.count:
            raise vfio_error(
                f"{self.name} {info.name} has {info.count} vector(s); cannot set {start}..{start + len(fds) - 1}",
                errno.EINVAL,
            )
        if not info.eventfd:
            raise vfio_error(f"{self.name} {info.name} does not signal through eventfds", errno.ENOTSUP)
        if any(fd < -1 for fd in fds):
            raise ValueError(f"eventfds must be file descriptors or -1, not {list(fds)}")
        flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
        i = 0
        while i < len(fds):
            if fds[i] < 0:
                j = i
                while j < len(fds) and fds[j] < 0:
                    j += 1
                run: list[int] = []
            else:
                j = i
                while j < len(fds) and fds[j] >= 0 and j - i < self._conn.max_fds:
                    j += 1
                run = list(fds[i:j])
            what = f"{info.name} vectors {start + i}..{start + j - 1} on eventfds {run or 'none'}"
            reply = self._conn.request(
                p.VFIO_USER_DEVICE_SET_IRQS, p.encode_set_irqs(flags, index, start + i, j - i), run, what=what
            )
            reply.close_fds()
            i = j
        res.irqs[index] = max(res.irqs.get(index, 0), start + len(fds))

    def disable_irqs(self, index: int) -> None:
        res = self._live()
        info = self.irq_info(index)
        reply = self._conn.request(
            p.VFIO_USER_DEVICE_SET_IRQS,
            p.encode_set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, index, 0, 0),
            what=f"disable {info.name}",
        )
        reply.close_fds()
        res.irqs.pop(index, None)

    def unmask_irq(self, index: int, start: int = 0, count: int = 1) -> None:
        self._live()
        info = self.irq_info(index)
        reply = self._conn.request(
            p.VFIO_USER_DEVICE_SET_IRQS,
            p.encode_set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, index, start, count),
            what=f"unmask {info.name} {start}..{start + count - 1}",
        )
        reply.close_fds()

    # --- reset ----------------------------------------------------------------------------------

    def reset(self) -> None:
        self._live()
        if not self._device_info.supports_reset:
            raise vfio_error(
                f"{self.name} does not support DEVICE_RESET (device flags {self._device_info.flags:#x} lack "
                "VFIO_DEVICE_FLAGS_RESET); reset it through the virtio device_status register instead",
                errno.ENOTSUP,
            )
        reply = self._conn.request(p.VFIO_USER_DEVICE_RESET, what="device reset")
        reply.close_fds()
