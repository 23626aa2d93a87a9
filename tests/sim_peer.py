"""The peer on the other end of the built-in device's dgram wire.

The same functions, with the same names and results, as tests/vm/guest.py
offers for QEMU's -netdev dgram (there the host agent answers them), so the
driver test class in test_port.py runs unchanged against both devices.
Frames are made and compared by the same code as the QEMU host agent's.
"""

from __future__ import annotations

import collections
import hashlib
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).parent / "vm"))
from harness import compare_frames, make_frames  # noqa: E402


class ReceivingPeer:
    """What both peers share: the frames received (``rx``, filled by the subclass), the
    frames of the last ``host_traffic`` (``sent``), and the guest.py functions that
    compare or digest what came back."""

    rx: collections.deque[bytes]
    sent: list[bytes]

    def host_traffic_check(self, mode: str = "io", *, wait: float = 120.0, net: str = "") -> dict:
        deadline = time.monotonic() + wait
        while len(self.rx) < len(self.sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        got = [self.rx.popleft() for _ in range(min(len(self.rx), len(self.sent)))]
        return compare_frames(self.sent, got, mode)

    def host_wire_digest(self, *, quiet: float = 2.0, net: str = "") -> dict:
        seen, since = -1, time.monotonic()
        while time.monotonic() - since < quiet:
            if len(self.rx) != seen:
                seen, since = len(self.rx), time.monotonic()
            time.sleep(0.02)
        digest = hashlib.sha256()
        count = 0
        while self.rx:
            digest.update(self.rx.popleft())
            count += 1
        return {"count": count, "sha256": digest.hexdigest()}


class SimPeer(ReceivingPeer):
    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "peer.sock")
        self.device_path = str(directory / "wire.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.rx: collections.deque[bytes] = collections.deque()
        self.sent: list[bytes] = []
        self.sim: Any = None            # the SimProcess, for set_link
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.rx.append(self.sock.recv(65536))
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return

    def _send(self, frames: list[bytes]) -> None:
        for f in frames:
            while not self._stop.is_set():
                try:
                    self.sock.sendto(f, self.device_path)
                    break
                except (socket.timeout, BlockingIOError):
                    continue          # the device's queue is full: wait, never drop
                except FileNotFoundError:
                    time.sleep(0.01)  # the device has not bound its end yet

    # -- the guest.py interface
    def host_clear(self, net: str = "sim") -> int:
        n = len(self.rx)
        self.rx.clear()
        return n

    def host_send(self, frames: Iterable[bytes], net: str = "sim", **_: Any) -> int:
        frames = [bytes(f) for f in frames]
        self._send(frames)
        return len(frames)

    def host_traffic(self, count: int, *, seed: int = 0, min_len: int = 60, max_len: int = 1514,
                     dst: bytes = b"\xff" * 6, src: bytes = b"\x02\x00\x00\x00\x00\x01", net: str = "sim") -> int:
        self.sent = make_frames(count, seed, min_len, max_len, dst, src)
        threading.Thread(target=self._send, args=(self.sent,), daemon=True).start()
        return len(self.sent)

    def set_link(self, up: bool, net: str = "sim", **_: Any) -> None:
        self.sim.set_link(up)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
