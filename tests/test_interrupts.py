"""pmd.interrupts: one test per rule of the interrupt thread, the direct wait and EventFd.

Every wait here is bounded (threading.Event with a timeout, wait() with a
timeout) so a broken rule fails the test instead of hanging the run. Timing
checks are lower bounds only: a shared VM can be slow, never early.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pmd.driver.interrupts import EventFd, InterruptThread, Registration, get_interrupt_thread, wait, wait_any

TIMEOUT = 5.0  # seconds; only reached when a rule is broken


@pytest.fixture
def intr() -> Iterator[InterruptThread]:
    thread = InterruptThread(name="pmd-intr-test")
    yield thread
    assert thread.stop(timeout=TIMEOUT), "interrupt thread did not stop"


@pytest.fixture
def new_efd() -> Iterator[Callable[[], EventFd]]:
    made: list[EventFd] = []

    def make() -> EventFd:
        made.append(EventFd())
        return made[-1]

    yield make
    for efd in made:
        efd.close()


class Recorder:
    """A callback that records its calls and lets a test wait for the n-th."""

    def __init__(self, log: list[tuple[str, int, int, Any]] | None = None, name: str = "cb",
                 action: Callable[[], None] | None = None) -> None:
        self.log = log if log is not None else []
        self.name = name
        self.action = action
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self, fd: int, count: int, arg: Any) -> None:
        if self.action is not None:
            self.action()
        with self._cond:
            self.log.append((self.name, fd, count, arg))
            self.calls += 1
            self._cond.notify_all()

    def wait_calls(self, n: int, timeout: float = TIMEOUT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.calls >= n, timeout)


def open_fds() -> int:
    gc.collect()  # unreferenced EventFds close in __del__: count only real leaks
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------ EventFd


def test_eventfd_is_nonblocking_and_close_on_exec() -> None:
    with EventFd() as efd:
        assert not os.get_blocking(efd.fileno())
        assert fcntl.fcntl(efd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{efd.fileno()}") == "anon_inode:[eventfd]"


def test_eventfd_drain_returns_the_sum_of_signals_then_zero() -> None:
    with EventFd() as efd:
        assert efd.drain() == 0
        efd.signal()
        efd.signal(4)
        assert efd.drain() == 5
        assert efd.drain() == 0


def test_eventfd_close_is_idempotent_and_fileno_after_close_raises() -> None:
    efd = EventFd()
    with efd:
        pass
    assert efd.closed
    efd.close()
    with pytest.raises(ValueError, match="closed EventFd"):
        efd.fileno()
    with pytest.raises(ValueError, match="closed EventFd"):
        efd.signal()


def test_eventfd_counter_overflow_raises_overflow_error() -> None:
    with EventFd() as efd:
        efd.signal(0xFFFF_FFFF_FFFF_FFFE)
        with pytest.raises(OverflowError, match="drain"):
            efd.signal()
        assert efd.drain() == 0xFFFF_FFFF_FFFF_FFFE


# ------------------------------------------------------------ interrupt thread


def test_callback_runs_on_signal(intr: InterruptThread, new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    cb = Recorder()
    handle = intr.register(efd, cb, arg="vector0")
    assert handle.active and handle.fd == efd.fileno()
    efd.signal(3)
    assert cb.wait_calls(1)
    assert cb.log == [("cb", efd.fileno(), 3, "vector0")]
    assert efd.drain() == 0  # the thread read the counter


def test_reading_the_counter_clears_readiness(intr: InterruptThread,
                                               new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    cb = Recorder()
    intr.register(efd, cb)
    efd.signal()
    assert cb.wait_calls(1)
    # Level-triggered epoll would call again and again if the read had not
    # cleared the fd; a second fd serves as a barrier for "the thread went round".
    barrier_fd = new_efd()
    barrier = Recorder()
    intr.register(barrier_fd, barrier)
    barrier_fd.signal()
    assert barrier.wait_calls(1)
    assert cb.calls == 1


def test_several_callbacks_per_fd_all_run_in_registration_order(
        intr: InterruptThread, new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    log: list[tuple[str, int, int, Any]] = []
    cbs = [Recorder(log, name) for name in ("a", "b", "c", "d")]
    for i, cb in enumerate(cbs):
        intr.register(efd, cb, arg=i)
    efd.signal()
    assert cbs[-1].wait_calls(1)
    assert [(name, arg) for name, _, _, arg in log] == [("a", 0), ("b", 1), ("c", 2), ("d", 3)]


def test_callbacks_of_different_fds_get_their_own_fd(
        intr: InterruptThread, new_efd: Callable[[], EventFd]) -> None:
    e1, e2 = new_efd(), new_efd()
    c1, c2 = Recorder(), Recorder()
    intr.register(e1, c1)
    intr.register(e2.fileno(), c2)  # a plain int fd works too
    e2.signal(2)
    assert c2.wait_calls(1)
    e1.signal(1)
    assert c1.wait_calls(1)
    assert c1.log == [("cb", e1.fileno(), 1, None)]
    assert c2.log == [("cb", e2.fileno(), 2, None)]


def test_unregister_from_another_thread(intr: InterruptThread,
                                        new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    gone, sentinel = Recorder(name="gone"), Recorder(name="sentinel")
    handle = intr.register(efd, gone)
    intr.register(efd, sentinel)  # after `gone`: when it runs, `gone` had its turn
    result: list[bool] = []
    other = threading.Thread(target=lambda: result.append(intr.unregister(handle)))
    other.start()
    other.join(TIMEOUT)
    assert result == [True] and not handle.active
    efd.signal()
    assert sentinel.wait_calls(1)
    assert gone.calls == 0
    assert intr.unregister(handle) is False  # a second time: already gone


def test_unregister_waits_for_the_running_callback(intr: InterruptThread,
                                                   new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow(fd: int, count: int, arg: Any) -> None:
        entered.set()
        release.wait(TIMEOUT)
        finished.set()

    handle = intr.register(efd, slow)
    efd.signal()
    assert entered.wait(TIMEOUT)
    unregistered = threading.Event()

    def unregister() -> None:
        intr.unregister(handle)
        unregistered.set()

    other = threading.Thread(target=unregister)
    other.start()
    assert not unregistered.wait(0.1)  # still inside the callback
    release.set()
    assert unregistered.wait(TIMEOUT)
    assert finished.is_set()
    other.join(TIMEOUT)


def test_unregister_self_and_another_from_inside_a_callback(
        intr: InterruptThread, new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    log: list[tuple[str, int, int, Any]] = []
    handles: dict[str, Registration] = {}

    def remove_both() -> None:
        # wait=True is the default: from inside the callback it must not wait for itself.
        assert intr.unregister(handles["a"])
        assert intr.unregister(handles["b"])

    a = Recorder(log, "a", action=remove_both)
    b = Recorder(log, "b")
    c = Recorder(log, "c")
    handles["a"] = intr.register(efd, a)
    handles["b"] = intr.register(efd, b)
    intr.register(efd, c)
    efd.signal()
    assert c.wait_calls(1)
    efd.signal()
    assert c.wait_calls(2)
    # `b` was unregistered before its turn in the first round: never called.
    assert [name for name, *_ in log] == ["a", "c", "c"]
    assert [r.callback for r in intr.registrations(efd)] == [c]


def test_unregister_fd_from_inside_a_callback(intr: InterruptThread,
                                              new_efd: Callable[[], EventFd]) -> None:
    efd, barrier_fd = new_efd(), new_efd()
    log: list[tuple[str, int, int, Any]] = []
    removed: list[int] = []
    a = Recorder(log, "a", action=lambda: removed.append(intr.unregister_fd(efd)))
    b = Recorder(log, "b")
    intr.register(efd, a)
    intr.register(efd, b)
    barrier = Recorder()
    intr.register(barrier_fd, barrier)
    efd.signal()
    assert a.wait_calls(1)
    barrier_fd.signal()
    assert barrier.wait_calls(1)
    assert removed == [2] and [name for name, *_ in log] == ["a"]
    assert intr.registrations(efd) == []


def test_register_a_new_one_from_inside_a_callback(intr: InterruptThread,
                                                   new_efd: Callable[[], EventFd]) -> None:
    efd, other_efd = new_efd(), new_efd()
    log: list[tuple[str, int, int, Any]] = []
    added_same = Recorder(log, "added-same-fd")
    added_other = Recorder(log, "added-other-fd")
    once = threading.Event()

    def add() -> None:
        if not once.is_set():
            once.set()
            intr.register(efd, added_same)
            intr.register(other_efd, added_other)

    first = Recorder(log, "first", action=add)
    intr.register(efd, first)
    efd.signal()
    assert first.wait_calls(1)
    other_efd.signal()
    assert added_other.wait_calls(1)
    # Registered during the round: first called on the next interrupt of its fd.
    assert added_same.calls == 0
    efd.signal()
    assert added_same.wait_calls(1)
    assert [name for name, *_ in log] == ["first", "added-other-fd", "first", "added-same-fd"]


def test_exception_in_callback_is_logged_and_the_thread_survives(
        intr: InterruptThread, new_efd: Callable[[], EventFd],
        caplog: pytest.LogCaptureFixture) -> None:
    efd = new_efd()

    def bad(fd: int, count: int, arg: Any) -> None:
        raise RuntimeError("device on fire")

    good = Recorder()
    intr.register(efd, bad)
    intr.register(efd, good)
    with caplog.at_level(logging.ERROR, logger="pmd.interrupts"):
        efd.signal()
        assert good.wait_calls(1)  # the rest of the round still runs
        efd.signal()
        assert good.wait_calls(2)  # and later rounds
    records = [r for r in caplog.records if r.name == "pmd.interrupts"]
    assert len(records) == 2
    assert records[0].exc_info is not None and "device on fire" in str(records[0].exc_info[1])
    assert intr.running


def test_hangup_or_error_on_an_fd_unregisters_it_and_logs(
        intr: InterruptThread, new_efd: Callable[[], EventFd],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # An eventfd cannot be made to hang up from user space; report EPOLLHUP
    # for it through an epoll that adds the flag to what the kernel says.
    efd = new_efd()
    hup_fd = efd.fileno()
    real_epoll = select.epoll

    class HangupEpoll:
        def __init__(self) -> None:
            self._ep = real_epoll()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._ep, name)

        def poll(self, *args: Any) -> list[tuple[int, int]]:
            return [(fd, mask | select.EPOLLHUP if fd == hup_fd else mask)
                    for fd, mask in self._ep.poll(*args)]

    monkeypatch.setattr(select, "epoll", HangupEpoll)  # the module pmd.interrupts uses
    cb = Recorder()
    handle = intr.register(efd, cb)
    with caplog.at_level(logging.WARNING, logger="pmd.interrupts"):
        efd.signal()
        deadline = time.monotonic() + TIMEOUT
        while handle.active and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not handle.active and cb.calls == 0
    assert intr.registrations(efd) == []
    assert any("hang-up" in r.getMessage() for r in caplog.records if r.name == "pmd.interrupts")


def test_fd_closed_while_registered_is_dropped_and_logged(
        intr: InterruptThread, new_efd: Callable[[], EventFd],
        caplog: pytest.LogCaptureFixture) -> None:
    # The wrong order (close before unregister) with the eventfd still open
    # elsewhere, as when VFIO or a dup holds it: epoll keeps reporting the
    # closed number. The thread must drop it, say so, and keep serving others.
    efd = new_efd()
    fd = os.dup(efd.fileno())
    cb = Recorder()
    handle = intr.register(fd, cb)  # only the dup is registered: one reader
    efd.signal()
    assert cb.wait_calls(1)  # watched by now
    with caplog.at_level(logging.ERROR, logger="pmd.interrupts"):
        os.close(fd)
        efd.signal()  # the same eventfd, through the fd still open
        deadline = time.monotonic() + TIMEOUT
        while handle.active and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not handle.active and cb.calls == 1
    assert any("reading fd" in r.getMessage() for r in caplog.records)
    other_efd = new_efd()
    other = Recorder()
    intr.register(other_efd, other)
    other_efd.signal()
    assert other.wait_calls(1)


def test_stop_joins_and_restart_works(intr: InterruptThread,
                                      new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    cb = Recorder()
    intr.register(efd, cb)
    efd.signal()
    assert cb.wait_calls(1)
    assert intr.stop(timeout=TIMEOUT)
    assert not intr.running
    assert not any(t.name == intr.name for t in threading.enumerate())
    assert intr.stop() is True  # idempotent
    efd.signal(7)  # while stopped: kept in the counter
    intr.start()  # registrations survive a stop
    assert cb.wait_calls(2)
    assert cb.log[-1][2] == 7
    assert intr.stop(timeout=TIMEOUT)
    second = Recorder()
    intr.register(efd, second)  # register starts it again too
    efd.signal()
    assert second.wait_calls(1)


def test_stop_from_inside_a_callback_ends_the_round(intr: InterruptThread,
                                                    new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    log: list[tuple[str, int, int, Any]] = []
    results: list[bool] = []
    stopper = Recorder(log, "stopper", action=lambda: results.append(intr.stop()))
    after = Recorder(log, "after")
    intr.register(efd, stopper)
    intr.register(efd, after)
    efd.signal()
    assert stopper.wait_calls(1)
    deadline = time.monotonic() + TIMEOUT
    while any(t.name == intr.name for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == intr.name for t in threading.enumerate())
    assert results == [False]  # could not join itself
    assert after.calls == 0


def test_shared_thread_is_one_daemon_named_pmd_intr(new_efd: Callable[[], EventFd]) -> None:
    shared = get_interrupt_thread()
    assert get_interrupt_thread() is shared
    efd = new_efd()
    seen: list[threading.Thread] = []
    cb = Recorder(action=lambda: seen.append(threading.current_thread()))
    handle = shared.register(efd, cb)
    try:
        efd.signal()
        assert cb.wait_calls(1)
        assert seen[0].name == "pmd-intr" and seen[0].daemon
    finally:
        shared.unregister(handle)
        assert shared.stop(timeout=TIMEOUT)


def test_no_fd_leak_after_many_register_unregister_cycles_and_stop() -> None:
    before = open_fds()
    intr = InterruptThread(name="pmd-intr-leak")
    for i in range(200):
        with EventFd() as efd:
            cb = Recorder()
            handle = intr.register(efd, cb)
            if i % 10 == 0:  # now and then through a full delivery
                efd.signal()
                assert cb.wait_calls(1)
            if i % 2:
                assert intr.unregister(handle)
            else:
                assert intr.unregister_fd(efd) == 1
        if i % 50 == 49:
            assert intr.stop(timeout=TIMEOUT)  # stop/start cycles too
    assert intr.stop(timeout=TIMEOUT)
    assert open_fds() == before


# --------------------------------------------------------------- direct wait


def test_wait_returns_on_signal(new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    timer = threading.Timer(0.05, efd.signal, args=(2,))
    timer.start()
    try:
        assert wait(efd, timeout=TIMEOUT) == 2
    finally:
        timer.cancel()
        timer.join(TIMEOUT)
    assert efd.drain() == 0  # wait drained it


def test_wait_times_out(new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    start = time.monotonic()
    assert wait(efd.fileno(), timeout=0.2) == 0
    assert time.monotonic() - start >= 0.2  # never early; no upper bound on a shared VM


def test_wait_with_the_counter_already_set_returns_at_once(new_efd: Callable[[], EventFd]) -> None:
    efd = new_efd()
    efd.signal(5)
    assert wait(efd, timeout=0) == 5  # timeout 0 only checks: the count must already be there
    assert efd.wait(timeout=0) == 0


def test_wait_is_correct_under_eintr(new_efd: Callable[[], EventFd]) -> None:
    # Signal handlers run in the main thread, so the wait must be there and a
    # helper thread interrupts it with SIGUSR1 several times.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are only delivered to handlers in the main thread")
    efd = new_efd()
    handled = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: handled.set())
    stop = threading.Event()
    main_id = threading.main_thread().ident
    assert main_id is not None

    def interrupt() -> None:
        while not stop.wait(0.02):
            signal.pthread_kill(main_id, signal.SIGUSR1)

    kicker = threading.Thread(target=interrupt)
    kicker.start()
    try:
        start = time.monotonic()
        assert wait(efd, timeout=0.3) == 0
        assert time.monotonic() - start >= 0.3  # EINTR did not cut the wait short
        assert handled.is_set()
        timer = threading.Timer(0.1, efd.signal)
        timer.start()
        assert wait(efd, timeout=TIMEOUT) == 1  # and a signal during EINTR storms still counts
        timer.join(TIMEOUT)
    finally:
        stop.set()
        kicker.join(TIMEOUT)
        signal.signal(signal.SIGUSR1, previous)


def test_wait_any_returns_the_count_of_each_fd_that_fired(new_efd: Callable[[], EventFd]) -> None:
    a, b, c = new_efd(), new_efd(), new_efd()
    timer = threading.Timer(0.05, c.signal, args=(3,))
    timer.start()
    try:
        assert wait_any([a, b, c], timeout=TIMEOUT) == [0, 0, 3]
    finally:
        timer.cancel()
        timer.join(TIMEOUT)
    a.signal()
    b.signal(2)
    assert wait_any([a, b, c], timeout=0) == [1, 2, 0]     # every fd is drained, not only the first
    assert a.drain() == b.drain() == 0


def test_wait_any_times_out_with_all_zeros(new_efd: Callable[[], EventFd]) -> None:
    a, b = new_efd(), new_efd()
    start = time.monotonic()
    assert wait_any([a, b.fileno()], timeout=0.2) == [0, 0]
    assert time.monotonic() - start >= 0.2


def test_wait_any_refuses_no_fds_and_non_eventfds(new_efd: Callable[[], EventFd]) -> None:
    with pytest.raises(ValueError, match="at least one eventfd"):
        wait_any([], timeout=0)
    with pytest.raises(TypeError, match="sequence of fds"):
        wait_any(new_efd(), timeout=0)  # type: ignore[arg-type]
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="not an eventfd"):
            wait_any([new_efd(), r], timeout=0)
    finally:
        os.close(r)
        os.close(w)


# ----------------------------------------------------------------- bad inputs


def test_closed_fd_is_refused_with_a_remedy(intr: InterruptThread) -> None:
    efd = EventFd()
    fd = efd.fileno()
    efd.close()
    with pytest.raises(ValueError, match="not open"):
        intr.register(fd, Recorder())
    with pytest.raises(ValueError, match="not open"):
        wait(fd, timeout=0)
    with pytest.raises(ValueError, match="closed EventFd"):
        intr.register(efd, Recorder())
    assert not intr.running  # nothing registered, nothing started


def test_non_callable_callback_is_a_type_error(intr: InterruptThread,
                                               new_efd: Callable[[], EventFd]) -> None:
    with pytest.raises(TypeError, match="callback must be callable"):
        intr.register(new_efd(), "not a function")  # type: ignore[arg-type]
    assert intr.registrations() == []


@pytest.mark.parametrize("timeout", [-0.001, -1, float("nan")])
def test_negative_timeout_is_a_value_error(new_efd: Callable[[], EventFd], timeout: float) -> None:
    with pytest.raises(ValueError, match=">= 0 seconds"):
        wait(new_efd(), timeout=timeout)


def test_non_eventfd_is_refused(intr: InterruptThread) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="not an eventfd.*EventFd"):
            intr.register(r, Recorder())
        with pytest.raises(ValueError, match="not an eventfd"):
            wait(r, timeout=0)
    finally:
        os.close(r)
        os.close(w)


def test_blocking_eventfd_is_refused_with_a_remedy(intr: InterruptThread) -> None:
    fd = os.eventfd(0)  # blocking: a read racing another reader could hang
    try:
        with pytest.raises(ValueError, match="set_blocking"):
            intr.register(fd, Recorder())
        with pytest.raises(ValueError, match="set_blocking"):
            wait(fd, timeout=0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("bad", ["3", 3.0, None, True])
def test_fd_of_the_wrong_type_is_a_type_error(intr: InterruptThread, bad: Any) -> None:
    with pytest.raises(TypeError, match="fileno"):
        intr.register(bad, Recorder())
    with pytest.raises(TypeError, match="fileno"):
        wait(bad, timeout=0)


def test_unregister_needs_a_registration_handle(intr: InterruptThread,
                                                new_efd: Callable[[], EventFd]) -> None:
    with pytest.raises(TypeError, match="Registration"):
        intr.unregister(new_efd().fileno())  # type: ignore[arg-type]
    other = InterruptThread(name="pmd-intr-other")
    efd = new_efd()
    handle = other.register(efd, Recorder())
    try:
        with pytest.raises(ValueError, match="another InterruptThread"):
            intr.unregister(handle)
    finally:
        other.unregister(handle)
        assert other.stop(timeout=TIMEOUT)
