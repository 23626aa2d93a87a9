"""The other end of the wire when DPDK's vhost library is the device.

``dpdk-testpmd`` runs two vhost-user ports in io mode: port 0 is the port under
test, port 1 this peer, and testpmd forwards 0 -> 1 and 1 -> 0. The peer is a
second pmd port on port 1 with a thread that receives everything into a queue. It
offers the functions, names and results of tests/vm/guest.py (the QEMU host
agent) and tests/sim_peer.py, so the driver test class in test_port.py runs
unchanged against this device too. Frames are made and compared by the same code.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

import pmd

sys.path.insert(0, str(Path(__file__).parent / "vm"))
from harness import make_frames  # noqa: E402

from tests.sim_peer import ReceivingPeer  # noqa: E402

#: how many receive buffers' worth of frames the peer keeps in flight towards the port
#: under test: its rx ring holds 256 buffers of 2 KiB (a jumbo frame takes five), and
#: testpmd drops (does not queue) what finds it full
WINDOW = 64
BUFFER = 2048


class VhostUserWire(ReceivingPeer):
    """One thread owns the peer's queue pair, receiving and sending: the pair's rx and
    tx share one packet pool, which takes no locks (docs/port.md, "one queue pair, one
    thread"). Sends are jobs the thread takes between receive bursts."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.port = pmd.open_port("vhost-user:" + path, timeout=timeout, wait=30, name="peer", mtu=9000)
        # testpmd drops what finds this port's rx ring full (no back-pressure, unlike the
        # QEMU and built-in peers): a ring of 4096 holds a whole test's traffic
        self.port.start(queue_size=4096)
        self.rx: collections.deque[bytes] = collections.deque()
        self.sent: list[bytes] = []
        self.tx_count = 0
        self._jobs: collections.deque[tuple[list[bytes], int | None, threading.Event]] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vhost-user-wire")
        self._thread.start()

    def _run(self) -> None:
        rxq, txq = self.port.rx_queue(0), self.port.tx_queue(0)
        out = np.zeros((64, rxq.max_packet_len), np.uint8)
        lens = np.zeros(64, np.uint32)
        job: _Send | None = None
        while not self._stop.is_set():
            try:
                n = rxq.rx_burst(out, lens)
                for j in range(n):
                    self.rx.append(bytes(out[j, :lens[j]]))
                if job is None and self._jobs:
                    job = _Send(*self._jobs.popleft())
                moved = job.step(txq, self) if job is not None else 0
            except pmd.QueueStateError:
                return
            if job is not None and job.finished:
                job.done.set()
                job = None
            if not n and not moved:
                time.sleep(0.0002)

    def _send(self, frames: list[bytes], window: int | None) -> threading.Event:
        done = threading.Event()
        self._jobs.append((frames, window, done))
        return done
    # -- the guest.py interface
    def host_clear(self, net: str = "vhost-user") -> int:
        n = len(self.rx)
        self.rx.clear()
        self.tx_count = 0
        return n

    def host_send(self, frames: Iterable[bytes], net: str = "vhost-user", **_: Any) -> int:
        frames = [bytes(f) for f in frames]
        self._send(frames, None).wait(120)
        return len(frames)

    def host_traffic(self, count: int, *, seed: int = 0, min_len: int = 60, max_len: int = 1514,
                     dst: bytes = b"\xff" * 6, src: bytes = b"\x02\x00\x00\x00\x00\x01",
                     net: str = "vhost-user") -> int:
        self.sent = make_frames(count, seed, min_len, max_len, dst, src)
        self.host_clear()
        self._send(self.sent, WINDOW)
        return len(self.sent)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.port.close()


class _Send:
    """Frames the peer's thread sends, 16 per burst, never more than ``window`` receive
    buffers' worth ahead of what has come back."""

    def __init__(self, frames: list[bytes], window: int | None, done: threading.Event) -> None:
        self.frames, self.window, self.done = frames, window, done
        self.width = max((len(f) for f in frames), default=0)
        # cost[i]: receive buffers the first i frames take (12-byte header, mergeable buffers)
        self.cost = [0]
        for f in frames:
            self.cost.append(self.cost[-1] + -(-(len(f) + 12) // BUFFER))
        self.i = 0

    @property
    def finished(self) -> bool:
        return self.i >= len(self.frames)

    def step(self, txq: Any, wire: VhostUserWire) -> int:
        i = self.i
        if self.finished:
            return 0
        if self.window is not None and self.cost[i] - self.cost[min(len(wire.rx), i)] >= self.window:
            return 0                    # wait for answers: never more than the window in flight
        chunk = self.frames[i:i + 16]
        data = np.zeros((len(chunk), self.width), np.uint8)
        lens = np.array([len(f) for f in chunk], np.uint32)
        for j, f in enumerate(chunk):
            data[j, :len(f)] = np.frombuffer(f, np.uint8)
        k = txq.tx_burst(data, lens)
        self.i += k
        wire.tx_count += k
        return k
