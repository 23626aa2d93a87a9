"""vhost-user: the wire format (pmd.abi.vhost_user), the front-end session
(pmd.driver.vhost_user) against a fake back-end, and interop with DPDK's testpmd.

- the codec, one test per rule: every size checked, headers cut short, wrong
  versions and flags, a reply to another request, too many fds, every decoder
  fed random bytes (hypothesis) raising only MessageError;
- the front-end against :class:`tests.vhost_user_peer.FakeBackend` on a
  socketpair: the handshake in DPDK's order, every message as pmd sends it
  (decoded strictly by the fake), REPLY_ACK, the error paths (garbage, closing
  mid-handshake, never replying, fds nobody asked for) each giving a clear
  error, with /proc/self/fd and the thread count checked before and after;
  client and server mode on real socket files;
- DPDK: ``dpdk-testpmd`` (Debian package ``dpdk-dev``) as the back-end in io mode,
  frames sent with ``tx_burst`` come back byte-exact through ``rx_burst``, in
  client and server mode, and a killed testpmd is reported within a second. These
  skip, saying so, where testpmd is missing; CI installs dpdk-dev so they run;
- a bounded-time fuzzer of the front-end against a hostile back-end, in a child
  process (a signal would show as a negative exit status): ``PMD_FUZZ_SECONDS``
  (default 10), ``PMD_FUZZ_SEED`` (default 10).

Every test is bounded in time (SIGALRM).
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pmd
from pmd.driver._rx import RxQueue
from pmd.driver._tx import TxQueue
from pmd.driver._pool import PacketPool
from pmd.driver._virtqueue import Virtqueue
from pmd.driver import vhost_user as fe_mod
from pmd.driver.vhost_user import VhostUserFrontend
from pmd.errors import PmdError
from pmd.driver.interrupts import EventFd
from pmd.abi import vhost_user as v
from pmd.abi.vhost_user import MessageError, VhostUserError

from .dpdk import DpdkBackend, needs_testpmd
from .vhost_user_peer import ALL_PROTOCOL, DPDK_FEATURES, DPDK_PROTOCOL_FEATURES, FakeBackend

ROOT = Path(__file__).resolve().parent.parent
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
MRG_RXBUF = 1 << 15
F30 = 1 << v.VHOST_USER_F_PROTOCOL_FEATURES
ACK, DRIVER, FEATURES_OK, DRIVER_OK = 1, 2, 8, 4


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def hard_time_limit(request):
    """No test may hang: SIGALRM raises in the main thread (90 s with testpmd, 30 s otherwise)."""

    def expired(signum, frame):
        raise TimeoutError("test exceeded its time limit")

    limit = 90.0 if request.node.name.startswith("test_dpdk_") else 30.0
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="vh", dir="/tmp")  # short: AF_UNIX paths hold 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def memory():
    m = pmd.DmaMemory(2 << 20, lock=False, name="pmd-vhost-test")
    yield m
    m.close()


class Session:
    """A front-end on one end of a socketpair, a FakeBackend on the other.

    ``fe`` are the front-end's keyword arguments, the rest the back-end's.
    """

    def __init__(self, fe: dict | None = None, **backend) -> None:
        self.fe_kwargs = dict(fe or {})
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend = FakeBackend(b, **backend)
        self.sock = a
        self.fe: VhostUserFrontend | None = None

    def open(self) -> VhostUserFrontend:
        try:
            self.fe = VhostUserFrontend.from_socket(self.sock, name="fake", **self.fe_kwargs)
        except BaseException:
            self.sock.close()  # from_socket closes it too; twice is harmless
            raise
        return self.fe

    def synced(self) -> FakeBackend:
        """The back-end once it has read every request sent (the last ones may need no reply)."""
        assert self.fe is not None
        deadline = time.monotonic() + 5
        while len(self.backend.seen) < self.fe.requests and time.monotonic() < deadline:
            time.sleep(0.001)
        return self.backend

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
        else:
            self.sock.close()
        self.backend.join()


@pytest.fixture
def session():
    sessions: list[Session] = []

    def make(fe: dict | None = None, **backend) -> Session:
        s = Session(fe, **backend)
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()


def no_leaks(before_fds: int, before_threads: int) -> None:
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # a finished thread may still be on its way out
        if open_fds() == before_fds and threading.active_count() == before_threads:
            return
        time.sleep(0.01)
    assert (open_fds(), threading.active_count()) == (before_fds, before_threads)


# ===========================================================================
# the codec (pmd.abi.vhost_user)
# ===========================================================================


def test_header_is_request_flags_size_in_native_order():
    raw = v.encode_message(v.VHOST_USER_SET_FEATURES, b"\x01" * 8, need_reply=True)
    assert len(raw) == v.HEADER_SIZE + 8 == 20
    assert struct.unpack("=III", raw[:12]) == (2, 0x1 | 0x8, 8)
    assert v.decode_header(raw[:12]) == (2, 9, 8)
    assert struct.unpack("=III", v.encode_reply(11, b"")[:12]) == (11, 0x5, 0)


def test_truncated_header_is_refused():
    with pytest.raises(MessageError) as e:
        v.decode_header(b"\x01\x00\x00\x00\x01\x00")
    assert e.value.fatal and "12 bytes" in str(e.value)


def test_payload_larger_than_the_limit_is_fatal():
    with pytest.raises(MessageError) as e:
        v.decode_header(struct.pack("=III", 1, 5, v.MAX_PAYLOAD_SIZE + 1))
    assert e.value.fatal and e.value.errno == errno.EMSGSIZE and e.value.request == 1


@pytest.mark.parametrize("flags", [0x4, 0x2 | 0x4, 0x3 | 0x4])
def test_wrong_version_is_refused(flags):
    with pytest.raises(MessageError, match="version"):
        v.check_reply(v.Message(1, flags, b""), 1)


def test_unknown_flag_bits_are_refused():
    with pytest.raises(MessageError, match="unknown flag bits"):
        v.check_reply(v.Message(1, 0x5 | 0x10, b""), 1)
    with pytest.raises(MessageError, match="unknown flag bits"):
        v.check_request_flags(v.Message(1, 0x1 | 1 << 31, b""))


def test_reply_to_the_wrong_request_is_refused():
    with pytest.raises(MessageError, match="answered a different request") as e:
        v.check_reply(v.Message(v.VHOST_USER_GET_PROTOCOL_FEATURES, 0x5, b""), v.VHOST_USER_GET_FEATURES)
    assert e.value.request == v.VHOST_USER_GET_PROTOCOL_FEATURES


def test_reply_needs_the_reply_flag_and_no_need_reply():
    with pytest.raises(MessageError, match="lacks the reply flag"):
        v.check_reply(v.Message(1, 0x1, b""), 1)
    with pytest.raises(MessageError, match="need_reply"):
        v.check_reply(v.Message(1, 0x1 | 0x4 | 0x8, b""), 1)
    with pytest.raises(MessageError, match="reply flag"):
        v.check_request_flags(v.Message(1, 0x5, b""))
    v.check_reply(v.Message(1, 0x5, b""), 1)
    v.check_request_flags(v.Message(1, 0x9, b""))


# every fixed-size payload, its decoder and a valid example
FIXED = [
    ("u64", lambda p: v.decode_u64(p, "x"), v.encode_u64(7)),
    ("vring state", lambda p: v.decode_vring_state(p, "x"), v.encode_vring_state(1, 256)),
    ("vring addr", lambda p: v.decode_vring_addr(p), v.encode_vring_addr(v.VringAddr(0, 0, 0x1000, 0x3000, 0x2000))),
    ("vring file", lambda p: v.decode_vring_file(p, "x", 1), v.encode_vring_file(3, True)),
    ("single region", lambda p: v.decode_mem_region(p, "x"),
     bytes(8) + v.encode_mem_region(v.MemoryRegion(0, 4096, 0, 0))),
    ("log", lambda p: v.decode_log(p), v.encode_log(4096, 0)),
    ("inflight", lambda p: v.decode_inflight(p, "x"), v.encode_inflight(v.Inflight(4096, 0, 2, 256))),
    ("iotlb", lambda p: v.decode_iotlb(p, "x"), v.encode_iotlb(v.IotlbMsg(0x1000, 0x1000, 0x2000, 3, 2))),
    ("vring area", lambda p: v.decode_vring_area(p, "x"), v.encode_vring_area(v.VringArea(1, 4096, 0))),
    ("shared object", lambda p: v.decode_shared_object(p, "x"), v.encode_shared_object(bytes(range(16)))),
    ("device state", lambda p: v.decode_device_state(p, "x"), v.encode_device_state(v.DeviceStateTransfer(1, 0))),
    ("status", lambda p: v.decode_status(p, "x"), v.encode_u64(0x0F)),
]


@pytest.mark.parametrize("name,decode,example", FIXED, ids=[f[0] for f in FIXED])
def test_every_payload_size_is_checked(name, decode, example):
    decode(example)  # the valid one decodes
    for bad in (example[:-1], example + b"\0", b""):
        with pytest.raises(MessageError, match="bytes"):
            decode(bad)


def test_layout_sizes_match_the_c_structures():
    # struct vhost_vring_addr 40, VhostUserMemoryRegion 32, VhostUserInflight 24 (padded),
    # struct vhost_iotlb_msg 32 (padded), VhostUserConfig header 12
    assert len(v.encode_vring_addr(v.VringAddr(0, 0, 0, 0, 0))) == 40
    assert len(v.encode_mem_region(v.MemoryRegion(0, 1, 0, 0))) == 32
    assert len(v.encode_inflight(v.Inflight(0, 0, 0, 0))) == 24
    assert len(v.encode_iotlb(v.IotlbMsg(0, 0, 0, 0, 1))) == 32
    assert len(v.encode_config(0, b"\0")) == 13


def test_vring_addr_field_order_is_desc_used_avail():
    raw = v.encode_vring_addr(v.VringAddr(5, 0, desc=0x1000, used=0x3000, avail=0x2000, log=0))
    assert struct.unpack("=IIQQQQ", raw) == (5, 0, 0x1000, 0x3000, 0x2000, 0)
    assert v.decode_vring_addr(raw) == v.VringAddr(5, 0, 0x1000, 0x3000, 0x2000, 0)


def test_vring_addr_alignment_flags_and_index_are_checked():
    def raw(index=0, flags=0, desc=0x1000, used=0x3000, avail=0x2000):
        return struct.pack("=IIQQQQ", index, flags, desc, used, avail, 0)

    for bad, what in ((raw(desc=0x1008), "misaligned"), (raw(used=0x3002), "misaligned"),
                      (raw(avail=0x2001), "misaligned"), (raw(flags=2), "unknown vring flags"),
                      (raw(index=256), "out of range")):
        with pytest.raises(MessageError, match=what):
            v.decode_vring_addr(bad)
    assert v.decode_vring_addr(raw(flags=v.VHOST_VRING_F_LOG)).flags == 1


def test_vring_file_index_and_nofd_flag_must_match_the_fds():
    assert v.decode_vring_file(v.encode_vring_file(7, True), "KICK", 1) == v.VringFile(7, False)
    assert v.decode_vring_file(v.encode_vring_file(7, False), "KICK", 0) == v.VringFile(7, True)
    with pytest.raises(MessageError, match="0 file descriptors with the no-fd flag clear"):
        v.decode_vring_file(v.encode_vring_file(7, True), "KICK", 0)  # no fd where one is needed
    with pytest.raises(MessageError, match="must be 0"):
        v.decode_vring_file(v.encode_vring_file(7, False), "KICK", 1)
    with pytest.raises(MessageError, match="bits above"):
        v.decode_vring_file(v.encode_u64(1 << 9), "KICK", 1)
    with pytest.raises(ValueError):
        v.encode_vring_file(256, True)


def test_memory_table_round_trip_and_one_fd_per_region():
    regions = [v.MemoryRegion(0x10000, 0x4000, 0x7F0000000000, 0),
               v.MemoryRegion(0x40000, 0x1000, 0x7F1000000000, 0x2000)]
    raw = v.encode_memory_table(regions)
    assert len(raw) == 8 + 2 * 32 and struct.unpack_from("=II", raw) == (2, 0)
    assert v.decode_memory_table(raw, 2) == regions
    with pytest.raises(MessageError, match="2 regions came with 1 file descriptors"):
        v.decode_memory_table(raw, 1)  # no fd where one is needed
    with pytest.raises(MessageError, match="must be"):
        v.decode_memory_table(raw + bytes(32), 2)  # a third region nregions does not count


def test_memory_table_counts_sizes_overlaps_and_wraps_are_checked():
    def table(*regions, n=None):
        head = struct.pack("=II", len(regions) if n is None else n, 0)
        return head + b"".join(struct.pack("=QQQQ", *r) for r in regions)

    cases = [
        (table(n=0), 0, "0 regions"),
        (table(*[(i << 20, 4096, i << 20, 0) for i in range(9)]), 9, "9 regions"),
        (table((0, 0, 0, 0)), 1, "size 0"),
        (table(((1 << 63), (1 << 63) + 4096, 0, 0), (0, 4096, 1 << 40, 0)), 2, "wraps"),
        (table((0, 8192, 0, 0), (4096, 4096, 1 << 40, 0)), 2, "overlap in guest addresses"),
        (table((0, 8192, 1 << 40, 0), (1 << 30, 4096, (1 << 40) + 4096, 0)), 2, "overlap in user addresses"),
        (b"\x01\x00", 0, "shorter than its 8-byte header"),
    ]
    for raw, nfds, what in cases:
        with pytest.raises(MessageError, match=what):
            v.decode_memory_table(raw, nfds)
    with pytest.raises(ValueError):
        v.encode_memory_table([])
    with pytest.raises(ValueError, match="overlap"):
        v.encode_memory_table([v.MemoryRegion(0, 8192, 0, 0), v.MemoryRegion(4096, 4096, 1 << 40, 0)])


def test_config_sizes_offsets_and_flags_are_checked():
    raw = v.encode_config(6, b"\x01\x00")
    assert v.decode_config(raw, "x") == v.ConfigSpace(6, 2, 0, b"\x01\x00")
    for bad, what in (
        (struct.pack("=III", 0, 0, 0), "config size 0"),
        (struct.pack("=III", 0, 257, 0) + bytes(257), "config size 257"),
        (struct.pack("=III", 250, 8, 0) + bytes(8), "run past"),
        (struct.pack("=III", 0, 4, 2) + bytes(4), "unknown config flags"),
        (struct.pack("=III", 0, 4, 0) + bytes(3), "must be 16"),
        (b"\0" * 11, "shorter than its 12-byte header"),
    ):
        with pytest.raises(MessageError, match=what):
            v.decode_config(bad, "x")
    with pytest.raises(ValueError):
        v.encode_config(255, b"\0\0")


def test_split_base_reserved_bits_and_packed_base_round_trip():
    assert v.decode_split_base(0xFFFF, "x") == 0xFFFF
    with pytest.raises(MessageError, match="reserved bits"):
        v.decode_split_base(0x10000, "x")
    base = v.PackedBase(avail_idx=0x1234, avail_wrap=True, used_idx=0x7FFF, used_wrap=False)
    assert v.decode_packed_base(v.encode_packed_base(base)) == base
    assert v.encode_packed_base(v.PackedBase(1, False, 2, True)) == 1 | 2 << 16 | 1 << 31


def test_fields_of_the_other_payloads_are_checked():
    with pytest.raises(MessageError, match="does not fit the 8-bit"):
        v.decode_status(v.encode_u64(0x100), "GET_STATUS")
    with pytest.raises(MessageError, match="permissions"):
        v.decode_iotlb(struct.pack("=QQQBB6x", 0, 1, 0, 4, 2), "x")
    with pytest.raises(MessageError, match="message type"):
        v.decode_iotlb(struct.pack("=QQQBB6x", 0, 1, 0, 1, 5), "x")
    with pytest.raises(MessageError, match="direction"):
        v.decode_device_state(struct.pack("=II", 2, 0), "x")
    with pytest.raises(MessageError, match="phase"):
        v.decode_device_state(struct.pack("=II", 0, 1), "x")
    with pytest.raises(MessageError, match="queue size"):
        v.decode_inflight(struct.pack("=QQHH4x", 0, 0, 1, 65535), "x")
    with pytest.raises(MessageError, match="wraps"):
        v.decode_log(struct.pack("=QQ", 2, (1 << 64) - 1))
    with pytest.raises(MessageError, match="out of range"):
        v.decode_vring_state(struct.pack("=II", 256, 0), "x")
    with pytest.raises(MessageError, match="bits above"):
        v.decode_vring_area(struct.pack("=QQQ", 1 << 9, 0, 0), "x")


def test_encoders_refuse_values_that_do_not_fit():
    with pytest.raises(ValueError):
        v.encode_u64(1 << 64)
    with pytest.raises(ValueError):
        v.encode_vring_state(-1, 0)
    with pytest.raises(ValueError):
        v.encode_vring_addr(v.VringAddr(0, 0, 1 << 64, 0, 0))
    with pytest.raises(ValueError):
        v.encode_header(1, v.MAX_PAYLOAD_SIZE + 1)
    with pytest.raises(ValueError):
        v.encode_shared_object(b"short")


def test_names_and_which_requests_have_a_reply():
    assert v.request_name(v.VHOST_USER_SET_MEM_TABLE) == "SET_MEM_TABLE"
    assert v.request_name(2, backend=True) == "BACKEND_CONFIG_CHANGE_MSG"
    assert v.request_name(999) == "request 999"
    assert v.has_reply(v.VHOST_USER_GET_VRING_BASE) and not v.has_reply(v.VHOST_USER_SET_VRING_BASE)
    assert not v.has_reply(v.VHOST_USER_SET_LOG_BASE)
    assert v.has_reply(v.VHOST_USER_SET_LOG_BASE, 1 << v.VHOST_USER_PROTOCOL_F_LOG_SHMFD)
    assert v.protocol_feature_names(DPDK_PROTOCOL_FEATURES) == [
        "MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "NET_MTU", "BACKEND_REQ", "CRYPTO_SESSION", "BACKEND_SEND_FD",
        "HOST_NOTIFIER", "STATUS"]
    assert len(v.FRONTEND_REQUEST_NAMES) == 43 and len(v.BACKEND_REQUEST_NAMES) == 8


DECODERS = [f[1] for f in FIXED] + [
    lambda p: v.decode_memory_table(p, 1),
    lambda p: v.decode_memory_table(p, 8),
    lambda p: v.decode_config(p, "x"),
    lambda p: v.decode_vring_file(p, "x", 0),
    lambda p: v.decode_header(p[:12].ljust(12, b"\0")),
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(range(len(DECODERS))))
def test_decoders_raise_only_message_error(payload, which):
    try:
        DECODERS[which](payload)
    except MessageError as exc:
        assert str(exc) and exc.errno
    # anything else (IndexError, struct.error, ...) fails the test


# --- framing on a socket ---


def pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_message_and_its_fds_round_trip():
    a, b = pair()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        v.send_message(a, v.encode_message(v.VHOST_USER_SET_VRING_KICK, v.encode_vring_file(1, True)), [efd])
        msg = v.recv_message(b, deadline=v.deadline_after(2))
        assert msg is not None and msg.name == "SET_VRING_KICK" and len(msg.fds) == 1
        assert os.get_inheritable(msg.fds[0]) is False  # MSG_CMSG_CLOEXEC
        assert os.fstat(msg.fds[0]).st_ino == os.fstat(efd).st_ino
        msg.close_fds()
    finally:
        os.close(efd)
        a.close()
        b.close()


def test_too_many_fds_are_closed():
    a, b = pair()
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(v.MAX_FDS + 1)]
    try:
        before = open_fds()
        # send_message refuses to send so many; go around it
        a.sendmsg([v.encode_message(v.VHOST_USER_SET_MEM_TABLE)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        msg = v.recv_message(b, deadline=v.deadline_after(2))
        assert msg is not None and msg.fds_truncated and msg.fds == []
        assert open_fds() == before  # none of the received copies stayed open
        with pytest.raises(ValueError, match="at most 8"):
            v.send_message(a, v.encode_message(1), fds)
    finally:
        v.close_fds(fds)
        a.close()
        b.close()


def test_header_cut_short_by_a_close_is_fatal():
    a, b = pair()
    a.sendall(b"\x01\x00\x00\x00\x05")
    a.close()
    with pytest.raises(MessageError, match="after 5 of the 12 header bytes") as e:
        v.recv_message(b, deadline=v.deadline_after(2))
    assert e.value.fatal and e.value.errno == errno.ECONNRESET
    b.close()


def test_payload_cut_short_by_a_close_is_fatal():
    a, b = pair()
    a.sendall(struct.pack("=III", 1, 5, 8) + b"abc")
    a.close()
    with pytest.raises(MessageError, match="15 of 20 bytes") as e:
        v.recv_message(b, deadline=v.deadline_after(2))
    assert e.value.fatal and e.value.request == 1
    b.close()


def test_no_message_before_the_deadline_is_fatal():
    a, b = pair()
    with pytest.raises(MessageError, match="no message arrived") as e:
        v.recv_message(b, deadline=v.deadline_after(0.05))
    assert e.value.fatal and e.value.errno == errno.ETIMEDOUT
    a.close()
    b.close()


def test_close_between_messages_is_none():
    a, b = pair()
    a.close()
    assert v.recv_message(b, deadline=v.deadline_after(1)) is None
    b.close()


def test_errors_are_pmd_errors_and_os_errors():
    exc = v.vhost_user_error("x", errno.ENOENT)
    assert isinstance(exc, PmdError) and isinstance(exc, OSError) and exc.errno == errno.ENOENT and str(exc) == "x"
    assert issubclass(MessageError, VhostUserError)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(absolute top-level modules, relative ``from`` targets) imported by a module."""
    import ast

    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.add("." * node.level + (node.module or ""))
            else:
                absolute.add((node.module or "").split(".")[0])
    return absolute, relative


def test_the_wire_format_is_pure_vocabulary():
    absolute, relative = _imports(ROOT / "pmd" / "abi" / "vhost_user.py")
    assert absolute - {"__future__"} <= set(sys.stdlib_module_names)
    assert relative == {"..errors", ".stream"}


def test_the_frontend_imports_neither_the_device_side_nor_the_port():
    absolute, relative = _imports(ROOT / "pmd" / "driver" / "vhost_user.py")
    assert absolute - {"__future__"} <= set(sys.stdlib_module_names)
    assert relative <= {"..errors", "..abi", "..abi.vhost_user", "..abi.virtio", "..memory", "..memory.seals", ".interrupts", ".session", "..sockets"}


# ===========================================================================
# the front-end against the fake back-end
# ===========================================================================


def test_handshake_is_dpdks_order(session):
    s = session()
    fe = s.open()
    assert s.backend.names() == ["SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                                 "GET_QUEUE_NUM"]
    wanted_offered = fe_mod.WANTED_PROTOCOL_FEATURES & s.backend.protocol_features
    assert s.backend.negotiated_protocol == fe.protocol_features == wanted_offered
    assert fe.offered_protocol_features == s.backend.protocol_features
    assert fe.backend_features == DPDK_FEATURES and fe.device_features == DPDK_FEATURES & ~F30
    assert fe.queue_num == fe.max_queue_pairs == 128
    assert not any(x.need_reply for x in s.backend.seen)  # REPLY_ACK starts after SET_PROTOCOL_FEATURES
    assert s.backend.errors == []


def test_protocol_features_only_when_bit_30_is_offered(session):
    s = session(features=VERSION_1)
    fe = s.open()
    assert s.backend.names() == ["SET_OWNER", "GET_FEATURES"]
    assert fe.protocol_features == 0 and fe.queue_num is None and fe.max_queue_pairs == 1


def test_queue_num_only_with_mq(session):
    s = session(protocol_features=1 << v.VHOST_USER_PROTOCOL_F_REPLY_ACK)
    fe = s.open()
    assert "GET_QUEUE_NUM" not in s.backend.names() and fe.max_queue_pairs == 1


def test_protocol_features_asked_for_can_be_limited(session):
    s = session({"protocol_features": 1 << v.VHOST_USER_PROTOCOL_F_MQ}, protocol_features=ALL_PROTOCOL)
    fe = s.open()
    assert fe.protocol_features == s.backend.negotiated_protocol == 1


def test_negotiate_offers_only_what_the_backend_offered_and_keeps_bit_30(session):
    s = session()
    fe = s.open()
    wanted = VERSION_1 | EVENT_IDX | MRG_RXBUF | 1 << 5 | 1 << v.VHOST_F_LOG_ALL | 1 << v.VIRTIO_F_IOMMU_PLATFORM
    accepted = fe.negotiate(wanted)
    assert accepted == VERSION_1 | EVENT_IDX | MRG_RXBUF  # MAC (5) not offered, LOG_ALL and IOMMU never
    assert s.backend.acked_features == accepted | F30 and fe.features == accepted
    assert s.synced().seen[-1].need_reply  # REPLY_ACK negotiated: every request without a reply asks for one
    assert s.backend.errors == []


def test_refusal_by_reply_ack_fails_only_that_call(session):
    s = session(actions={"SET_FEATURES": "nack"})
    fe = s.open()
    with pytest.raises(VhostUserError, match="refused SET_FEATURES .REPLY_ACK status 1.") as e:
        fe.negotiate(VERSION_1)
    assert e.value.errno == errno.EREMOTEIO and fe.broken is None and fe.features is None
    assert fe.negotiate(VERSION_1) == VERSION_1


def test_without_reply_ack_no_request_asks_for_a_reply(session):
    s = session(protocol_features=1 << v.VHOST_USER_PROTOCOL_F_MQ)
    fe = s.open()
    fe.negotiate(VERSION_1)
    fe.set_status(ACK)
    assert not any(x.need_reply for x in s.backend.seen)
    fe.get_status()  # without STATUS: answered locally, nothing sent
    assert s.synced().names()[-1] == "SET_FEATURES"


def test_status_goes_to_the_backend_with_status(session):
    s = session()
    fe = s.open()
    fe.set_status(ACK | DRIVER)
    assert s.backend.status == 3 and fe.get_status() == 3
    assert s.synced().names()[-2:] == ["SET_STATUS", "GET_STATUS"]
    with pytest.raises(ValueError):
        fe.set_status(0x100)


def test_a_status_byte_out_of_range_breaks_the_session(session):
    s = session(actions={"GET_STATUS": "payload:" + v.encode_u64(0x1FF).hex()})
    fe = s.open()
    with pytest.raises(VhostUserError, match="8-bit status"):
        fe.get_status()
    assert fe.broken


def test_memory_table_is_the_memfd_with_iova_equal_to_va(session, memory):
    s = session()
    fe = s.open()
    fe.negotiate(VERSION_1)
    fe.set_memory(memory)
    seen = s.synced().seen[-1]
    assert seen.name == "SET_MEM_TABLE" and seen.need_reply
    assert seen.fd_kinds[0].startswith("/memfd:pmd-vhost-test") and seen.fd_inodes == [os.fstat(memory.fd).st_ino]
    assert s.backend.regions == fe.memory_regions == [v.MemoryRegion(memory.address, memory.size, memory.address, 0)]
    assert memory.iova(0) == memory.address


def test_memory_with_another_iova_translator_is_refused(session):
    s = session()
    fe = s.open()
    m = pmd.DmaMemory(1 << 20, lock=False)
    try:
        m.set_iova_translator(lambda va: va + (1 << 40))
        with pytest.raises(ValueError, match="IOVA = virtual address"):
            fe.set_memory(m)
    finally:
        m.close()
    with pytest.raises(ValueError, match="1 to 8"):
        fe.set_memory([])


def ring_pair(memory, size=64, *, event_idx=False):
    rx = Virtqueue(memory, size, 0, event_idx=event_idx)
    tx = Virtqueue(memory, size, 1, event_idx=event_idx)
    return rx, tx


def test_setup_queue_sends_call_num_base_addr_kick_with_the_eventfds(session, memory):
    s = session()
    fe = s.open()
    fe.negotiate(VERSION_1)
    fe.set_memory(memory)
    rx, _tx = ring_pair(memory)
    kick, call = EventFd(), EventFd()
    try:
        first = len(s.backend.seen)
        fe.setup_queue(0, rx.size, rx.desc_iova, rx.avail_iova, rx.used_iova, kick.fileno(), call.fileno(), base=5)
        seen = s.backend.seen[first:]
        assert [x.name for x in seen] == ["SET_VRING_CALL", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                                          "SET_VRING_KICK"]
        assert all(x.need_reply for x in seen)
        assert seen[0].fd_inodes == [os.fstat(call.fileno()).st_ino] and seen[0].fd_kinds == ["anon_inode:[eventfd]"]
        assert seen[4].fd_inodes == [os.fstat(kick.fileno()).st_ino]
        assert v.decode_vring_state(seen[1].payload, "x") == v.VringState(0, 64)
        assert v.decode_vring_state(seen[2].payload, "x") == v.VringState(0, 5)
        assert v.decode_vring_addr(seen[3].payload) == v.VringAddr(0, 0, rx.desc_iova, rx.used_iova, rx.avail_iova)
        q = fe.queues[0]
        assert (q.size, q.base, q.started, q.enabled) == (64, 5, True, False)  # protocol features: starts disabled
        assert q.kick_fd not in (-1, kick.fileno()) and fd_is_open(q.kick_fd)  # pmd's own duplicate
        fe.enable_queue(0)
        assert s.synced().names()[-1] == "SET_VRING_ENABLE" and fe.queues[0].enabled
        assert s.backend.errors == []
    finally:
        kick.close()
        call.close()


def test_setup_queue_without_eventfds_sends_the_no_fd_flag(session, memory):
    s = session()
    fe = s.open()
    fe.negotiate(VERSION_1)
    fe.set_memory(memory)
    rx, _tx = ring_pair(memory)
    fe.setup_queue(0, rx.size, rx.desc_iova, rx.avail_iova, rx.used_iova, None, None)
    call, kick = s.synced().seen[-5], s.backend.seen[-1]
    assert v.decode_vring_file(call.payload, "x", 0).nofd and v.decode_vring_file(kick.payload, "x", 0).nofd
    assert call.fd_kinds == [] and fe.queues[0].kick_fd == -1


def test_setup_queue_checks_what_it_is_given(session, memory):
    s = session(protocol_features=1 << v.VHOST_USER_PROTOCOL_F_REPLY_ACK)  # no MQ: one queue pair
    fe = s.open()
    rx, _tx = ring_pair(memory)
    args = (rx.size, rx.desc_iova, rx.avail_iova, rx.used_iova, None, None)
    with pytest.raises(VhostUserError, match="negotiate"):
        fe.setup_queue(0, *args)
    fe.negotiate(VERSION_1)
    with pytest.raises(VhostUserError, match="set_memory"):
        fe.setup_queue(0, *args)
    fe.set_memory(memory)
    with pytest.raises(ValueError, match="1 queue pair"):
        fe.setup_queue(2, *args)
    with pytest.raises(ValueError, match="power of two"):
        fe.setup_queue(0, 48, *args[1:])
    with pytest.raises(ValueError, match="not inside the memory"):
        fe.setup_queue(0, rx.size, memory.address + memory.size - 16, rx.avail_iova, rx.used_iova, None, None)
    with pytest.raises(ValueError, match="aligned"):
        fe.setup_queue(0, rx.size, rx.desc_iova + 8, rx.avail_iova, rx.used_iova, None, None)
    with pytest.raises(ValueError, match="eventfd"):
        fe.setup_queue(0, *args[:4], -3, None)
    with pytest.raises(ValueError, match="not an open file descriptor"):
        fe.setup_queue(0, *args[:4], 1 << 20, None)
    before = open_fds()
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="is not an eventfd .pipe:"):
            fe.setup_queue(0, *args[:4], None, w)
    finally:
        os.close(r)
        os.close(w)
    assert open_fds() == before  # the duplicate was closed
    fe.setup_queue(0, *args)
    with pytest.raises(VhostUserError, match="running") as e:
        fe.setup_queue(0, *args)
    assert e.value.errno == errno.EBUSY
    with pytest.raises(VhostUserError, match="while rings run"):
        fe.negotiate(VERSION_1)
    with pytest.raises(VhostUserError, match="while rings run"):
        fe.set_memory(memory)


def test_stop_queue_disables_then_gets_the_base(session, memory):
    s = session(bases={0: 1234})
    fe = s.open()
    fe.negotiate(VERSION_1)
    fe.set_memory(memory)
    rx, _tx = ring_pair(memory)
    fe.setup_queue(0, rx.size, rx.desc_iova, rx.avail_iova, rx.used_iova, None, None)
    fe.enable_queue(0)
    assert fe.stop_queue(0) == 1234
    assert s.synced().names()[-2:] == ["SET_VRING_ENABLE", "GET_VRING_BASE"]
    assert v.decode_vring_state(s.backend.seen[-2].payload, "x") == v.VringState(0, 0)
    q = fe.queues[0]
    assert (q.base, q.started, q.enabled) == (1234, False, False)
    with pytest.raises(VhostUserError, match="not running"):
        fe.stop_queue(0)
    # resume from the saved state: what a reconnect replays
    fe.setup_queue(0, q.size, q.desc, q.avail, q.used, None, None, base=q.base)
    assert v.decode_vring_state(s.synced().seen[-3].payload, "x") == v.VringState(0, 1234)


@pytest.mark.parametrize("payload,what", [
    (v.encode_vring_state(1, 7), "for vring 1, not 0"),
    (v.encode_vring_state(0, 0x10000), "reserved bits"),
    (bytes(12), "must be 8"),
])
def test_a_bad_vring_base_reply_breaks_the_session(session, memory, payload, what):
    s = session(actions={"GET_VRING_BASE": "payload:" + payload.hex()})
    fe = s.open()
    fe.negotiate(VERSION_1)
    fe.set_memory(memory)
    rx, _tx = ring_pair(memory)
    fe.setup_queue(0, rx.size, rx.desc_iova, rx.avail_iova, rx.used_iova, None, None)
    with pytest.raises(VhostUserError, match=what):
        fe.stop_queue(0)
    assert fe.broken
    with pytest.raises(VhostUserError, match="broken") as e:
        fe.enable_queue(0)
    assert e.value.errno == errno.EPIPE


def test_get_config_reads_the_device_configuration(session):
    s = session()
    fe = s.open()
    assert fe.get_config(0, 6) == bytes.fromhex("525400123456")
    assert fe.get_config(6, 6) == b"\x01\x00\x01\x00\xdc\x05"
    seen = s.synced().seen[-1]
    assert seen.name == "GET_CONFIG" and not seen.need_reply  # it has a reply of its own
    assert v.decode_config(seen.payload, "x") == v.ConfigSpace(6, 6, 0, bytes(6))
    with pytest.raises(ValueError):
        fe.get_config(250, 10)


def test_get_config_needs_the_config_protocol_feature(session):
    s = session(protocol_features=DPDK_PROTOCOL_FEATURES)  # what DPDK offers: no CONFIG
    fe = s.open()
    with pytest.raises(VhostUserError, match="did not offer VHOST_USER_PROTOCOL_F_CONFIG") as e:
        fe.get_config(0, 6)
    assert e.value.errno == errno.ENOTSUP and "GET_CONFIG" not in s.backend.names()


def test_empty_get_config_reply_is_a_refusal(session):
    s = session(actions={"GET_CONFIG": "nack"})
    fe = s.open()
    with pytest.raises(VhostUserError, match="refused GET_CONFIG") as e:
        fe.get_config(0, 6)
    assert e.value.errno == errno.EREMOTEIO and fe.broken is None


def test_get_config_reply_for_other_bytes_breaks_the_session(session):
    s = session(actions={"GET_CONFIG": "payload:" + v.encode_config(2, bytes(6)).hex()})
    fe = s.open()
    with pytest.raises(VhostUserError, match="6 bytes at 2, not 6 at 0"):
        fe.get_config(0, 6)
    assert fe.broken


# --- the handshake's error paths: a clear error, nothing leaks ---

HANDSHAKE_FAILURES = [
    ("GET_FEATURES", "close", "closed the connection instead of answering GET_FEATURES", errno.ECONNRESET),
    ("GET_PROTOCOL_FEATURES", "close", "closed the connection instead of answering GET_PROTOCOL_FEATURES",
     errno.ECONNRESET),
    ("SET_OWNER", "close", "gone|closed the connection", None),
    ("GET_FEATURES", "huge", "claims a payload of 4294967295 bytes", errno.EMSGSIZE),
    ("GET_FEATURES", "short", "15 of 20 bytes", errno.ECONNRESET),
    ("GET_FEATURES", "half_header", "after 5 of the 12 header bytes", errno.ECONNRESET),
    ("GET_FEATURES", "wrong_request", "names GET_STATUS .40.: the backend answered a different request", None),
    ("GET_PROTOCOL_FEATURES", "bad_version", "protocol version 2", None),
    ("GET_FEATURES", "no_reply_flag", "lacks the reply flag", None),
    ("GET_FEATURES", "need_reply", "need_reply flag", None),
    ("GET_FEATURES", "unknown_flag", "unknown flag bits", None),
    ("GET_FEATURES", "bad_size", "payload is 4 bytes, must be 8", None),
    ("GET_QUEUE_NUM", "bad_size", "payload is 4 bytes, must be 8", None),
    ("GET_FEATURES", "with_fd", "came with file descriptors", None),
    ("GET_QUEUE_NUM", "payload:" + v.encode_u64(0).hex(), "GET_QUEUE_NUM answered 0", None),
    ("GET_QUEUE_NUM", "payload:" + v.encode_u64(1000).hex(), "GET_QUEUE_NUM answered 1000", None),
    ("GET_FEATURES", "unsolicited", "sent request code 2 without the reply flag, a request of its own", None),
    ("GET_FEATURES", "twice", "the reply to GET_PROTOCOL_FEATURES names GET_FEATURES", None),
]


@pytest.mark.parametrize("request_name,action,message,err", HANDSHAKE_FAILURES,
                         ids=[f"{r}-{a[:12]}" for r, a, _m, _e in HANDSHAKE_FAILURES])
def test_misbehaving_backend_gets_a_clear_error_and_nothing_leaks(request_name, action, message, err):
    before = (open_fds(), threading.active_count())
    s = Session({"timeout": 0.5}, actions={request_name: action})
    with pytest.raises(VhostUserError, match=message) as e:
        s.open()
    assert "vhost-user fake" in str(e.value) and "the session is closed" in str(e.value)
    if err is not None:
        assert e.value.errno == err
    s.close()
    no_leaks(*before)


def test_a_reply_written_in_pieces_is_read_whole(session):
    s = session(actions={"GET_FEATURES": "split", "GET_QUEUE_NUM": "split"})
    fe = s.open()
    assert fe.backend_features == DPDK_FEATURES and fe.queue_num == 128


def test_backend_that_never_replies_gets_a_clear_error_within_a_second():
    before = (open_fds(), threading.active_count())
    s = Session(actions={"GET_FEATURES": "silent"})  # the default timeout: 1 s
    with pytest.raises(VhostUserError, match="no reply to GET_FEATURES within 1.0 s") as e:
        s.open()
    assert e.value.errno == errno.ETIMEDOUT
    s.close()
    no_leaks(*before)


def test_a_full_session_leaks_nothing(memory):
    before = (open_fds(), threading.active_count())
    s = Session()
    fe = s.open()
    fe.on_lost(lambda reason: None)
    fe.negotiate(VERSION_1)
    fe.set_memory(memory)
    rx, tx = ring_pair(memory)
    efds = [EventFd() for _ in range(4)]
    for i, vq in enumerate((rx, tx)):
        fe.setup_queue(i, vq.size, vq.desc_iova, vq.avail_iova, vq.used_iova, efds[2 * i].fileno(),
                       efds[2 * i + 1].fileno())
        fe.enable_queue(i)
    fe.close()
    assert s.synced().names()[-2:] == ["GET_VRING_BASE", "GET_VRING_BASE"]  # close stops the rings first
    s.close()
    for e in efds:
        e.close()
    no_leaks(*before)


# --- loss, close, state ---


def test_on_lost_fires_when_the_backend_goes_away(session):
    s = session()
    fe = s.open()
    fired = threading.Event()
    reasons: list[str] = []
    fe.on_lost(lambda reason: (reasons.append(reason), fired.set()))
    s.backend.close()
    assert fired.wait(5)
    assert reasons == ["the backend closed the connection (it exited or crashed)"]
    assert not fe.alive
    late: list[str] = []
    fe.on_lost(late.append)  # after the loss: called at once
    assert late == reasons


def test_on_lost_does_not_fire_on_our_own_close(session):
    s = session()
    fe = s.open()
    fired: list[str] = []
    fe.on_lost(fired.append)
    fe.close()
    s.backend.join()
    assert fired == []


def test_on_lost_fires_when_the_frontend_breaks_the_session(session):
    s = session(actions={"GET_STATUS": "wrong_request"})
    fe = s.open()
    fired = threading.Event()
    reasons: list[str] = []
    fe.on_lost(lambda reason: (reasons.append(reason), fired.set()))
    with pytest.raises(VhostUserError):
        fe.get_status()
    assert fired.wait(5) and "different request" in reasons[0]


def test_cancelled_callback_is_not_called(session):
    s = session()
    fe = s.open()
    called: list[str] = []
    cancel = fe.on_lost(called.append)
    cancel()
    s.backend.close()
    time.sleep(0.1)
    assert called == []


def test_alive_and_closed(session):
    s = session()
    fe = s.open()
    assert fe.alive and not fe.closed and "connected" in repr(fe)
    fe.close()
    fe.close()  # idempotent
    assert fe.closed and not fe.alive
    with pytest.raises(VhostUserError, match="closed") as e:
        fe.negotiate(VERSION_1)
    assert e.value.errno == errno.EBADF


def test_close_from_another_thread_wakes_a_waiting_request(session):
    s = session({"timeout": 20.0}, actions={"GET_STATUS": "silent"})
    fe = s.open()
    threading.Timer(0.2, fe.close).start()
    with pytest.raises(VhostUserError):
        fe.get_status()  # would wait 20 s; close() shuts the socket down under it
    assert fe.closed


# --- client and server mode on socket files ---


def serve_fake(path: str, **backend) -> tuple[threading.Thread, list[FakeBackend]]:
    """A fake back-end listening at ``path`` (client mode for pmd), for one connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    out: list[FakeBackend] = []

    def run() -> None:
        listener.settimeout(10)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        finally:
            listener.close()
        out.append(FakeBackend(conn, **backend))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_client_mode_connects_to_a_listening_backend(sock_dir):
    path = os.path.join(sock_dir, "b.sock")
    t, out = serve_fake(path)
    fe = VhostUserFrontend.connect(path)
    t.join()
    try:
        assert fe.name == path and not fe.server_mode and fe.peer_pid == os.getpid()
        assert out[0].names()[0] == "SET_OWNER"
    finally:
        fe.close()
        out[0].join()


def test_client_mode_without_a_backend_says_how_to_start_one(sock_dir):
    path = os.path.join(sock_dir, "none.sock")
    with pytest.raises(VhostUserError, match="no vhost-user backend at .* start one first") as e:
        VhostUserFrontend.connect(path)
    assert e.value.errno == errno.ENOENT
    assert f"dpdk-testpmd --no-pci --no-huge -m 1024 --file-prefix vhost --vdev net_vhost0,iface={path}" in str(e.value)


def test_client_mode_on_a_stale_socket_says_the_backend_exited(sock_dir):
    path = os.path.join(sock_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    with pytest.raises(VhostUserError, match="stale socket file") as e:
        VhostUserFrontend.connect(path)
    assert e.value.errno == errno.ECONNREFUSED


def test_socket_path_too_long_is_refused():
    with pytest.raises(VhostUserError, match="longer than the 107 bytes") as e:
        VhostUserFrontend.connect("/tmp/" + "x" * 120)
    assert e.value.errno == errno.ENAMETOOLONG


def test_server_mode_accepts_one_backend(sock_dir):
    path = os.path.join(sock_dir, "s.sock")
    out: list[FakeBackend] = []

    def backend() -> None:
        for _ in range(500):
            if os.path.exists(path):
                break
            time.sleep(0.01)
        for _ in range(500):  # bind comes a moment before listen
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                c.connect(path)
                break
            except ConnectionRefusedError:
                c.close()
                time.sleep(0.01)
        out.append(FakeBackend(c))

    t = threading.Thread(target=backend, daemon=True)
    t.start()
    fe = VhostUserFrontend.listen(path, accept_timeout=10)
    t.join()
    try:
        assert fe.server_mode and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert fe.protocol_features and out[0].names()[:2] == ["SET_OWNER", "GET_FEATURES"]
    finally:
        fe.close()
        out[0].join()
    assert not os.path.exists(path)  # the socket file goes with the front-end


def test_server_mode_times_out_saying_how_to_start_a_client_backend(sock_dir):
    path = os.path.join(sock_dir, "s.sock")
    before = open_fds()
    with pytest.raises(VhostUserError, match="no vhost-user backend connected .* within 0.2 s") as e:
        VhostUserFrontend.listen(path, accept_timeout=0.2)
    assert e.value.errno == errno.ETIMEDOUT and ",client=1" in str(e.value)
    assert not os.path.exists(path) and open_fds() == before


def test_server_mode_refuses_to_replace_a_file_or_a_live_socket(sock_dir):
    path = os.path.join(sock_dir, "f")
    Path(path).write_text("mine")
    with pytest.raises(VhostUserError, match="not a socket") as e:
        VhostUserFrontend.listen(path, accept_timeout=0.1)
    assert e.value.errno == errno.EEXIST and Path(path).read_text() == "mine"
    live = os.path.join(sock_dir, "live.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(live)
    s.listen(1)
    try:
        with pytest.raises(VhostUserError, match="in use") as e:
            VhostUserFrontend.listen(live, accept_timeout=0.1)
        assert e.value.errno == errno.EADDRINUSE
    finally:
        s.close()


def test_server_mode_socket_mode_never_follows_a_symlink(sock_dir, monkeypatch):
    # The listening socket's file gets its mode through the inode bound, as the
    # device's sockets do (pmd.sockets): a symlink planted after bind is refused and
    # what it points to keeps its mode.
    from tests.conftest import plant_symlink_after_bind

    path = os.path.join(sock_dir, "s.sock")
    victim = Path(sock_dir, "victim")
    victim.write_text("secret")
    os.chmod(victim, 0o644)
    plant_symlink_after_bind(monkeypatch, path, victim)
    old = os.umask(0o077)
    try:
        with pytest.raises(VhostUserError, match="replaced right after bind") as e:
            VhostUserFrontend.listen(path, accept_timeout=0.1, mode=0o660)
    finally:
        os.umask(old)
    assert e.value.errno == errno.EEXIST
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644 and victim.read_text() == "secret"


def test_server_mode_removes_a_stale_socket(sock_dir):
    path = os.path.join(sock_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    with pytest.raises(VhostUserError, match="within 0.1 s"):
        VhostUserFrontend.listen(path, accept_timeout=0.1)
    assert not os.path.exists(path)


# ===========================================================================
# the transport: a Port over a vhost-user session (pmd.driver.virtio.vhost_user)
# ===========================================================================

from pmd.driver.port import Port  # noqa: E402
from pmd.driver.virtio.vhost_user import CONFIG_FEATURES, NOT_CARRIED, VhostUserTransport  # noqa: E402
from pmd.abi import virtio as V  # noqa: E402


def test_the_transport_offers_only_what_vhost_user_carries(session):
    # no receive filters or MAC setting (a back-end runs data queues only and delivers every
    # frame) and no ACCESS_PLATFORM (IOTLB)
    with_config = VhostUserTransport(session().open())
    try:
        offered = with_config.device_features()
        assert offered & NOT_CARRIED == 0 and offered & V.bit(V.VERSION_1)
        assert offered & CONFIG_FEATURES == DPDK_FEATURES & CONFIG_FEATURES   # CONFIG: its fields can be read
        assert with_config.device_config_length() > 0
    finally:
        with_config.close()
    # DPDK's vhost library: no CONFIG, so no MAC, link status or MTU to read
    bare = VhostUserTransport(session(protocol_features=DPDK_PROTOCOL_FEATURES).open())
    try:
        assert bare.device_features() & (CONFIG_FEATURES | NOT_CARRIED) == 0
        # only max_virtqueue_pairs, which the transport answers: GET_QUEUE_NUM
        assert bare.device_config_length() == 10
        assert bare.read_config([(8, 2)]) == [128]
    finally:
        bare.close()


def test_a_port_over_vhost_user_reads_the_config_and_stops_the_rings_before_its_memory_goes(session):
    from pmd.driver.interrupts import get_interrupt_thread

    with EventFd() as ev:    # the process's one interrupt thread (its epoll and wake fds) is not the port's
        get_interrupt_thread().unregister(get_interrupt_thread().register(ev, lambda: None))
    before = open_fds()
    # a back-end with CONFIG that offers MAC and STATUS (DPDK's offers neither)
    s = session(features=DPDK_FEATURES | 1 << 5 | 1 << 16)
    port = Port(VhostUserTransport(s.open()))
    try:
        port.start()
        assert port.mac == bytes.fromhex("525400123456") and port.mtu == 1500 and port.link.up
        names = s.synced().names()
        assert "SET_MEM_TABLE" in names and names.count("SET_VRING_KICK") == 2
        assert names.index("SET_MEM_TABLE") < names.index("SET_VRING_ADDR")
        assert port.transport.get_status() & V.STATUS_DRIVER_OK
        port.stop()
        names = s.synced().names()
        # the rings stop (GET_VRING_BASE) while the memory they point into still exists
        assert names.count("GET_VRING_BASE") == 2
        assert port.transport.get_status() == 0
        old = port.transport.frontend.memory_regions
        port.start()                     # and start again on the same session
        assert s.synced().names().count("SET_MEM_TABLE") == 2
        # never the old region's address: DPDK would take it for the old memfd and keep it
        # ("memory regions not changed")
        assert port.transport.frontend.memory_regions[0].userspace_addr != old[0].userspace_addr
    finally:
        port.close()
    s.backend.join()
    assert open_fds() == before


def test_a_port_over_vhost_user_says_the_backend_is_gone_within_a_second(session):
    s = session(features=DPDK_FEATURES | 1 << 5 | 1 << 16)
    port = Port(VhostUserTransport(s.open()))
    try:
        port.start()
        t0 = time.monotonic()
        s.backend.close()                         # the back-end hangs up
        while port.lost is None and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        assert port.lost is not None and time.monotonic() - t0 < 1.0
        with pytest.raises(PmdError, match="the device is gone"):
            port.rx_burst(np.zeros((4, 2048), np.uint8), np.zeros(4, np.uint32))
    finally:
        port.close()                              # with the back-end gone: no hang, no error


def _enables(backend: FakeBackend) -> list[tuple[int, int]]:
    return [(st.index, st.num) for st in (v.decode_vring_state(x.payload, x.name) for x in backend.seen
                                          if x.request == v.VHOST_USER_SET_VRING_ENABLE)]


def test_several_queue_pairs_run_once_vq_pairs_set_enables_their_rings(session):
    # the transport serves the control queue: MQ is offered (GET_QUEUE_NUM 4), CTRL_VQ is
    # never sent to the back-end, and VQ_PAIRS_SET becomes SET_VRING_ENABLE per ring
    s = session(queue_num=4, protocol_features=DPDK_PROTOCOL_FEATURES)
    port = Port(VhostUserTransport(s.open()))
    try:
        port.start(queue_pairs=2)
        assert port.features & V.bit(17) and port.features & V.bit(22)       # CTRL_VQ, MQ
        assert port.max_queue_pairs == 4 and port.queue_pairs == 2 and port.ctrl is not None
        assert port.stats()["control_commands"] == 1
        b = s.synced()
        assert not b.acked_features & V.bit(17) and b.acked_features & V.bit(22)
        # pair 0 at setup, pair 1 only on VQ_PAIRS_SET (5.1.6.5.5: the first pair until then)
        assert _enables(b) == [(0, 1), (1, 1), (2, 1), (3, 1)]
        names = b.names()
        last_kick = len(names) - 1 - names[::-1].index("SET_VRING_KICK")
        enables = [i for i, name in enumerate(names) if name == "SET_VRING_ENABLE"]
        assert enables[1] < last_kick < enables[2]          # pair 1's rings: after every ring is set up
        t = port.transport
        assert t.control_command(4, 0, (1).to_bytes(2, "little")) == 0         # back to one pair
        assert _enables(s.synced())[4:] == [(2, 0), (3, 0)]
        for bad in (0, 3, 5):       # 3: its rings were never set up; 5: more than the back-end has
            assert t.control_command(4, 0, bad.to_bytes(2, "little")) == 1
        assert t.control_command(4, 0, b"\x02") == 1                            # short
        assert t.control_command(0, 0, b"\x01") == 1                            # CTRL_RX: not served
        assert len(_enables(s.synced())) == 6                                    # none of those touched a ring
        with pytest.raises(PmdError, match="refused control command"):
            port.ctrl_command(4, 0, (3).to_bytes(2, "little"))
        with pytest.raises(PmdError, match="CTRL_RX"):
            port.promiscuous = False
    finally:
        port.close()


def test_one_queue_pair_backends_get_no_control_queue(session):
    for kw in ({"queue_num": 1}, {"protocol_features": DPDK_PROTOCOL_FEATURES & ~(1 << v.VHOST_USER_PROTOCOL_F_MQ)}):
        s = session(**kw)
        port = Port(VhostUserTransport(s.open()))
        try:
            assert not port.transport.device_features() & (V.bit(17) | V.bit(22))
            with pytest.raises(ValueError, match="at most 1 .*no VIRTIO_NET_F_MQ"):
                port.start(queue_pairs=2)
            port.start()
            assert port.ctrl is None and port.queue_pairs == 1
        finally:
            port.close()


def test_an_mtu_given_to_the_transport_is_reported_and_told_to_the_backend(session):
    # DPDK's back-end has no CONFIG, so the MTU comes from the front-end (as virtio-user's mtu=)
    s = session(protocol_features=DPDK_PROTOCOL_FEATURES)
    port = Port(VhostUserTransport(s.open(), mtu=9000))
    try:
        port.start()
        assert port.features & V.bit(3) and port.mtu == 9000              # VIRTIO_NET_F_MTU
        assert port.rx_queue(0).max_packet_len >= 9018
        b = s.synced()
        assert b.mtu == 9000 and b.names().index("SET_FEATURES") < b.names().index("NET_SET_MTU")
    finally:
        port.close()
    # no NET_MTU protocol feature: reported all the same, the back-end is not told
    s = session(protocol_features=DPDK_PROTOCOL_FEATURES & ~(1 << v.VHOST_USER_PROTOCOL_F_NET_MTU))
    port = Port(VhostUserTransport(s.open(), mtu=1400))
    try:
        port.start()
        assert port.mtu == 1400 and "NET_SET_MTU" not in s.synced().names()
    finally:
        port.close()
    for bad in (67, 65536, "9000"):
        with pytest.raises(ValueError, match="mtu must be 68 to 65535"):
            VhostUserTransport(session().open(), mtu=bad)


def test_the_transport_refuses_access_platform_and_vectors_never_set_up(session, memory):
    t = VhostUserTransport(session().open())
    try:
        with pytest.raises(PmdError, match="ACCESS_PLATFORM"):
            t.map_memory(memory, iommu=True)
        with pytest.raises(PmdError, match="vector 3 was not set up"):
            t.set_config_vector(3)
        with pytest.raises(PmdError, match="were not offered"):
            t.set_driver_features(V.bit(V.ACCESS_PLATFORM))
    finally:
        t.close()
    with pytest.raises(TypeError, match="VhostUserFrontend"):
        VhostUserTransport(object())  # type: ignore[arg-type]


# --- reconnect: server mode, a back-end that comes back ---


def connect_fake(path: str, **backend) -> FakeBackend:
    """A fake back-end that connects to pmd listening at ``path`` (DPDK's client=1)."""
    deadline = time.monotonic() + 10
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            c.connect(path)
            return FakeBackend(c, **backend)
        except (FileNotFoundError, ConnectionRefusedError):
            c.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def listening_port(path: str, enable: str | int = 0, **backend) -> tuple[Port, FakeBackend]:
    out: list[FakeBackend] = []
    t = threading.Thread(target=lambda: out.append(connect_fake(path, **backend)), daemon=True)
    t.start()
    fe = VhostUserFrontend.listen(path, accept_timeout=10)
    t.join()
    return Port(VhostUserTransport(fe), enable=enable), out[0]


def baseline() -> tuple[int, int]:
    """Open fds and threads, with the process's one interrupt thread (not a port's) running."""
    from pmd.driver.interrupts import get_interrupt_thread

    with EventFd() as ev:
        get_interrupt_thread().unregister(get_interrupt_thread().register(ev, lambda: None))
    return open_fds(), threading.active_count()


def wait_for(condition, timeout: float) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"condition not met in time; threads {threading.enumerate()}"
        time.sleep(0.005)
    return time.monotonic() - t0


PACKED = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])


def _used_idx(port: Port, vq) -> np.ndarray:
    return port.memory.view(vq.used_iova - port.memory.iova(0) + 2, 2)


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_server_mode_link_goes_down_and_a_backend_that_connects_again_resumes_the_rings(sock_dir, layout):
    from pmd.driver.virtio.net import Link

    path = os.path.join(sock_dir, "s.sock")
    before, threads = baseline()
    port, b1 = listening_port(path, enable="RING_PACKED" if layout == "packed" else 0,
                              protocol_features=DPDK_PROTOCOL_FEATURES)
    try:
        port.start()
        assert port.ring_layout == layout
        port.transport.frontend.set_mtu(1500)   # replayed too
        # the transport reports the link (STATUS), and never tells the back-end so
        assert port.features & V.bit(16) and port.link.up
        assert not s_acked(b1) & V.bit(16)
        links: list[Link] = []
        port.on_link_change(links.append)
        txvq = port.tx_queue(0).vq
        if layout == "split":
            _used_idx(port, txvq)[:] = (7, 0)     # as if the device had completed 7 tx chains
            want = {0: 0, 1: 7}
        else:
            # 3 frames in flight, the device wrote the used descriptors of the first 2
            assert port.tx_burst(np.zeros((3, 60), np.uint8), np.full(3, 60, np.uint32)) == 3
            ring = np.frombuffer(port.memory.view(txvq.offset, txvq.ring_bytes), PACKED, count=txvq.size)
            for pos in (0, 1):
                ring[pos]["id"], ring[pos]["flags"] = pos, 1 << 7 | 1 << 15
            del ring                                        # a view keeps the memory (and its fd)
            fresh, resumed = 0 | 1 << 15, 2 | 1 << 15       # position | wrap counter << 15
            want = {0: fresh | fresh << 16, 1: resumed | resumed << 16}
            assert b1.bases == {0: fresh | fresh << 16, 1: fresh | fresh << 16}
        b1.close()                            # the back-end hangs up
        assert wait_for(lambda: links == [Link(False)], 2.0) < 1.0
        assert not port.link.up and port.lost is None and port.transport.reconnects == 0
        assert port.rx_burst(np.zeros((4, 2048), np.uint8), np.zeros(4, np.uint32)) == 0   # nothing fails
        b2 = connect_fake(path, protocol_features=DPDK_PROTOCOL_FEATURES)
        wait_for(lambda: links == [Link(False), Link(True)], 5.0)
        assert port.link.up and port.transport.reconnects == 1
        names = b2.names()
        assert names[:2] == ["SET_OWNER", "GET_FEATURES"]
        assert names.index("SET_FEATURES") < names.index("SET_MEM_TABLE") < names.index("SET_VRING_CALL")
        assert names.count("SET_VRING_KICK") == 2 and names.count("SET_VRING_ENABLE") == 2
        assert names[-1] == "SET_STATUS" and b2.status == b1.status == port.transport.get_status()
        assert s_acked(b2) == s_acked(b1) and b2.mtu == 1500
        # each ring resumes where the device had got to, read from its memory
        assert b2.bases == want
        assert [k.fd_kinds for k in b2.seen if k.name == "SET_VRING_KICK"] == [["anon_inode:[eventfd]"]] * 2
        if layout == "split":
            _used_idx(port, txvq)[:] = (0, 0)
    finally:
        port.close()
    b2.join()
    wait_for(lambda: threading.active_count() <= threads, 5.0)
    assert open_fds() == before


def s_acked(backend: FakeBackend) -> int:
    return backend.acked_features or 0


def test_a_backend_that_cannot_take_the_session_is_refused_and_the_next_one_taken(sock_dir):
    path = os.path.join(sock_dir, "s.sock")
    port, b1 = listening_port(path)
    try:
        port.start()
        b1.close()
        wait_for(lambda: not port.link.up, 2.0)
        poor = connect_fake(path, features=DPDK_FEATURES & ~MRG_RXBUF)   # lacks a negotiated feature
        poor.join()                                           # pmd hung up on it
        assert "SET_MEM_TABLE" not in poor.names() and not port.link.up
        b3 = connect_fake(path)
        wait_for(lambda: port.link.up, 5.0)
        assert "SET_MEM_TABLE" in b3.names() and port.transport.reconnects == 1
    finally:
        port.close()
    b3.join()


def test_a_port_stopped_while_the_backend_is_away_replays_nothing_and_starts_on_the_next(sock_dir):
    path = os.path.join(sock_dir, "s.sock")
    port, b1 = listening_port(path)
    try:
        port.start()
        b1.close()
        wait_for(lambda: not port.link.up, 2.0)
        port.stop()                                           # no back-end to stop rings on: no error
        with pytest.raises(PmdError, match="waiting for one to connect again"):
            port.start()
        b2 = connect_fake(path)
        wait_for(lambda: port.transport.connected, 5.0)
        names = b2.names()
        assert "SET_MEM_TABLE" not in names and "SET_VRING_KICK" not in names   # its memory is gone
        port.start()
        assert port.link.up and s_acked(b2) and "SET_MEM_TABLE" in b2.names()
    finally:
        port.close()
    b2.join()


def test_closing_a_port_that_waits_for_its_backend_ends_the_wait(sock_dir):
    path = os.path.join(sock_dir, "s.sock")
    before, threads = baseline()
    port, b1 = listening_port(path)
    port.start()
    b1.close()
    wait_for(lambda: not port.link.up, 2.0)
    t0 = time.monotonic()
    port.close()
    assert time.monotonic() - t0 < 2.0 and not os.path.exists(path)
    wait_for(lambda: threading.active_count() <= threads, 5.0)
    assert open_fds() == before


def test_without_reconnect_a_server_mode_port_reports_the_loss(sock_dir):
    path = os.path.join(sock_dir, "s.sock")
    out: list[FakeBackend] = []
    t = threading.Thread(target=lambda: out.append(connect_fake(path)), daemon=True)
    t.start()
    fe = VhostUserFrontend.listen(path, accept_timeout=10)
    t.join()
    port = Port(VhostUserTransport(fe, reconnect=False))
    try:
        port.start()
        assert not port.features & V.bit(16)     # no STATUS: the back-end offers none without CONFIG
        out[0].close()
        wait_for(lambda: port.lost is not None, 1.0)
    finally:
        port.close()


def test_reconnect_is_refused_in_client_mode(session):
    with pytest.raises(ValueError, match="reconnect needs server mode"):
        VhostUserTransport(session().open(), reconnect=True)
    with pytest.raises(ValueError, match="reconnect=True needs server=True"):
        pmd.open_port("vhost-user:/nonexistent.sock", reconnect=True)


# ===========================================================================
# DPDK testpmd as the back-end
# ===========================================================================

@pytest.fixture
def testpmd(sock_dir):
    started: list[DpdkBackend] = []

    def start(path: str, **kw) -> DpdkBackend:
        t = DpdkBackend(path, os.path.join(sock_dir, f"testpmd{len(started)}.log"), **kw)
        started.append(t)
        return t

    yield start
    for t in started:
        t.stop()


class Rings:
    """An rx/tx queue pair in one DmaMemory, with kick and call eventfds."""

    def __init__(self, *, event_idx: bool = False, mergeable: bool = False, size: int = 256) -> None:
        self.memory = pmd.DmaMemory(8 << 20, lock=False, name="pmd-vhost-dpdk")
        self.pool = PacketPool(self.memory, 1024, 2048)
        self.vqs = [Virtqueue(self.memory, size, i, event_idx=event_idx) for i in range(2)]
        self.rx = RxQueue(self.vqs[0], self.pool, mergeable=mergeable)
        self.tx = TxQueue(self.vqs[1], self.pool)
        self.kicks = [EventFd(), EventFd()]
        self.calls = [EventFd(), EventFd()]
        for vq, kick in zip(self.vqs, self.kicks):
            vq.set_notify_eventfd(kick.fileno())

    def start(self, fe: VhostUserFrontend, wanted: int) -> int:
        """The virtio status sequence (Virtio 1.2 3.1.1) over the session, then the rings."""
        fe.set_status(ACK)
        fe.set_status(ACK | DRIVER)
        accepted = fe.negotiate(wanted)
        fe.set_status(ACK | DRIVER | FEATURES_OK)
        assert fe.get_status() & FEATURES_OK, "the backend refused the features"
        fe.set_memory(self.memory)
        for i, vq in enumerate(self.vqs):
            fe.setup_queue(i, vq.size, vq.desc_iova, vq.avail_iova, vq.used_iova, self.kicks[i].fileno(),
                           self.calls[i].fileno())
            fe.enable_queue(i)
        fe.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        self.rx.fill()
        return accepted

    def echo(self, n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
        """Send ``n`` random frames (60-1514 bytes) in bursts of 32; collect what comes back."""
        rng = np.random.default_rng(seed)
        lengths = rng.integers(60, 1515, n).astype(np.uint32)
        data = rng.integers(0, 256, (n, 1514), dtype=np.uint8)
        sent = [bytes(data[i, :lengths[i]]) for i in range(n)]
        out = np.zeros((64, self.rx.max_packet_len), np.uint8)
        lens = np.zeros(64, np.uint32)
        got: list[bytes] = []
        done = 0
        deadline = time.monotonic() + 20
        while len(got) < n and time.monotonic() < deadline:
            # testpmd drops what finds our rx ring full: keep at most half of it in the loop
            if done < n and done - len(got) + 32 <= self.vqs[0].size // 2:
                done += self.tx.tx_burst(data[done:done + 32], lengths[done:done + 32])
            k = self.rx.rx_burst(out, lens)
            got.extend(bytes(out[j, :lens[j]]) for j in range(k))
            self.tx.reclaim()
            if not k:
                time.sleep(0.0005)
        return sent, got

    def close(self) -> None:
        self.rx.close()
        self.tx.close()
        for e in self.kicks + self.calls:
            e.close()
        self.memory.close()


#: testpmd answers its first messages late when the machine is loaded (its vhost thread competes with the
#: main thread populating 1 GiB for the mbuf pool): more than the default 1 s was seen with both cores busy
DPDK_TIMEOUT = 5.0


def check_dpdk_session(fe: VhostUserFrontend) -> None:
    # what DPDK 22.11's net_vhost offers; pmd takes MQ, REPLY_ACK and STATUS of it (no CONFIG there)
    assert fe.backend_features & F30 and fe.device_features & VERSION_1
    want = (1 << v.VHOST_USER_PROTOCOL_F_MQ | 1 << v.VHOST_USER_PROTOCOL_F_REPLY_ACK
            | 1 << v.VHOST_USER_PROTOCOL_F_STATUS)
    assert fe.protocol_features & want == want & fe.offered_protocol_features


def run_echo(fe: VhostUserFrontend, tp: DpdkBackend, wanted: int, *, n: int = 512, **rings) -> None:
    r = Rings(**rings)
    try:
        accepted = r.start(fe, wanted)
        assert accepted == wanted & fe.device_features
        sent, got = r.echo(n, seed=n)
        assert len(got) == n, f"{len(got)} of {n} frames came back\n{tp.output()[-3000:]}"
        assert got == sent  # byte-exact and in order
        # one descriptor per frame both ways: the bases are the frame counts (mod 2^16)
        assert fe.stop_queue(0) == n and fe.stop_queue(1) == n
        assert r.rx.stats()["bad_used_id"] == 0 and r.tx.stats()["dropped"] == 0
    finally:
        fe.close()
        r.close()


@needs_testpmd
def test_dpdk_client_mode_frames_come_back_byte_exact(sock_dir, testpmd):
    path = os.path.join(sock_dir, "vhost.sock")
    tp = testpmd(path)
    tp.wait_for_socket(path)
    fe = VhostUserFrontend.connect(path, wait=30, timeout=DPDK_TIMEOUT)
    check_dpdk_session(fe)
    run_echo(fe, tp, VERSION_1 | EVENT_IDX, event_idx=True)
    assert tp.stop() == 0
    assert tp.forwarded() == (512, 512)


@needs_testpmd
def test_dpdk_server_mode_frames_come_back_byte_exact(sock_dir, testpmd):
    path = os.path.join(sock_dir, "vhost.sock")
    tp = testpmd(path, client=True)  # it retries every second until pmd listens
    fe = VhostUserFrontend.listen(path, accept_timeout=60, timeout=DPDK_TIMEOUT)
    assert fe.server_mode and fe.peer_pid == tp.proc.pid
    check_dpdk_session(fe)
    run_echo(fe, tp, VERSION_1 | MRG_RXBUF, mergeable=True)
    assert not os.path.exists(path)
    assert tp.stop() == 0
    assert tp.forwarded() == (512, 512)


@needs_testpmd
def test_dpdk_a_port_in_server_mode_echoes_byte_exact(sock_dir, testpmd):
    # open_port("vhost-user:PATH", server=True): pmd listens, DPDK connects (client=1)
    path = os.path.join(sock_dir, "vhost.sock")
    tp = testpmd(path, client=True)
    port = pmd.open_port("vhost-user:" + path, server=True, accept_timeout=60, timeout=DPDK_TIMEOUT)
    try:
        port.start()
        assert port.transport.frontend.server_mode
        data, lengths = random_frames(600, 11)
        assert port_echo(port, data, lengths) == as_bytes(data, lengths)
    finally:
        port.close()
    assert not os.path.exists(path)
    assert tp.stop() == 0 and tp.forwarded() == (600, 600)


def random_frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1514), dtype=np.uint8), rng.integers(60, 1515, n).astype(np.uint32)


def port_echo(port, data: np.ndarray, lengths: np.ndarray, *, timeout: float = 30) -> list[bytes]:
    """Send the frames through an echoing back-end, at most 128 in flight (testpmd drops
    what finds the rx ring full); returns what came back."""
    n = len(lengths)
    out = np.zeros((64, port.rx_queue(0).max_packet_len), np.uint8)
    lens = np.zeros(64, np.uint32)
    got: list[bytes] = []
    done = 0
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if done < n and done - len(got) + 32 <= 128:
            done += port.tx_burst(data[done:done + 32], lengths[done:done + 32])
        k = port.rx_burst(out, lens)
        got.extend(bytes(out[j, :lens[j]]) for j in range(k))
        if not k:
            time.sleep(0.0005)
    return got


def as_bytes(data: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    return [bytes(data[i, :lengths[i]]) for i in range(len(lengths))]


@needs_testpmd
def test_dpdk_server_mode_resumes_on_a_restarted_testpmd_where_the_rings_were(sock_dir, testpmd):
    from pmd.driver.virtio.net import Link

    path = os.path.join(sock_dir, "vhost.sock")
    tp = testpmd(path, client=True)
    port = pmd.open_port("vhost-user:" + path, server=True, accept_timeout=60, timeout=DPDK_TIMEOUT)
    try:
        port.start()
        links: list[Link] = []
        port.on_link_change(links.append)
        data, lengths = random_frames(300, 31)
        assert port_echo(port, data, lengths) == as_bytes(data, lengths)
        killed = time.monotonic()
        tp.proc.kill()                                   # a crash: SIGKILL by PID
        wait_for(lambda: not port.link.up, 5.0)
        print(f"link down {(time.monotonic() - killed) * 1000:.1f} ms after SIGKILL")
        assert time.monotonic() - killed < 1.0 and links == [Link(False)] and port.lost is None
        # sent while no back-end is there: they wait in the tx ring
        away, away_lengths = random_frames(20, 32)
        assert port.tx_burst(away, away_lengths) == 20
        tp2 = testpmd(path, client=True)                 # DPDK's client retries every second
        t0 = time.monotonic()
        wait_for(lambda: port.link.up, 60.0)
        print(f"link up {time.monotonic() - t0:.2f} s after the new testpmd started")
        # the new back-end resumes the tx ring where the old one had got to: the 20 come back
        out = np.zeros((64, port.rx_queue(0).max_packet_len), np.uint8)
        lens = np.zeros(64, np.uint32)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 20 and time.monotonic() < deadline:
            k = port.rx_burst(out, lens)
            got.extend(bytes(out[j, :lens[j]]) for j in range(k))
        assert got == as_bytes(away, away_lengths)
        data, lengths = random_frames(300, 33)
        assert port_echo(port, data, lengths) == as_bytes(data, lengths)
        assert links == [Link(False), Link(True)] and port.transport.reconnects == 1
        s = port.stats()
        assert s["rx_packets"] == s["tx_packets"] == 620 and s["device_errors"] == 0
    finally:
        port.close()
    assert tp2.stop() == 0 and tp2.forwarded() == (320, 320)


@needs_testpmd
def test_dpdk_pmd_fwd_txonly_over_vhost_user_prints_a_summary(sock_dir, testpmd):
    path = os.path.join(sock_dir, "vhost.sock")
    tp = testpmd(path)
    tp.wait_for_socket(path)
    r = subprocess.run([sys.executable, "-m", "pmd", "fwd", "vhost-user:" + path, "--mode", "txonly",
                        "--duration", "1", "--timeout", str(DPDK_TIMEOUT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vhost-user virtio transport" in r.stdout
    summary = re.search(r"summary: mode=txonly .* tx=(\d+)", r.stdout)
    assert summary and int(summary.group(1)) > 0, r.stdout
    assert tp.stop() == 0
    received, _sent = tp.forwarded()
    assert received > 0


def test_pmd_fwd_server_applies_to_vhost_user_only():
    r = subprocess.run([sys.executable, "-m", "pmd", "fwd", "sim", "--server", "--duration", "0.1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--server applies to vhost-user:PATH only" in r.stderr


@needs_testpmd
def test_dpdk_rings_resume_from_the_saved_base(sock_dir, testpmd):
    # what a reconnect replays: the kept QueueState, SET_VRING_BASE with the base GET_VRING_BASE gave
    path = os.path.join(sock_dir, "vhost.sock")
    tp = testpmd(path)
    tp.wait_for_socket(path)
    fe = VhostUserFrontend.connect(path, wait=30, timeout=DPDK_TIMEOUT)
    r = Rings()
    try:
        r.start(fe, VERSION_1)
        sent, got = r.echo(64, seed=3)
        assert got == sent
        assert (fe.stop_queue(0), fe.stop_queue(1)) == (64, 64)
        for i in range(2):
            q = fe.queues[i]
            assert not q.started and q.base == 64
            fe.setup_queue(i, q.size, q.desc, q.avail, q.used, r.kicks[i].fileno(), r.calls[i].fileno(), base=q.base)
            fe.enable_queue(i)
        sent, got = r.echo(64, seed=4)
        assert got == sent
        assert (fe.stop_queue(0), fe.stop_queue(1)) == (128, 128)
    finally:
        fe.close()
        r.close()
    assert tp.stop() == 0
    assert tp.forwarded() == (128, 128)


@needs_testpmd
def test_dpdk_backend_loss_is_reported_within_a_second(sock_dir, testpmd):
    path = os.path.join(sock_dir, "vhost.sock")
    tp = testpmd(path)
    tp.wait_for_socket(path)
    fe = VhostUserFrontend.connect(path, wait=30, timeout=DPDK_TIMEOUT)
    r = Rings()
    try:
        r.start(fe, VERSION_1)
        sent, got = r.echo(32, seed=1)
        assert got == sent
        fired = threading.Event()
        when: list[float] = []
        fe.on_lost(lambda reason: (when.append(time.monotonic()), fired.set()))
        killed = time.monotonic()
        tp.proc.kill()  # a crash: SIGKILL by PID
        tp.proc.wait()
        reaped = time.monotonic()
        assert fired.wait(5), "the loss was never reported"
        # the kernel closes a dying process's sockets before it can be reaped
        print(f"backend loss reported {(when[0] - killed) * 1000:.1f} ms after SIGKILL "
              f"(testpmd reaped after {(reaped - killed) * 1000:.1f} ms)")
        assert when[0] - killed < 1.0
        assert fe.broken is None and not fe.alive  # alive() then marks it broken
        with pytest.raises(VhostUserError, match="broken"):
            fe.stop_queue(0)
    finally:
        fe.close()
        r.close()


# ===========================================================================
# fuzzing the front-end against a hostile back-end
# ===========================================================================

FUZZ_SECONDS = float(os.environ.get("PMD_FUZZ_SECONDS", "10"))
FUZZ_SEED = int(os.environ.get("PMD_FUZZ_SEED", "10"))

FUZZ_CHILD = textwrap.dedent(
    """
    import json, os, random, re, socket, sys, threading, time
    sys.path.insert(0, {root!r})
    import pmd
    from pmd.driver._virtqueue import Virtqueue
    from pmd.driver.vhost_user import VhostUserFrontend
    from pmd.driver.interrupts import EventFd
    from pmd.abi import vhost_user as v
    from tests.vhost_user_peer import ALL_PROTOCOL, DPDK_FEATURES, DPDK_PROTOCOL_FEATURES, FakeBackend

    ACTIONS = ["close", "silent", "huge", "short", "half_header", "wrong_request", "bad_version",
               "no_reply_flag", "need_reply", "unknown_flag", "bad_size", "with_fd", "nack", "garbage",
               "split", "twice", "unsolicited"]
    rng = random.Random({seed})
    end = time.monotonic() + {seconds}
    counts = dict(iterations=0, sound=0, sound_ok=0, hostile=0, hostile_failed=0, messages=0)
    errors = {{}}
    memory = pmd.DmaMemory(1 << 20, lock=False, name="fuzz")
    rx = Virtqueue(memory, 64, 0)
    tx = Virtqueue(memory, 64, 1)
    efds = [EventFd() for _ in range(4)]

    def resources():
        return len(os.listdir("/proc/self/fd")), threading.active_count()

    base = resources()
    while time.monotonic() < end:
        counts["iterations"] += 1
        rate = rng.choice([0.0, 0.0, 0.03, 0.1, 0.3])
        falsified = []

        def chooser(msg):
            counts["messages"] += 1
            if rng.random() >= rate:
                return None
            a = rng.choice(ACTIONS)
            falsified.append(a)
            if a == "garbage":
                return "payload:" + rng.randbytes(rng.choice([0, 1, 4, 8, 12, 40, 300])).hex()
            return a

        # the back-end's own values: sound ones, or anything at all
        sound_values = rng.random() < 0.6
        if sound_values:
            features = rng.choice([DPDK_FEATURES, DPDK_FEATURES & ~(1 << 30), 1 << 32])
            pf = rng.choice([DPDK_PROTOCOL_FEATURES, ALL_PROTOCOL, 0, 1 << 3])
            queue_num, vbase = rng.choice([1, 2, 128]), rng.getrandbits(16)
        else:
            features, pf = rng.getrandbits(64), rng.getrandbits(64)
            queue_num, vbase = rng.choice([0, 1, 129, 2**64 - 1]), rng.getrandbits(32)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = FakeBackend(b, features=features, protocol_features=pf, chooser=chooser,
                              queue_num=queue_num, bases={{0: vbase, 1: vbase}})
        fe = None
        failure = None
        try:
            # a session with nothing falsified must succeed even on a loaded machine: it gets 2 s per
            # request; hostile ones 0.2 s (a back-end that stays silent costs that much)
            fe = VhostUserFrontend.from_socket(a, name="fuzz", timeout=2.0 if rate == 0.0 else 0.2)
            fe.on_lost(lambda reason: None)
            fe.set_status(3)
            fe.negotiate(rng.getrandbits(64) | (1 << 32))
            fe.set_status(11)
            fe.get_status()
            fe.set_memory(memory)
            for i, vq in enumerate((rx, tx)):
                fe.setup_queue(i, vq.size, vq.desc_iova, vq.avail_iova, vq.used_iova,
                               efds[2 * i].fileno(), rng.choice([efds[2 * i + 1].fileno(), None]))
                fe.enable_queue(i)
            fe.set_status(15)
            if fe.protocol_features >> v.VHOST_USER_PROTOCOL_F_CONFIG & 1:
                fe.get_config(rng.randrange(0, 200), rng.randrange(1, 56))
            fe.stop_queue(0)
            fe.stop_queue(1)
        except v.VhostUserError as exc:
            assert str(exc) and exc.errno, repr(exc)  # every failure says something, with an errno
            failure = exc
            key = re.sub(r"0x[0-9a-f]+|\\d+", "N", str(exc).replace("vhost-user fuzz: ", ""))[:110]
            errors[key] = errors.get(key, 0) + 1
        finally:
            if fe is not None:
                fe.close()
            else:
                a.close()
            backend.close()
        if falsified:
            counts["hostile"] += 1
            counts["hostile_failed"] += failure is not None
        elif sound_values and rate == 0.0:
            counts["sound"] += 1
            if failure is not None:
                raise AssertionError(f"a session with nothing falsified failed: {{failure}}")
            if backend.errors:
                raise AssertionError(f"pmd sent what the strict decoders refuse: {{backend.errors}}")
            counts["sound_ok"] += 1
        now = resources()
        if now != base:
            time.sleep(0.1)  # a thread on its way out
            now = resources()
            if now != base:
                raise AssertionError(f"leak after iteration {{counts['iterations']}}: {{base}} -> {{now}}")
    for e in efds:
        e.close()
    memory.close()
    print(json.dumps(dict(counts=counts, errors=errors)))
    """
)


def test_fuzz_frontend_against_a_hostile_backend():
    script = FUZZ_CHILD.format(root=str(ROOT), seed=FUZZ_SEED, seconds=FUZZ_SECONDS)
    signal.setitimer(signal.ITIMER_REAL, FUZZ_SECONDS + 60)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=FUZZ_SECONDS + 50,
                       cwd=ROOT)
    assert r.returncode == 0, f"exit status {r.returncode} (negative: killed by a signal)\n{r.stdout}\n{r.stderr}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    print(f"vhost-user front-end fuzz: {counts} in {FUZZ_SECONDS} s, seed {FUZZ_SEED}")
    for text, n in sorted(result["errors"].items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {n:6d}  {text}")
    assert counts["sound_ok"] == counts["sound"] > 5 and counts["hostile_failed"] > 5


RECONNECT_FUZZ_CHILD = textwrap.dedent(
    """
    import json, os, random, re, shutil, socket, sys, tempfile, threading, time
    sys.path.insert(0, {root!r})
    import pmd
    from pmd.driver.port import Port
    from pmd.driver.vhost_user import VhostUserFrontend
    from pmd.driver.virtio.vhost_user import VhostUserTransport
    from tests.vhost_user_peer import DPDK_FEATURES, DPDK_PROTOCOL_FEATURES, FakeBackend

    ACTIONS = ["close", "silent", "huge", "short", "half_header", "wrong_request", "bad_version",
               "no_reply_flag", "need_reply", "unknown_flag", "bad_size", "with_fd", "nack", "garbage",
               "split", "twice", "unsolicited"]
    rng = random.Random({seed})
    d = tempfile.mkdtemp(prefix="vhf")
    path = os.path.join(d, "s.sock")
    counts = dict(iterations=0, hostile=0, resumed=0, refused=0, sound_resumed=0, messages=0)

    def connect(**kw):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        return FakeBackend(c, **kw)

    def until(cond, limit):
        end = time.monotonic() + limit
        while not cond():
            if time.monotonic() > end:
                return False
            time.sleep(0.002)
        return True

    first = []
    t = threading.Thread(target=lambda: first.append(
        (time.sleep(0.05), connect(protocol_features=DPDK_PROTOCOL_FEATURES))[1]))
    t.start()
    fe = VhostUserFrontend.listen(path, accept_timeout=10, timeout=0.5)
    t.join()
    port = Port(VhostUserTransport(fe, mtu=1500))
    port.start()
    tr = port.transport

    def sound_cycle():
        # a sound back-end must always be resumed on, whatever came before it
        b = connect(protocol_features=DPDK_PROTOCOL_FEATURES)
        if not until(lambda: tr.connected, 5):
            raise AssertionError(f"a sound backend was not resumed on: {{b.names()}}")
        if b.errors:
            raise AssertionError(f"pmd sent what the strict decoders refuse: {{b.errors}}")
        counts["sound_resumed"] += 1
        b.close()
        if not until(lambda: not tr.connected and not port.link.up, 5):
            raise AssertionError("the loss of a resumed backend was not seen")

    def resources():
        return len(os.listdir("/proc/self/fd")), threading.active_count()

    first[0].close()
    until(lambda: not tr.connected, 5)
    sound_cycle()
    time.sleep(0.05)
    base = resources()
    end = time.monotonic() + {seconds}
    while time.monotonic() < end:
        counts["iterations"] += 1
        rate = rng.choice([0.03, 0.1, 0.3, 1.0])

        def chooser(msg):
            counts["messages"] += 1
            if rng.random() >= rate:
                return None
            a = rng.choice(ACTIONS)
            if a == "garbage":
                return "payload:" + rng.randbytes(rng.choice([0, 1, 4, 8, 12, 40, 300])).hex()
            return a

        if rng.random() < 0.5:
            kw = dict(features=DPDK_FEATURES, protocol_features=DPDK_PROTOCOL_FEATURES, queue_num=rng.choice([1, 2, 128]))
        else:
            kw = dict(features=rng.getrandbits(64), protocol_features=rng.getrandbits(64),
                      queue_num=rng.choice([0, 1, 129, 2**64 - 1]))
        b = connect(chooser=chooser, **kw)
        counts["hostile"] += 1
        until(lambda: tr.connected or not b._thread.is_alive(), 5)
        if tr.connected:
            counts["resumed"] += 1
            b.close()
            if not until(lambda: not tr.connected, 5):
                raise AssertionError("the loss of a resumed hostile backend was not seen")
        else:
            counts["refused"] += 1
            b.close()
        sound_cycle()
        time.sleep(0.01)
        now = resources()
        if now != base and not until(lambda: resources() == base, 1.0):
            raise AssertionError(f"leak after iteration {{counts['iterations']}}: {{base}} -> {{resources()}}")
    port.close()
    shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(dict(counts=counts)))
    """
)


def test_fuzz_reconnect_against_hostile_backends():
    # a server-mode port whose back-end went away, against back-ends that connect and lie:
    # each is resumed on or refused, and a sound one after it is always resumed on
    script = RECONNECT_FUZZ_CHILD.format(root=str(ROOT), seed=FUZZ_SEED, seconds=FUZZ_SECONDS)
    signal.setitimer(signal.ITIMER_REAL, FUZZ_SECONDS + 90)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=FUZZ_SECONDS + 80,
                       cwd=ROOT)
    assert r.returncode == 0, f"exit status {r.returncode} (negative: killed by a signal)\n{r.stdout}\n{r.stderr[-3000:]}"
    counts = json.loads(r.stdout.strip().splitlines()[-1])["counts"]
    print(f"vhost-user reconnect fuzz: {counts} in {FUZZ_SECONDS} s, seed {FUZZ_SEED}")
    assert counts["refused"] > 5 and counts["sound_resumed"] == counts["iterations"] + 1
