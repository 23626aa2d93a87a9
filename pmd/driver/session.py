"""A request/reply session over a UNIX socket, and how it breaks.

The vfio-user client (:mod:`pmd.driver.access.vfio_user`) and the vhost-user
front-end (:mod:`pmd.driver.vhost_user`) speak different messages over the same
kind of connection: one request at a time under a lock, a peer that may go away at
any moment, and a session that, once broken (the peer hung up, a reply broke the
protocol, a request timed out), stays broken. What that takes is here, once:

- :class:`Session`: the socket, the lock, why it broke, the error a caller gets
  (with the remedy), waking a blocked request from another thread, and a poll that
  tells whether the peer is still there without sending anything;
- :class:`LossWatcher`: a thread that notices the peer hang up and calls the
  ``on_lost`` callbacks once.

Each protocol subclasses :class:`Session` for its words (what it is, who the peer
is, which exception it raises); the messages stay in the protocol's module.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import ClassVar

from ..errors import PmdError

__all__ = ["Session", "LossWatcher"]

_HANGUP = select.POLLHUP | select.POLLERR | select.POLLRDHUP | select.POLLNVAL


class Session:
    """The socket of one session and its state: open, broken (and why) or closed.

    Requests hold :attr:`lock`; :meth:`break_` and :meth:`close` may run from any thread.
    """

    #: "vfio-user", "vhost-user": names the watcher thread
    protocol: ClassVar[str]
    #: what the caller holds, in messages: "vfio-user device", "vhost-user"
    kind: ClassVar[str]
    #: the protocol's logger
    log: ClassVar[logging.Logger]
    #: what hanging up means, e.g. "the server closed the connection"
    gone: ClassVar[str]
    #: the remedy once broken, e.g. "close this device and connect again"
    remedy: ClassVar[str]
    #: "the connection to the server", "the session with the backend"
    what_breaks: ClassVar[str]

    def __init__(self, sock: socket.socket, name: str, timeout: float,
                 lock: threading.Lock | threading.RLock | None = None) -> None:
        self.sock: socket.socket | None = sock
        self.name = name
        self.timeout = timeout
        self.lock = lock if lock is not None else threading.Lock()
        self.broken: str | None = None
        self.closed = False
        self.requests = 0

    def error(self, message: str, err: int) -> PmdError:
        """The protocol's exception (a subclass of :class:`PmdError` and ``OSError``)."""
        raise NotImplementedError

    def unusable(self, what: str) -> PmdError:
        """Why ``what`` cannot be done now: the session is closed, or broken."""
        if self.closed:
            return self.error(f"{self.kind} {self.name} is closed: cannot {what}", errno.EBADF)
        return self.error(f"{self.kind} {self.name}: cannot {what}: {self.what_breaks} is broken "
                          f"({self.broken}); {self.remedy}", errno.EPIPE)

    def break_(self, reason: str) -> None:
        """Give up on the session: remember why (the first reason wins), shut the socket
        down (which wakes a blocked request and the watcher) and close it."""
        if self.broken is None:
            self.broken = reason
            self.log.warning("%s %s: %s is broken: %s", self.protocol, self.name, self.what_breaks, reason)
        self._drop_socket()

    def interrupt(self) -> None:
        """Wake a thread blocked in a request (close() from another thread)."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def alive(self) -> bool:
        """Whether the peer is still there: a poll of the socket, nothing sent. A session
        found hung up is broken here."""
        if self.sock is None or self.broken is not None or self.closed:
            return False
        if not self.lock.acquire(blocking=False):
            return True  # a request is in flight; it will find out
        try:
            sock = self.sock
            if sock is None:
                return False
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
            events = poller.poll(0)
            if not events:
                return True
            if events[0][1] & _HANGUP:
                self.break_(self.gone)
                return False
            try:  # readable: a message, or the end of the stream
                peek = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError as exc:
                self.break_(f"the connection failed: {exc.strerror}")
                return False
            if not peek:
                self.break_(self.gone)
                return False
            return True  # an unsolicited message waits; the next request deals with it
        finally:
            self.lock.release()

    def end(self, goodbye: Callable[[], None]) -> None:
        """The last words of a session being closed: take the lock (a request still waiting
        for its reply is woken, fails and lets go), let ``goodbye`` undo what the peer holds
        for us while it still answers, and mark the session closed: requests from now on
        fail at once. The socket stays open until :meth:`close`."""
        if not self.lock.acquire(timeout=0.05):
            self.interrupt()
            self.lock.acquire()
        try:
            if self.sock is not None and self.broken is None:
                goodbye()
        finally:
            self.closed = True
            self.lock.release()

    def close(self) -> None:
        self.closed = True
        self._drop_socket()

    def _drop_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class LossWatcher:
    """A thread that notices the peer hang up and calls the ``on_lost`` callbacks once.

    It polls a duplicate of the socket for POLLRDHUP only (POLLHUP and POLLERR come
    anyway), so replies arriving for requests never wake it, and an eventfd that
    :meth:`stop` signals. A session broken from our side (a timeout, a bad reply) is
    shut down, which wakes it too.
    """

    def __init__(self, session: Session) -> None:
        sock = session.sock
        if sock is None:
            raise session.unusable("watch the connection")
        self.session = session
        self.callbacks: list[Callable[[str], object]] = []
        self.lock = threading.Lock()
        self.fired = False
        self.fired_at: float | None = None
        self._fd = os.dup(sock.fileno())
        try:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC)
        except BaseException:
            os.close(self._fd)
            raise
        self._thread = threading.Thread(target=self._run, name=f"{session.protocol}-watch {session.name}",
                                        daemon=True)
        try:
            self._thread.start()
        except BaseException:
            os.close(self._fd)
            os.close(self._wake)
            raise

    def _reason(self) -> str:
        return self.session.broken or self.session.gone

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP)
        poller.register(self._wake, select.POLLIN)
        while True:
            try:
                events = dict(poller.poll())
            except InterruptedError:
                continue
            if self._wake in events:
                return
            if events.get(self._fd):
                break
        with self.lock:
            self.fired = True
            self.fired_at = time.monotonic()
            callbacks = list(self.callbacks)
        reason = self._reason()
        for callback in callbacks:
            try:
                callback(reason)
            except Exception:
                self.session.log.exception("%s %s: on_lost callback failed", self.session.protocol,
                                           self.session.name)

    def add(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(reason)`` once when the peer goes (at once if it has gone);
        returns a function that cancels it."""
        with self.lock:
            fired = self.fired
            if not fired:
                self.callbacks.append(callback)
        if fired:  # already gone: tell at once
            callback(self._reason())

        def cancel() -> None:
            with self.lock:
                if callback in self.callbacks:
                    self.callbacks.remove(callback)

        return cancel

    def stop(self) -> None:
        os.eventfd_write(self._wake, 1)
        if self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._fd)
        os.close(self._wake)
