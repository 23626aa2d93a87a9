"""Bounded-time fuzzers for vfio-user, both directions (issue 8).

- :func:`test_fuzz_server_against_malformed_messages`: pmd's ``VfioUserServer`` over the
  built-in device (``VirtioNetModel``) in a process of its own, against a raw client that
  sends truncated headers, wrong sizes, unknown commands, out-of-range region accesses,
  DMA_MAP with bad, missing, unsealed or short fds, garbage SET_IRQS (huge counts, bad flags,
  wrong fd counts), messages after partial ones, bad header flags, stalls. It checks every
  answer: a well-framed message gets exactly its reply (an error with the expected errno
  where the badness is certain), a broken frame gets the connection closed, every error is
  counted by the server (its counts equal what the client saw), the server never dies, a
  good client and a Port still work afterwards, and nothing leaks (fds, threads and memfd
  mappings of the server process, counted from /proc/PID).
- :func:`test_fuzz_client_against_a_hostile_server`: ``VfioUserAccess`` in a child process
  (so a SIGBUS or SIGSEGV shows as a negative exit status) against a proxy in front of a
  real server that mutates what the server says: wrong sizes, ids and commands, bad flags,
  garbage payloads, region info with huge sizes, offsets past the file and capability
  chains that loop, fds that are unsealed (and then truncated), too short or not files at
  all, extra fds, commands from the server, replies that never come or stop half way.
  A quarter of the connections run a whole Port on it (open, start, a burst, close).
  Every call may only fail with a pmd error that says something; a connection with nothing
  falsified must work end to end; the child counts its own fds, threads and mappings around
  each connection.

Seeded and bounded: ``PMD_FUZZ_SEED`` (default 8) and ``PMD_FUZZ_SECONDS`` per target
(default 12). A longer run::

    PMD_FUZZ_SECONDS=300 python -m pytest tests/test_fuzz_vfio_user.py -s -p no:cacheprovider

Each test prints its iteration counts (``-s`` shows them).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import mmap
import os
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pmd.memory.seals import create_sealed_memfd
from pmd.abi import vfio_user as p

ROOT = Path(__file__).resolve().parent.parent
PAGE = mmap.PAGESIZE
SECONDS = float(os.environ.get("PMD_FUZZ_SECONDS", "12"))
SEED = int(os.environ.get("PMD_FUZZ_SEED", "8"))
SERVER_TIMEOUT = 0.5  # the server's per-message limit: a stall costs this much
REPLY_WAIT = 5.0  # how long the fuzzer waits for an answer that must come (a loaded machine)
U64 = (1 << 64) - 1
# the built-in device with default options: BAR0 0x10000 (notify area 0x6000), config 256 bytes,
# MSI-X (IRQ index 2) with 4 vectors
BAR0_SIZE = 0x10000
MSIX = 4
MAX_DMA_WINDOWS = 16  # pmd._device.DmaWindows


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="fz", dir="/tmp")  # short: AF_UNIX paths hold 107 bytes
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def process_resources(pid: int) -> dict[str, int]:
    """What a leak would grow: open fds, threads, and mappings of memfds (DMA maps, BARs)."""
    with open(f"/proc/{pid}/maps") as f:
        memfd_maps = sum(1 for line in f if "/memfd:" in line)
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "memfd_maps": memfd_maps,
    }


# ---------------------------------------------------------------------------
# (a) the server against malformed messages
# ---------------------------------------------------------------------------

SERVER_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    sys.path.insert(0, {root!r})

    class Problems(logging.Handler):
        # tracebacks and errors: an exception the server did not expect, a model that failed
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            if record.exc_info or record.levelno >= logging.ERROR:
                self.records.append(self.format(record)[-3000:])

    problems = Problems()
    logging.getLogger().addHandler(problems)
    logging.getLogger().setLevel(logging.WARNING)
    from pmd.sim.model import VirtioNetModel
    from pmd.sim.server import VfioUserServer

    model = VirtioNetModel()
    server = VfioUserServer(model, {path!r}, timeout={timeout})
    server.serve_in_thread()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            st = server.stats()
            st["dma_mappings"] = len(model.dma)
            st["irq_fds"] = sum(1 for fd in model.irq_fds if fd >= 0)
            st["problems"] = problems.records[:5]
            st["n_problems"] = len(problems.records)
            print(json.dumps(st), flush=True)
        else:
            break
    server.close()
    model.close()
    """
)


class ServerProcess:
    """The server under test: its socket, its stats (over a pipe) and its /proc entries."""

    def __init__(self, sock_dir: str) -> None:
        self.path = os.path.join(sock_dir, "s")
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT.format(root=str(ROOT), path=self.path, timeout=SERVER_TIMEOUT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready", self.log_text()

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stats(self) -> dict:
        self.check_alive()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        self.check_alive()
        return json.loads(line)

    def check_alive(self, context: str = "") -> None:
        rc = self.proc.poll()
        if rc is not None:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            pytest.fail(f"the vfio-user server {how} {context}\n{self.log_text()}")

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Stats once the server has finished with the last client (client_gone done)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if not st["connected"]:
                return st
            if time.monotonic() > deadline:
                pytest.fail(f"the server still serves a client {timeout} s after it left: {st}")
            time.sleep(0.002)

    def resources(self) -> dict[str, int]:
        return process_resources(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@dataclass
class Step:
    """One thing the fuzzer sends and what must come of it.

    ``expect``: ``reply`` (exactly its reply, error or not), ``error`` (an error reply,
    errno in ``errnos`` when given, and the connection dropped after it when ``then_drop``),
    ``ok`` (a success reply), ``none`` (no reply: no-reply bit, or a reply nobody asked
    for), ``drop`` (the server closes the connection), ``cut`` (we close the connection in
    the middle of the message), ``desync`` (the stream is in an unknown state afterwards:
    drain it and end the session).
    """

    what: str
    data: bytes
    fds: list[int] = field(default_factory=list)
    expect: str = "reply"
    errnos: tuple[int, ...] = ()
    then_drop: bool = False
    chunks: int = 1  # sent in this many pieces (the fds with piece ``fd_chunk``)
    fd_chunk: int = 0
    on_ok: object = None  # called with the reply when it is a success


def pick(rng: random.Random, edges: list[int], bits: int = 64) -> int:
    """An edge value most of the time, sometimes any value of ``bits`` bits."""
    if rng.random() < 0.8:
        return rng.choice(edges) & ((1 << bits) - 1)
    return rng.getrandbits(bits)


OFFSETS = [0, 1, 2, 3, 4, 0x10, 0x14, 0x16, 0x18, 0xFC, 0xFE, 0xFF, 0x100, 0x2000, 0x4000, 0x4006, 0x6000,
           0x6002, 0x6FFE, 0x7000, 0x8000, 0x9000, 0xFFFC, 0xFFFF, 0x10000, 1 << 31, 1 << 32, 1 << 63, U64 - 3, U64]
COUNTS = [0, 1, 2, 3, 4, 5, 8, 16, 64, 255, 256, 257, 4096, 0x10000, 1 << 20, (1 << 20) + 1, 1 << 31, 0xFFFFFFFF]
REGIONS = [0, 0, 0, 7, 7, 7, 1, 2, 3, 4, 5, 6, 8, 9, 64, 0xFFFFFFFF]
IRQ_INDEXES = [2, 2, 2, 0, 1, 3, 4, 5, 16, 0xFFFFFFFF]
SIZES = [0, 1, PAGE - 1, PAGE, 2 * PAGE, 16 * PAGE, 1 << 20, 1 << 30, 1 << 40, 1 << 63, U64]
ADDRESSES = [0, PAGE, 0x100000, 0x7F0000000000, 1 << 47, 1 << 63, U64 - PAGE + 1, U64]
FD_KINDS = ["eventfd", "pipe", "memfd", "sealable_memfd", "sealed_memfd", "sealed_small", "sealed_ro",
            "sealed_huge", "sealed_write", "o_path_memfd", "devnull", "directory", "socket", "o_path"]


class FdFactory:
    """Makes fds of many kinds to send; closes them all after each send."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def make(self, kind: str, size: int = 4 * PAGE) -> int:
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC)
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        if kind == "memfd":
            fd = os.memfd_create("fz-unsealed", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            return fd
        if kind == "sealable_memfd":
            fd = os.memfd_create("fz-sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)
            return fd
        if kind == "sealed_memfd":
            return create_sealed_memfd("fz-sealed", size)
        if kind == "sealed_small":
            return create_sealed_memfd("fz-small", PAGE)
        if kind == "sealed_ro":
            fd = create_sealed_memfd("fz-ro", size)
            ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            os.close(fd)
            return ro
        if kind == "sealed_write":  # sealed against shrinking and writing: no writable mapping
            fd = os.memfd_create("fz-wsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
            return fd
        if kind == "o_path_memfd":  # a sealed memfd, reopened O_PATH: no seals can be read through it
            fd = create_sealed_memfd("fz-opath", size)
            opath = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            os.close(fd)
            return opath
        if kind == "sealed_huge":
            return create_sealed_memfd("fz-huge", 1 << 32)  # sparse: no page is ever touched here
        if kind == "devnull":
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        if kind == "directory":
            return os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if kind == "socket":
            return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()
        if kind == "o_path":
            return os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
        raise AssertionError(kind)

    def some(self, n: int, kinds: list[str] | None = None, size: int = 4 * PAGE) -> list[int]:
        return [self.make(self.rng.choice(kinds or FD_KINDS), size) for _ in range(n)]


class ServerFuzzer:
    """Generates sessions of steps against the built-in device's server and checks the answers."""

    def __init__(self, server: ServerProcess, seed: int) -> None:
        self.server = server
        self.rng = random.Random(seed)
        self.fds = FdFactory(self.rng)
        self.next_id = 0
        self.counts: Counter[str] = Counter()
        self.error_replies = 0  # seen by us
        self.drops = 0  # connections the server closed, plus the ones we cut mid-message
        self.desyncs = 0
        self.history: list[str] = []  # the current session's steps, for a failure message
        self.dma: list[tuple[int, int]] = []  # this session's mappings
        self.dma_unknown = False  # a DMA_MAP/UNMAP went without a reply: the list may be wrong

    # --- building messages ---

    def msg(self, command: int, payload: bytes = b"", flags: int = p.TYPE_COMMAND, error: int = 0) -> tuple[int, bytes]:
        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        return msg_id, p.encode_message(msg_id, command, payload, flags, error)

    def step(self, what: str, command: int, payload: bytes = b"", **kw: object) -> Step:
        _msg_id, data = self.msg(command, payload)
        return Step(what, data, **kw)  # type: ignore[arg-type]

    def region_read(self) -> Step:
        rng = self.rng
        region, offset, count = rng.choice(REGIONS), pick(rng, OFFSETS), pick(rng, COUNTS, 32)
        payload = p.encode_region_access(offset, region, count)
        if rng.random() < 0.1:
            payload += os.urandom(rng.randrange(1, 9))  # trailing bytes
        return self.step(f"REGION_READ {region} {offset:#x}+{count:#x}", p.VFIO_USER_REGION_READ, payload)

    def region_write(self) -> Step:
        rng = self.rng
        region, offset = rng.choice(REGIONS), pick(rng, OFFSETS)
        count = rng.choice([1, 2, 4, 8, 1, 2, 4, 0, 3, 16, 300])
        data = os.urandom(count)
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data) + 1)]  # fewer bytes than count
        return self.step(f"REGION_WRITE {region} {offset:#x}+{count}", p.VFIO_USER_REGION_WRITE,
                         p.encode_region_access(offset, region, count, data))

    def region_info(self) -> Step:
        rng = self.rng
        index, argsz = rng.choice(REGIONS), rng.choice([0, 8, 31, 32, 33, 64, 1024, 0xFFFFFFFF])
        if rng.random() < 0.1:
            payload = struct.pack("<IIIIQQ", argsz, rng.getrandbits(32), index, rng.getrandbits(32), 0, 0)
        else:
            payload = p.encode_region_info_request(index, argsz)
        return self.step(f"REGION_INFO {index} argsz {argsz}", p.VFIO_USER_DEVICE_GET_REGION_INFO, payload)

    def irq_info(self) -> Step:
        rng = self.rng
        index = rng.choice(IRQ_INDEXES)
        payload = p.encode_irq_info_request(index)
        if rng.random() < 0.2:
            payload = struct.pack("<IIII", rng.choice([0, 15, 16, 17]), rng.getrandbits(2), index, rng.getrandbits(2))
        return self.step(f"IRQ_INFO {index}", p.VFIO_USER_DEVICE_GET_IRQ_INFO, payload)

    def set_irqs(self) -> Step:
        rng = self.rng
        flags = rng.choice([0x24, 0x24, 0x24, 0x21, 0x22, 0x14, 0x11, 0x12, 0x0, 0x26, 0x64, 0x7, 0x100, 0xFFFFFFFF])
        index = rng.choice(IRQ_INDEXES)
        start = rng.choice([0, 0, 1, 2, 3, 4, 5, 0x7FFFFFFF, 0xFFFFFFFF])
        count = rng.choice([0, 1, 1, 2, 3, 4, 5, 16, 17, 2048, 0xFFFF, 0xFFFFFFFF])
        data = b""
        if flags & 0x7 == 0x2:  # DATA_BOOL: one byte per vector follows
            data = os.urandom(min(count, 64) if rng.random() < 0.7 else rng.randrange(4))
        argsz = 20 + len(data)
        if rng.random() < 0.1:
            argsz = rng.choice([0, 19, 21, 0xFFFFFFFF])
        payload = struct.pack("<IIIII", argsz, flags, index, start, count) + data
        n_fds = min(20, rng.choice([0, 0, 1, count, min(count, 16), max(count - 1, 0), count + 1]))
        kinds = ["eventfd"] * 6 + FD_KINDS if rng.random() < 0.7 else FD_KINDS
        fds = self.fds.some(n_fds, kinds)
        expect, errnos = "reply", ()
        if n_fds > p.MAX_MSG_FDS:
            expect, errnos = "error", (errno.E2BIG,)
        elif argsz != len(payload):
            expect, errnos = "error", (errno.EINVAL,)
        return self.step(f"SET_IRQS flags {flags:#x} index {index} {start}+{count} with {n_fds} fds",
                         p.VFIO_USER_DEVICE_SET_IRQS, payload, fds=fds, expect=expect, errnos=errnos)

    def good_set_irqs(self) -> Step:
        n = self.rng.randrange(1, MSIX + 1)
        start = self.rng.randrange(0, MSIX - n + 1)
        fds = self.fds.some(n, ["eventfd"])
        return self.step(f"SET_IRQS {start}+{n} eventfds", p.VFIO_USER_DEVICE_SET_IRQS,
                         p.encode_set_irqs(0x24, 2, start, n), fds=fds, expect="ok")

    def dma_map(self) -> Step:
        rng = self.rng
        kind = rng.choice(FD_KINDS + ["none", "two", "sealed_memfd", "sealed_memfd", "sealed_memfd"])
        file_size = rng.choice([PAGE, 4 * PAGE, 16 * PAGE, 1 << 20])
        flags = rng.choice([3, 3, 3, 0, 1, 2, 4, 7, 0xFFFFFFFF])
        offset = rng.choice([0, 0, 0, PAGE, 1, PAGE + 1, file_size, 1 << 40, 1 << 63, U64 - PAGE + 1])
        address = pick(rng, ADDRESSES) & ~(PAGE - 1) if rng.random() < 0.9 else rng.getrandbits(64)
        size = rng.choice([PAGE, 2 * PAGE, file_size, file_size + PAGE, 1 << 30, 0]) if rng.random() < 0.9 else pick(rng, SIZES)
        argsz = 32 if rng.random() < 0.95 else rng.choice([0, 31, 33, 0xFFFFFFFF])
        payload = struct.pack("<IIQQQ", argsz, flags & 0xFFFFFFFF, offset & U64, address & U64, size & U64)
        if rng.random() < 0.05:
            payload = payload[: rng.randrange(32)]
        if kind == "none":
            fds = []
        elif kind == "two":
            fds = self.fds.some(2, ["sealed_memfd"], file_size)
        else:
            fds = [self.fds.make(kind, file_size)]
        known = payload == struct.pack("<IIQQQ", 32, flags, offset, address, size)
        expect, errnos = "reply", ()
        if known and kind in ("memfd", "sealable_memfd") and flags in (1, 2, 3) and size and offset % PAGE == 0 \
                and address + size <= U64 + 1 and offset + size <= U64 + 1:
            expect, errnos = "error", (errno.EPERM,)  # unsealed: refused, whatever else is right
        elif known and kind == "none" and flags in (1, 2, 3) and size and address + size <= U64 + 1 \
                and offset + size <= U64 + 1:
            expect, errnos = "error", (errno.ENOTSUP,)
        step = self.step(f"DMA_MAP {kind} flags {flags:#x} offset {offset:#x} iova {address:#x} size {size:#x} "
                         f"(file {file_size:#x})", p.VFIO_USER_DMA_MAP, payload, fds=fds, expect=expect, errnos=errnos)
        step.on_ok = lambda reply: self.dma.append((address, size))
        return step

    def good_dma_map(self) -> Step:
        size = self.rng.choice([PAGE, 4 * PAGE, 1 << 20])
        address = 0x1000_0000 + self.rng.randrange(1 << 16) * (1 << 21)
        overlaps = any(address < a + s and a < address + size for a, s in self.dma)
        expect, errnos = ("error", (errno.EEXIST,)) if overlaps else ("ok", ())
        if self.dma_unknown or len(self.dma) >= MAX_DMA_WINDOWS:
            expect, errnos = "reply", ()  # a map we were not told about, or the window table is full
        step = self.step(f"DMA_MAP sealed iova {address:#x} size {size:#x}", p.VFIO_USER_DMA_MAP,
                         p.encode_dma_map(address, size, 0), fds=[self.fds.make("sealed_memfd", size)],
                         expect=expect, errnos=errnos)
        step.on_ok = lambda reply: self.dma.append((address, size))
        return step

    def dma_unmap(self) -> Step:
        rng = self.rng
        if self.dma and rng.random() < 0.6:
            address, size = rng.choice(self.dma)
            if rng.random() < 0.3:
                size = rng.choice([PAGE, size + PAGE, size - 1])
        else:
            address, size = pick(rng, ADDRESSES), pick(rng, SIZES)
        flags = 0 if rng.random() < 0.9 else rng.choice([1, 2, 0xFFFFFFFF])
        argsz = rng.choice([24, 24, 24, 0, 23, 25, 0xFFFFFFFF])
        payload = struct.pack("<IIQQ", argsz, flags, address & U64, size & U64)

        def unmapped(reply: p.Message) -> None:
            if (address, size) in self.dma:
                self.dma.remove((address, size))

        step = self.step(f"DMA_UNMAP {address:#x}+{size:#x} flags {flags:#x} argsz {argsz}",
                         p.VFIO_USER_DMA_UNMAP, payload)
        step.on_ok = unmapped
        return step

    def misc(self) -> Step:
        rng = self.rng
        choice = rng.randrange(9)
        if choice == 0:
            cmd = rng.choice([0, 14, 15, 16, 99, 0x100, 0xFFFF])
            return self.step(f"unknown command {cmd}", cmd, os.urandom(rng.randrange(32)), expect="error",
                             errnos=(errno.ENOSYS,))
        if choice == 1:
            return self.step("VERSION again", p.VFIO_USER_VERSION, p.encode_version(0, 1, p.Capabilities()),
                             expect="error", errnos=(errno.EINVAL,))
        if choice == 2:
            payload = b"" if rng.random() < 0.5 else os.urandom(rng.randrange(1, 8))
            return self.step(f"DEVICE_RESET +{len(payload)}", p.VFIO_USER_DEVICE_RESET, payload,
                             expect="error" if payload else "ok", errnos=(errno.EINVAL,) if payload else ())
        if choice == 3:
            cmd = rng.choice([p.VFIO_USER_DMA_READ, p.VFIO_USER_DMA_WRITE, p.VFIO_USER_DEVICE_GET_REGION_IO_FDS])
            return self.step(f"{p.command_name(cmd)}", cmd, os.urandom(rng.randrange(40)), expect="error",
                             errnos=(errno.EINVAL, errno.ENOTSUP))
        if choice == 4:
            payload = p.encode_device_info_request(rng.choice([16, 16, 0, 15, 1024]))
            return self.step("DEVICE_GET_INFO", p.VFIO_USER_DEVICE_GET_INFO, payload)
        if choice == 5:  # a known command with garbage of any length
            cmd = rng.choice(list(p.COMMAND_NAMES))
            if cmd == p.VFIO_USER_VERSION:
                cmd = p.VFIO_USER_DEVICE_GET_INFO
            return self.step(f"{p.command_name(cmd)} garbage", cmd, os.urandom(rng.choice([1, 4, 8, 16, 20, 24, 32, 64])),
                             fds=self.fds.some(rng.choice([0, 0, 1, 2])))
        if choice == 6:  # more fds than max_msg_fds
            return self.step("DEVICE_GET_INFO with 17+ fds", p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request(),
                             fds=self.fds.some(rng.randrange(17, 40), ["eventfd", "pipe", "memfd"]), expect="error",
                             errnos=(errno.E2BIG,))
        if choice == 7:  # unused fds with a command that takes none
            return self.step("DEVICE_GET_INFO with an fd", p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request(),
                             fds=self.fds.some(rng.randrange(1, 4)), expect="ok")
        return self.step("DEVICE_GET_INFO", p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request(), expect="ok")

    def header_mutation(self, step: Step) -> Step:
        """Same payload, a header the server must refuse, ignore or lose the frame over."""
        rng = self.rng
        msg_id, command, size, flags, error = p.HEADER.unpack_from(step.data)
        payload = step.data[p.HEADER_SIZE:]
        choice = rng.randrange(10)
        if choice == 0:
            bits = rng.choice([0x40, 0x80, 0x100, 1 << 31])
            step.data = p.HEADER.pack(msg_id, command, size, flags | bits, error) + payload
            step.expect, step.errnos, step.what = "error", (errno.EINVAL,), f"{step.what} with reserved flag {bits:#x}"
        elif choice == 1:
            step.data = p.HEADER.pack(msg_id, command, size, flags | p.FLAG_ERROR, rng.getrandbits(32)) + payload
            step.expect, step.errnos, step.what = "error", (errno.EINVAL,), f"{step.what} with the error flag"
        elif choice == 2:
            kind = rng.randrange(2, 16)
            step.data = p.HEADER.pack(msg_id, command, size, kind, error) + payload
            step.expect, step.errnos, step.what = "error", (errno.EINVAL,), f"{step.what} of message type {kind}"
        elif choice == 3:
            step.data = p.HEADER.pack(msg_id, command, size, p.FLAG_NO_REPLY, error) + payload
            step.expect, step.what = "none", f"{step.what}, no reply wanted"
        elif choice == 4:
            step.data = p.HEADER.pack(msg_id, command, size, p.TYPE_REPLY, error) + payload
            step.expect, step.what = "none", f"{step.what} sent as a reply"
        elif choice == 5:
            bad = rng.choice([0, 1, 15])
            step.data = p.HEADER.pack(msg_id, command, bad, flags, error) + payload
            step.expect, step.what = "drop", f"{step.what} claiming {bad} bytes"
        elif choice == 6:
            bad = rng.choice([p.max_message_size() + 1, 1 << 30, 0xFFFFFFFF])
            step.data = p.HEADER.pack(msg_id, command, bad, flags, error) + payload
            step.expect, step.what = "desync", f"{step.what} claiming {bad} bytes"
        elif choice == 7:  # a size that does not match the bytes: the next message is misframed
            delta = rng.choice([-4, -1, 1, 4, 100])
            if size + delta < p.HEADER_SIZE:
                delta = 1
            step.data = p.HEADER.pack(msg_id, command, size + delta, flags, error) + payload
            step.expect, step.what = "desync", f"{step.what} claiming {delta:+d} bytes"
        else:  # fragments, the fds riding on a later one: must not matter
            step.chunks = rng.randrange(2, 6)
            step.fd_chunk = rng.randrange(step.chunks)
            step.what += f" in {step.chunks} pieces"
        return step

    def next_step(self) -> Step:
        rng = self.rng
        gen = rng.choices(
            [self.region_read, self.region_write, self.region_info, self.irq_info, self.set_irqs,
             self.good_set_irqs, self.dma_map, self.good_dma_map, self.dma_unmap, self.misc],
            weights=[12, 12, 6, 4, 12, 3, 12, 4, 6, 10],
        )[0]
        step = gen()
        if rng.random() < 0.1:
            step = self.header_mutation(step)
            if step.expect == "none" and struct.unpack_from("<H", step.data, 2)[0] in (p.VFIO_USER_DMA_MAP,
                                                                                    p.VFIO_USER_DMA_UNMAP):
                self.dma_unknown = True
        return step

    # --- talking ---

    def send(self, sock: socket.socket, step: Step) -> None:
        deadline = time.monotonic() + REPLY_WAIT
        if step.chunks <= 1:
            p.send_message(sock, step.data, step.fds, deadline)
            return
        n = len(step.data)
        cuts = sorted({0, n, *(self.rng.randrange(1, max(n, 2)) for _ in range(step.chunks - 1))})
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
            p.send_message(sock, step.data[a:b], step.fds if k == min(step.fd_chunk, len(cuts) - 2) else (), deadline)
            time.sleep(0.0005)

    @staticmethod
    def recv(sock: socket.socket, timeout: float = REPLY_WAIT) -> p.Message | None:
        msg = p.recv_message(sock, deadline=time.monotonic() + timeout, max_size=p.max_message_size() * 2,
                             max_fds=p.MAX_MSG_FDS)
        return msg

    def fail(self, text: str) -> None:
        history = "\n  ".join(self.history[-15:])
        pytest.fail(f"{text}\nsession steps (last 15):\n  {history}\n{self.server.log_text()}")

    def expect_eof(self, sock: socket.socket, timeout: float) -> bool:
        """Read until the server closes the connection (True) or ``timeout`` passes quietly (False);
        error replies on the way are counted."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([sock], [], [], left)
            if not r:
                return False
            try:
                msg = self.recv(sock, REPLY_WAIT)
            except p.MessageError:
                return True  # reset, or cut inside a reply: the server is gone from this connection
            if msg is None:
                return True
            msg.close_fds()
            if msg.is_error:
                self.error_replies += 1
            deadline = time.monotonic() + timeout  # something came: give it the full time again

    def answer(self, sock: socket.socket, step: Step) -> bool:
        """Check the server's answer to ``step``; False when the session is over."""
        if step.expect == "none":
            return True
        if step.expect == "cut":
            self.drops += 1
            return False
        if step.expect == "drop":
            if not self.expect_eof(sock, SERVER_TIMEOUT + REPLY_WAIT):
                self.fail(f"{step.what}: the server did not drop the connection")
            self.drops += 1
            return False
        if step.expect == "desync":
            # Whatever the server made of the bytes, our end of the stream makes it finish: it
            # answers what it could frame, then drops us (inside a message) or sees us go.
            self.desyncs += 1
            sock.shutdown(socket.SHUT_WR)
            if not self.expect_eof(sock, REPLY_WAIT):
                self.fail(f"{step.what}: the server did not close the connection after ours")
            return False
        msg_id, command = struct.unpack_from("<HH", step.data)
        try:
            reply = self.recv(sock)
        except p.MessageError as exc:
            self.fail(f"{step.what}: no proper reply: {exc}")
        if reply is None:
            self.fail(f"{step.what}: the server closed the connection instead of answering")
        assert reply is not None
        reply.close_fds()
        if not reply.is_reply or reply.msg_id != msg_id or reply.command != command:
            self.fail(f"{step.what}: got {reply.describe()} for id {msg_id} command {command}")
        if reply.is_error:
            self.error_replies += 1
            self.counts[f"errno {errno.errorcode.get(reply.error, reply.error)}"] += 1
            if reply.payload:
                self.fail(f"{step.what}: an error reply with a payload")
            if step.expect == "ok":
                self.fail(f"{step.what}: refused with errno {reply.error} ({os.strerror(reply.error)})")
            if step.errnos and reply.error not in step.errnos:
                self.fail(f"{step.what}: errno {reply.error} ({errno.errorcode.get(reply.error)}), expected {step.errnos}")
        else:
            self.counts["ok"] += 1
            if step.expect == "error":
                self.fail(f"{step.what}: accepted, expected errno {step.errnos}")
            if callable(step.on_ok):
                step.on_ok(reply)
        if step.then_drop:
            if not self.expect_eof(sock, REPLY_WAIT):
                self.fail(f"{step.what}: the server did not drop the connection after the error")
            self.drops += 1
            return False
        return True

    def session(self) -> int:
        """One connection: maybe VERSION, some steps, an ending. Returns the steps sent."""
        rng = self.rng
        self.history = []
        self.dma = []
        self.dma_unknown = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(self.server.path)
        sent = 0
        steps: list[Step] | itertools.chain[Step]
        try:
            first = rng.random()
            if first < 0.06:  # a command before VERSION: refused, then dropped
                step = self.next_step()
                if step.expect in ("none", "drop", "desync", "cut") or \
                        struct.unpack_from("<H", step.data, 2)[0] == p.VFIO_USER_VERSION:
                    step = self.step("DEVICE_GET_INFO", p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request())
                step.expect, step.errnos, step.then_drop = "error", (errno.EINVAL, errno.E2BIG), True
                steps = [step]
            elif first < 0.1:  # a bad VERSION
                major = rng.choice([0, 1, 0xFFFF])
                data = rng.choice([b"{oops\0", b"[]\0", b'{"capabilities":{"max_msg_fds":0}}\0', b"\0\0",
                                   b"[" * 4000, b'{"capabilities":' * 300, os.urandom(64)])
                payload = struct.pack("<HH", major, 1) + data
                steps = [self.step(f"VERSION {major}.1 {data[:20]!r}", p.VFIO_USER_VERSION, payload,
                                   expect="error", errnos=(errno.EINVAL, errno.ENOTSUP, errno.E2BIG), then_drop=True)]
            else:
                version = self.step("VERSION", p.VFIO_USER_VERSION, p.encode_version(0, rng.choice([0, 1, 9]),
                                    p.Capabilities(max_msg_fds=rng.choice([1, 4, 16]))), expect="ok")
                body = (self.next_step() for _ in range(rng.randrange(1, 40)))  # made as they are sent
                ending = rng.random()
                if ending < 0.04:  # cut in the middle of a message
                    _id, data = self.msg(p.VFIO_USER_REGION_WRITE, p.encode_region_access(0, 7, 8, b"x" * 8))
                    last = Step("cut mid-message", data[: rng.randrange(1, len(data))], expect="cut")
                elif ending < 0.06:  # a partial header, then silence: the server gives up after its timeout
                    _id, data = self.msg(p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request())
                    last = Step("stalled partial message", data[: rng.randrange(1, len(data))], expect="drop")
                else:  # a good request last: the session still works and nothing stray is in the stream
                    last = self.step("DEVICE_GET_INFO", p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request(),
                                     expect="ok")
                steps = itertools.chain([version], body, [last])
            for step in steps:
                self.history.append(step.what)
                self.counts[step.what.split()[0]] += 1
                try:
                    self.send(sock, step)
                except OSError as exc:
                    self.fail(f"{step.what}: cannot send ({exc}): the server closed the connection early")
                finally:
                    for fd in step.fds:
                        os.close(fd)
                sent += 1
                if not self.answer(sock, step):
                    break
        finally:
            sock.close()
        return sent


def good_client_works(path: str) -> None:
    """A well-behaved client: connect, read config, map BAR0 and memory, interrupts, close."""
    import pmd
    from pmd.driver.access.vfio_user import VfioUserAccess

    efd = os.eventfd(0, os.EFD_CLOEXEC)
    mem = pmd.DmaMemory(1 << 20, lock=False, name="fz-good")
    try:
        with VfioUserAccess.connect(path, timeout=REPLY_WAIT) as dev:
            assert dev.config_read_int(0, 2) == 0x1AF4
            mapping = dev.map_region(0)
            assert mapping.mmio(0x6000, 4).read32(0) is not None
            dev.map_memory(mem)
            dev.set_irqs(2, 0, [efd])
            dev.disable_irqs(2)
            dev.unmap_memory(mem)
    finally:
        mem.close()
        os.close(efd)


def port_loopback_works(path: str) -> None:
    """The whole driver on the device: start, send 8 frames, get them back (loopback wire)."""
    import numpy as np

    import pmd

    port = pmd.open_port("vfio-user:" + path)
    try:
        port.start()
        frames = np.zeros((8, 64), np.uint8)
        frames[:, :6] = 0xFF
        frames[:, 12:14] = (0x88, 0xB5)
        frames[:, 14] = np.arange(8)
        lengths = np.full(8, 64, np.uint32)
        assert port.tx_burst(frames, lengths) == 8
        out = np.zeros((8, 2048), np.uint8)
        lens = np.zeros(8, np.uint32)
        got, deadline = 0, time.monotonic() + 10
        while got < 8 and time.monotonic() < deadline:
            got += port.rx_burst(out[got:], lens[got:])
            time.sleep(0)
        assert got == 8 and sorted(out[:8, 14]) == list(range(8))
    finally:
        port.close()


def test_fuzz_server_against_malformed_messages(sock_dir):
    server = ServerProcess(sock_dir)
    try:
        port_loopback_works(server.path)  # first use: whatever is created once is there now
        good_client_works(server.path)
        before = server.wait_idle()
        baseline = server.resources()
        fuzzer = ServerFuzzer(server, SEED)
        sessions = messages = checks = 0
        start = time.monotonic()
        while time.monotonic() - start < SECONDS:
            messages += fuzzer.session()
            sessions += 1
            st = server.wait_idle()
            server.check_alive(f"after session {sessions} (seed {SEED})")
            if st["dma_mappings"] or st["irq_fds"]:
                pytest.fail(f"session {sessions}: the device kept {st['dma_mappings']} DMA maps and "
                            f"{st['irq_fds']} eventfds after the client left")
            if sessions % 25 == 0:
                checks += 1
                good_client_works(server.path)
                server.wait_idle()
                assert server.resources() == baseline, f"after {sessions} sessions: {server.resources()} vs {baseline}"
        port_loopback_works(server.path)
        after = server.wait_idle()
        leaked = {k: v - baseline[k] for k, v in server.resources().items()}
        elapsed = time.monotonic() - start
        print(f"\nfuzz vfio-user server: seed {SEED}, {elapsed:.1f} s: {sessions} sessions, {messages} messages, "
              f"{fuzzer.error_replies} error replies, {fuzzer.drops} dropped connections, {fuzzer.desyncs} misframed, "
              f"{checks + 2} good-client checks; server counted {after['messages'] - before['messages']} messages, "
              f"errnos {after['errnos']}; resource delta {leaked}")
        assert after["n_problems"] == 0, after["problems"]
        # every refusal the client saw was counted by the server, and nothing else
        assert after["error_replies"] - before["error_replies"] == fuzzer.error_replies
        drops = after["dropped"] - before["dropped"]
        assert fuzzer.drops <= drops <= fuzzer.drops + fuzzer.desyncs
        assert leaked == {"fds": 0, "threads": 0, "memfd_maps": 0}
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# (b) a hostile server against the client
# ---------------------------------------------------------------------------

CLIENT_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, sys, threading, traceback
    sys.path.insert(0, {root!r})
    import pmd
    from pmd.errors import PmdError
    from pmd.driver.access.vfio_user import VfioUserAccess

    mem = pmd.DmaMemory(1 << 20, lock=False, name="fz-client")
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]

    def resources():
        with open("/proc/self/maps") as f:
            maps = sum(1 for line in f if "/memfd:" in line)
        return {{"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(), "memfd_maps": maps}}

    def burst(port):
        import numpy as np
        frames = np.zeros((4, 64), np.uint8)
        frames[:, :6] = 0xFF
        sent = port.tx_burst(frames, np.full(4, 64, np.uint32))
        out, lens = np.zeros((8, 2048), np.uint8), np.zeros(8, np.uint32)
        got = 0
        for _ in range(2000):
            got += port.rx_burst(out[got:], lens[got:])
            if got >= sent:
                break
        return True

    # What a process creates once and keeps (pmd's shared interrupt thread): made now, so that
    # the counts around each connection see only what that connection left behind.
    from pmd.backends.local import open_local_port
    warm = open_local_port()
    warm.start(queue_size=64)
    warm.close()
    warm.transport.access.model.close()
    warm = None

    print("ready", flush=True)
    for line in sys.stdin:
        mode = line.split()[1]
        gc.collect()
        before = resources()
        ops, bad = [], []

        def run(name, fn):
            try:
                value = fn()
            except PmdError as e:
                text = str(e)
                if not text.strip():
                    bad.append(f"{{name}}: {{type(e).__name__}} without a message")
                ops.append([name, type(e).__name__, getattr(e, "errno", None), text[:300]])
                return None
            except BaseException as e:
                bad.append(f"{{name}}: {{type(e).__name__}}: {{e}}\\n{{traceback.format_exc()[-2500:]}}")
                ops.append([name, type(e).__name__, None, str(e)[:300]])
                return None
            ops.append([name, "ok", None, ""])
            return value if value is not None else True

        dev = run("connect", lambda: VfioUserAccess.connect({path!r}, timeout={timeout}))
        if dev and mode == "port":  # the whole driver on the hostile server: fail cleanly or work
            port = run("open_port", lambda: pmd.open_port(dev, name="fz"))
            if port:
                if run("start", lambda: port.start(queue_size=64)):
                    run("burst", lambda: burst(port))
                run("port_close", port.close)
            port = None
        elif dev:
            lost = []
            run("on_lost", lambda: dev.on_lost(lost.append))
            run("config_read", lambda: dev.config_read(0, 64))
            run("config_read_int", lambda: dev.config_read_int(0, 2))
            regions = dev.device_info.num_regions
            run("region_info", lambda: [dev.region_info(i) for i in range(regions)])
            mapping = run("map_region", lambda: dev.map_region(0))
            if mapping:
                def touch():
                    for area in mapping.areas[:4]:
                        window = mapping.mmio(area.offset, min(area.size, 8))
                        window.read32(0) if window.length >= 4 else window.read8(0)
                        if window.length >= 2:
                            window.write16(0, 0)
                run("touch_bar", touch)
            bar0 = run("bar0_info", lambda: dev.region_info(0))
            if bar0 and bar0.size > 0x14:  # the device_status register, if the server says BAR0 has one
                run("region_read", lambda: dev.region_read(0, 0x14, 1))
                run("region_write", lambda: dev.region_write(0, 0x14, b"\\0"))
            if dev.device_info.num_irqs > 2:
                info = run("irq_info", lambda: dev.irq_info(2))
                if info and info.count >= 2 and info.eventfd:
                    run("set_irqs", lambda: dev.set_irqs(2, 0, efds))
                    run("disable_irqs", lambda: dev.disable_irqs(2))
            if run("map_memory", lambda: dev.map_memory(mem)):
                run("unmap_memory", lambda: dev.unmap_memory(mem))
            if mapping:
                run("touch_bar_again", touch)  # after more messages: a server may have shrunk the file by now
            if dev.device_info.supports_reset:
                run("reset", dev.reset)
            run("alive", lambda: dev.alive)
            run("check_alive", dev.check_alive)
            run("close", dev.close)
            mapping = info = bar0 = None
        dev = None
        gc.collect()
        after = resources()
        delta = {{k: after[k] - before[k] for k in after}}
        print(json.dumps({{"ops": ops, "bad": bad, "delta": delta}}), flush=True)
    """
)

CLIENT_TIMEOUT = 0.3  # the client's per-request limit: a reply that never comes costs this much
PORT_SHARE = 0.25  # connections that run a Port (open, start, a burst, close) instead of single calls
GENERIC_MUTATIONS = ["wrong_id", "wrong_command", "size_small", "size_huge", "size_minus", "size_plus", "flags",
                     "error_reply", "truncate", "extend", "flip", "garbage", "silence", "close", "close_mid",
                     "duplicate", "inject_command", "extra_fds", "pieces", "stale_reply"]
TARGETED = {
    p.VFIO_USER_VERSION: ["version"],
    p.VFIO_USER_DEVICE_GET_INFO: ["device_info"],
    p.VFIO_USER_DEVICE_GET_REGION_INFO: ["region_info", "region_info", "region_fd", "region_fd", "region_fd"],
    p.VFIO_USER_DEVICE_GET_IRQ_INFO: ["irq_info"],
    p.VFIO_USER_REGION_READ: ["access_echo"],
    p.VFIO_USER_REGION_WRITE: ["access_echo"],
    p.VFIO_USER_DMA_UNMAP: ["unmap_echo"],
    p.VFIO_USER_DMA_MAP: GENERIC_MUTATIONS,
    p.VFIO_USER_DEVICE_SET_IRQS: GENERIC_MUTATIONS,
    p.VFIO_USER_DEVICE_RESET: GENERIC_MUTATIONS,
}


class HostileProxy:
    """Between the client and a real server, says what the server said, except where the plan
    says to lie. A plan maps ``(command or None, n)`` (the n-th reply to that command, or the
    n-th reply of all) to a mutation."""

    def __init__(self, path: str, upstream: str, server: object) -> None:
        self.path = path
        self.upstream = upstream
        self.server = server
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(path)
        self.listener.listen(1)
        self.plans: list[dict] = []
        self.plan_ready = threading.Event()
        self.done = threading.Event()
        self.applied: Counter[str] = Counter()
        self.problems: list[str] = []  # the proxy's own failures: bugs in this test
        self.rng = random.Random(0)
        self.keep: list[int] = []  # fds handed to the client that we truncate later or must close
        self.thread = threading.Thread(target=self.run, name="hostile-proxy", daemon=True)
        self.thread.start()

    def run(self) -> None:
        import traceback

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            plan = self.plans.pop(0) if self.plans else {}
            try:
                self.relay(conn, plan)
            except Exception:
                self.problems.append(traceback.format_exc())
            finally:
                conn.close()
                for fd in self.keep:
                    os.close(fd)
                self.keep = []
                self.done.set()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)

    # --- relaying ---

    def relay(self, conn: socket.socket, plan: dict) -> None:
        deadline = time.monotonic() + 10
        while self.server.connected:  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise AssertionError("the real server still serves the previous connection")
            time.sleep(0.001)
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        up.connect(self.upstream)
        seen: Counter[int | None] = Counter()
        shrink: list[list[int]] = []  # [fd, messages to wait]: unsealed files to truncate under the client
        try:
            while True:
                try:
                    msg = p.recv_message(conn, deadline=None, max_size=p.max_message_size(), max_fds=p.MAX_MSG_FDS)
                except p.MessageError:
                    return
                if msg is None:
                    return
                for entry in shrink:  # an unsealed file handed out earlier: shrink it now or later
                    entry[1] -= 1
                    if entry[1] == 0:
                        os.ftruncate(entry[0], 0)
                if msg.is_reply:  # the client's answer to a command we injected
                    msg.close_fds()
                    continue
                p.send_message(up, p.encode_message(msg.msg_id, msg.command, msg.payload, msg.flags, msg.error),
                               msg.fds, time.monotonic() + 5)
                msg.close_fds()
                reply = p.recv_message(up, deadline=time.monotonic() + 5, max_size=p.max_message_size())
                if reply is None:
                    return
                mutation = plan.get((msg.command, seen[msg.command])) or plan.get((None, seen[None]))
                seen[msg.command] += 1
                seen[None] += 1
                try:
                    if mutation is None:
                        p.send_message(conn, self.encode(reply), reply.fds, time.monotonic() + 5)
                    elif not self.mutate(conn, msg, reply, mutation, shrink):
                        return
                except OSError:
                    return  # the client gave up on us
                finally:
                    reply.close_fds()
        finally:
            up.close()

    @staticmethod
    def encode(reply: p.Message, payload: bytes | None = None, **header: int) -> bytes:
        fields = {"msg_id": reply.msg_id, "command": reply.command, "flags": reply.flags, "error": reply.error}
        fields.update(header)
        body = reply.payload if payload is None else payload
        size = header.get("size", p.HEADER_SIZE + len(body))
        return p.HEADER.pack(fields["msg_id"], fields["command"], size, fields["flags"], fields["error"]) + body

    def fd(self, kind: str, size: int) -> int:
        fd = FdFactory(self.rng).make(kind, size)
        self.keep.append(fd)
        return fd

    def mutate(self, conn: socket.socket, request: p.Message, reply: p.Message, mutation: str,
               shrink: list[list[int]]) -> bool:
        """Send the mutated reply; False to end the connection."""
        rng = self.rng
        self.applied[mutation] += 1
        send = lambda data, fds=(): p.send_message(conn, data, fds, time.monotonic() + 5)  # noqa: E731
        payload = reply.payload
        if mutation == "wrong_id":
            send(self.encode(reply, msg_id=(reply.msg_id + rng.randrange(1, 0xFFFF)) & 0xFFFF), reply.fds)
        elif mutation == "wrong_command":
            send(self.encode(reply, command=rng.choice([c for c in range(0, 20) if c != reply.command])), reply.fds)
        elif mutation == "size_small":
            send(self.encode(reply, size=rng.randrange(p.HEADER_SIZE)))
        elif mutation == "size_huge":
            send(self.encode(reply, size=rng.choice([p.max_message_size() + 1, 1 << 31, 0xFFFFFFFF])))
        elif mutation == "size_minus" and payload:
            send(self.encode(reply, size=p.HEADER_SIZE + rng.randrange(len(payload))), reply.fds)
        elif mutation == "size_plus":
            send(self.encode(reply, size=p.HEADER_SIZE + len(payload) + rng.choice([1, 4, 64])), reply.fds)
        elif mutation == "flags":
            flags = rng.choice([0, 2, 3, 15, p.TYPE_REPLY | p.FLAG_NO_REPLY, p.TYPE_REPLY | 0x40, 1 << 31,
                                p.TYPE_REPLY | p.FLAG_ERROR])
            send(self.encode(reply, flags=flags, error=rng.choice([0, 0, 5])), reply.fds)
        elif mutation == "error_reply":
            err = rng.choice([0, 1, errno.EINVAL, errno.EPERM, 4095, 4096, 0xFFFF, 0xFFFFFFFF])
            send(self.encode(reply, b"" if rng.random() < 0.7 else payload, flags=p.TYPE_REPLY | p.FLAG_ERROR,
                             error=err), reply.fds if rng.random() < 0.3 else ())
        elif mutation == "truncate":
            send(self.encode(reply, payload[: rng.randrange(len(payload) + 1)]), reply.fds)
        elif mutation == "extend":
            send(self.encode(reply, payload + os.urandom(rng.choice([1, 4, 8, 32, 4096]))), reply.fds)
        elif mutation == "flip" and payload:
            data = bytearray(payload)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            send(self.encode(reply, bytes(data)), reply.fds)
        elif mutation == "garbage":
            send(self.encode(reply, os.urandom(rng.choice([0, 1, 4, 16, 20, 32, 64, 256]))), reply.fds)
        elif mutation == "silence":
            return True  # no reply at all: the client must time out
        elif mutation == "close":
            return False
        elif mutation == "close_mid":
            data = self.encode(reply)
            send(data[: rng.randrange(1, len(data))], reply.fds)
            return False
        elif mutation == "duplicate":
            send(self.encode(reply), reply.fds)
            send(self.encode(reply))
        elif mutation == "inject_command":
            cmd = rng.choice([p.VFIO_USER_DMA_READ, p.VFIO_USER_DMA_WRITE, p.VFIO_USER_VERSION, 99, 0])
            flags = rng.choice([p.TYPE_COMMAND, p.TYPE_COMMAND, p.FLAG_NO_REPLY, p.TYPE_COMMAND | p.FLAG_ERROR])
            fds = [self.fd(rng.choice(FD_KINDS), 4 * PAGE) for _ in range(rng.choice([0, 0, 1, 3]))]
            send(p.HEADER.pack(rng.getrandbits(16), cmd, p.HEADER_SIZE + 16, flags, 0) + os.urandom(16), fds)
            send(self.encode(reply), reply.fds)
        elif mutation == "extra_fds":
            fds = list(reply.fds) + [self.fd(rng.choice(FD_KINDS), 4 * PAGE) for _ in range(rng.choice([1, 2, 17, 20]))]
            send(self.encode(reply), fds)
        elif mutation == "pieces":  # a slow server: must still work
            data = self.encode(reply)
            cuts = sorted({0, len(data), *(rng.randrange(1, len(data)) for _ in range(3))})
            for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
                send(data[a:b], reply.fds if k == 0 else ())
                time.sleep(0.002)
        elif mutation == "stale_reply":
            send(self.encode(reply, msg_id=(reply.msg_id - 1) & 0xFFFF))
            send(self.encode(reply), reply.fds)
        elif mutation == "version":
            send(self.encode(reply, self.bad_version()))
        elif mutation == "device_info":
            argsz = rng.choice([16, 16, 0, 15, 0xFFFFFFFF])
            flags = rng.choice([3, 2, 1, 0, 0xFFFFFFFF])
            regions = rng.choice([9, 0, 7, 8, 64, 65, 0xFFFFFFFF])
            irqs = rng.choice([5, 0, 2, 3, 16, 17, 0xFFFFFFFF])
            send(self.encode(reply, struct.pack("<IIII", argsz, flags, regions, irqs) + os.urandom(rng.choice([0, 0, 4]))))
        elif mutation == "region_info":
            send(self.encode(reply, self.bad_region_info(payload)), reply.fds)
        elif mutation == "region_fd":
            send(self.encode(reply), self.bad_region_fds(reply, shrink))
        elif mutation == "irq_info":
            argsz, flags, index, count = struct.unpack_from("<IIII", payload)
            flags = rng.choice([flags, 0, 0x10, 0xFFFFFFFF, flags & ~1])
            count = rng.choice([count, 0, 1, 2048, 2049, 0xFFFFFFFF])
            index = rng.choice([index, index, index + 1, 0xFFFFFFFF])
            send(self.encode(reply, struct.pack("<IIII", rng.choice([argsz, 0, 15]), flags, index, count)))
        elif mutation == "access_echo":
            offset, region, count = struct.unpack_from("<QII", payload)
            which = rng.randrange(3)
            offset = offset + 1 if which == 0 else offset
            region = region ^ 1 if which == 1 else region
            count = rng.choice([0, count + 1, count - 1, 0xFFFFFFFF]) if which == 2 else count
            send(self.encode(reply, struct.pack("<QII", offset, region, count) + payload[16:]))
        elif mutation == "unmap_echo" and len(payload) >= 24:
            argsz, flags, address, size = struct.unpack_from("<IIQQ", payload)
            send(self.encode(reply, struct.pack("<IIQQ", argsz, rng.choice([flags, 1]), address + PAGE * rng.randrange(2),
                                                 size + PAGE * rng.randrange(2))))
        else:  # a mutation that does not fit this reply: a plain one
            self.applied[mutation] -= 1
            send(self.encode(reply), reply.fds)
        return True

    def bad_version(self) -> bytes:
        rng = self.rng
        head = struct.pack("<HH", rng.choice([0, 0, 1, 0xFFFF]), rng.choice([0, 1, 2, 0xFFFF]))
        data = rng.choice([
            b"[" * 4000, b'{"capabilities":' * 400, b"{oops\0", b"[]\0", b"\0", b"{}", b"{}\0\0",
            b'{"capabilities":[]}\0', b'{"capabilities":{"max_msg_fds":0}}\0',
            b'{"capabilities":{"max_msg_fds":300}}\0', b'{"capabilities":{"max_msg_fds":"x"}}\0',
            b'{"capabilities":{"max_data_xfer_size":1}}\0', b'{"capabilities":{"max_data_xfer_size":8589934592}}\0',
            b'{"capabilities":{"migration":5}}\0', b'{"capabilities":{"max_msg_fds":1e400}}\0',
            b'{"capabilities":{"max_data_xfer_size":1.5}}\0', b'"\\ud800"\0', b" " * 5000, os.urandom(100),
        ])
        return head + data

    def bad_region_info(self, payload: bytes) -> bytes:
        rng = self.rng
        argsz, flags, index, cap_offset, size, offset = struct.unpack_from("<IIIIQQ", payload)
        data = bytearray(payload)
        which = rng.randrange(9)
        if which == 0:
            size = rng.choice([1 << 62, 1 << 63, U64, 1 << 40, PAGE + 1, 1])
        elif which == 1:
            offset = rng.choice([1 << 40, 1 << 62, U64 - PAGE + 1, 1, PAGE - 1])
        elif which == 2:
            flags = rng.choice([flags | 4, flags | 8, flags & ~4, 0xFFFFFFFF, 0xF])
        elif which == 3:  # a capability chain that loops, or points anywhere
            flags |= 8
            cap_offset = rng.choice([32, 0, 1, 31, 33, len(data), len(data) - 2, 0xFFFFFFFF])
            if len(data) < 40:
                data += bytes(8)
            struct.pack_into("<HHI", data, 32, rng.choice([1, 1, 2, 3, 0xFFFF]), rng.choice([1, 0, 2]),
                             rng.choice([32, 0, 33, 1 << 31]))
        elif which == 4 and len(data) >= 48:  # sparse areas: count, then the areas themselves
            struct.pack_into("<I", data, 40, rng.choice([0, 2, 1 << 20, 0xFFFFFFFF]))
        elif which == 5 and len(data) >= 64:
            struct.pack_into("<QQ", data, 48, rng.choice([0, 1, PAGE, 0x6001, 0xF000, 1 << 63, U64]),
                             rng.choice([0, 1, PAGE, 0x10000, 1 << 63, U64]))
        elif which == 6:
            argsz = rng.choice([0, 31, len(data) - 1, len(data) + 16, 1 << 16, (1 << 16) + 1, 0xFFFFFFFF])
        elif which == 7:
            index = rng.choice([index + 1, 0xFFFFFFFF])
        else:
            data += os.urandom(rng.choice([1, 16, 64]))
        struct.pack_into("<IIIIQQ", data, 0, argsz & 0xFFFFFFFF, flags & 0xFFFFFFFF, index & 0xFFFFFFFF,
                         cap_offset & 0xFFFFFFFF, size & U64, offset & U64)
        return bytes(data)

    def bad_region_fds(self, reply: p.Message, shrink: list[list[int]]) -> list[int]:
        """Another file for a mappable region: unsealed (truncated a few messages later, once
        the client may have mapped it), too short, read-only, not a file, two of them, none."""
        rng = self.rng
        kind = rng.choice(["memfd", "memfd", "sealable_memfd", "sealed_small", "sealed_ro", "sealed_write",
                           "o_path_memfd", "pipe", "eventfd", "devnull", "directory", "socket", "o_path", "two",
                           "none", "sealed_memfd"])
        if kind == "none":
            return []
        if kind == "two":
            return list(reply.fds) + [self.fd("sealed_memfd", BAR0_SIZE)]
        fd = self.fd(kind, BAR0_SIZE)
        if kind in ("memfd", "sealable_memfd"):
            shrink.append([fd, rng.randrange(1, 24)])
        return [fd]


def test_fuzz_client_against_a_hostile_server(sock_dir):
    from pmd.sim.model import VirtioNetModel
    from pmd.sim.server import VfioUserServer

    rng = random.Random(SEED)
    model = VirtioNetModel()
    real = os.path.join(sock_dir, "real")
    server = VfioUserServer(model, real)
    server.serve_in_thread()
    proxy = HostileProxy(os.path.join(sock_dir, "hostile"), real, server)
    log = tempfile.TemporaryFile()
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT.format(root=str(ROOT), path=proxy.path, timeout=CLIENT_TIMEOUT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
    )

    def log_text() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-3000:]

    def died(context: str) -> None:
        rc = child.poll()
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with status {rc}"
        pytest.fail(f"the client {how} {context}\n{log_text()}")

    outcomes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    iterations = clean = 0
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline().strip() != "ready":
            died("before it was ready")
        start = time.monotonic()
        while time.monotonic() - start < SECONDS:
            plan: dict = {}
            if rng.random() < 0.06:
                clean += 1
            else:
                for _ in range(rng.choice([1, 1, 1, 2, 3])):
                    if rng.random() < 0.5:
                        command = rng.choice(list(TARGETED))
                        nth = 0 if rng.random() < 0.6 else rng.randrange(4)
                        plan[(command, nth)] = rng.choice(TARGETED[command])
                    else:
                        nth = rng.randrange(12) if rng.random() < 0.5 else rng.randrange(120)
                        plan[(None, nth)] = rng.choice(GENERIC_MUTATIONS)
            proxy.rng = random.Random(f"{SEED}-{iterations}")
            proxy.plans.append(plan)
            proxy.done.clear()
            mode = "port" if rng.random() < PORT_SHARE else "device"
            modes[mode] += 1
            child.stdin.write(f"{iterations} {mode}\n")
            child.stdin.flush()
            ready, _, _ = select.select([child.stdout], [], [], 30)
            line = child.stdout.readline() if ready else ""
            if not line:
                try:
                    child.wait(5)  # end of its output: it is exiting (reaped a moment after)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"iteration {iterations}: the client hangs (plan {plan})\n{log_text()}")
                died(f"in iteration {iterations} (seed {SEED}, plan {plan})")
            result = json.loads(line)
            iterations += 1
            assert proxy.done.wait(10), "the proxy did not finish the connection"
            assert not proxy.problems, proxy.problems
            assert not result["bad"], f"iteration {iterations - 1}, plan {plan}:\n" + "\n".join(result["bad"])
            assert result["delta"] == {"fds": 0, "threads": 0, "memfd_maps": 0}, (plan, result)
            if not plan:  # the happy path works, through the proxy too
                assert all(op[1] == "ok" for op in result["ops"]), (mode, result["ops"])
            for name, outcome, err, _text in result["ops"]:
                if outcome != "ok":
                    outcomes[f"{name}: {outcome} {errno.errorcode.get(err, err) if err else ''}".strip()] += 1
                    break
            else:
                outcomes["all ok"] += 1
        elapsed = time.monotonic() - start
        child.stdin.close()
        if child.wait(10) != 0:
            died("at the end")
        print(f"\nfuzz vfio-user client: seed {SEED}, {elapsed:.1f} s: {iterations} connections ({clean} clean, "
              f"{modes['port']} with a Port), "
              f"mutations applied {sum(proxy.applied.values())}: {dict(proxy.applied.most_common())}; "
              f"first failure per connection: {dict(outcomes.most_common(12))}")
        assert set(proxy.applied) >= set(GENERIC_MUTATIONS) or SECONDS < 5
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(5)
        log.close()
        proxy.close()
        server.close()
        model.close()
