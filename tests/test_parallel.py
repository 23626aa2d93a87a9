"""Queues in parallel threads: a burst never holds the GIL, and N queue pairs run
in N threads at once with byte-exact traffic.

The GIL test does not read the source: it runs a burst in one thread while
another thread can only make progress when the GIL is free. With the switch
interval raised to minutes, CPython hands the GIL over only when its holder
releases it of its own accord (a ``with nogil:`` block, a blocking call), so the
watcher's timestamps inside a burst's start and end prove the burst released it.
A pure-Python loop of the same length, which holds it, is the control: the same
harness must find no timestamp inside it.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import pmd
from pmd.driver import _fwd, _queue
from pmd.loopback import Loopback

QUEUE = 4096
LEN = 1514


class GilWatcher:
    """A thread that stamps the time whenever it holds the GIL, and gives it up at once."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gil-watcher", daemon=True)

    def _run(self) -> None:
        stamps, now, stop = self.stamps, time.perf_counter, self._stop
        while not stop.is_set():
            stamps.append(now())
            time.sleep(0)            # releases the GIL and waits to take it back

    def __enter__(self) -> "GilWatcher":
        self._old = sys.getswitchinterval()
        sys.setswitchinterval(300.0)  # no forced hand-over: only voluntary releases
        self._thread.start()
        while not self.stamps:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        sys.setswitchinterval(self._old)

    def ran_during(self, call: Callable[[], object]) -> tuple[int, float]:
        """How many times the watcher ran while ``call`` ran, and how long it took."""
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        stamps = list(self.stamps)
        return bisect.bisect_left(stamps, t1) - bisect.bisect_right(stamps, t0), t1 - t0


def frames(n: int, seed: int, lo: int = 60, hi: int = LEN) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, hi), dtype=np.uint8)
    return data, rng.integers(lo, hi + 1, n).astype(np.uint32)


@pytest.fixture
def lb():
    with Loopback(queue_size=QUEUE, n_buffers=4 * QUEUE + 512) as lb:
        yield lb


def _drain(lb: Loopback) -> None:
    """Both rings empty again: the device takes what was sent, the driver drops what came."""
    while lb.step(QUEUE):
        pass
    while lb.driver_rx.rx_discard(256):
        pass
    lb.driver_tx.reclaim()


def _sent(lb: Loopback, seed: int) -> None:
    data, lens = frames(QUEUE, seed)
    assert lb.driver_tx.tx_burst(data, lens) == QUEUE


# Each prepares one long call (a queue's worth of packets, or 200,000 bursts of the
# C forwarding loops) on an empty loopback, and returns it.
def _tx_copy(lb: Loopback) -> Callable[[], object]:
    data, lens = frames(QUEUE, 1)
    return lambda: lb.driver_tx.tx_burst(data, lens)


def _rx_copy(lb: Loopback) -> Callable[[], object]:
    _sent(lb, 2)
    assert lb.step(QUEUE) == QUEUE
    out = np.zeros((QUEUE, lb.driver_rx.max_packet_len), np.uint8)
    got = np.zeros(QUEUE, np.uint32)
    return lambda: lb.driver_rx.rx_burst(out, got)


def _rx_zc(lb: Loopback) -> Callable[[], object]:
    _sent(lb, 3)
    assert lb.step(QUEUE) == QUEUE
    ids = np.zeros(QUEUE, np.uint32)
    got = np.zeros(QUEUE, np.uint32)
    return lambda: lb.driver_rx.rx_burst_zc(ids, got) and lb.pool.free(ids[:QUEUE])


def _device_step(lb: Loopback) -> Callable[[], object]:
    _sent(lb, 4)
    return lambda: lb.step(QUEUE)


def _txonly_loop(lb: Loopback) -> Callable[[], object]:
    # the ring fills after the first bursts; the rest find it full and reclaim nothing
    return lambda: _fwd.txonly(lb.driver_tx, 64, 32, 200_000)


def _forward_loop(lb: Loopback) -> Callable[[], object]:
    return lambda: _fwd.forward(lb.driver_rx, lb.driver_tx, 32, False, 200_000, 0)


BURSTS = {"tx_burst": _tx_copy, "rx_burst": _rx_copy, "rx_burst_zc": _rx_zc,
          "device_tx_to_rx": _device_step, "fwd_txonly": _txonly_loop, "fwd_forward": _forward_loop}


@pytest.mark.parametrize("kind", sorted(BURSTS))
def test_a_burst_lets_another_python_thread_run_while_it_runs(lb, kind):
    # A burst of a millisecond or two: on a loaded machine the watcher's thread may
    # not be scheduled in time, so up to 20 tries; one that holds the GIL never passes.
    tries = []
    with GilWatcher() as w:
        for _ in range(20):
            _drain(lb)
            call = BURSTS[kind](lb)
            ran, took = w.ran_during(call)
            tries.append((ran, round(took * 1e3, 2)))
            if ran:
                break
        # the control: a pure-Python loop at least as long holds the GIL
        spin = max(100_000, int(max(t for _r, t in tries) * 2e4))
        control, control_took = w.ran_during(lambda: sum(range(spin)))
    assert control == 0, f"the harness saw the watcher run during code holding the GIL ({control})"
    assert control_took > 0
    assert tries[-1][0] > 0, f"{kind} held the GIL while it ran: (watcher runs, ms) per try {tries}"


# ------------------------------------------------------------ N queue pairs, N threads

def _echo(port: pmd.Port, q: int, n: int, seed: int, errors: list, results: dict) -> None:
    """Send ``n`` random frames on tx queue q and receive them on rx queue q (the built-in
    device's loopback wire returns queue q's traffic on queue q)."""
    try:
        data, lens = frames(n, seed, 60, 1514)
        want = [bytes(data[i, :lens[i]]) for i in range(n)]
        got: list[bytes] = []
        rxq, txq = port.rx_queue(q), port.tx_queue(q)
        out = np.zeros((64, rxq.max_packet_len), np.uint8)
        glen = np.zeros(64, np.uint32)
        sent = 0
        deadline = time.monotonic() + 60
        while len(got) < n and time.monotonic() < deadline:
            if sent < n:
                sent += txq.tx_burst(data[sent:sent + 32], lens[sent:sent + 32])
            k = rxq.rx_burst(out, glen)
            got += [bytes(out[i, :glen[i]]) for i in range(k)]
        results[q] = (want, got, threading.get_native_id())
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


@pytest.mark.parametrize("pairs", [2, 4])
def test_n_queue_pairs_in_n_threads_carry_byte_exact_traffic(pairs):
    with pmd.open_port("sim", wire="loopback", queue_pairs=pairs,
                       disable="RSS,HASH_REPORT") as port:   # the loopback wire keeps each pair's traffic on it
        port.start(queue_pairs=pairs)
        assert port.queue_pairs == pairs
        errors: list = []
        results: dict = {}
        threads = [threading.Thread(target=_echo, args=(port, q, 3000, 100 + q, errors, results))
                   for q in range(pairs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert sorted(results) == list(range(pairs))
        for q, (want, got, _tid) in results.items():
            assert len(got) == len(want), f"queue {q}: {len(got)} of {len(want)} frames came back"
            assert got == want, f"queue {q}: frames differ or came out of order"
        assert len({tid for _w, _g, tid in results.values()}) == pairs
        s = port.stats()
        for q in range(pairs):
            assert s["rx_queues"][q]["packets"] == 3000 and s["tx_queues"][q]["packets"] == 3000, s


# ------------------------------------------------------------ one pair, two threads

def test_a_pool_call_waits_for_another_threads_burst_on_the_same_pool(lb):
    # The receive and transmit queue of a pair share a pool whose free stack has no
    # atomics: a burst holds the pool's turn, and anything else on that pool in
    # another thread (here pool.alloc) waits for it. The forwarding loop holds the
    # turn for all its polls; without turns alloc would return while it runs.
    ended = threading.Event()
    ran_during: list[bool] = []

    def long_burst() -> None:
        _fwd.forward(lb.driver_rx, lb.driver_tx, 32, False, 3_000_000, 0)
        ended.set()

    for polls_left in range(5):          # a loaded machine may not start the loop in time
        ended.clear()
        t = threading.Thread(target=long_burst)
        t.start()
        time.sleep(0.02)
        before = ended.is_set()
        b = lb.pool.alloc()
        ran_during.append(not before)
        after = ended.is_set()
        t.join(60)
        lb.pool.free(b)
        if not before:
            assert after, "pool.alloc returned while another thread's burst held the pool"
            break
    assert any(ran_during), "the forwarding loop always ended before pool.alloc was called"


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero_copy"])
def test_the_receive_and_transmit_queue_of_one_pair_in_two_threads(zero_copy):
    # DPDK lets one lcore receive on queue 0 and another transmit on it; here they
    # take turns on the pair's pool. Every frame comes back byte-exact and in order,
    # and no buffer is lost or freed twice (a corrupted free stack shows here or kills
    # the process).
    n = 20000
    data, lens = frames(n, 7, 60, 1514)
    with pmd.open_port("sim", wire="loopback") as port:
        port.start(queue_size=256)
        rxq, txq = port.rx_queue(0), port.tx_queue(0)
        pool = rxq.pool
        assert txq.pool is pool
        errors: list = []
        got: list[bytes] = []

        def send() -> None:
            try:
                sent = 0
                deadline = time.monotonic() + 60
                while sent < n and time.monotonic() < deadline:
                    sent += txq.tx_burst(data[sent:sent + 32], lens[sent:sent + 32])
                    if sent - len(got) > 128:     # the wire has no flow control: stay in the rx ring
                        time.sleep(0)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        def receive() -> None:
            try:
                out = np.zeros((64, rxq.max_packet_len), np.uint8)
                ids = np.zeros(64, np.uint32)
                glen = np.zeros(64, np.uint32)
                deadline = time.monotonic() + 60
                while len(got) < n and time.monotonic() < deadline:
                    if zero_copy:
                        k = rxq.rx_burst_zc(ids, glen)
                        got.extend(bytes(pool.data[ids[i], :glen[i]]) for i in range(k))
                        pool.free(ids[:k])
                    else:
                        k = rxq.rx_burst(out, glen)
                        got.extend(bytes(out[i, :glen[i]]) for i in range(k))
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        threads = [threading.Thread(target=receive), threading.Thread(target=send)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        want = [bytes(data[i, :lens[i]]) for i in range(n)]
        assert len(got) == n, f"{len(got)} of {n} frames came back ({port.stats()['rx_dropped']} dropped)"
        assert got == want, "frames differ or came out of order"
        port.stop()
        assert pool.available == pool.n_buffers, "a buffer was lost or freed twice"


# The GIL hand-off between queues' threads (csrc/pmd_gil.h): a burst that ends while
# another pmd thread runs the Python between two of its bursts spins for the GIL
# instead of sleeping on CPython's condition variable, but only briefly.
def _burst_rounds(lb: Loopback, stop: threading.Event, rounds: list[int], i: int, errors: list,
                  hold: float = 0.0) -> None:
    try:
        ids = np.zeros(128, np.uint32)
        lens = np.zeros(128, np.uint32)
        while not stop.is_set():
            _fwd.txonly(lb.driver_tx, 64, 32, 4)
            lb.step(128)
            n = lb.driver_rx.rx_burst_zc(ids, lens)
            lb.pool.free(ids, n)
            rounds[i] += 1
            end = time.perf_counter() + hold
            while time.perf_counter() < end:      # Python holding the GIL
                pass
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)
        stop.set()


def _two_threads_bursting(seconds: float, holds: tuple[float, float],
                          until: Callable[[], bool] | None = None) -> list[int]:
    """Two threads bursting on loopbacks of their own for ``seconds``, or, with ``until``,
    until it holds (checked every 20 ms, ``seconds`` at most): a hand-off needs both
    threads running at once, which a loaded machine grants only now and then."""
    stop = threading.Event()
    rounds = [0, 0]
    errors: list[BaseException] = []
    lbs = [Loopback(queue_size=256, n_buffers=1024) for _ in range(2)]
    threads = [threading.Thread(target=_burst_rounds, args=(lbs[i], stop, rounds, i, errors, holds[i]))
               for i in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set() and not (until is not None and until()):
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for lb in lbs:
            lb.close()
    assert not errors, errors
    return rounds


needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or _queue.GIL_ALWAYS_KEPT,
    reason="needs two CPUs and a build whose bursts release the GIL (not PMD_DEBUG)")


# (0, 0): each thread's bursts end while the other runs the Python between two of its
# own, and take the GIL by spinning (spun). (0, 2 ms): thread 1 holds the GIL 2 ms after
# each round, so thread 0's bursts ending then spin to the bound and sleep (spun_out);
# both threads still make progress.
@needs_two_cpus
@pytest.mark.parametrize("holds, counter", [((0.0, 0.0), "spun"), ((0.0, 0.002), "spun_out")],
                         ids=["between-bursts", "held-long"])
def test_a_burst_spins_for_a_gil_another_queues_thread_holds_between_bursts_and_only_briefly(holds, counter):
    before = _queue.gil_handoffs()
    rounds = _two_threads_bursting(20.0, holds, until=lambda: _queue.gil_handoffs()[counter] > before[counter])
    after = _queue.gil_handoffs()
    assert min(rounds) > 0, rounds
    assert after[counter] > before[counter], (before, after)


def test_a_process_on_one_cpu_never_spins_for_the_gil():
    # the holder could not run while the waiter spins on its only CPU
    code = textwrap.dedent("""
        import importlib.util, os, sys
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        sys.path.insert(0, sys.argv[1])           # the pmd this test runs on
        spec = importlib.util.spec_from_file_location("helpers", sys.argv[2])
        t = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(t)
        from pmd.driver import _queue
        rounds = t._two_threads_bursting(0.3, (0.0, 0.0))
        assert min(rounds) > 0, rounds
        print(_queue.gil_handoffs())
    """)
    root = str(Path(pmd.__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code, root, __file__], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'spun': 0, 'spun_out': 0}", out.stdout
