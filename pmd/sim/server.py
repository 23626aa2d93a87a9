"""A vfio-user server: one device model behind a UNIX socket, one client at a time.

``VfioUserServer(model, "/run/pmd/dev0.sock")`` binds and listens at once (the
socket file is created mode 0600 unless ``mode`` says otherwise; an existing
file that is not a socket is never replaced, nor a socket another server still
listens on). ``serve_forever()`` (or ``serve_in_thread()``) accepts a client,
answers its messages by calling the :class:`DeviceModel`,
and when the client goes (or is dropped for breaking the framing) calls
``model.client_gone()`` and accepts the next one. While a client is connected,
another connection is accepted and closed at once (the protocol is one socket
per client). ``close()`` stops serving, ends the session and removes the
socket file.

Every message is validated before the model sees it (sizes, indexes, ranges,
flags, file descriptors; what a model may rely on follows). A malformed message that is still correctly framed gets an error
reply with an errno; a message that breaks the framing (a size below the
header or above the limit, cut short, stalled for longer than ``timeout``)
drops the connection. File descriptors a message carries but does not use are
closed.

**The device model.** What a device served over vfio-user implements: :class:`DeviceModel`.
:class:`VfioUserServer` speaks the protocol; the device
model only answers questions about itself and does what it is told. The server
checks every message before the model sees it, so a model may rely on:

- ``index`` of ``region_*`` below ``num_regions`` of :meth:`DeviceModel.device_info`,
  and of ``irq_info``/``set_irqs`` below ``num_irqs``;
- ``region_read``/``region_write``: ``[offset, offset + size)`` inside the region's
  ``RegionSpec.size``, the region readable (``REGION_INFO_FLAG_READ``) or writable
  (``REGION_INFO_FLAG_WRITE``), ``1 <= size <= max_data_xfer_size``; the
  bytes returned by ``region_read`` must be exactly ``size`` long (else the
  client gets ``EIO``);
- ``set_irqs``: ``start + len(fds) <= count`` of that index; ``fds`` are eventfds
  received from the client, ``-1`` for "no eventfd for this vector any more";
  ``None`` means "disable every interrupt of this index" (close what you hold);
- ``dma_map``: ``size > 0``, ``[iova, iova + size)`` overlaps no current mapping,
  ``fd`` is a regular file (a memfd) at least ``fd_offset + size`` bytes long,
  ``prot`` is ``mmap.PROT_READ | mmap.PROT_WRITE`` (or one of them);
- ``dma_unmap``: ``(iova, size)`` is exactly one current mapping;
- ``reset`` only when ``device_info`` flags have ``VFIO_DEVICE_FLAGS_RESET``;
- ``client_gone`` after the client disconnected, for whatever reason (closed,
  crashed, dropped by the server for a protocol error, or the server closing):
  drop every DMA mapping and close every IRQ fd the model still holds. The spec
  lets a device keep its state for a client that reconnects; a model may also
  reset (the built-in device does: docs/vfio-user.md, section 9).

File descriptors:

- ``RegionSpec.fd`` stays the model's: the server sends a copy of it (``SCM_RIGHTS``
  duplicates it into the client) in each region-info reply and never closes it;
- ``set_irqs``: on return, the model owns every fd in ``fds`` (it keeps them,
  and closes the ones it replaces or no longer needs); if it raises, the
  server closes them all, so a model that raises must not have kept any;
- ``dma_map``: the fd stays the server's and is closed when the call returns:
  a model that maps the memory keeps the mapping (``mmap`` holds its own
  reference to the file), or ``os.dup`` s the fd.

Errors: an exception from the model becomes an error reply whose errno is the
exception's (``OSError``, :class:`pmd.errors.VfioError`), ``EINVAL`` for
``ValueError``/``TypeError``, ``ENOENT`` for ``LookupError``, ``ENOTSUP`` for
``NotImplementedError``, ``ENOMEM`` for ``MemoryError`` and ``EIO`` for anything
else (logged with its traceback). The server goes on serving.

All calls come from the server's one serving thread, one at a time.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import selectors
import socket
import struct
import threading
import weakref
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from ..errors import VfioError, vfio_error
from ..memory.seals import require_sealed
from ..abi import vfio_user as p
from ..abi.vfio import (
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    SparseArea,
)
from ..sockets import bind_socket, check_path, remove_socket, remove_stale

__all__ = ["VfioUserServer", "DeviceModel", "RegionSpec", "errno_for"]

log = logging.getLogger("pmd.vfio_user.server")

_PAGE = mmap.PAGESIZE


@dataclass
class RegionSpec:
    """One region (BAR, config space, ...) as the device presents it.

    ``size == 0``: the device has no such region (an unimplemented BAR).
    With ``REGION_INFO_FLAG_MMAP`` in ``flags`` and ``fd >= 0``, the client may
    map ``mmap_areas`` (each ``(offset, size)`` relative to the region, offsets
    page aligned) from ``fd`` at file offset ``fd_offset + offset``; an empty
    ``mmap_areas`` then means the whole region is mappable. Everything not
    mapped is reached by REGION_READ/REGION_WRITE messages, which the model
    must serve for the whole region (mapped areas included: the spec requires
    both paths to work).
    """

    size: int
    flags: int  # VFIO_REGION_INFO_FLAG_READ | WRITE | MMAP
    mmap_areas: list[tuple[int, int]] = field(default_factory=list)  # (offset, size) sparse areas served by fd
    fd: int = -1  # backing file (memfd) for the mmappable areas
    fd_offset: int = 0  # file offset of region offset 0


class DeviceModel(Protocol):
    """The device behind a :class:`VfioUserServer` (see the module documentation)."""

    def device_info(self) -> tuple[int, int, int]:
        """``(flags, num_regions, num_irqs)``; flags are ``VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI``."""
        ...

    def region_spec(self, index: int) -> RegionSpec: ...

    def region_read(self, index: int, offset: int, size: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def irq_info(self, index: int) -> tuple[int, int]:
        """``(count, flags)``; flags are ``IRQ_INFO_EVENTFD | MASKABLE | AUTOMASKED | NORESIZE``."""
        ...

    def set_irqs(self, index: int, start: int, fds: list[int] | None) -> None:
        """``None``: disable; the model owns the fds it keeps."""
        ...

    def dma_map(self, iova: int, size: int, fd: int, fd_offset: int, prot: int) -> None: ...

    def dma_unmap(self, iova: int, size: int) -> None: ...

    def reset(self) -> None: ...

    def client_gone(self) -> None:
        """The driver disconnected: clean up DMA maps, IRQ fds."""
        ...


def errno_for(exc: BaseException) -> int:
    """The errno an error reply carries for an exception raised while serving a message."""
    if isinstance(exc, OSError):
        if isinstance(exc.errno, int) and exc.errno > 0:
            return exc.errno
        return errno.ETIMEDOUT if isinstance(exc, TimeoutError) else errno.EIO
    if isinstance(exc, (ValueError, TypeError)):
        return errno.EINVAL
    if isinstance(exc, LookupError):
        return errno.ENOENT
    if isinstance(exc, NotImplementedError):
        return errno.ENOTSUP
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    return errno.EIO


def _request_error(text: str, err: int = errno.EINVAL) -> p.MessageError:
    return p.message_error(text, err)


@dataclass
class _Session:
    """One connected client."""

    sock: socket.socket
    number: int
    peer: tuple[int, int, int]  # pid, uid, gid (SO_PEERCRED)
    negotiated: bool = False
    client_caps: p.Capabilities = field(default_factory=p.Capabilities)
    dma: dict[int, int] = field(default_factory=dict)  # iova -> size
    irqs: set[int] = field(default_factory=set)  # IRQ indexes with eventfds given to the model
    messages: int = 0


class _Resources:
    """The listening socket, the wake-up pipe and the socket file; no reference to the server."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener: socket.socket | None = None
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we made
        self.wake_r = -1
        self.wake_w = -1
        self.released = False

    def wake(self) -> None:
        if self.wake_w >= 0:
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                pass  # full (already woken) or closed

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        remove_socket(self.path, self.identity)
        self.identity = None
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1


class VfioUserServer:
    """Serve ``model`` over vfio-user on the UNIX socket ``socket_path``.

    ``mode``: permissions of the socket file (connecting needs write
    permission: 0600 lets only this user and root in). ``timeout``: how long a
    message may take to arrive once its first byte has, and how long sending a
    reply may take. ``max_data_xfer_size`` and ``max_msg_fds`` are the limits
    announced in the VERSION reply and enforced on every message.
    """

    def __init__(
        self,
        model: DeviceModel,
        socket_path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        timeout: float = 5.0,
        max_data_xfer_size: int = p.MAX_DATA_XFER_SIZE,
        max_msg_fds: int = p.MAX_MSG_FDS,
    ) -> None:
        if not 1 <= max_data_xfer_size <= p.MAX_DATA_XFER_SIZE:
            raise ValueError(f"max_data_xfer_size must be in 1..{p.MAX_DATA_XFER_SIZE}, not {max_data_xfer_size}")
        if not 1 <= max_msg_fds <= p.MAX_MSG_FDS:
            raise ValueError(f"max_msg_fds must be in 1..{p.MAX_MSG_FDS}, not {max_msg_fds}")
        if mode & ~0o777:
            raise ValueError(f"mode must be permission bits (0o000..0o777), not {mode:#o}")
        self.model = model
        self.socket_path = os.fspath(socket_path)
        self.mode = mode
        self.timeout = timeout
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds
        self.max_msg_size = p.max_message_size(max_data_xfer_size)
        self.sessions = 0  # clients served so far
        self.refused = 0  # connections closed because a client was already connected
        self.messages = 0  # messages received, well framed or not
        self.error_replies = 0  # commands answered with an error reply
        self.silent_errors = 0  # commands that failed with the no-reply bit set (logged only)
        self.errnos: dict[int, int] = {}  # errno -> how many commands failed with it
        self.dropped = 0  # connections this server dropped (framing, a failed VERSION or reply)
        self.ignored_replies = 0  # replies nobody asked for
        self.unused_fds = 0  # fds that came with a message and were closed unused
        self._res = _Resources(self.socket_path)
        self._finalizer = weakref.finalize(self, self._res.release)
        self._state = threading.Lock()
        self._closed = False
        self._stopping = False
        self._serving = False
        self._serve_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._session: _Session | None = None
        try:
            self._listen()
        except BaseException:
            self._finalizer()
            raise

    # --- the socket -----------------------------------------------------------

    def _listen(self) -> None:
        path = self.socket_path
        check_path(path)
        remove_stale(path, "another vfio-user server listens on it; stop that one or choose another path")
        res = self._res
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        res.wake_r, res.wake_w = r, w
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        res.listener = sock
        # Exactly ``mode``, never through a symlink planted after bind (pmd.sockets).
        res.identity = bind_socket(sock, path, self.mode, "vfio-user socket")
        sock.listen(4)
        log.debug("vfio-user server listening on %s (mode %#o)", path, self.mode)

    # --- state ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, object]:
        """What the server has seen: every bad message is counted here (and logged)."""
        return {
            "sessions": self.sessions,
            "refused": self.refused,
            "messages": self.messages,
            "error_replies": self.error_replies,
            "silent_errors": self.silent_errors,
            "errnos": {errno.errorcode.get(k, str(k)): v for k, v in sorted(self.errnos.items())},
            "dropped": self.dropped,
            "ignored_replies": self.ignored_replies,
            "unused_fds": self.unused_fds,
            "connected": self.connected,
        }

    @property
    def connected(self) -> bool:
        """Whether a client is connected now."""
        return self._session is not None

    @property
    def peer(self) -> tuple[int, int, int] | None:
        """``(pid, uid, gid)`` of the connected client, from ``SO_PEERCRED``."""
        session = self._session
        return session.peer if session is not None else None

    def __enter__(self) -> VfioUserServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self.connected else "listening")
        return f"<VfioUserServer {self.socket_path} {state}>"

    # --- serving --------------------------------------------------------------

    def serve_in_thread(self, name: str | None = None) -> threading.Thread:
        """Run :meth:`serve_forever` in a daemon thread; ``close()`` stops it."""
        started = threading.Event()
        thread = threading.Thread(
            target=self._serve, args=(started,), name=name or f"vfio-user {self.socket_path}", daemon=True
        )
        thread.start()
        started.wait(5.0)
        return thread

    def serve_forever(self) -> None:
        """Accept clients and answer them until :meth:`close` (from another thread, or a model call)."""
        self._serve(None)

    def _serve(self, started: threading.Event | None) -> None:
        with self._state:
            if self._closed:
                if started is not None:
                    started.set()
                raise vfio_error(f"vfio-user server {self.socket_path} is closed", errno.EBADF)
            if self._serving:
                if started is not None:
                    started.set()
                raise RuntimeError(f"vfio-user server {self.socket_path} is already serving")
            self._serving = True
            self._serve_thread = threading.current_thread()
            self._stopped.clear()
        sel = selectors.DefaultSelector()
        try:
            listener = self._res.listener
            assert listener is not None
            sel.register(listener, selectors.EVENT_READ, "listen")
            sel.register(self._res.wake_r, selectors.EVENT_READ, "wake")
            if started is not None:
                started.set()  # set up: serve_in_thread() returns with every fd of the loop open
            while not self._stopping:
                try:
                    events = sel.select()
                except (OSError, ValueError):
                    if self._stopping:
                        break
                    raise
                for key, _mask in events:
                    if self._stopping:
                        break
                    if key.data == "wake":
                        try:
                            os.read(self._res.wake_r, 64)
                        except OSError:
                            pass
                    elif key.data == "listen":
                        self._accept(sel)
                    elif self._session is not None and key.fileobj is self._session.sock:
                        self._serve_message(sel, self._session)
        finally:
            if started is not None:
                started.set()
            if self._session is not None:
                self._end_session(sel, "the server is closing")
            sel.close()
            with self._state:
                self._serving = False
                self._serve_thread = None
                closed = self._closed
            if closed:
                self._finalizer()  # release before saying "stopped": close() returns with the file gone
            self._stopped.set()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        listener = self._res.listener
        if listener is None:
            return
        try:
            conn, _addr = listener.accept()
        except OSError as exc:
            log.warning("vfio-user %s: accept failed: %s", self.socket_path, exc)
            return
        if self._session is not None:
            self.refused += 1
            log.warning(
                "vfio-user %s: refusing a second client while client %d is connected",
                self.socket_path,
                self._session.number,
            )
            conn.close()
            return
        try:
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            peer: tuple[int, int, int] = struct.unpack("3i", cred)
        except OSError:
            peer = (0, -1, -1)
        conn.setblocking(True)
        self.sessions += 1
        self._session = _Session(conn, self.sessions, peer)
        sel.register(conn, selectors.EVENT_READ, "client")
        log.info(
            "vfio-user %s: client %d connected (pid %d, uid %d)", self.socket_path, self.sessions, peer[0], peer[1]
        )

    def _end_session(self, sel: selectors.BaseSelector, reason: str) -> None:
        session = self._session
        if session is None:
            return
        try:
            sel.unregister(session.sock)
        except (KeyError, ValueError, OSError):
            pass
        session.sock.close()
        log.info(
            "vfio-user %s: client %d gone (%s) after %d messages",
            self.socket_path,
            session.number,
            reason,
            session.messages,
        )
        session.dma.clear()
        session.irqs.clear()
        try:
            self.model.client_gone()
        except Exception:
            log.exception("vfio-user %s: model.client_gone() failed", self.socket_path)
        self._session = None  # only now: ``connected`` turns false once the model has cleaned up

    def _serve_message(self, sel: selectors.BaseSelector, session: _Session) -> None:
        try:
            msg = p.recv_message(
                session.sock,
                deadline=p.deadline_after(self.timeout),
                max_size=self.max_msg_size,
                max_fds=self.max_msg_fds,
            )
        except p.MessageError as exc:
            log.warning("vfio-user %s: client %d: %s; dropping the connection", self.socket_path, session.number, exc)
            self.messages += 1
            self.dropped += 1
            self._end_session(sel, f"broken framing: {exc}")
            return
        if msg is None:
            self._end_session(sel, "disconnected")
            return
        session.messages += 1
        self.messages += 1
        drop = False
        payload = b""
        reply_fds: list[int] = []
        err = 0
        try:
            p.check_flags(msg)
            if msg.is_reply:
                # pmd's server sends no commands, so no reply is awaited: ignore it.
                log.warning("vfio-user %s: ignoring an unsolicited %s", self.socket_path, msg.describe())
                self.ignored_replies += 1
                return
            if msg.fds_truncated:
                raise _request_error(
                    f"{msg.name} carried more than {self.max_msg_fds} file descriptors (max_msg_fds)", errno.E2BIG
                )
            if not session.negotiated and msg.command != p.VFIO_USER_VERSION:
                drop = True
                raise _request_error(f"{msg.name} before VERSION: negotiate the version first", errno.EINVAL)
            payload, reply_fds, drop = self._dispatch(session, msg)
        except p.MessageError as exc:
            err = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EINVAL
            log.info("vfio-user %s: client %d: %s -> %s", self.socket_path, session.number, exc, errno.errorcode.get(err, err))
        except Exception as exc:
            err = errno_for(exc)
            log.warning(
                "vfio-user %s: client %d: %s failed in the device model: %r -> %s",
                self.socket_path,
                session.number,
                msg.name,
                exc,
                errno.errorcode.get(err, err),
                exc_info=not isinstance(exc, (OSError, ValueError, LookupError, NotImplementedError)),
            )
        finally:
            self.unused_fds += len(msg.fds)
            msg.close_fds()  # whatever the handler did not take
        if err and not session.negotiated:
            drop = True  # no agreement on the protocol: the spec has the server close the connection
        if err:
            self.errnos[err] = self.errnos.get(err, 0) + 1
            if msg.no_reply or msg.is_reply:
                self.silent_errors += 1
            else:
                self.error_replies += 1
        if msg.is_reply:
            return
        if not msg.no_reply:
            if err:
                data = p.encode_message(msg.msg_id, msg.command, b"", p.TYPE_REPLY | p.FLAG_ERROR, err)
                reply_fds = []
            else:
                data = p.encode_message(msg.msg_id, msg.command, payload, p.TYPE_REPLY)
            try:
                p.send_message(session.sock, data, reply_fds, p.deadline_after(self.timeout))
            except (OSError, ValueError) as exc:
                log.warning("vfio-user %s: cannot send the %s reply: %s", self.socket_path, msg.name, exc)
                drop = True
        elif err:
            log.warning("vfio-user %s: %s (no reply requested) failed with errno %d", self.socket_path, msg.name, err)
        if drop:
            self.dropped += 1
            self._end_session(sel, f"dropped after {msg.name}")

    # --- the commands ---------------------------------------------------------

    def _dispatch(self, session: _Session, msg: p.Message) -> tuple[bytes, list[int], bool]:
        """Answer one command: ``(reply payload, fds to send, drop the connection afterwards)``."""
        cmd = msg.command
        if cmd == p.VFIO_USER_VERSION:
            return self._version(session, msg)
        if cmd == p.VFIO_USER_DEVICE_GET_INFO:
            p.decode_device_info_request(msg.payload)
            flags, num_regions, num_irqs = self._device_info()
            return p.encode_device_info(flags, num_regions, num_irqs), [], False
        if cmd == p.VFIO_USER_DEVICE_GET_REGION_INFO:
            return self._region_info(msg)
        if cmd == p.VFIO_USER_REGION_READ:
            return self._region_read(msg), [], False
        if cmd == p.VFIO_USER_REGION_WRITE:
            return self._region_write(msg), [], False
        if cmd == p.VFIO_USER_DEVICE_GET_IRQ_INFO:
            index = p.decode_irq_info_request(msg.payload)
            self._check_irq_index(index)
            count, flags = self.model.irq_info(index)
            return p.encode_irq_info(index, flags, count), [], False
        if cmd == p.VFIO_USER_DEVICE_SET_IRQS:
            self._set_irqs(session, msg)
            return b"", [], False
        if cmd == p.VFIO_USER_DMA_MAP:
            self._dma_map(session, msg)
            return b"", [], False
        if cmd == p.VFIO_USER_DMA_UNMAP:
            return self._dma_unmap(session, msg), [], False
        if cmd == p.VFIO_USER_DEVICE_RESET:
            if msg.payload:
                raise _request_error(f"DEVICE_RESET has no payload, this one has {len(msg.payload)} bytes")
            flags, _, _ = self._device_info()
            if not flags & VFIO_DEVICE_FLAGS_RESET:
                raise _request_error("the device does not support reset (no VFIO_DEVICE_FLAGS_RESET)", errno.ENOTSUP)
            self.model.reset()
            return b"", [], False
        if cmd == p.VFIO_USER_DEVICE_GET_REGION_IO_FDS:
            raise _request_error("DEVICE_GET_REGION_IO_FDS is not supported (no ioeventfds)", errno.ENOTSUP)
        if cmd in (p.VFIO_USER_DMA_READ, p.VFIO_USER_DMA_WRITE):
            raise _request_error(f"{msg.name} goes from the server to the client, not the other way", errno.EINVAL)
        raise _request_error(f"unknown command {cmd}", errno.ENOSYS)

    def _version(self, session: _Session, msg: p.Message) -> tuple[bytes, list[int], bool]:
        if session.negotiated:
            raise _request_error("VERSION was already negotiated on this connection")
        major, minor, caps = p.decode_version(msg.payload)
        if major != p.VFIO_USER_MAJOR:
            log.warning("vfio-user %s: client proposes version %d.%d; pmd speaks %d.x", self.socket_path, major, minor, p.VFIO_USER_MAJOR)
            raise _request_error(f"protocol major version {major} is not supported (only {p.VFIO_USER_MAJOR})", errno.ENOTSUP)
        session.client_caps = caps
        session.negotiated = True
        ours = p.Capabilities(max_msg_fds=self.max_msg_fds, max_data_xfer_size=self.max_data_xfer_size)
        return p.encode_version(p.VFIO_USER_MAJOR, min(minor, p.VFIO_USER_MINOR), ours), [], False

    def _device_info(self) -> tuple[int, int, int]:
        flags, num_regions, num_irqs = self.model.device_info()
        if not 0 <= num_regions <= p.MAX_REGIONS or not 0 <= num_irqs <= p.MAX_IRQ_INDEXES:
            raise vfio_error(
                f"device model reports {num_regions} regions and {num_irqs} IRQ indexes "
                f"(limits {p.MAX_REGIONS} and {p.MAX_IRQ_INDEXES})",
                errno.EIO,
            )
        return flags, num_regions, num_irqs

    def _check_region_index(self, index: int) -> None:
        _, num_regions, _ = self._device_info()
        if not 0 <= index < num_regions:
            raise _request_error(f"region {index} does not exist (the device has {num_regions})")

    def _check_irq_index(self, index: int) -> None:
        _, _, num_irqs = self._device_info()
        if not 0 <= index < num_irqs:
            raise _request_error(f"IRQ index {index} does not exist (the device has {num_irqs})")

    def _spec(self, index: int) -> RegionSpec:
        self._check_region_index(index)
        spec = self.model.region_spec(index)
        problem = None
        if spec.size < 0 or spec.size > 1 << 62:
            problem = f"size {spec.size}"
        elif spec.flags & REGION_INFO_FLAG_MMAP and spec.fd >= 0:
            if spec.fd_offset < 0 or spec.fd_offset % _PAGE:
                problem = f"fd_offset {spec.fd_offset:#x} is not page aligned"
            for off, size in spec.mmap_areas:
                if off < 0 or off % _PAGE or size <= 0 or off + size > spec.size:
                    problem = f"mmap area ({off:#x}, {size:#x}) is not page aligned or not inside the region"
        if problem is not None:
            log.error("vfio-user %s: device model region %d: %s", self.socket_path, index, problem)
            raise vfio_error(f"device model describes region {index} wrongly: {problem}", errno.EIO)
        return spec

    def _region_info(self, msg: p.Message) -> tuple[bytes, list[int], bool]:
        argsz, index = p.decode_region_info_request(msg.payload)
        spec = self._spec(index)
        flags = spec.flags & (REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_MMAP)
        mappable = bool(flags & REGION_INFO_FLAG_MMAP) and spec.fd >= 0 and spec.size > 0
        areas: list[SparseArea] | None = None
        fds: list[int] = []
        offset = 0
        if mappable:
            if spec.mmap_areas:
                areas = [SparseArea(off, size) for off, size in spec.mmap_areas]
            fds = [spec.fd]
            offset = spec.fd_offset
        else:
            flags &= ~REGION_INFO_FLAG_MMAP
        payload = p.encode_region_info(index, flags, spec.size, offset, areas, min(argsz, p.MAX_INFO_SIZE))
        return payload, fds, False

    def _access_spec(self, access: p.RegionAccess, write: bool) -> RegionSpec:
        spec = self._spec(access.region)
        if access.offset + access.count > spec.size:
            raise _request_error(
                f"[{access.offset:#x}, {access.offset + access.count:#x}) is outside region {access.region} "
                f"(size {spec.size:#x})"
            )
        need = REGION_INFO_FLAG_WRITE if write else REGION_INFO_FLAG_READ
        if not spec.flags & need:
            raise _request_error(
                f"region {access.region} is not {'writable' if write else 'readable'}", errno.EACCES
            )
        return spec

    def _region_read(self, msg: p.Message) -> bytes:
        access = p.decode_region_access(
            msg.payload, "REGION_READ", with_data=False, max_count=self.max_data_xfer_size
        )
        self._access_spec(access, write=False)
        data = bytes(self.model.region_read(access.region, access.offset, access.count))
        if len(data) != access.count:
            raise vfio_error(
                f"device model returned {len(data)} bytes for a {access.count}-byte read of region {access.region}",
                errno.EIO,
            )
        return p.encode_region_access(access.offset, access.region, access.count, data)

    def _region_write(self, msg: p.Message) -> bytes:
        access = p.decode_region_access(
            msg.payload, "REGION_WRITE", with_data=True, max_count=self.max_data_xfer_size
        )
        self._access_spec(access, write=True)
        self.model.region_write(access.region, access.offset, access.data)
        return p.encode_region_access(access.offset, access.region, access.count)

    def _set_irqs(self, session: _Session, msg: p.Message) -> None:
        req = p.decode_set_irqs(msg.payload)
        self._check_irq_index(req.index)
        available, irq_flags = self.model.irq_info(req.index)
        if req.action == VFIO_IRQ_SET_ACTION_TRIGGER and req.data_type == VFIO_IRQ_SET_DATA_NONE and req.count == 0:
            if req.start != 0 or msg.fds:
                raise _request_error("disabling an IRQ index takes start 0, count 0 and no file descriptors")
            self.model.set_irqs(req.index, 0, None)
            session.irqs.discard(req.index)
            return
        if req.action == VFIO_IRQ_SET_ACTION_UNMASK and req.data_type == VFIO_IRQ_SET_DATA_NONE:
            unmask = getattr(self.model, "unmask_irq", None)
            if unmask is None or not irq_flags & IRQ_INFO_MASKABLE:
                raise _request_error(f"IRQ index {req.index} is not maskable: nothing to unmask", errno.ENOTSUP)
            if msg.fds:
                raise _request_error("an unmask request carries no file descriptors")
            unmask(req.index, req.start, req.count)
            return
        if req.action != VFIO_IRQ_SET_ACTION_TRIGGER or req.data_type != VFIO_IRQ_SET_DATA_EVENTFD:
            raise _request_error(
                f"DEVICE_SET_IRQS flags {req.flags:#x}: only DATA_EVENTFD|ACTION_TRIGGER (and DATA_NONE with "
                "count 0 to disable) are supported",
                errno.ENOTSUP,
            )
        if not irq_flags & IRQ_INFO_EVENTFD:
            raise _request_error(f"IRQ index {req.index} does not signal through eventfds", errno.ENOTSUP)
        if req.count == 0 or req.start + req.count > available:
            raise _request_error(
                f"IRQ index {req.index} has {available} interrupts; cannot set {req.count} from {req.start}"
            )
        if msg.fds and len(msg.fds) != req.count:
            raise _request_error(f"count is {req.count} but {len(msg.fds)} file descriptors came with the message")
        for fd in msg.fds:
            try:
                kind = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                kind = "?"
            if kind != "anon_inode:[eventfd]":
                raise _request_error(f"a file descriptor given for IRQ index {req.index} is not an eventfd ({kind})")
        fds = msg.take_fds() if msg.fds else [-1] * req.count
        try:
            self.model.set_irqs(req.index, req.start, fds)
        except BaseException:
            p.close_fds([fd for fd in fds if fd >= 0])
            raise
        session.irqs.add(req.index)

    def _dma_map(self, session: _Session, msg: p.Message) -> None:
        req = p.decode_dma_map(msg.payload)
        if not msg.fds:
            raise _request_error(
                "DMA_MAP without a file descriptor: this server reaches client memory only by mapping it "
                "(no DMA_READ/DMA_WRITE)",
                errno.ENOTSUP,
            )
        if len(msg.fds) != 1:
            raise _request_error(f"DMA_MAP carries {len(msg.fds)} file descriptors, not 1")
        if not req.flags:
            raise _request_error("DMA_MAP with neither the readable nor the writeable flag")
        if req.offset % _PAGE:
            raise _request_error(f"DMA_MAP file offset {req.offset:#x} is not page aligned")
        fd = msg.fds[0]
        # The device mmaps this file: unless it is sealed against shrinking, the client could
        # truncate it and kill the device with SIGBUS (spec, Security Considerations; fcntl(2)).
        try:
            require_sealed(fd, req.offset + req.size, f"DMA_MAP [{req.address:#x}, +{req.size:#x}): the file")
        except VfioError as exc:
            raise _request_error(str(exc), exc.errno or errno.EINVAL) from None
        for iova, size in session.dma.items():
            if req.address < iova + size and iova < req.address + req.size:
                raise _request_error(
                    f"DMA_MAP [{req.address:#x}, {req.address + req.size:#x}) overlaps the mapping at "
                    f"[{iova:#x}, {iova + size:#x})",
                    errno.EEXIST,
                )
        prot = (mmap.PROT_READ if req.readable else 0) | (mmap.PROT_WRITE if req.writable else 0)
        self.model.dma_map(req.address, req.size, fd, req.offset, prot)
        session.dma[req.address] = req.size

    def _dma_unmap(self, session: _Session, msg: p.Message) -> bytes:
        req = p.decode_dma_unmap(msg.payload)
        if session.dma.get(req.address) != req.size:
            known = ", ".join(f"{a:#x}+{s:#x}" for a, s in session.dma.items()) or "none"
            raise _request_error(
                f"no DMA mapping of {req.size:#x} bytes at {req.address:#x} (mappings: {known})", errno.ENOENT
            )
        self.model.dma_unmap(req.address, req.size)
        del session.dma[req.address]
        return p.encode_dma_unmap(req.address, req.size, req.flags, req.argsz)

    # --- closing --------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving (ending the session: ``model.client_gone()``), close the socket, remove its file.

        Idempotent. From another thread, waits up to ``timeout`` for the serving
        thread to finish the message it is answering.
        """
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            thread = self._serve_thread
        self._res.wake()
        if thread is not None and thread is not threading.current_thread():
            if not self._stopped.wait(timeout):
                log.warning(
                    "vfio-user %s: the serving thread did not stop within %.1f s (stuck in the device model?)",
                    self.socket_path,
                    timeout,
                )
        if thread is threading.current_thread():
            return  # called by the model while serving: the loop ends after this message and releases
        self._finalizer()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the serving loop has ended; ``False`` on timeout."""
        return self._stopped.wait(timeout)
