"""Guest side of the QEMU harness: ask the host to act on the guest's devices.

Inside the guest (``PMD_IN_GUEST=1``) the host-side agent of
``tests/vm/harness.py`` listens on a virtio-serial port,
``/dev/virtio-ports/pmd.host`` (``PMD_VM_PORT``).  Each request is one JSON
line, each reply one JSON line with the same ``id``; a request returns once the
host has done it (for ``set_link``: once QMP answered).

    import guest                       # tests/vm on sys.path, or load by path
    guest.set_link(False)              # QMP set_link pmd0 down: the device's
    guest.set_link(True)               #   status changes, config interrupt fires
    guest.host_send([frame])           # the host sends frames to the device
    frames = guest.host_recv(timeout=2)  # frames the device sent to the wire
    guest.qmp("query-pci")             # any QMP command

Networks: ``"modern"`` (QEMU id ``pmd0``, ``PMD_VFIO_DEVICE``), ``"legacy"``
(``pmd1``, ``PMD_VFIO_LEGACY_DEVICE``, when the guest was started with
``legacy=True``), ``"knic"`` (``knic0``, a NIC the guest kernel drives, with
``kernel_nic=True``).  Frames are whole Ethernet frames without a virtio-net
header (one per datagram on the ``-netdev dgram`` wire).

Standard library only; usable from a test, or as a command in the guest:
``python tests/vm/guest.py ping | link up|down [NET] | qmp CMD [JSON]``.
"""
from __future__ import annotations

import base64
import errno
import itertools
import json
import os
import select
import sys
import threading
import time
from typing import Iterable

PORT = os.environ.get("PMD_VM_PORT", "/dev/virtio-ports/pmd.host")

_lock = threading.Lock()
_ids = itertools.count(1)


class HostError(RuntimeError):
    """The host agent refused or failed a request, or did not answer in time."""


def in_guest() -> bool:
    """True inside the harness's guest (``PMD_IN_GUEST=1``)."""
    return bool(os.environ.get("PMD_IN_GUEST"))


def available() -> bool:
    """True when the host request channel exists (inside the harness's guest)."""
    return in_guest() and os.path.exists(PORT)


def _open(deadline: float) -> int:
    while True:
        try:
            return os.open(PORT, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            # EBUSY: another process has the port open (only one opener at a time).
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                if e.errno == errno.ENOENT:
                    raise HostError(f"{PORT} does not exist: not in the harness's guest?") from e
                raise HostError(f"cannot open {PORT}: {e}") from e
            time.sleep(0.02)


def request(op: str, *, timeout: float = 30.0, **args) -> object:
    """Send one request to the host agent and return its ``result``.

    Raises :class:`HostError` with the host's message when it failed, or when no
    reply came within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with _lock:
        rid = next(_ids) + (os.getpid() << 20)
        msg = json.dumps({"id": rid, "op": op, **args}).encode() + b"\n"
        fd = _open(deadline)
        try:
            p = select.poll()
            view = memoryview(msg)
            while view:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostError(f"{op}: timed out writing to {PORT}")
                p.register(fd, select.POLLOUT)
                p.poll(min(left, 0.5) * 1000)
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    continue
                view = view[n:]
            p.register(fd, select.POLLIN)
            buf = b""
            while True:
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        reply = json.loads(line)
                    except ValueError:
                        continue
                    if reply.get("id") != rid:        # a late reply to an abandoned request
                        continue
                    if not reply.get("ok"):
                        raise HostError(f"{op}: {reply.get('error')}")
                    return reply.get("result")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostError(f"{op}: no reply from the host within {timeout:g} s")
                p.poll(min(left, 0.5) * 1000)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:                         # host side not connected (yet)
                    time.sleep(0.05)
                    continue
                buf += chunk
        finally:
            os.close(fd)


def ping(timeout: float = 30.0) -> dict:
    """Round trip to the host agent; returns ``{"pong": True, "time": host_time}``."""
    return request("ping", timeout=timeout)


def set_link(up: bool, net: str = "modern", *, timeout: float = 30.0) -> None:
    """QMP ``set_link`` on the device of ``net`` (or a QEMU device/netdev id).

    Returns once QMP returned success; raises :class:`HostError` otherwise.
    """
    request("set_link", name=net, up=bool(up), timeout=timeout)


def qmp(execute: str, timeout: float = 30.0, **arguments) -> object:
    """Run any QMP command on the guest's QEMU; returns its ``return`` value."""
    return request("qmp", execute=execute, arguments=arguments or None, timeout=timeout)


def nets() -> dict:
    """The guest's networks: ``{name: {"device": id, "netdev": id, "mac": mac}}``."""
    return request("nets")


def host_send(frames: Iterable[bytes], net: str = "modern", *, timeout: float = 30.0) -> int:
    """The host sends ``frames`` (whole Ethernet frames) to the device of ``net``.

    Returns how many were sent.  QEMU drops frames the device cannot take
    (driver not ready, no rx buffers), as a real wire would.
    """
    enc = [base64.b64encode(bytes(f)).decode() for f in frames]
    return request("send", net=net, frames=enc, timeout=timeout)["sent"]


def host_recv(max_frames: int = 64, timeout: float = 1.0, net: str = "modern", *,
              count: int = 1) -> list:
    """Frames the device of ``net`` sent to the wire, as ``bytes``, oldest first.

    The host keeps what arrives on the wire from boot on; this waits up to
    ``timeout`` seconds until at least ``count`` frames are there, then returns
    up to ``max_frames`` of them (maybe fewer, maybe none).
    """
    r = request("recv", net=net, max=max_frames, count=count, wait=timeout,
                timeout=timeout + 30.0)
    return [base64.b64decode(f) for f in r["frames"]]


def host_traffic(count: int, *, seed: int = 0, min_len: int = 60, max_len: int = 1514,
                 dst: bytes = b"\xff" * 6, src: bytes = b"\x02\x00\x00\x00\x00\x01",
                 net: str = "modern") -> int:
    """The host generates ``count`` random frames (lengths ``min_len``..``max_len``,
    sequence number first) and sends them to the device of ``net``, in the
    background, never dropping one on its side. Returns how many."""
    return request("traffic", net=net, count=count, seed=seed, min_len=min_len, max_len=max_len,
                   dst=dst.hex(), src=src.hex())["started"]


def host_traffic_check(mode: str = "io", *, wait: float = 120.0, net: str = "modern") -> dict:
    """Wait until as many frames came back from the device as ``host_traffic`` sent
    (or ``wait`` seconds) and compare them in order: ``{"sent", "received",
    "matched", "n_mismatched", "mismatched"}``. ``mode="macswap"`` expects the
    MACs swapped."""
    return request("traffic_check", net=net, mode=mode, wait=wait, timeout=wait + 60.0)


def host_wire_digest(*, quiet: float = 2.0, net: str = "modern") -> dict:
    """Once the device has been silent for ``quiet`` seconds: how many frames it sent
    and the SHA-256 over them in order (``{"count", "sha256"}``); clears them."""
    return request("wire_digest", net=net, quiet=quiet, timeout=quiet + 660.0)


def host_clear(net: str = "modern") -> int:
    """Drop the frames the host holds for ``net``; returns how many."""
    return request("clear", net=net)["dropped"]


def _main(argv: list) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "ping":
        print(json.dumps(ping()))
    elif cmd == "link":
        set_link(rest[0] in ("up", "on", "1", "true"), *(rest[1:2] or ["modern"]))
        print("ok")
    elif cmd == "qmp":
        args = json.loads(rest[1]) if len(rest) > 1 else {}
        print(json.dumps(qmp(rest[0], **args), indent=1))
    elif cmd == "nets":
        print(json.dumps(nets(), indent=1))
    else:
        print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_main(sys.argv[1:]))
    except HostError as e:
        print(f"guest.py: {e}", file=sys.stderr)
        sys.exit(1)
