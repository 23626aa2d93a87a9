"""Interrupts: eventfds, the interrupt thread, and a direct wait for rx-interrupt mode.

VFIO delivers each MSI-X vector (or MSI, or INTx) of a device by signalling an
eventfd that the driver handed over with ``VFIO_DEVICE_SET_IRQS``; vfio-user
does the same with eventfds passed over its socket. So in user space an
interrupt is "an eventfd became readable", and this module has three pieces:

- :class:`EventFd`, the owner of one non-blocking, close-on-exec eventfd;
- :class:`InterruptThread`, DPDK's interrupt thread (``eal_intr_thread_main``
  and ``rte_intr_callback_register``): one daemon thread per process that
  waits in ``epoll`` on every registered eventfd, reads the counter and calls
  the callbacks registered for that fd; :func:`get_interrupt_thread` returns
  the shared one;
- :func:`wait` (and :func:`wait_any` on several), a blocking wait on an
  eventfd with a timeout, no thread in between, for a queue in rx-interrupt mode.

Callbacks are called as ``callback(fd, count, arg)``: ``fd`` the eventfd that
fired, ``count`` the counter read from it (how many times it was signalled
since the last read; interrupts coalesce, so treat it as "at least one"), and
``arg`` the value given at registration (DPDK's ``cb_arg``).

Pure standard library; see docs/interrupts.md for the model and latencies.
"""

from __future__ import annotations

import atexit
import errno
import logging
import math
import os
import select
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol, Union

__all__ = [
    "Callback",
    "EventFd",
    "FdLike",
    "InterruptThread",
    "Registration",
    "SupportsFileno",
    "get_interrupt_thread",
    "wait",
    "wait_any",
]

logger = logging.getLogger("pmd.interrupts")


class SupportsFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = Union[int, SupportsFileno]

#: ``callback(fd, count, arg)``; the return value is ignored.
Callback = Callable[[int, int, Any], object]

# eventfd(2): the counter is a uint64 that can hold at most 2**64 - 2, and a
# read returns 8 bytes.
_EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE
_EPOLL_HANGUP = select.EPOLLHUP | select.EPOLLERR
# poll(2) takes an int of milliseconds; longer waits are done in slices.
_MAX_POLL_MS = 1 << 30
_STOP_TIMEOUT = 5.0


# --------------------------------------------------------------------- EventFd


class EventFd:
    """One eventfd, non-blocking and close-on-exec, closed by :meth:`close` or ``with``.

    These are the fds given to ``VFIO_DEVICE_SET_IRQS`` (one per MSI-X
    vector); non-blocking so that neither the interrupt thread nor
    :func:`wait` can block on a read another reader raced it to.
    """

    __slots__ = ("_fd", "__weakref__")

    def __init__(self, initval: int = 0) -> None:
        self._fd = -1  # so __del__ and close() work if eventfd() fails
        if not isinstance(initval, int) or not 0 <= initval <= 0xFFFF_FFFF:
            raise ValueError(f"EventFd initval must be an int in 0..2**32-1, got {initval!r}")
        self._fd = os.eventfd(initval, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._checked_fd()

    def signal(self, n: int = 1) -> None:
        """Add ``n`` to the counter: what the device (through VFIO) does on an interrupt."""
        if not isinstance(n, int) or not 1 <= n <= _EVENTFD_MAX:
            raise ValueError(f"signal(n): n must be an int in 1..2**64-2, got {n!r}")
        try:
            os.eventfd_write(self._checked_fd(), n)
        except BlockingIOError:
            # The kernel refuses a write that would overflow the counter.
            raise OverflowError(
                f"{self!r}: counter would overflow; drain() it (nobody is reading it?)"
            ) from None

    def drain(self) -> int:
        """Read and reset the counter; 0 if nothing is pending (never blocks)."""
        return _read_counter(self._checked_fd())

    def wait(self, timeout: float | None = None) -> int:
        """Block until signalled (return the drained count) or ``timeout`` seconds pass (0)."""
        return wait(self, timeout)

    def close(self) -> None:
        """Close the fd; calling it again does nothing."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> EventFd:
        self._checked_fd()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0:
            # Like an unclosed file: say so, then release the fd anyway.
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"<EventFd fd={self._fd}>" if self._fd >= 0 else "<EventFd closed>"

    def _checked_fd(self) -> int:
        if self._fd < 0:
            raise ValueError("operation on a closed EventFd; create a new EventFd()")
        return self._fd


def _read_counter(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# ---------------------------------------------------------- argument checking


def _fd_of(obj: FdLike, what: str) -> int:
    """The fd number of an int or an object with fileno(), validated to be a usable eventfd."""
    if isinstance(obj, bool) or not (isinstance(obj, int) or hasattr(obj, "fileno")):
        raise TypeError(f"{what}: expected an fd (int) or an object with fileno() such as "
                        f"EventFd, got {type(obj).__name__}")
    fd = obj if isinstance(obj, int) else obj.fileno()
    if fd < 0:
        raise ValueError(f"{what}: fd {fd} is negative; pass an open eventfd (EventFd().fileno())")
    try:
        blocking = os.get_blocking(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise ValueError(f"{what}: fd {fd} is not open (closed already?); "
                             "pass an open eventfd such as EventFd()") from None
        raise
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = None  # no /proc: skip the type check rather than refuse
    if target is not None and target != "anon_inode:[eventfd]":
        raise ValueError(f"{what}: fd {fd} is {target}, not an eventfd; interrupts arrive "
                         "on eventfds (create one with EventFd())")
    if blocking:
        raise ValueError(f"{what}: eventfd {fd} is blocking, so a read could hang; "
                         "use EventFd() or call os.set_blocking(fd, False) first")
    return fd


def _check_timeout(timeout: float | None, what: str) -> float | None:
    """None for "wait forever", else a finite number of seconds >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what}: timeout must be a number of seconds or None, "
                        f"got {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{what}: timeout must be >= 0 seconds (or None to wait forever), "
                         f"got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


# ----------------------------------------------------------------- direct wait


def wait(fd: FdLike, timeout: float | None = None) -> int:
    """Block on one eventfd until it fires or ``timeout`` seconds pass.

    Returns the count drained from the eventfd, or 0 on timeout. The counter
    is read first, so an interrupt that arrived before the call returns at
    once. ``poll(2)`` releases the GIL while waiting; after ``EINTR`` (a
    signal handler ran) the wait resumes with the time that is left, and an
    exception raised by the handler propagates. ``timeout=None`` waits
    forever, ``0`` only checks.

    Do not wait on an fd the interrupt thread is also watching: the two
    readers would race for each count.
    """
    return _wait([_fd_of(fd, "wait")], _check_timeout(timeout, "wait"), "wait")[0]


def wait_any(fds: Sequence[FdLike], timeout: float | None = None) -> list[int]:
    """:func:`wait` on several eventfds at once: returns the count drained from each
    (all of them are read, in order), all zeros on timeout.

    For a queue whose MSI-X vector is shared: it sleeps on the vector's
    eventfd and on a private one through which another sharer passes an
    interrupt on.
    """
    if isinstance(fds, (int, str, bytes)) or not hasattr(fds, "__iter__"):
        raise TypeError(f"wait_any: expected a sequence of fds, got {type(fds).__name__}")
    numbers = [_fd_of(fd, "wait_any") for fd in fds]
    if not numbers:
        raise ValueError("wait_any: no fds given; pass at least one eventfd")
    return _wait(numbers, _check_timeout(timeout, "wait_any"), "wait_any")


def _wait(fds: list[int], timeout: float | None, what: str) -> list[int]:
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = select.poll()  # poll, not epoll: no fd to create and close per wait
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while True:
        counts = [_read_counter(fd) for fd in fds]
        if any(counts):
            return counts
        ms: float
        if deadline is None:
            ms = _MAX_POLL_MS
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return counts
            # Python rounds the milliseconds up, so poll never wakes early;
            # and the deadline is re-checked in any case.
            ms = min(remaining * 1000.0, _MAX_POLL_MS)
        # Python's poll retries by itself on EINTR (PEP 475) with the time left.
        for fd, mask in poller.poll(ms):
            if mask & select.POLLNVAL:
                raise ValueError(f"{what}: fd {fd} was closed while waiting on it")
            if mask & select.POLLERR:
                raise OSError(errno.EIO, f"{what}: poll reported an error on eventfd {fd}")
        # Readable, or a spurious wakeup, or another reader won the count: loop and re-read.


# ----------------------------------------------------------- interrupt thread


class Registration:
    """The handle :meth:`InterruptThread.register` returns; give it to ``unregister``."""

    __slots__ = ("fd", "callback", "arg", "_owner", "_keepalive", "_active")

    def __init__(self, owner: InterruptThread, fd: int, callback: Callback, arg: Any,
                 keepalive: object) -> None:
        self.fd = fd
        self.callback = callback
        self.arg = arg
        self._owner = owner
        # An EventFd passed to register() must outlive the registration, or
        # its __del__ would close the fd under the interrupt thread.
        self._keepalive = keepalive
        self._active = True

    @property
    def active(self) -> bool:
        """True until unregistered (by the caller, or after a hang-up on the fd)."""
        return self._active

    def __repr__(self) -> str:
        state = "active" if self._active else "unregistered"
        name = getattr(self.callback, "__qualname__", repr(self.callback))
        return f"<Registration fd={self.fd} {name} {state}>"


class _Source:
    """The callbacks of one fd, in registration order (DPDK's ``rte_intr_source``).

    Its identity matters: unregistering the last callback and registering the
    same fd number again makes a new _Source, which tells the thread to re-add
    the fd to epoll (the number may now name a different eventfd).
    """

    __slots__ = ("fd", "callbacks")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.callbacks: list[Registration] = []


class _Loop:
    """What one run of the thread owns; a restart gets a fresh one.

    Keeping it per run means a thread that is still finishing a slow callback
    after stop() timed out never shares an epoll or wake fd with its successor.
    """

    def __init__(self) -> None:
        self.wake = EventFd()
        try:
            self.epoll = select.epoll()  # EPOLL_CLOEXEC by default
            self.epoll.register(self.wake.fileno(), select.EPOLLIN)
        except BaseException:
            self.wake.close()
            raise
        self.watched: dict[int, _Source] = {}  # what is in self.epoll now
        self.dirty = True  # the source table changed since the last sync
        self.rebuild = False  # epoll holds an entry we cannot remove: start over
        self.stopping = False
        self.closed = False
        self.thread: threading.Thread | None = None

    def close(self) -> None:
        self.closed = True
        self.epoll.close()
        self.wake.close()


class InterruptThread:
    """One thread waiting in ``epoll`` on eventfds and calling their callbacks.

    The rules:

    - ``register`` and ``unregister`` may be called from any thread, and from
      inside a callback (for the callback itself, for another, or to add one);
      the table is changed under a lock that is never held while a callback
      runs, and the thread is woken through an internal eventfd to update its
      epoll set.
    - When an fd is readable the thread reads its counter (8 bytes; this
      clears the readiness) and calls each callback registered for it, in
      registration order, as ``callback(fd, count, arg)``. A callback
      unregistered before its turn is skipped; one registered during a round
      is first called on the next interrupt.
    - After ``unregister`` returns, the callback is not running and will not
      be called again, except when called from inside that very callback
      (then only the latter holds).
    - A callback that raises is logged on ``pmd.interrupts``; the thread goes on.
    - ``EPOLLHUP``/``EPOLLERR`` on an fd unregisters all its callbacks, logged.
    - Unregister an fd before closing it (as with DPDK): epoll forgets a closed
      fd silently, so a callback left registered would just never fire again.
    - ``stop`` ends and joins the thread and closes its fds; registrations are
      kept, and ``start`` (or the next ``register``) runs the thread again.
    - In a child after ``fork`` the thread is gone and so are the registrations
      (the eventfds belong to the parent's devices).
    """

    def __init__(self, name: str = "pmd-intr") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a callback returns
        self._sources: dict[int, _Source] = {}
        self._loop: _Loop | None = None
        # The callback each interrupt thread is calling now. Usually one
        # entry; two when a thread stopped in a slow callback overlaps a restart.
        self._running: dict[threading.Thread, Registration] = {}
        _live.add(self)

    # ---- public API

    def register(self, fd: FdLike, callback: Callback, arg: Any = None) -> Registration:
        """Call ``callback(fd, count, arg)`` whenever ``fd`` (an eventfd) is signalled.

        Starts the thread if it is not running. Returns the handle for
        :meth:`unregister`. Registering the same callback twice calls it twice.
        """
        if not callable(callback):
            raise TypeError(f"register: callback must be callable as callback(fd, count, arg), "
                            f"got {type(callback).__name__}")
        num = _fd_of(fd, "register")
        handle = Registration(self, num, callback, arg, None if isinstance(fd, int) else fd)
        with self._lock:
            source = self._sources.get(num)
            if source is None:
                source = self._sources[num] = _Source(num)
            source.callbacks.append(handle)
            self._changed_locked()
        try:
            self.start()
        except BaseException:
            self.unregister(handle)  # e.g. out of fds: leave nothing half-registered
            raise
        return handle

    def unregister(self, handle: Registration, *, wait: bool = True) -> bool:
        """Remove one callback. Returns False if it was already unregistered.

        With ``wait`` (the default), waits for a call of it in progress on
        the interrupt thread to return, unless called from that call itself.
        """
        if not isinstance(handle, Registration):
            raise TypeError(f"unregister: expected the Registration returned by register(), "
                            f"got {type(handle).__name__}")
        if handle._owner is not self:
            raise ValueError("unregister: this handle belongs to another InterruptThread")
        with self._lock:
            if not handle._active:
                return False
            source = self._sources[handle.fd]
            source.callbacks.remove(handle)
            self._deactivate_locked(handle)
            if not source.callbacks:
                del self._sources[handle.fd]
                self._changed_locked()
            if wait:
                self._wait_idle_locked(lambda running: running is handle)
        return True

    def unregister_fd(self, fd: FdLike, *, wait: bool = True) -> int:
        """Remove every callback of ``fd``; returns how many there were.

        ``fd`` may be closed already (only its number is used).
        """
        if isinstance(fd, bool) or not (isinstance(fd, int) or hasattr(fd, "fileno")):
            raise TypeError(f"unregister_fd: expected an fd (int) or an object with fileno(), "
                            f"got {type(fd).__name__}")
        num = fd if isinstance(fd, int) else fd.fileno()
        with self._lock:
            source = self._sources.pop(num, None)
            if source is None:
                return 0
            for handle in source.callbacks:
                self._deactivate_locked(handle)
            self._changed_locked()
            if wait:
                self._wait_idle_locked(lambda running: running.fd == num)
        return len(source.callbacks)

    def registrations(self, fd: FdLike | None = None) -> list[Registration]:
        """The active registrations, of one fd or of all, in registration order."""
        with self._lock:
            if fd is None:
                return [h for s in self._sources.values() for h in s.callbacks]
            num = fd if isinstance(fd, int) else fd.fileno()
            source = self._sources.get(num)
            return list(source.callbacks) if source else []

    @property
    def running(self) -> bool:
        """True while the thread is started and not asked to stop."""
        with self._lock:
            return self._loop is not None

    def start(self) -> None:
        """Start the thread if it is not running (idempotent)."""
        with self._lock:
            if self._loop is not None:
                return
            loop = _Loop()
            thread = threading.Thread(target=self._run, args=(loop,), name=self.name, daemon=True)
            loop.thread = thread
            try:
                thread.start()
            except BaseException:
                loop.close()
                raise
            self._loop = loop

    def stop(self, timeout: float | None = _STOP_TIMEOUT) -> bool:
        """Stop the thread and join it; True once it has exited (idempotent).

        Returns False if a callback still running kept the thread past
        ``timeout``: it exits (and closes its fds) as soon as that callback
        returns, and calls no other. Called from inside a callback, it only
        asks the thread to stop after this callback (a thread cannot join itself).
        """
        timeout = _check_timeout(timeout, "stop")
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is None:
                return True
            loop.stopping = True
            if not loop.closed:
                loop.wake.signal()
            thread = loop.thread
        assert thread is not None
        if thread is threading.current_thread():
            return False
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("interrupt thread %r still in a callback %s s after stop(); "
                           "it will exit when the callback returns", self.name, timeout)
            return False
        return True

    def __repr__(self) -> str:
        state = "running" if self._loop is not None else "stopped"
        return f"<InterruptThread {self.name!r} {state}, {len(self._sources)} fds>"

    # ---- helpers (caller holds self._lock)

    def _changed_locked(self) -> None:
        loop = self._loop
        if loop is not None and not loop.closed:
            loop.dirty = True
            loop.wake.signal()

    @staticmethod
    def _deactivate_locked(handle: Registration) -> None:
        handle._active = False
        handle._keepalive = None

    def _wait_idle_locked(self, matches: Callable[[Registration], bool]) -> None:
        # Waiting from inside the callback would wait for ourselves.
        me = threading.current_thread()
        while any(t is not me and matches(h) for t, h in self._running.items()):
            self._idle.wait()

    # ---- the thread

    def _run(self, loop: _Loop) -> None:
        wake_fd = loop.wake.fileno()
        try:
            while True:
                with self._lock:
                    if loop.stopping:
                        return
                    if loop.dirty:
                        self._sync_locked(loop)
                # Level-triggered: an fd still readable after this round
                # (signalled again meanwhile) shows up in the next poll.
                events = loop.epoll.poll()
                for fd, mask in events:
                    if fd == wake_fd:
                        loop.wake.drain()  # before the table is read again: no lost wakeup
                    elif not self._dispatch(loop, fd, mask):
                        return
        except BaseException:
            logger.exception("interrupt thread %r failed; interrupts are no longer delivered",
                             self.name)
        finally:
            with self._lock:
                loop.close()
                if self._loop is loop:
                    self._loop = None

    def _sync_locked(self, loop: _Loop) -> None:
        """Make the epoll set match the source table (DPDK rebuilds it the same way)."""
        if loop.rebuild:
            loop.epoll.close()
            loop.epoll = select.epoll()
            loop.epoll.register(loop.wake.fileno(), select.EPOLLIN)
            loop.watched.clear()
            loop.rebuild = False
        for fd, source in list(loop.watched.items()):
            if self._sources.get(fd) is not source:
                del loop.watched[fd]
                try:
                    loop.epoll.unregister(fd)
                except OSError:
                    # Closed already: epoll dropped it, or (if another fd still
                    # refers to the eventfd) it will report it and we rebuild.
                    pass
        for fd, source in list(self._sources.items()):
            if fd in loop.watched:
                continue
            try:
                loop.epoll.register(fd, select.EPOLLIN)
            except FileExistsError:
                loop.epoll.modify(fd, select.EPOLLIN)  # left over from a failed unregister
            except OSError as exc:
                logger.error("interrupts: cannot watch fd %d (%s); unregistering its %d "
                             "callback(s) (was it closed before unregister?)",
                             fd, exc.strerror, len(source.callbacks))
                self._drop_source_locked(loop, source)
                continue
            loop.watched[fd] = source
        loop.dirty = False

    def _drop_source_locked(self, loop: _Loop, source: _Source) -> None:
        if self._sources.get(source.fd) is source:
            del self._sources[source.fd]
        for handle in source.callbacks:
            self._deactivate_locked(handle)
        loop.dirty = True  # the thread itself changed the table: no wakeup needed

    def _dispatch(self, loop: _Loop, fd: int, mask: int) -> bool:
        """Serve one ready fd; False if the thread must stop."""
        with self._lock:
            if loop.stopping:
                return False  # stop() was called: leave the counts to the next run
            source = self._sources.get(fd)
            watched = loop.watched.get(fd)
            if watched is None:
                # epoll reports an fd we never added or already removed: an
                # entry left by an fd closed while registered. Start over.
                loop.rebuild = loop.dirty = True
                return True
            if source is not watched:
                return True  # unregistered (or replaced) since: the sync comes first
            if mask & _EPOLL_HANGUP:
                logger.warning("interrupts: hang-up/error (epoll events %#x) on fd %d; "
                               "unregistering its %d callback(s)", mask, fd, len(source.callbacks))
                self._drop_source_locked(loop, source)
                return True
            try:
                count = os.eventfd_read(fd)  # non-blocking: checked at register()
            except BlockingIOError:
                return True  # someone else read the counter first; nothing to report
            except OSError as exc:
                logger.error("interrupts: reading fd %d failed (%s); unregistering its %d "
                             "callback(s)", fd, exc.strerror, len(source.callbacks))
                self._drop_source_locked(loop, source)
                loop.rebuild = True
                return True
            callbacks = list(source.callbacks)
        me = threading.current_thread()
        for handle in callbacks:
            with self._lock:
                if loop.stopping:
                    return False
                if not handle._active:
                    continue  # unregistered earlier in this round
                self._running[me] = handle
            try:
                handle.callback(fd, count, handle.arg)
            except BaseException:
                # The thread serves every device in the process: one bad
                # callback must not take the others' interrupts away.
                logger.exception("interrupts: callback %r for fd %d raised", handle.callback, fd)
            finally:
                with self._lock:
                    del self._running[me]
                    self._idle.notify_all()
        return True

    def _after_fork_in_child(self) -> None:
        # Only the forking thread survives a fork; the lock may have been held
        # by one that did not. Forget the run without touching the parent's
        # epoll set (shared with the child): just close the child's copies.
        # The registrations go too: the eventfds are shared with the parent,
        # and a child serving them would steal the parent's interrupts.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = {}
        for source in self._sources.values():
            for handle in source.callbacks:
                self._deactivate_locked(handle)
        self._sources = {}
        loop, self._loop = self._loop, None
        if loop is not None and not loop.closed:
            loop.close()


# ------------------------------------------------------------ the shared one

_live: weakref.WeakSet[InterruptThread] = weakref.WeakSet()
_shared: InterruptThread | None = None
_shared_lock = threading.Lock()


def get_interrupt_thread() -> InterruptThread:
    """The process's interrupt thread (created on first call, started on first register)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = InterruptThread()
        return _shared


@atexit.register
def _stop_all_at_exit() -> None:
    # A daemon thread left in epoll at interpreter exit would be frozen
    # mid-callback; stop it while Python still works, and close its fds.
    for intr in list(_live):
        intr.stop(timeout=1.0)


def _after_fork_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    for intr in list(_live):
        intr._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
