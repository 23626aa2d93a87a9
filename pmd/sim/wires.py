"""What is behind the built-in device: the wire its packets go out on and come in from.

The device's engine (:mod:`pmd.sim.engine`) takes what the driver transmits
out of the tx rings into flat numpy rows (``device_tx_burst``) and hands them
to :meth:`Wire.transmit`; it asks :meth:`Wire.receive` for packets for the
driver and writes them into the rx rings (``device_rx_burst``). A wire sees
packets as a :class:`Batch`: ``rows[i, :lengths[i]]`` for ``start <= i < n``,
Ethernet frames without the virtio-net header and without FCS.

| wire | what it is |
| --- | --- |
| ``loopback`` | the driver's own tx comes back on its rx (the engine moves ring to ring with ``tx_to_rx()`` while no receive filter is on) |
| ``pair`` | two devices back to back: A's tx is B's rx and B's tx is A's rx (:func:`pair_wires`) |
| ``pcap`` | rx from a capture file (optionally at a rate, looped), tx written to another |
| ``generator`` | synthetic UDP flows at a rate and size; checks the sequence numbers of what comes back |
| ``tap`` | a Linux TAP interface (``IFF_TAP | IFF_NO_PI``, non-blocking): the kernel's stack is the peer |
| ``null`` | tx dropped (counted), nothing received |

Each engine thread calls its wire's ``transmit``/``receive``; the two ends of
a ``pair`` are called from two engines and meet only in lock-free deques.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from ..abi.ethernet import udp_frame
from ..abi.pcap import PcapWriter, read_pcap
from ._rss import RssState
from ._rx import device_rx_generate
from ._turns import generator_turns
from ._virtqueue import DeviceQueue

Rows = npt.NDArray[np.uint8]
Lengths = npt.NDArray[np.uint32]
Release = Callable[[Rows, Lengths], None]

#: most frames a wire holds for a peer that is not taking them, in batches
INBOX_LIMIT = 64


class Batch:
    """Packets ``rows[i, :lengths[i]]`` for ``start <= i < n``.

    ``done()`` gives the arrays back to their owner (an engine's spare list)
    once the packets are consumed; a batch not owned by anyone has no release.
    """

    __slots__ = ("rows", "lengths", "n", "start", "_release")

    def __init__(self, rows: Rows, lengths: Lengths, n: int, release: Release | None = None) -> None:
        self.rows = rows
        self.lengths = lengths
        self.n = n
        self.start = 0
        self._release = release

    @property
    def remaining(self) -> int:
        return self.n - self.start

    def done(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self.rows, self.lengths)

    @classmethod
    def from_frames(cls, frames: list[bytes], width: int) -> "Batch":
        rows = np.zeros((len(frames), width), np.uint8)
        lengths = np.zeros(len(frames), np.uint32)
        for i, frame in enumerate(frames):
            rows[i, :len(frame)] = np.frombuffer(frame, np.uint8)
            lengths[i] = len(frame)
        return cls(rows, lengths, len(frames))

    def frames(self) -> list[bytes]:
        return [self.rows[i, :int(self.lengths[i])].tobytes() for i in range(self.start, self.n)]


class WireDevice(Protocol):
    """What a wire may ask of the device it is plugged into."""

    @property
    def mac(self) -> bytes: ...

    @property
    def max_frame(self) -> int: ...


class Wire:
    """A wire: override what applies. Called from the device's engine thread only."""

    name = "wire"
    #: the engine may move packets from tx ring to rx ring itself (loopback)
    ring_to_ring = False

    def __init__(self) -> None:
        self.device: WireDevice | None = None

    def bind(self, device: WireDevice) -> None:
        """Plugged into ``device`` (its MAC and largest frame are asked for as needed)."""
        self.device = device

    @property
    def width(self) -> int:
        return self.device.max_frame if self.device is not None else 9216

    def transmit(self, pair: int, batch: Batch) -> bool:
        """The driver sent ``batch`` on queue pair ``pair``. Return True to keep the
        batch (then call ``batch.done()`` when finished with it), False when done now."""
        return False

    def receive(self, pair: int, n_pairs: int, budget: int) -> Batch | None:
        """Up to ``budget`` packets for rx queue ``pair`` of ``n_pairs`` active ones, or None."""
        return None

    def deliver_direct(self, pair: int, n_pairs: int, rx: DeviceQueue, budget: int, hdr_len: int,
                       mergeable: bool, accepts: Callable[[bytes], bool]) -> int | None:
        """A fast path: write up to ``budget`` packets straight into the driver's rx
        ring ``rx`` (no batch) and return how many, or None for "use receive()".
        ``accepts(dst_mac)`` is the device's receive filter. None by default."""
        return None

    def turns(self, txs: list[DeviceQueue], rxs: list[DeviceQueue], budget: int, hdr_len: int, mergeable: bool,
              accepts: Callable[[bytes], bool], rss: RssState | None = None) -> tuple[int, int] | None:
        """The fastest path: run whole turns of every queue pair (what the driver sent
        on ``txs``, then the active pairs' ``rxs`` filled, steered by ``rss`` when it is
        active) in C until the rings are idle or about a millisecond has passed, and
        return ``(tx packets, rx packets)``; None for "use the per-turn path" (the
        default: only the generator at full rate has one)."""
        return None

    def delivered(self, pair: int, count: int) -> None:
        """``count`` packets of the last batch went into the driver's rx ring ``pair``."""

    def flush(self) -> None:
        """The device was reset: forget packets waiting for the driver."""

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release files and interfaces. Idempotent."""


class NullWire(Wire):
    """Nothing is connected: transmitted packets are counted and dropped."""

    name = "null"

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def transmit(self, pair: int, batch: Batch) -> bool:
        self.dropped += batch.remaining
        return False

    def stats(self) -> dict[str, Any]:
        return {"wire": self.name, "dropped": self.dropped}


class _Inbox:
    """Batches waiting for a device's rx queues, one deque per queue pair (lock-free:
    one engine appends, another pops)."""

    def __init__(self, limit: int = INBOX_LIMIT) -> None:
        self.limit = limit
        self.queues: dict[int, deque[Batch]] = {}
        self.dropped = 0

    def put(self, pair: int, batch: Batch) -> bool:
        q = self.queues.get(pair)
        if q is None:
            q = self.queues.setdefault(pair, deque())
        if len(q) >= self.limit:
            self.dropped += batch.remaining
            return False
        q.append(batch)
        return True

    def get(self, pair: int, n_pairs: int) -> Batch | None:
        # Traffic for a pair that is not active (fewer pairs after VQ_PAIRS_SET)
        # goes to pair (index mod active pairs).
        for k, q in list(self.queues.items()):
            if k % n_pairs == pair and q:
                try:
                    return q.popleft()
                except IndexError:
                    continue
        return None

    def clear(self) -> None:
        for q in list(self.queues.values()):
            while q:
                try:
                    batch = q.popleft()
                except IndexError:
                    break
                self.dropped += batch.remaining
                batch.done()

    @property
    def waiting(self) -> int:
        return sum(b.remaining for q in list(self.queues.values()) for b in list(q))


class LoopbackWire(Wire):
    """What the driver sends comes back to it, on the rx queue of the same pair.

    While the device's receive filter accepts everything the engine moves
    packets ring to ring (``pmd.sim._tx.tx_to_rx``, one copy); with a filter on,
    they go through rows here so the filter can drop what is not for the driver.
    """

    name = "loopback"
    ring_to_ring = True

    def __init__(self) -> None:
        super().__init__()
        self.inbox = _Inbox()

    def transmit(self, pair: int, batch: Batch) -> bool:
        return self.inbox.put(pair, batch)

    def receive(self, pair: int, n_pairs: int, budget: int) -> Batch | None:
        return self.inbox.get(pair, n_pairs)

    def flush(self) -> None:
        self.inbox.clear()

    def stats(self) -> dict[str, Any]:
        return {"wire": self.name, "dropped": self.inbox.dropped, "waiting": self.inbox.waiting}


class PairEnd(Wire):
    """One end of a :func:`pair_wires` cable."""

    name = "pair"

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.inbox = _Inbox()
        self.peer: PairEnd | None = None
        self.sent = 0

    def transmit(self, pair: int, batch: Batch) -> bool:
        peer = self.peer
        if peer is None:
            return False
        n = batch.remaining
        kept = peer.inbox.put(pair, batch)
        if kept:
            self.sent += n
        return kept

    def receive(self, pair: int, n_pairs: int, budget: int) -> Batch | None:
        return self.inbox.get(pair, n_pairs)

    def flush(self) -> None:
        self.inbox.clear()

    def stats(self) -> dict[str, Any]:
        return {"wire": self.name, "end": self.label, "sent": self.sent,
                "dropped": self.inbox.dropped, "waiting": self.inbox.waiting}


def pair_wires() -> tuple[PairEnd, PairEnd]:
    """Two wire ends connected back to back: plug one into each device."""
    a, b = PairEnd("a"), PairEnd("b")
    a.peer, b.peer = b, a
    return a, b


class _Pacer:
    """Token bucket: how many packets may go now at ``rate`` per second (0: no limit)."""

    def __init__(self, rate: float) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0 packets per second (0: as fast as possible)")
        self.rate = rate
        self.t0: float | None = None
        self.granted = 0

    def allow(self, budget: int) -> int:
        if self.rate == 0:
            return budget
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        n = int((now - self.t0) * self.rate) - self.granted
        if n > 4 * budget:
            # Idle for a while (no rx buffers, link down): do not burst to catch up.
            self.granted += n - budget
            n = budget
        n = max(0, min(n, budget))
        self.granted += n
        return n


class _FlushingPcapWriter(PcapWriter):
    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()


class PcapWire(Wire):
    """``PcapWire(pcap_in=None, pcap_out=None, rate=0, loop=1)``: frames of ``pcap_in`` are
    received by the driver (on queue pair 0, ``loop`` times over, at ``rate`` pps or as
    fast as the driver takes them); what the driver sends is written to ``pcap_out``."""

    name = "pcap"

    def __init__(self, pcap_in: str | Path | None = None, pcap_out: str | Path | None = None, *,
                 rate: float = 0, loop: int = 1) -> None:
        super().__init__()
        if loop < 1:
            raise ValueError("loop must be at least 1")
        self.pcap_in = Path(pcap_in) if pcap_in is not None else None
        if self.pcap_in is not None:
            next(iter(read_pcap(self.pcap_in)), None)       # a bad file fails now, not in the engine
        self.loop = loop
        self._pacer = _Pacer(rate)
        self._frames: Iterator[tuple[float, bytes, int]] | None = None
        self._round = 0
        self._writer = _FlushingPcapWriter(pcap_out) if pcap_out is not None else None
        self._last_flush = time.monotonic()
        self.received = 0       # frames read from pcap_in and handed to the driver
        self.written = 0        # frames the driver sent, written to pcap_out
        self.too_long = 0
        self.exhausted = self.pcap_in is None

    def _next_frames(self, n: int) -> list[bytes]:
        out: list[bytes] = []
        width = self.width
        while len(out) < n and not self.exhausted:
            if self._frames is None:
                assert self.pcap_in is not None
                self._frames = read_pcap(self.pcap_in)
            record = next(self._frames, None)
            if record is None:
                self._frames = None
                self._round += 1
                if self._round >= self.loop:
                    self.exhausted = True
                continue
            frame = record[1]
            if len(frame) > width or len(frame) == 0:
                self.too_long += 1
                continue
            out.append(frame)
        return out

    def receive(self, pair: int, n_pairs: int, budget: int) -> Batch | None:
        if pair != 0 or self.exhausted:
            return None
        n = self._pacer.allow(budget)
        if n == 0:
            return None
        frames = self._next_frames(n)
        if not frames:
            return None
        return Batch.from_frames(frames, max(len(f) for f in frames))

    def delivered(self, pair: int, count: int) -> None:
        self.received += count

    def transmit(self, pair: int, batch: Batch) -> bool:
        if self._writer is not None:
            self._writer.write_burst(batch.rows[batch.start:], batch.lengths[batch.start:], batch.remaining)
            self.written += batch.remaining
            now = time.monotonic()
            if now - self._last_flush > 0.2:
                self._writer.flush()
                self._last_flush = now
        return False

    def sync(self) -> None:
        """Push what was written to the file (the engine calls it when idle)."""
        if self._writer is not None:
            self._writer.flush()

    def stats(self) -> dict[str, Any]:
        return {"wire": self.name, "received": self.received, "written": self.written,
                "too_long": self.too_long, "exhausted": self.exhausted}

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# ---- the generator ----

GEN_MAGIC = b"PMDG"
GEN_PAYLOAD = 42            # 14 Ethernet + 20 IPv4 + 8 UDP
GEN_MIN_SIZE = 60
GEN_SRC_MAC = bytes.fromhex("020000000001")


def generator_frame(size: int, dst: bytes, src: bytes, flow: int) -> bytes:
    """The template of flow ``flow``: Ethernet/IPv4/UDP (198.18.0.1 -> 198.18.0.2, ports
    1024+flow -> 9) with payload ``"PMDG" flow(le32) seq(le64)`` and a fill pattern."""
    frame = bytearray(udp_frame(size, src, dst))
    frame[34:36] = (1024 + flow % 64512).to_bytes(2, "big")
    frame[GEN_PAYLOAD:GEN_PAYLOAD + 4] = GEN_MAGIC
    frame[GEN_PAYLOAD + 4:GEN_PAYLOAD + 8] = flow.to_bytes(4, "little")
    fill = GEN_PAYLOAD + 16
    frame[fill:] = bytes((fill + i) & 0xFF for i in range(size - fill))
    return bytes(frame)


class _GenLayout(NamedTuple):
    templates: Rows                    # the per-flow frames these rows were made from
    rows: Rows                         # row i: the frame of flow flow_of[i]
    flow_of: npt.NDArray[np.int64]
    round_of: npt.NDArray[np.int64]    # i // number of flows
    seq: npt.NDArray[np.int64]         # a view: the sequence-number field of each row
    lengths: Lengths


class _Steering(NamedTuple):
    key: tuple[Any, ...]               # (rx pairs, header length, RSS on, its configuration)
    templates: Rows                    # the per-flow frames it was made for
    ok: bool                           # every flow's rx pair is one of those given
    frames: Rows                       # a copy: generator_turns stamps sequence numbers in it
    queue_flows: npt.NDArray[np.uint32]    # the flows, grouped by rx pair
    queue_start: npt.NDArray[np.uint32]    # pair j's are queue_flows[start[j]:start[j + 1]]
    cursor: npt.NDArray[np.uint32]     # per pair: its next flow (round robin)
    hashes: npt.NDArray[np.uint32] | None  # per flow, for the header (HASH_REPORT), or None
    reports: npt.NDArray[np.uint16] | None


class GeneratorWire(Wire):
    """``GeneratorWire(rate=0, size=64, flows=1, count=0)``: synthetic UDP flows to the driver.

    Packets go to the device's MAC from ``src_mac`` at ``rate`` packets per second
    (0: as fast as the driver posts buffers), ``count`` in all (0: no end), each
    with its flow and a sequence number in the payload; flow ``f`` goes to rx
    queue pair ``f mod active pairs``. What the driver sends back (echoed as is,
    or with MACs swapped) is checked: ``received``, ``lost`` (sent and not
    back), ``reordered`` (a sequence number lower than one already seen on its
    flow), ``bad`` (not one of ours, or the wrong length).
    """

    name = "generator"

    def __init__(self, rate: float = 0, size: int = 64, flows: int = 1, count: int = 0,
                 src_mac: bytes = GEN_SRC_MAC) -> None:
        super().__init__()
        if not GEN_MIN_SIZE <= size <= 9014:
            raise ValueError(f"generator packet size must be {GEN_MIN_SIZE} to 9014 bytes")
        if not 1 <= flows <= 4096:
            raise ValueError("flows must be 1 to 4096")
        if count < 0:
            raise ValueError("count must be >= 0 (0: no end)")
        self.size = size
        self.flows = flows
        self.count = count
        self.src_mac = src_mac
        self._pacer = _Pacer(rate)
        self.rate = rate
        self._templates: Rows | None = None
        self._template_mac = b""
        self._next_seq = np.zeros(flows, np.int64)
        self._max_seen = np.full(flows, -1, np.int64)
        self._flows_of: dict[tuple[int, int], npt.NDArray[np.int64]] = {}
        # per (pair, active pairs): the frames of a whole batch laid out once, so a
        # batch only stamps sequence numbers (the engine asks a pair for more only
        # once its last batch is delivered, so the rows can be reused)
        self._layouts: dict[tuple[int, int], _GenLayout] = {}
        self._steer: _Steering | None = None           # turns(): flows to rx pairs
        self._scratch: Rows | None = None              # deliver_direct's frame
        self._scratch_of: Rows | None = None           # the templates it was copied from
        self.generated = 0
        self.sent = 0
        self.received = 0
        self.reordered = 0
        self.bad = 0
        self.started: float | None = None

    def _template_rows(self) -> Rows:
        mac = self.device.mac if self.device is not None else b"\xff" * 6
        if self._templates is None or mac != self._template_mac:
            frames = [generator_frame(self.size, mac, self.src_mac, f) for f in range(self.flows)]
            self._templates = np.frombuffer(b"".join(frames), np.uint8).reshape(self.flows, self.size).copy()
            self._template_mac = mac
        return self._templates

    def receive(self, pair: int, n_pairs: int, budget: int) -> Batch | None:
        key = (pair, n_pairs)
        flows = self._flows_of.get(key)
        if flows is None:
            flows = np.arange(pair, self.flows, n_pairs, dtype=np.int64)
            self._flows_of[key] = flows
        if not len(flows):
            return None
        if self.count:
            budget = min(budget, self.count - self.generated)
            if budget <= 0:
                return None
        n = self._pacer.allow(budget)
        if n == 0:
            return None
        if self.started is None:
            self.started = time.monotonic()
        k = len(flows)
        lay = self._layout(key, flows, n)
        # packet i belongs to flow flows[i % k] and is that flow's (i // k)-th of the batch
        if k == 1:
            f = int(flows[0])
            np.add(lay.round_of[:n], self._next_seq[f], out=lay.seq[:n])
            self._next_seq[f] += n
        else:
            np.add(self._next_seq[lay.flow_of[:n]], lay.round_of[:n], out=lay.seq[:n])
            self._next_seq[flows] += n // k
            self._next_seq[flows[:n % k]] += 1
        self.generated += n
        return Batch(lay.rows[:n], lay.lengths[:n], n)

    def _direct_scratch(self, accepts: Callable[[bytes], bool]) -> Rows | None:
        """The one flow's frame to stamp sequence numbers into (the fast paths' scratch),
        or None when the receive filter would drop it."""
        templates = self._template_rows()
        if self._scratch is None or self._scratch_of is not templates:
            if not accepts(templates[0, :6].tobytes()):
                return None
            self._scratch = templates[0].copy()
            self._scratch_of = templates
        return self._scratch

    def deliver_direct(self, pair: int, n_pairs: int, rx: DeviceQueue, budget: int, hdr_len: int,
                       mergeable: bool, accepts: Callable[[bytes], bool]) -> int | None:
        """One flow at full rate: frames go from one scratch frame straight into the
        rx ring (``device_rx_generate`` stamps the sequence numbers), as a hardware
        generator would. Several flows or a rate take the batch path (receive)."""
        if self.flows != 1 or self.rate:
            return None
        if pair != 0:
            return 0                                   # the one flow is on pair 0
        scratch = self._direct_scratch(accepts)
        if scratch is None:
            return None                                # the batch path filters and counts it
        if self.count:
            budget = min(budget, self.count - self.generated)
            if budget <= 0:
                return 0
        k = device_rx_generate(rx, scratch, budget, GEN_PAYLOAD + 8, int(self._next_seq[0]),
                               hdr_len, mergeable)
        if k:
            if self.started is None:
                self.started = time.monotonic()
            self._next_seq[0] += k
            self.generated += k
        return k

    def turns(self, txs: list[DeviceQueue], rxs: list[DeviceQueue], budget: int, hdr_len: int, mergeable: bool,
              accepts: Callable[[bytes], bool], rss: RssState | None = None) -> tuple[int, int] | None:
        """At full rate, any number of flows and pairs: :func:`generator_turns` sends the
        frames and checks what comes back in C, with the same counters as receive and
        transmit. Flow f goes to rx pair ``f mod len(rxs)``, or where ``rss`` steers its
        headers (each flow's headers are fixed, so its queue and hash are computed
        once per configuration); None when a flow would go to a pair not given."""
        if self.rate or not rxs:
            return None
        templates = self._template_rows()
        if not accepts(templates[0, :6].tobytes()):
            return None                                # the batch path filters and counts it
        plan = self._steering(templates, len(rxs), hdr_len, rss)
        if plan is None:
            return None
        limit = max(self.count - self.generated, 0) if self.count else -1
        if self.started is None:
            self.started = time.monotonic()
        generated, taken, ours, bad, reordered, _rounds = generator_turns(
            txs, rxs, plan.frames, GEN_PAYLOAD, self._next_seq, self._max_seen, plan.queue_flows,
            plan.queue_start, plan.cursor, budget, limit, hdr_len, mergeable, self.width, plan.hashes,
            plan.reports)
        self.generated += generated
        self.sent += generated
        self.received += ours
        self.bad += bad
        self.reordered += reordered
        return taken, generated

    def _steering(self, templates: Rows, n_rx: int, hdr_len: int, rss: RssState | None) -> "_Steering | None":
        """Which rx pair each flow goes to, with its hash and report: kept until the
        templates, the pairs or the RSS configuration change."""
        active = rss is not None and rss.active
        key = (n_rx, hdr_len, active) + ((rss.hash_types, rss.key, tuple(rss.table), rss.unclassified_queue)
                                         if rss is not None and active else ())
        st = self._steer
        if st is not None and st.key == key and st.templates is templates:
            return st if st.ok else None
        queue = np.arange(self.flows, dtype=np.int64) % n_rx
        hashes = reports = None
        if rss is not None and active:
            hashes = np.zeros(self.flows, np.uint32)
            reports = np.zeros(self.flows, np.uint16)
            for f in range(self.flows):
                q, hashes[f], reports[f] = rss.hash(templates[f].tobytes(), int(queue[f]))
                queue[f] = q
            if hdr_len < 20:                           # no room for the hash (5.1.6.4.4)
                hashes = reports = None
        ok = bool(np.all(queue < n_rx))
        order = np.argsort(queue, kind="stable")
        start = np.searchsorted(queue[order], np.arange(n_rx + 1)).astype(np.uint32)
        st = _Steering(key, templates, ok, templates.copy(), order.astype(np.uint32), start,
                       np.zeros(n_rx, np.uint32), hashes, reports)
        self._steer = st
        return st if ok else None

    def _layout(self, key: tuple[int, int], flows: npt.NDArray[np.int64], n: int) -> "_GenLayout":
        templates = self._template_rows()
        lay = self._layouts.get(key)
        if lay is None or len(lay.rows) < n or lay.templates is not templates:
            cap = max(n, 256)
            idx = np.arange(cap, dtype=np.int64)
            flow_of = flows[idx % len(flows)]
            rows = templates[flow_of]
            # each row's sequence number (le64 at GEN_PAYLOAD + 8) as one strided, unaligned array
            seq = np.ndarray((cap,), "<i8", buffer=rows, offset=GEN_PAYLOAD + 8, strides=(rows.strides[0],))
            lay = _GenLayout(templates, rows, flow_of, idx // len(flows), seq, np.full(cap, self.size, np.uint32))
            self._layouts[key] = lay
        return lay

    def delivered(self, pair: int, count: int) -> None:
        self.sent += count

    def transmit(self, pair: int, batch: Batch) -> bool:
        rows = batch.rows[batch.start:batch.n]
        lengths = batch.lengths[batch.start:batch.n]
        if len(rows) == 0:
            return False
        if rows.shape[1] < GEN_PAYLOAD + 16:
            self.bad += len(rows)
            return False
        p = GEN_PAYLOAD
        ours = (lengths == self.size) & np.all(rows[:, p:p + 4] == np.frombuffer(GEN_MAGIC, np.uint8), axis=1)
        flow = np.ascontiguousarray(rows[:, p + 4:p + 8]).view("<u4").reshape(-1).astype(np.int64)
        ours &= flow < self.flows
        self.bad += int(len(rows) - np.count_nonzero(ours))
        if not ours.any():
            return False
        flow = flow[ours]
        seq = np.ascontiguousarray(rows[ours, p + 8:p + 16]).view("<u8").reshape(-1).astype(np.int64)
        self.received += len(seq)
        for f in np.unique(flow):
            s = seq[flow == f]
            prev = self._max_seen[f]
            running = np.maximum.accumulate(np.concatenate(([prev], s)))[:-1]
            self.reordered += int(np.count_nonzero(s < running))
            self._max_seen[f] = max(int(prev), int(s.max()))
        return False

    def report(self) -> dict[str, Any]:
        """sent / received / lost / reordered / bad, and the rates since the first packet."""
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        return {"sent": self.sent, "received": self.received, "lost": max(0, self.sent - self.received),
                "reordered": self.reordered, "bad": self.bad, "generated": self.generated,
                "seconds": round(elapsed, 3),
                "sent_pps": round(self.sent / elapsed) if elapsed > 0 else 0,
                "received_pps": round(self.received / elapsed) if elapsed > 0 else 0}

    def stats(self) -> dict[str, Any]:
        return {"wire": self.name, "rate": self.rate, "size": self.size, "flows": self.flows, **self.report()}


# ---- TAP ----

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
_IFNAMSIZ = 16


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tap(name: str, netns: str | None = None) -> int:
    """Create TAP interface ``name`` (in network namespace ``netns`` when given, by its
    name under /var/run/netns) and return its non-blocking fd. The interface goes
    away when the fd is closed."""
    if not 0 < len(name.encode()) < _IFNAMSIZ:
        raise ValueError(f"interface name must be 1 to {_IFNAMSIZ - 1} bytes")
    result: list[int | BaseException] = []

    def create() -> None:
        try:
            if netns is not None:
                # setns changes the namespace of this thread only; it ends right after.
                _setns(netns if "/" in netns else f"/var/run/netns/{netns}")
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                ifr = struct.pack(f"{_IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
                fcntl.ioctl(fd, TUNSETIFF, ifr)
            except BaseException:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as e:   # reported in the caller's thread
            result.append(e)

    if netns is None:
        create()
    else:
        t = threading.Thread(target=create, name=f"pmd-tap-{name}")
        t.start()
        t.join()
    got = result[0]
    if isinstance(got, BaseException):
        if isinstance(got, OSError) and got.errno in (errno.EPERM, errno.EACCES):
            raise PermissionError(got.errno, f"cannot create TAP interface {name}: {got.strerror}; "
                                             "it needs CAP_NET_ADMIN (run as root)") from got
        if isinstance(got, FileNotFoundError):
            raise FileNotFoundError(got.errno, f"/dev/net/tun or namespace {netns} not found: "
                                               "load the tun module / create the namespace") from got
        raise got
    return got


class TapWire(Wire):
    """``TapWire(name, netns=None)``: the device's wire is a TAP interface; what the driver
    sends is written to it (the kernel receives it) and what the kernel sends out of
    it is received by the driver (on queue pair 0)."""

    name = "tap"

    def __init__(self, ifname: str = "pmdtap0", netns: str | None = None) -> None:
        super().__init__()
        self.ifname = ifname
        self.netns = netns
        self.fd = open_tap(ifname, netns)
        self.received = 0
        self.written = 0
        self.dropped = 0
        self.too_long = 0

    def receive(self, pair: int, n_pairs: int, budget: int) -> Batch | None:
        if pair != 0 or self.fd < 0:
            return None
        frames: list[bytes] = []
        width = self.width
        while len(frames) < budget:
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                break
            if not frame or len(frame) > width:
                self.too_long += 1
                continue
            frames.append(frame)
        if not frames:
            return None
        return Batch.from_frames(frames, max(len(f) for f in frames))

    def delivered(self, pair: int, count: int) -> None:
        self.received += count

    def transmit(self, pair: int, batch: Batch) -> bool:
        for i in range(batch.start, batch.n):
            try:
                os.write(self.fd, batch.rows[i, :int(batch.lengths[i])].tobytes())
                self.written += 1
            except OSError:
                # The interface is down or its queue is full: the frame is lost, as on a wire.
                self.dropped += 1
        return False

    def stats(self) -> dict[str, Any]:
        return {"wire": self.name, "ifname": self.ifname, "received": self.received,
                "written": self.written, "dropped": self.dropped, "too_long": self.too_long}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DgramWire(Wire):
    """``DgramWire(local, remote)``: one Ethernet frame per datagram on a UNIX
    datagram socket, as QEMU's ``-netdev dgram`` does, so another process (a
    test peer) is the other end. Bound at ``local``; sends to ``remote``. Frames
    the peer sends go to queue pair 0. A full peer queue holds the sender for
    up to ``SEND_WAIT`` seconds (back-pressure), then the rest of that burst is
    dropped and counted."""

    name = "dgram"

    def __init__(self, local: str, remote: str) -> None:
        super().__init__()
        if not local or not remote:
            raise ValueError("the dgram wire needs --dgram-local and --dgram-remote socket paths")
        self.remote = remote
        self.local = local
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if os.path.exists(local):
                os.unlink(local)
            self.sock.bind(local)
            os.chmod(local, 0o600)
        except BaseException:
            self.sock.close()
            raise
        # Non-blocking: receive() must never wait (the engine polls every ring
        # in one thread); a send waits for the peer in transmit() itself.
        self.sock.setblocking(False)
        self.sent = 0
        self.received = 0
        self.dropped = 0

    #: how long a send waits for room in the peer's queue before dropping
    SEND_WAIT = 1.0

    def _send(self, frame: bytes) -> bool:
        deadline = 0.0
        while True:
            try:
                self.sock.sendto(frame, self.remote)
                return True
            except (BlockingIOError, InterruptedError):
                # The peer's queue is full (a UNIX datagram socket's receive
                # queue holds net.unix.max_dgram_qlen frames): back-pressure.
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.SEND_WAIT
                elif now >= deadline:
                    return False
                time.sleep(20e-6)
            except OSError:          # no peer bound yet: a wire with nobody on it drops
                return False

    def transmit(self, pair: int, batch: Batch) -> bool:
        for i in range(batch.start, batch.n):
            if self._send(batch.rows[i, :int(batch.lengths[i])].tobytes()):
                self.sent += 1
            else:
                # The peer stayed full (or is gone): drop the rest of the burst
                # at once rather than wait again for each frame.
                self.dropped += batch.n - i
                break
        return False

    def receive(self, pair: int, n_pairs: int, budget: int) -> Batch | None:
        if pair != 0:
            return None
        frames: list[bytes] = []
        width = self.width
        while len(frames) < budget:
            try:
                f = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            if 0 < len(f) <= width:
                frames.append(f)
            else:
                self.dropped += 1
        if not frames:
            return None
        return Batch.from_frames(frames, max(len(f) for f in frames))

    def delivered(self, pair: int, count: int) -> None:
        self.received += count

    def stats(self) -> dict[str, Any]:
        return {"wire": self.name, "sent": self.sent, "received": self.received, "dropped": self.dropped}

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
            try:
                os.unlink(self.local)
            except OSError:
                pass


WIRES = ("loopback", "pair", "pcap", "generator", "tap", "null", "dgram")


def make_wire(kind: str, *, pcap_in: str | None = None, pcap_out: str | None = None, rate: float = 0,
              size: int = 64, flows: int = 1, count: int = 0, loop: int = 1, tap: str = "pmdtap0",
              netns: str | None = None, dgram_local: str | None = None,
              dgram_remote: str | None = None) -> Wire:
    """A wire by name (``pair`` has two ends: use :func:`pair_wires`)."""
    if kind == "loopback":
        return LoopbackWire()
    if kind == "pcap":
        return PcapWire(pcap_in, pcap_out, rate=rate, loop=loop)
    if kind == "generator":
        return GeneratorWire(rate=rate, size=size, flows=flows, count=count)
    if kind == "tap":
        return TapWire(tap, netns)
    if kind == "null":
        return NullWire()
    if kind == "dgram":
        return DgramWire(dgram_local or "", dgram_remote or "")
    raise ValueError(f"unknown wire {kind!r}; one of {', '.join(WIRES)} (pair: use pair_wires())")


__all__ = ["Batch", "Wire", "WireDevice", "NullWire", "LoopbackWire", "PairEnd", "pair_wires", "PcapWire",
           "GeneratorWire", "TapWire", "DgramWire", "open_tap", "make_wire", "generator_frame", "WIRES"]
