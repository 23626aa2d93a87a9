"""The built-in device's data path: one thread that polls the rings while the driver runs.

While the device is live (DRIVER_OK, bus mastering on, no NEEDS_RESET) the
engine thread loops over the enabled queue pairs:

- **loopback, no filter on**: ``tx_to_rx(tx, rx)`` (:mod:`pmd.sim._tx`) moves
  packets from each tx ring straight into the rx ring of the same pair, one copy;
- **otherwise**: ``device_tx_burst`` takes what the driver sent into numpy rows
  and hands them to the wire; ``wire.receive`` gives packets for the driver,
  the receive filter (promiscuous, all-multicast, MAC table: the control
  queue's state) drops what is not for it, and ``device_rx_burst`` writes the
  rest into the rx ring. Packets the driver has no buffers for yet wait
  (back-pressure: the wire is not asked for more meanwhile);
- **RSS or hash report configured** (RSS_CONFIG, HASH_CONFIG: ``Engine.rss``):
  what the wire gives is classified (``RssState.classify_burst``: queue, hash
  and report per packet) and each rx queue takes its packets in order
  (``device_rx_steered``, the hash in the 20-byte header); a full queue holds
  up only its own packets. The ring-to-ring and generator fast paths are not
  used then: they write into one pair's ring without looking at the packets;
- the **control queue** is served in Python (one command at a time, 5.1.6.5).

All ring work happens inside the Cython functions, with the GIL released and
every descriptor checked (``docs/rings.md``). Interrupts are the device
queues' own: each writes its MSI-X eventfd when the driver did not suppress it.

Idle back-off: after ``spin`` empty rounds the thread sleeps, starting at
``sleep_min`` and doubling to ``sleep_max`` while nothing moves; any packet
resets it, and :meth:`Engine.kick` (a doorbell written by message) wakes it.
So a busy device polls and an idle one costs a few percent of a core. The thread's
timer slack is 1 ns (:func:`fine_timer_slack`), so those short sleeps are short.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from ._rss import RssState
from ._rx import device_rx_burst, device_rx_steered
from ._tx import device_tx_burst, tx_to_rx
from ._virtqueue import DeviceQueue
from ..errors import DeviceError
from .wires import Batch, Lengths, Rows, Wire

log = logging.getLogger("pmd.sim.engine")

_PR_SET_TIMERSLACK = 29          # <linux/prctl.h>


def fine_timer_slack() -> bool:
    """Make this thread's sleeps end on time (prctl PR_SET_TIMERSLACK is per thread).

    Linux lets a sleep run late by the thread's timer slack, 50 us by default.
    The engine yields the GIL with ``time.sleep(0)`` after empty rounds (every
    round before YIELDS_PER_SLEEP existed), and with the default slack each took about 57 us: a burst
    circulating between driver and device waited that long at every turn
    (0.5 Mpps; bench/sim.py, docs/performance.md). With 1 ns it takes about a
    microsecond and still lets other threads take the GIL. False where the
    call is not available.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False

BUDGET = 256          # packets per queue per round
SPIN = 2000           # empty rounds before the first sleep
SLEEP_MIN = 20e-6
SLEEP_MAX = 1e-3
YIELDS_PER_SLEEP = 8  # empty rounds that only sched_yield() between two time.sleep(0)

_BCAST = 0xFFFFFFFFFFFF
_WEIGHTS = np.array([1 << 40, 1 << 32, 1 << 24, 1 << 16, 1 << 8, 1], np.uint64)


def mac_key(mac: bytes) -> int:
    return int.from_bytes(mac, "big")


@dataclass
class RxFilter:
    """Receive filtering (5.1.6.5.1, 5.1.6.5.2): what the control queue set.

    Promiscuous: everything. Otherwise: the device's MAC, broadcast, the
    unicast table; multicast when all-multicast is on or it is in the multicast
    table. Reset values: promiscuous on (as QEMU's virtio-net), tables empty.
    """

    mac: bytes
    promiscuous: bool = True
    allmulti: bool = False
    unicast: set[int] = field(default_factory=set)
    multicast: set[int] = field(default_factory=set)

    @property
    def accept_all(self) -> bool:
        return self.promiscuous

    def accepts(self, dst: bytes) -> bool:
        key = mac_key(dst)
        if self.promiscuous or key == _BCAST:
            return True
        if dst[0] & 1:
            return self.allmulti or key in self.multicast
        return dst == self.mac or key in self.unicast

    def mask(self, rows: Rows, n: int) -> npt.NDArray[np.bool_] | None:
        """Which of ``rows[:n]`` to deliver; None when all of them."""
        if self.promiscuous or n == 0:
            return None
        dst = rows[:n, :6]
        keys = (dst.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)
        multicast = (dst[:, 0] & 1).astype(bool)
        ok_uni = keys == np.uint64(mac_key(self.mac))
        if self.unicast:
            ok_uni |= np.isin(keys, np.fromiter(self.unicast, np.uint64))
        ok_multi = np.full(n, self.allmulti)
        if self.multicast and not self.allmulti:
            ok_multi |= np.isin(keys, np.fromiter(self.multicast, np.uint64))
        ok = (keys == np.uint64(_BCAST)) | np.where(multicast, ok_multi, ok_uni)
        return None if ok.all() else ok


class SteeredBatch:
    """A batch from the wire, classified: each packet's rx queue, hash and report, which
    are delivered, and how many are left per queue."""

    __slots__ = ("batch", "queues", "hashes", "reports", "done", "left")

    def __init__(self, batch: Batch, rss: RssState, source: int) -> None:
        n = batch.n
        self.batch = batch
        self.queues = np.zeros(n, np.uint16)
        self.hashes = np.zeros(n, np.uint32)
        self.reports = np.zeros(n, np.uint16)
        self.done = np.zeros(n, np.uint8)
        rss.classify_burst(batch.rows, batch.lengths, batch.start, n, source, self.queues, self.hashes,
                           self.reports)
        counts = np.bincount(self.queues[batch.start:n])
        self.left = {int(q): int(c) for q, c in enumerate(counts) if c}


@dataclass
class QueuePairPlan:
    index: int
    rx: DeviceQueue | None
    tx: DeviceQueue | None


@dataclass
class Plan:
    """What the engine runs: the enabled queues and the negotiated format."""

    pairs: list[QueuePairPlan]
    ctrl: DeviceQueue | None
    hdr_len: int = 12
    mergeable: bool = False

    def queues(self) -> list[DeviceQueue]:
        qs = [q for p in self.pairs for q in (p.rx, p.tx) if q is not None]
        return qs + ([self.ctrl] if self.ctrl is not None else [])


#: ``control(cls, cmd, data) -> ack`` for one control-queue command
ControlHandler = Callable[[int, int, bytes], int]


class Engine:
    """``Engine(wire, rx_filter, control, name="pmd-sim")``: start/stop the device's data path.

    ``on_error(exc)`` is called from the engine thread if it dies, so the
    device can tell the driver (DEVICE_NEEDS_RESET) instead of going silent.

    The owner (the device model) builds a :class:`Plan` from its enabled
    queues and calls :meth:`start`; :meth:`stop` returns once the thread is
    gone, so queues, DMA windows and interrupt fds can be changed safely.
    ``active_pairs`` (VQ_PAIRS_SET) and ``link_up`` are read every round.
    """

    def __init__(self, wire: Wire, rx_filter: RxFilter, control: ControlHandler, *, name: str = "pmd-sim",
                 budget: int = BUDGET, spin: int = SPIN, sleep_min: float = SLEEP_MIN,
                 sleep_max: float = SLEEP_MAX, row_width: int = 2048,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.wire = wire
        self.on_error = on_error
        self.filter = rx_filter
        self.control = control
        self.name = name
        self.budget = budget
        self.spin = spin
        self.sleep_min = sleep_min
        self.sleep_max = sleep_max
        self.row_width = row_width
        self.active_pairs = 1
        self.link_up = True
        self._plan: Plan | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._spare: deque[tuple[Rows, Lengths]] = deque()
        self._pending: dict[int, Batch] = {}
        self._steered: dict[int, SteeredBatch] = {}
        #: RSS and hash report as the control queue set them (5.1.6.5.7); off after reset
        self.rss = RssState()
        self.error: BaseException | None = None
        # statistics (the engine thread writes, anyone reads)
        self.tx_packets = 0          # taken from the driver's tx rings
        self.rx_packets = 0          # written into the driver's rx rings
        self.rx_filtered = 0         # dropped by the receive filter
        self.tx_link_down = 0        # sent while the link was down: dropped
        self.rx_steered = 0          # delivered by the RSS table (or with a hash report)
        self.rx_no_queue = 0         # steered to a receive queue the driver did not enable: dropped
        self.ctrl_commands = 0
        self.ctrl_errors = 0
        self.rounds = 0
        self.sleeps = 0

    # ---- control ----
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, plan: Plan) -> None:
        if self.running:
            raise RuntimeError("engine already running")
        self._plan = plan
        self._stop.clear()
        self.error = None
        for q in plan.queues():
            q.disable_notify()        # we poll: 2.7.10 (NO_NOTIFY / avail_event)
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stop.set()
        self._wake.set()
        t.join()
        self._thread = None
        self._plan = None

    def kick(self) -> None:
        """A doorbell: wake the thread if it sleeps."""
        self._wake.set()

    def flush(self) -> None:
        """Forget packets waiting for the driver (device reset). Only while stopped."""
        for batch in self._pending.values():
            batch.done()
        self._pending.clear()
        for sb in self._steered.values():
            sb.batch.done()
        self._steered.clear()

    # ---- the thread ----
    def _main(self) -> None:
        fine_timer_slack()
        try:
            self._run()
        except BaseException as e:      # a bug, not a driver error: report it, stop
            self.error = e
            log.exception("%s: engine stopped", self.name)
            if self.on_error is not None:
                # From this thread: the callback must not stop() (join) the engine.
                self.on_error(e)

    def _scratch(self) -> tuple[Rows, Lengths]:
        try:
            return self._spare.pop()
        except IndexError:
            return (np.empty((self.budget, self.row_width), np.uint8), np.empty(self.budget, np.uint32))

    def _give_back(self, rows: Rows, lengths: Lengths) -> None:
        self._spare.append((rows, lengths))

    def _run(self) -> None:
        plan = self._plan
        assert plan is not None
        wire = self.wire
        stop = self._stop
        wake = self._wake
        budget, hdr_len, mergeable = self.budget, plan.hdr_len, plan.mergeable
        rxqs: dict[int, DeviceQueue] = {p.index: p.rx for p in plan.pairs if p.rx is not None}
        txs = [(p.index, p.tx) for p in plan.pairs if p.tx is not None]
        ctrl = plan.ctrl
        ring_to_ring = wire.ring_to_ring
        idle = 0
        sleep = self.sleep_min
        sync = getattr(wire, "sync", None)
        turns = wire.turns
        tx_list = [tx for _index, tx in txs]
        native_turns = type(wire).turns is not Wire.turns      # only the generator has them
        while not stop.is_set():
            moved = 0
            active = self.active_pairs
            link = self.link_up
            native = False
            # hashing on (or steered batches still waiting): every packet is looked at
            steer = self.rss.active or bool(self._steered)
            rx_list = [rxqs[j] for j in range(active) if j in rxqs] if native_turns else []
            if rx_list and link and not self._pending and not self._steered and len(rx_list) == active:
                # the wire's own turns in C (the generator at full rate, every pair,
                # steered as RSS says): no Python per turn
                done = turns(tx_list, rx_list, budget, hdr_len, mergeable, self.filter.accepts, self.rss)
                if done is not None:
                    native = True
                    self.tx_packets += done[0]
                    self.rx_packets += done[1]
                    if self.rss.active:
                        self.rx_steered += done[1]
                    moved = done[0] + done[1]
            fast = ring_to_ring and link and self.filter.accept_all and not steer
            for index, tx in (() if native else txs):
                if fast:
                    rx = rxqs.get(index % active)
                    if rx is not None and index % active not in self._pending:
                        n = tx_to_rx(tx, rx, budget, hdr_len, mergeable)
                        self.tx_packets += n
                        self.rx_packets += n
                        moved += n
                        continue
                moved += self._transmit(index, tx, link, hdr_len)
            if link and steer and not native:
                moved += self._receive_steered(rxqs, active, hdr_len, mergeable)
            elif link and not native:
                for j in range(active):
                    rx = rxqs.get(j)
                    if rx is not None:
                        moved += self._receive(j, rx, active, hdr_len, mergeable)
            if ctrl is not None and ctrl.avail_pending:
                self._serve_control(ctrl)
                moved += 1
            self.rounds += 1
            if moved:
                idle = 0
                sleep = self.sleep_min
                continue
            idle += 1
            if idle < self.spin:
                # Let other Python threads in (a driver in this process, the server):
                # the rings are polled without the GIL, but this loop holds it.
                # sched_yield releases the GIL for ~1 us, but a waiter on another
                # core may lose the race to take it back; a real sleep (~9 us here
                # even with a 1 ns timer slack) hands it over for sure. So: yield,
                # and sleep every YIELDS_PER_SLEEP-th empty round.
                if idle % YIELDS_PER_SLEEP:
                    os.sched_yield()
                else:
                    time.sleep(0)
                continue
            if idle == self.spin and sync is not None:
                sync()
            self.sleeps += 1
            if wake.wait(sleep):
                wake.clear()
                sleep = self.sleep_min
            else:
                sleep = min(sleep * 2, self.sleep_max)

    def _transmit(self, index: int, tx: DeviceQueue, link: bool, hdr_len: int) -> int:
        if not tx.avail_pending:
            return 0        # nothing sent: skip the burst call (its buffer setup costs ~1 us)
        rows, lengths = self._scratch()
        n = device_tx_burst(tx, rows, lengths, hdr_len)
        if n == 0:
            self._spare.append((rows, lengths))
            return 0
        self.tx_packets += n
        if not link:
            self.tx_link_down += n
            self._spare.append((rows, lengths))
            return n
        batch = Batch(rows, lengths, n, self._give_back)
        if not self.wire.transmit(index, batch):
            batch.done()
        return n

    def _receive(self, j: int, rx: DeviceQueue, active: int, hdr_len: int, mergeable: bool) -> int:
        batch = self._pending.get(j)
        if batch is None:
            k = self.wire.deliver_direct(j, active, rx, self.budget, hdr_len, mergeable, self.filter.accepts)
            if k is not None:          # the wire wrote into the ring itself (generator fast path)
                if k:
                    self.rx_packets += k
                    self.wire.delivered(j, k)
                return k
            got = self.wire.receive(j, active, self.budget)
            if got is None:
                return 0
            batch = self._filtered(got)
            if batch is None:
                return 1        # something happened: do not back off
            self._pending[j] = batch
        s = batch.start
        k = device_rx_burst(rx, batch.rows[s:], batch.lengths[s:], batch.n - s, hdr_len, mergeable)
        if k:
            batch.start += k
            self.rx_packets += k
            self.wire.delivered(j, k)
        if batch.start >= batch.n:
            del self._pending[j]
            batch.done()
        return k

    def _receive_steered(self, rxqs: dict[int, DeviceQueue], active: int, hdr_len: int, mergeable: bool) -> int:
        """The wire's packets for each pair, each to the rx queue RSS picks (5.1.6.5.7.2),
        its hash in the header when HASH_REPORT gave it room (5.1.6.4.4)."""
        moved = 0
        for j in range(active):
            sb = self._steered.get(j)
            if sb is None:
                batch = self._pending.pop(j, None)      # taken before hashing was configured
                if batch is None:
                    got = self.wire.receive(j, active, self.budget)
                    if got is None:
                        continue
                    batch = self._filtered(got)
                    if batch is None:
                        moved += 1
                        continue
                sb = SteeredBatch(batch, self.rss, j)
                self._steered[j] = sb
            b = sb.batch
            delivered = 0
            for q in list(sb.left):
                rx = rxqs.get(q)
                if rx is None:
                    # 5.1.6.5.7.1: the driver must name only enabled queues; it did not
                    k = int(np.count_nonzero((sb.queues[b.start:b.n] == q) & (sb.done[b.start:b.n] == 0)))
                    sb.done[b.start:b.n][sb.queues[b.start:b.n] == q] = 1
                    self.rx_no_queue += k
                    del sb.left[q]
                    moved += k
                    continue
                k = device_rx_steered(rx, b.rows, b.lengths, sb.queues, sb.hashes, sb.reports, sb.done, b.start,
                                      b.n, q, hdr_len, mergeable)
                if k:
                    delivered += k
                    sb.left[q] -= k
                    if not sb.left[q]:
                        del sb.left[q]
            if delivered:
                self.rx_packets += delivered
                self.rx_steered += delivered
                self.wire.delivered(j, delivered)
                moved += delivered
            if not sb.left:
                del self._steered[j]
                b.done()
        return moved

    def _filtered(self, batch: Batch) -> Batch | None:
        s = batch.start
        ok = self.filter.mask(batch.rows[s:], batch.n - s)
        if ok is None:
            return batch
        kept = int(np.count_nonzero(ok))
        self.rx_filtered += batch.n - s - kept
        if kept == 0:
            batch.done()
            return None
        rows = np.ascontiguousarray(batch.rows[s:batch.n][ok])
        lengths = np.ascontiguousarray(batch.lengths[s:batch.n][ok])
        batch.done()
        return Batch(rows, lengths, kept)

    def _serve_control(self, ctrl: DeviceQueue) -> None:
        """5.1.6.5: each chain is ``{u8 class; u8 command; data}`` then ``u8 ack`` (device-writable)."""
        # The driver picks the descriptor lengths: copy out no more than the
        # longest command the device accepts, MAC_TABLE_SET with two full tables
        # (5.1.6.5.2: class, command, then le32 entries + 6-byte MACs, twice; 64
        # entries a table, QEMU's MAC_TABLE_ENTRIES and the model's limit).
        # A longer chain is answered VIRTIO_NET_ERR without being read.
        max_command = 2 + 2 * (4 + 64 * 6)
        virtio_net_err = 1
        while True:
            try:
                chain = ctrl.pop_chain(max_command)
            except DeviceError:
                self.ctrl_errors += 1     # refused and counted by the queue; returned if it could be
                continue
            if chain is None:
                break
            head, readable, capacity = chain
            self.ctrl_commands += 1
            if readable is None:
                self.ctrl_errors += 1
                ctrl.complete(head, bytes([virtio_net_err]) if capacity >= 1 else b"")
                continue
            if len(readable) < 2 or capacity < 1:
                self.ctrl_errors += 1
                ctrl.complete(head, b"")
                continue
            ack = self.control(readable[0], readable[1], readable[2:])
            if ack:
                self.ctrl_errors += 1
            ctrl.complete(head, bytes([ack]))
        ctrl.publish_used()

    # ---- statistics ----
    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "tx_packets": self.tx_packets, "rx_packets": self.rx_packets,
                "rx_filtered": self.rx_filtered, "tx_link_down": self.tx_link_down,
                "rx_steered": self.rx_steered, "rx_no_queue": self.rx_no_queue,
                "rss": {"active": self.rss.active, "redirect": self.rss.redirect,
                        "hash_types": self.rss.hash_types, "table_length": len(self.rss.table),
                        "unclassified_queue": self.rss.unclassified_queue, "key_length": self.rss.key_len},
                "ctrl_commands": self.ctrl_commands, "ctrl_errors": self.ctrl_errors,
                "rounds": self.rounds, "sleeps": self.sleeps, "active_pairs": self.active_pairs,
                "waiting": sum(b.remaining for b in list(self._pending.values()))
                + sum(sum(sb.left.values()) for sb in list(self._steered.values())),
                "error": repr(self.error) if self.error else None}


__all__ = ["Engine", "Plan", "QueuePairPlan", "RxFilter", "ControlHandler", "mac_key"]
