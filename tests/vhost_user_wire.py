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
    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.port = pmd.open_port("vhost-user:" + path, timeout=timeout, wait=30, name="peer", mtu=9000)
        # testpmd drops what finds this port's rx ring full (no back-pressure, unlike the
        # QEMU and built-in peers): a ring of 4096 holds a whole test's traffic
        self.port.start(queue_size=4096)
        self.rx: collections.deque[bytes] = collections.deque()
        self.sent: list[bytes] = []
        self.tx_count = 0
        self._lock = threading.Lock()           # the peer's tx queue: the sender thread and host_send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True, name="vhost-user-wire rx")
        self._thread.start()

    def _receive(self) -> None:
        rxq = self.port.rx_queue(0)
        out = np.zeros((64, rxq.max_packet_len), np.uint8)
        lens = np.zeros(64, np.uint32)
        while not self._stop.is_set():
            try:
                n = rxq.rx_burst(out, lens)
            except pmd.QueueStateError:
                return
            for j in range(n):
                self.rx.append(bytes(out[j, :lens[j]]))
            if not n:
                time.sleep(0.0002)

    def _send(self, frames: list[bytes], window: int | None) -> None:
        txq = self.port.tx_queue(0)
        width = max((len(f) for f in frames), default=0)
        # cost[i]: receive buffers the first i frames take (12-byte header, mergeable buffers)
        cost = [0]
        for f in frames:
            cost.append(cost[-1] + -(-(len(f) + 12) // BUFFER))
        i = 0
        while i < len(frames) and not self._stop.is_set():
            if window is not None and cost[i] - cost[min(len(self.rx), i)] >= window:
                time.sleep(0.0002)      # wait for answers: never more than the window in flight
                continue
            chunk = frames[i:i + 16]
            data = np.zeros((len(chunk), width), np.uint8)
            lens = np.array([len(f) for f in chunk], np.uint32)
            for j, f in enumerate(chunk):
                data[j, :len(f)] = np.frombuffer(f, np.uint8)
            with self._lock:
                k = txq.tx_burst(data, lens)
            i += k
            self.tx_count += k
            if not k:
                time.sleep(0.0002)

    # -- the guest.py interface
    def host_clear(self, net: str = "vhost-user") -> int:
        n = len(self.rx)
        self.rx.clear()
        self.tx_count = 0
        return n

    def host_send(self, frames: Iterable[bytes], net: str = "vhost-user", **_: Any) -> int:
        frames = [bytes(f) for f in frames]
        self._send(frames, None)
        return len(frames)

    def host_traffic(self, count: int, *, seed: int = 0, min_len: int = 60, max_len: int = 1514,
                     dst: bytes = b"\xff" * 6, src: bytes = b"\x02\x00\x00\x00\x00\x01",
                     net: str = "vhost-user") -> int:
        self.sent = make_frames(count, seed, min_len, max_len, dst, src)
        self.host_clear()
        threading.Thread(target=self._send, args=(self.sent, WINDOW), daemon=True).start()
        return len(self.sent)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.port.close()
