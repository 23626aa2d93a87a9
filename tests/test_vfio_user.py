"""vfio-user: the wire format, the client (a DeviceAccess) and the server, against a toy device model.

The toy device: a 256-byte config space (region 7), BAR0 of two pages backed by a
memfd with only the first page mmap-able (the second reached by messages), BAR1
with 70 sparse areas (a region-info reply too large for the first request),
BAR2 a read-only 16-byte message region, INTx (1) and MSI-X (2 vectors), DMA
maps recorded by mapping the client's memfd.

Robustness is tested both ways with raw bytes: a fake server on a socketpair
for the client, a raw client socket for the server. Every test is bounded in
time (SIGALRM) and the fd tests count /proc/self/fd.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
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

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmd.abi.vfio import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    PCI_MSIX_IRQ_INDEX,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
)
from pmd.errors import VfioError
from pmd.memory.seals import create_sealed_memfd
from pmd.abi.vfio import (
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
)
from pmd.driver.access.vfio_user import VfioUserAccess
from tests.conftest import plant_symlink_after_bind
from pmd.sim.server import RegionSpec, VfioUserServer
from pmd.abi import vfio_user as p

ROOT = Path(__file__).resolve().parent.parent
PAGE = mmap.PAGESIZE
RW = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
BAR1_AREAS = 70


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_listing() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def wait_for(condition, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture(autouse=True)
def hard_time_limit():
    """No test may hang: SIGALRM after 30 s raises in the main thread."""

    def expired(signum, frame):
        raise TimeoutError("test exceeded its 30 s time limit")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="vu", dir="/tmp")  # short: AF_UNIX paths hold 107 bytes
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


# ---------------------------------------------------------------------------
# the toy device model
# ---------------------------------------------------------------------------


class ToyModel:
    """A small PCI device implementing pmd.vfio_user.model.DeviceModel (see the module docstring)."""

    def __init__(self, *, reset: bool = True, msix: int = 2) -> None:
        self.config = bytearray(256)
        struct.pack_into("<HH", self.config, 0, 0x1AF4, 0x1041)
        self.config[0x0E] = 0  # header type 0
        # BAR0 lives at file offset PAGE of its memfd (a region need not start the file)
        self.bar0_fd = create_sealed_memfd("toy-bar0", 3 * PAGE)
        self.bar0 = mmap.mmap(self.bar0_fd, 2 * PAGE, offset=PAGE)
        self.bar1_fd = create_sealed_memfd("toy-bar1", 2 * BAR1_AREAS * PAGE)
        self.flags = VFIO_DEVICE_FLAGS_PCI | (VFIO_DEVICE_FLAGS_RESET if reset else 0)
        self.msix = msix
        self.calls: list[tuple] = []
        self.irq_fds: dict[tuple[int, int], int] = {}
        self.dma: dict[int, tuple[mmap.mmap, int, int]] = {}
        self.gone = threading.Event()
        self.gone_count = 0
        self.resets = 0
        self.block: threading.Event | None = None  # config reads at 0x40 wait for it
        self.fail: dict[int, BaseException] = {}  # config read offset -> exception to raise
        self.sleep_at_0x40 = 0.0

    # --- DeviceModel ---

    def device_info(self):
        return self.flags, 9, 5

    def region_spec(self, index):
        if index == 0:
            return RegionSpec(2 * PAGE, RW | REGION_INFO_FLAG_MMAP, [(0, PAGE)], self.bar0_fd, PAGE)
        if index == 1:
            areas = [(2 * k * PAGE, PAGE) for k in range(BAR1_AREAS)]
            return RegionSpec(2 * BAR1_AREAS * PAGE, RW | REGION_INFO_FLAG_MMAP, areas, self.bar1_fd, 0)
        if index == 2:
            return RegionSpec(16, REGION_INFO_FLAG_READ)
        if index == 7:
            return RegionSpec(256, RW)
        return RegionSpec(0, 0)

    def region_read(self, index, offset, size):
        self.calls.append(("read", index, offset, size))
        if index == 7:
            if offset in self.fail:
                raise self.fail[offset]
            if offset == 0x40 and self.block is not None:
                self.block.wait(10)
            if offset == 0x40 and self.sleep_at_0x40:
                time.sleep(self.sleep_at_0x40)
            return bytes(self.config[offset : offset + size])
        if index == 0:
            return bytes(self.bar0[offset : offset + size])
        if index == 1:
            return os.pread(self.bar1_fd, size, offset)
        if index == 2:
            return bytes(range(16))[offset : offset + size]
        raise ValueError(f"no region {index}")

    def region_write(self, index, offset, data):
        self.calls.append(("write", index, offset, bytes(data)))
        if index == 7:
            self.config[offset : offset + len(data)] = data
        elif index == 0:
            self.bar0[offset : offset + len(data)] = data
        elif index == 1:
            os.pwrite(self.bar1_fd, data, offset)
        else:
            raise ValueError(f"region {index} is read-only")

    def irq_info(self, index):
        if index == 0:
            return 1, IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
        if index == PCI_MSIX_IRQ_INDEX:
            return self.msix, IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE
        return 0, 0

    def set_irqs(self, index, start, fds):
        self.calls.append(("set_irqs", index, start, None if fds is None else list(fds)))
        if fds is None:
            for key in [k for k in self.irq_fds if k[0] == index]:
                os.close(self.irq_fds.pop(key))
            return
        for i, fd in enumerate(fds):
            old = self.irq_fds.pop((index, start + i), None)
            if old is not None:
                os.close(old)
            if fd >= 0:
                self.irq_fds[(index, start + i)] = fd

    def dma_map(self, iova, size, fd, fd_offset, prot):
        self.calls.append(("dma_map", iova, size, fd_offset, prot))
        self.dma[iova] = (mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=fd_offset), size, prot)

    def dma_unmap(self, iova, size):
        self.calls.append(("dma_unmap", iova, size))
        self.dma.pop(iova)[0].close()

    def reset(self):
        self.resets += 1
        self.config[4:6] = b"\0\0"

    def client_gone(self):
        for fd in self.irq_fds.values():
            os.close(fd)
        self.irq_fds.clear()
        for m, _size, _prot in self.dma.values():
            m.close()
        self.dma.clear()
        self.gone_count += 1
        self.gone.set()

    # --- test helpers ---

    def fire(self, vector: int) -> None:
        os.eventfd_write(self.irq_fds[(PCI_MSIX_IRQ_INDEX, vector)], 1)

    def dma_bytes(self, iova: int, n: int) -> bytes:
        return bytes(self.dma[iova][0][:n])

    def close(self) -> None:
        self.client_gone()
        self.bar0.close()
        os.close(self.bar0_fd)
        os.close(self.bar1_fd)


@pytest.fixture
def model():
    m = ToyModel()
    yield m
    m.close()


@pytest.fixture
def served(model, sock_dir):
    path = os.path.join(sock_dir, "dev.sock")
    server = VfioUserServer(model, path)
    server.serve_in_thread()
    yield model, server, path
    server.close()


@pytest.fixture
def device(served):
    _model, _server, path = served
    dev = VfioUserAccess.connect(path, timeout=2.0)
    yield dev
    dev.close()


def eventfd_fired(fd: int, timeout: float = 1.0) -> int:
    r, _, _ = select.select([fd], [], [], timeout)
    return os.eventfd_read(fd) if r else 0


# ---------------------------------------------------------------------------
# the protocol as it should go
# ---------------------------------------------------------------------------


def test_version_negotiation_and_capabilities(served):
    _model, server, path = served
    with VfioUserAccess.connect(path) as dev:
        assert dev.version == (0, 1)
        caps = dev.server_capabilities
        assert caps.max_msg_fds == p.MAX_MSG_FDS
        assert caps.max_data_xfer_size == p.MAX_DATA_XFER_SIZE
        assert caps.migration is None
        assert server.connected and server.peer is not None and server.peer[0] == os.getpid()
    assert wait_for(lambda: not server.connected)


def test_device_region_and_irq_info(device):
    info = device.device_info
    assert info.is_pci and info.supports_reset and info.num_regions == 9 and info.num_irqs == 5
    bar0 = device.region_info(0)
    assert bar0.size == 2 * PAGE and bar0.readable and bar0.writable and bar0.mmappable
    assert bar0.offset == PAGE  # the mmap offset in the server's file
    assert [(a.offset, a.size) for a in bar0.mmap_areas()] == [(0, PAGE)]
    cfg = device.region_info(7)
    assert cfg.size == 256 and not cfg.mmappable
    assert device.region_info(3).size == 0 and device.region_info(8).size == 0
    ro = device.region_info(2)
    assert ro.readable and not ro.writable
    msix = device.irq_info(PCI_MSIX_IRQ_INDEX)
    assert msix.count == 2 and msix.eventfd and msix.noresize
    intx = device.irq_info(0)
    assert intx.count == 1 and intx.maskable and intx.automasked
    assert device.irq_info(1).count == 0
    with pytest.raises(ValueError):
        device.region_info(9)
    with pytest.raises(ValueError):
        device.irq_info(5)


def test_region_info_larger_than_the_first_request_is_asked_again(device):
    bar1 = device.region_info(1)  # 70 sparse areas: 1168 bytes > the first argsz of 1024
    assert bar1.sparse_areas is not None and len(bar1.sparse_areas) == BAR1_AREAS
    assert bar1.sparse_areas[-1].offset == 2 * (BAR1_AREAS - 1) * PAGE
    with device.map_region(1) as mapping:
        mapping.write(2 * PAGE, 4, 0x12345678)
        with pytest.raises(ValueError):
            mapping.write(PAGE, 4, 1)  # a hole between the areas
    assert device.region_read(1, 2 * PAGE, 4) == struct.pack("<I", 0x12345678)


def test_config_space_by_messages(device, model):
    assert device.config_read_int(0, 2) == 0x1AF4
    assert device.config_read_int(2, 2) == 0x1041
    device.config_write_int(0x40, 4, 0xA5A5A5A5)
    assert model.config[0x40:0x44] == b"\xa5" * 4
    assert not device.bus_master_enabled()
    device.enable_bus_master()
    assert device.bus_master_enabled() and model.config[4] & 0x04
    assert device.config_read(0, 256) == bytes(model.config)
    with pytest.raises(ValueError):
        device.config_read(250, 8)


def test_bar_is_mmapped_from_the_servers_fd(device, model):
    mapping = device.map_region(0)
    window = mapping.mmio(0, PAGE)
    window.write32(0x10, 0xDEADBEEF)
    assert struct.unpack_from("<I", model.bar0, 0x10)[0] == 0xDEADBEEF  # the model's own mapping sees it
    struct.pack_into("<Q", model.bar0, 0x20, 0x0123456789ABCDEF)
    assert window.read64(0x20) == 0x0123456789ABCDEF
    assert window.read16(0x20) == 0xCDEF
    before = len(model.calls)
    for _ in range(100):
        window.write16(0x30, 7)  # a doorbell: no message per access
    assert len(model.calls) == before
    with pytest.raises(ValueError):
        mapping.mmio(PAGE, 16)  # the message-only page is not mapped
    mapping.close()
    assert window.closed


def test_message_only_part_of_a_bar(device, model):
    device.region_write(0, PAGE + 8, b"hello")
    assert model.bar0[PAGE + 8 : PAGE + 13] == b"hello"
    model.bar0[PAGE + 100 : PAGE + 104] = b"abcd"
    assert device.region_read(0, PAGE + 100, 4) == b"abcd"
    assert ("write", 0, PAGE + 8, b"hello") in model.calls
    assert device.region_read(2, 4, 4) == bytes([4, 5, 6, 7])
    with pytest.raises(VfioError) as e:
        device.region_write(2, 0, b"x")  # read-only region: refused before any message
    assert e.value.errno == errno.EACCES


def test_large_accesses_are_split_by_max_data_xfer_size(model, sock_dir):
    path = os.path.join(sock_dir, "s")
    with VfioUserServer(model, path, max_data_xfer_size=64) as server:
        server.serve_in_thread()
        with VfioUserAccess.connect(path) as dev:
            assert dev.server_capabilities.max_data_xfer_size == 64
            before = dev.requests
            assert dev.config_read(0, 256) == bytes(model.config)
            assert dev.requests - before == 4
            before = dev.requests
            dev.config_write(0x40, bytes(range(100)))
            assert dev.requests - before == 2
            assert model.config[0x40:0xA4] == bytes(range(100))


def test_set_irqs_with_eventfds(device, model):
    e0, e1 = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        index, n = device.enable_interrupts([e0, e1])
        assert (index, n) == (PCI_MSIX_IRQ_INDEX, 2)
        assert device.enabled_irqs == {PCI_MSIX_IRQ_INDEX: 2}
        model.fire(1)
        assert eventfd_fired(e1) == 1
        assert eventfd_fired(e0, 0.05) == 0
        model.fire(0)
        model.fire(0)
        assert eventfd_fired(e0) == 2
        # take vector 0's eventfd away, keep vector 1's
        device.set_irqs(PCI_MSIX_IRQ_INDEX, 0, [-1])
        assert model.calls[-1] == ("set_irqs", PCI_MSIX_IRQ_INDEX, 0, [-1])
        assert (PCI_MSIX_IRQ_INDEX, 0) not in model.irq_fds
        kept = model.irq_fds[(PCI_MSIX_IRQ_INDEX, 1)]
        device.disable_irqs(PCI_MSIX_IRQ_INDEX)
        assert model.calls[-1] == ("set_irqs", PCI_MSIX_IRQ_INDEX, 0, None)
        assert not model.irq_fds and not fd_is_open(kept)
        assert device.enabled_irqs == {}
        with pytest.raises(VfioError):
            device.set_irqs(PCI_MSIX_IRQ_INDEX, 1, [e0, e1])  # only two vectors
        with pytest.raises(VfioError) as e:
            device.unmask_irq(0)  # the toy model has no masking: the server says so
        assert e.value.errno == errno.ENOTSUP
    finally:
        os.close(e0)
        os.close(e1)


def test_set_irqs_split_by_the_servers_max_msg_fds(model, sock_dir):
    path = os.path.join(sock_dir, "s")
    with VfioUserServer(model, path, max_msg_fds=1) as server:
        server.serve_in_thread()
        e0, e1 = os.eventfd(0), os.eventfd(0)
        try:
            with VfioUserAccess.connect(path) as dev:
                dev.irq_info(PCI_MSIX_IRQ_INDEX)  # cached from here on
                before = dev.requests
                dev.set_irqs(PCI_MSIX_IRQ_INDEX, 0, [e0, e1])
                assert dev.requests - before == 2
                assert [c for c in model.calls if c[0] == "set_irqs"] == [
                    ("set_irqs", 2, 0, [model.irq_fds[(2, 0)]]),
                    ("set_irqs", 2, 1, [model.irq_fds[(2, 1)]]),
                ]
                model.fire(1)
                assert eventfd_fired(e1) == 1
        finally:
            os.close(e0)
            os.close(e1)


def test_dma_map_shares_the_memfd(device, model):
    import pmd

    mem = pmd.DmaMemory(1 << 20, lock=False, name="vu-test")
    try:
        iova = device.map_memory(mem)
        assert iova == mem.address  # vfio-user: IOVA = virtual address
        assert mem.iova(0) == iova
        (name, got_iova, size, off, prot) = model.calls[-1]
        assert (name, got_iova, size, off) == ("dma_map", iova, mem.size, 0)  # the whole memfd, offset 0
        assert prot == mmap.PROT_READ | mmap.PROT_WRITE
        view = mem.view()
        view[100:105] = list(b"hello")
        assert model.dma_bytes(iova, 105)[100:] == b"hello"
        model.dma[iova][0][200:203] = b"xyz"  # the device writes; the driver sees it
        assert bytes(view[200:203]) == b"xyz"
        assert device.dma_mappings == {iova: (mem.address, mem.size)}
        with pytest.raises(VfioError) as e:
            device.dma_map(mem.address, iova, PAGE, mem.fd, 0)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(ValueError):
            device.dma_map(mem.address, iova + (2 << 20), PAGE, -1, 0)  # vfio-user needs the fd
        device.unmap_memory(mem)
        assert model.calls[-1] == ("dma_unmap", iova, mem.size)
        assert not model.dma and device.dma_mappings == {}
    finally:
        mem.close()


def test_reset(device, model):
    device.enable_bus_master()
    device.reset()
    assert model.resets == 1
    assert not device.bus_master_enabled()


def test_reset_refused_when_the_device_has_none(sock_dir):
    m = ToyModel(reset=False)
    path = os.path.join(sock_dir, "s")
    try:
        with VfioUserServer(m, path) as server:
            server.serve_in_thread()
            with VfioUserAccess.connect(path) as dev:
                with pytest.raises(VfioError) as e:
                    dev.reset()
                assert e.value.errno == errno.ENOTSUP and m.resets == 0
    finally:
        m.close()


def test_model_exceptions_become_error_replies(device, model):
    model.fail[0x50] = ValueError("bad offset")
    model.fail[0x54] = RuntimeError("model bug")
    model.fail[0x58] = OSError(errno.EBUSY, "busy")
    with pytest.raises(VfioError) as e:
        device.config_read(0x50, 4)
    assert e.value.errno == errno.EINVAL and "Invalid argument" in str(e.value) and "REGION_READ" in str(e.value)
    with pytest.raises(VfioError) as e:
        device.config_read(0x54, 4)
    assert e.value.errno == errno.EIO
    with pytest.raises(VfioError) as e:
        device.config_read(0x58, 4)
    assert e.value.errno == errno.EBUSY
    assert device.config_read_int(0, 2) == 0x1AF4  # the connection goes on
    assert device.broken is None


def test_requests_from_several_threads(device, model):
    errors: list[BaseException] = []

    def reader(offset: int) -> None:
        try:
            for _ in range(100):
                assert device.config_read_int(offset, 2) in (0x1AF4, 0x1041)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(2 * (i % 2),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and not any(t.is_alive() for t in threads)


def test_close_while_another_thread_waits(device, model):
    model.block = threading.Event()
    result: list[BaseException] = []

    def waiter() -> None:
        try:
            device.config_read(0x40, 4)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    assert wait_for(lambda: ("read", 7, 0x40, 4) in model.calls)
    start = time.monotonic()
    device.close()
    assert time.monotonic() - start < 1.0
    t.join(2)
    assert not t.is_alive() and isinstance(result[0], VfioError)
    model.block.set()
    with pytest.raises(VfioError) as e:
        device.config_read(0, 4)
    assert e.value.errno == errno.EBADF


def test_a_second_client_is_refused_while_one_is_connected(device, served):
    _model, server, path = served
    with pytest.raises(VfioError) as e:
        VfioUserAccess.connect(path, timeout=2.0)
    assert "one client at a time" in str(e.value)
    assert server.refused == 1
    assert device.config_read_int(0, 2) == 0x1AF4


def test_server_accepts_the_next_client(served):
    model, server, path = served
    for _ in range(3):
        with VfioUserAccess.connect(path) as dev:
            assert dev.config_read_int(0, 2) == 0x1AF4
        assert wait_for(lambda: not server.connected)
    assert model.gone_count == 3 and server.sessions == 3


def test_server_close_ends_the_session_and_the_client_fails_fast(served):
    model, server, path = served
    dev = VfioUserAccess.connect(path)
    try:
        mapping = dev.map_region(0)
        server.close()
        assert model.gone.is_set()
        start = time.monotonic()
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        assert time.monotonic() - start < 1.0
        assert "closed the connection" in str(e.value) or "gone" in str(e.value)
        assert not dev.alive
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        assert e.value.errno == errno.EPIPE and "broken" in str(e.value)
        mapping.write(0, 4, 1)  # the memfd outlives the server: no SIGBUS
    finally:
        dev.close()


# ---------------------------------------------------------------------------
# the socket file
# ---------------------------------------------------------------------------


def test_socket_is_created_0600_and_removed_on_close(model, sock_dir):
    path = os.path.join(sock_dir, "s")
    old = os.umask(0)
    try:
        server = VfioUserServer(model, path)
    finally:
        os.umask(old)
    st_ = os.lstat(path)
    assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600
    server.close()
    assert not os.path.exists(path)
    server.close()  # idempotent


def test_socket_mode_can_be_widened(model, sock_dir):
    path = os.path.join(sock_dir, "s")
    with VfioUserServer(model, path, mode=0o660):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    assert not os.path.exists(path)


def test_server_refuses_to_replace_a_file_that_is_not_a_socket(model, sock_dir):
    path = os.path.join(sock_dir, "s")
    Path(path).write_text("precious")
    with pytest.raises(VfioError) as e:
        VfioUserServer(model, path)
    assert e.value.errno == errno.EEXIST and "not a socket" in str(e.value)
    assert Path(path).read_text() == "precious"
    os.unlink(path)


def test_server_replaces_a_stale_socket_but_not_a_live_one(model, sock_dir):
    path = os.path.join(sock_dir, "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with VfioUserServer(model, path) as server:
        server.serve_in_thread()
        with pytest.raises(VfioError) as e:
            VfioUserServer(model, path)
        assert e.value.errno == errno.EADDRINUSE
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_socket_chmod_does_not_follow_a_symlink(model, sock_dir, monkeypatch):
    """Someone swaps the new socket file for a symlink to a file of ours between bind and
    chmod: the server must not change that file's mode (it refuses, and removes nothing)."""
    path = os.path.join(sock_dir, "s")
    victim = os.path.join(sock_dir, "victim")
    Path(victim).write_text("secret")
    os.chmod(victim, 0o600)
    plant_symlink_after_bind(monkeypatch, path, victim)
    old = os.umask(0o077)  # the umask takes the bits mode= asks for: a chmod is needed after bind
    try:
        with pytest.raises(VfioError) as e:
            VfioUserServer(model, path, mode=0o666)
    finally:
        os.umask(old)
        monkeypatch.undo()
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    assert os.path.islink(path) and Path(victim).read_text() == "secret"
    assert e.value.errno == errno.EEXIST and "symlink" in str(e.value)
    os.unlink(path)
    old = os.umask(0o077)  # without the swap, the mode is exactly what was asked, umask or not
    try:
        with VfioUserServer(model, path, mode=0o666):
            st_ = os.lstat(path)
            assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o666
    finally:
        os.umask(old)


def test_socket_path_too_long(model, sock_dir):
    with pytest.raises(VfioError) as e:
        VfioUserServer(model, os.path.join(sock_dir, "x" * 120))
    assert e.value.errno == errno.ENAMETOOLONG


def test_connect_errors_are_clear(sock_dir):
    with pytest.raises(VfioError) as e:
        VfioUserAccess.connect(os.path.join(sock_dir, "nothing"))
    assert e.value.errno == errno.ENOENT and "pmd sim --socket" in str(e.value)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.path.join(sock_dir, "stale"))
    stale.close()
    with pytest.raises(VfioError) as e:
        VfioUserAccess.connect(os.path.join(sock_dir, "stale"))
    assert e.value.errno == errno.ECONNREFUSED


# ---------------------------------------------------------------------------
# processes that die
# ---------------------------------------------------------------------------

SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_vfio_user import ToyModel
    from pmd.sim.server import VfioUserServer
    model = ToyModel()
    model.sleep_at_0x40 = 60.0
    server = VfioUserServer(model, {path!r})
    print("ready", flush=True)
    server.serve_forever()
    """
)

CLIENT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    import pmd
    from pmd.driver.access.vfio_user import VfioUserAccess
    dev = VfioUserAccess.connect({path!r})
    mem = pmd.DmaMemory(1 << 20, lock=False)
    dev.map_memory(mem)
    fds = [os.eventfd(0), os.eventfd(0)]
    dev.set_irqs(2, 0, fds)
    bar = dev.map_region(0)
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def server_process(sock_dir):
    """A vfio-user server (ToyModel, slow at config 0x40) in a process of its own: (proc, path)."""
    path = os.path.join(sock_dir, "s")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT.format(root=str(ROOT), path=path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc, path
    finally:
        proc.kill()
        proc.wait(5)


def test_server_killed_in_the_middle_of_a_request(server_process):
    proc, path = server_process
    dev = VfioUserAccess.connect(path, timeout=10.0)
    try:
        bar = dev.map_region(0).mmio(0, PAGE)
        bar.write32(0, 0x1234)
        killed_at: list[float] = []

        def kill() -> None:
            time.sleep(0.3)
            killed_at.append(time.monotonic())
            proc.kill()

        threading.Thread(target=kill).start()
        with pytest.raises(VfioError) as e:
            dev.config_read(0x40, 4)  # the server sleeps in the model: killed while it does
        assert time.monotonic() - killed_at[0] < 1.0
        assert e.value.errno == errno.ECONNRESET and "closed the connection" in str(e.value)
        assert not dev.alive and dev.broken
        assert bar.read32(0) == 0x1234  # the BAR's memfd outlives the server
    finally:
        dev.close()


def test_server_killed_while_idle_is_noticed_without_a_request(server_process):
    proc, path = server_process
    with VfioUserAccess.connect(path) as dev:
        assert dev.alive
        proc.kill()
        proc.wait(5)
        assert wait_for(lambda: not dev.alive, 1.0)
        with pytest.raises(VfioError):
            dev.check_alive()
        start = time.monotonic()
        with pytest.raises(VfioError):
            dev.config_read(0, 4)
        assert time.monotonic() - start < 1.0


def test_on_lost_is_called_once_when_the_server_goes(server_process):
    proc, path = server_process
    with VfioUserAccess.connect(path) as dev:
        calls: list[tuple[str, float]] = []
        dev.on_lost(lambda why: calls.append(("a", time.monotonic())))
        cancel_b = dev.on_lost(lambda why: calls.append(("b", time.monotonic())))
        dev.on_lost(lambda why: 1 / 0)           # a failing callback does not stop the others
        dev.on_lost(lambda why: calls.append((why, time.monotonic())))
        cancel_b()
        for _ in range(20):                      # replies to requests do not wake the watcher
            assert dev.config_read_int(0, 2) == 0x1AF4
        assert calls == []
        proc.kill()
        killed = time.monotonic()
        assert wait_for(lambda: len(calls) == 2, 1.0)
        assert [c[0] for c in calls] == ["a", "the server closed the connection"]
        assert all(t - killed < 1.0 for _, t in calls)
        late: list[str] = []
        dev.on_lost(late.append)                 # after the loss: told at once
        assert late == ["the server closed the connection"]
        time.sleep(0.1)
        assert len(calls) == 2                   # once only


def test_closing_the_device_stops_the_watcher_without_calling_back(served):
    _model, _server, path = served
    threads = threading.active_count()
    calls: list[str] = []
    dev = VfioUserAccess.connect(path)
    fds = open_fds()
    dev.on_lost(calls.append)
    assert threading.active_count() == threads + 1 and open_fds() == fds + 2   # a dup'd socket, an eventfd
    dev.close()
    assert threading.active_count() == threads and calls == []
    with pytest.raises(VfioError, match="closed"):
        dev.on_lost(calls.append)


def test_client_that_disappears_is_cleaned_up(served):
    model, server, path = served
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT.format(root=str(ROOT), path=path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    baseline = open_fds()  # with the pipe from the child
    before = fd_listing()
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert len(model.irq_fds) == 2 and len(model.dma) == 1
        # the connection, the two eventfds, the model's mapping of the DMA memfd (mmap keeps a dup)
        assert open_fds() == baseline + 4, (before, fd_listing())
        proc.kill()
        proc.wait(5)
        assert model.gone.wait(1.0)
        assert not model.irq_fds and not model.dma
        assert wait_for(lambda: open_fds() == baseline)
    finally:
        proc.kill()
        proc.wait(5)
    with VfioUserAccess.connect(path) as dev:  # and the next client is served
        assert dev.config_read_int(0, 2) == 0x1AF4


def _fd_numbers() -> set[str]:
    """This process's open fds, without the one listing them (gone when readlink runs)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        out.add(fd)
    return out


def test_no_fd_leaks(sock_dir):
    import gc

    import pmd

    # By fd number, not by count: an fd of an earlier test that its garbage or a
    # thread of its own closes meanwhile must not look like one of ours (CI saw 40 == 41).
    gc.collect()
    baseline = _fd_numbers()
    m = ToyModel()
    path = os.path.join(sock_dir, "s")
    server = VfioUserServer(m, path)
    server.serve_in_thread()
    e0, e1 = os.eventfd(0), os.eventfd(0)
    mem = pmd.DmaMemory(1 << 20, lock=False)
    for _ in range(3):
        dev = VfioUserAccess.connect(path)
        dev.map_region(0).mmio(0, 64).write32(0, 1)
        dev.map_region(1)
        dev.map_memory(mem)
        dev.set_irqs(PCI_MSIX_IRQ_INDEX, 0, [e0, e1])
        dev.config_read(0, 256)
        dev.close()
        assert wait_for(lambda: not server.connected)
    assert not m.irq_fds and not m.dma
    mem.close()
    os.close(e0)
    os.close(e1)
    server.close()
    m.close()
    assert wait_for(lambda: not (_fd_numbers() - baseline)), sorted(_fd_numbers() - baseline)


# ---------------------------------------------------------------------------
# a raw client against the server: malformed messages
# ---------------------------------------------------------------------------


class RawClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.next_id = 100

    def send_raw(self, data: bytes, fds=()) -> None:
        p.send_message(self.sock, data, fds, time.monotonic() + 2)

    def send(self, cmd, payload=b"", *, fds=(), flags=p.TYPE_COMMAND, msg_id=None, error=0) -> int:
        if msg_id is None:
            msg_id = self.next_id
            self.next_id += 1
        self.send_raw(p.encode_message(msg_id, cmd, payload, flags, error), fds)
        return msg_id

    def recv(self, timeout: float = 2.0):
        msg = p.recv_message(self.sock, deadline=time.monotonic() + timeout, max_size=p.max_message_size())
        assert msg is not None, "the server closed the connection"
        return msg

    def call(self, cmd, payload=b"", **kw):
        msg_id = self.send(cmd, payload, **kw)
        reply = self.recv()
        assert reply.msg_id == msg_id and reply.command == cmd and reply.is_reply
        return reply

    def negotiate(self) -> None:
        reply = self.call(p.VFIO_USER_VERSION, p.encode_version(0, 1, p.Capabilities()))
        assert not reply.is_error

    def dropped(self, timeout: float = 2.0) -> bool:
        """Whether the server closed the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    return True
        except (TimeoutError, socket.timeout):
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(served):
    _model, _server, path = served
    client = RawClient(path)
    yield client
    client.close()


def error_of(reply) -> int:
    assert reply.is_error and reply.payload == b""
    return reply.error


def test_server_wants_version_first(served, raw):
    model, server, path = served
    reply = raw.call(p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request())
    assert error_of(reply) == errno.EINVAL
    assert raw.dropped()
    assert model.gone.wait(1)
    with VfioUserAccess.connect(path) as dev:
        assert dev.config_read_int(0, 2) == 0x1AF4


def test_server_refuses_another_major_version(raw):
    reply = raw.call(p.VFIO_USER_VERSION, p.encode_version(1, 0, None))
    assert error_of(reply) == errno.ENOTSUP
    assert raw.dropped()


@pytest.mark.parametrize(
    "payload",
    [
        b"\0",  # shorter than major/minor
        struct.pack("=HH", 0, 1) + b"{not json}\0",
        struct.pack("=HH", 0, 1) + b"[1, 2]\0",
        struct.pack("=HH", 0, 1) + b'{"capabilities": {"max_msg_fds": 0}}\0',
        struct.pack("=HH", 0, 1) + b'{"capabilities": {"max_data_xfer_size": "big"}}\0',
        struct.pack("=HH", 0, 1) + b'{"capabilities": 5}\0',
        struct.pack("=HH", 0, 1) + b'{"a":1}\0junk\0',
    ],
)
def test_server_rejects_a_bad_version_proposal(raw, payload):
    reply = raw.call(p.VFIO_USER_VERSION, payload)
    assert error_of(reply) == errno.EINVAL
    assert raw.dropped()


def test_server_answers_version_only_once(raw):
    raw.negotiate()
    reply = raw.call(p.VFIO_USER_VERSION, p.encode_version(0, 1, None))
    assert error_of(reply) == errno.EINVAL


def test_server_rejects_malformed_commands_and_goes_on(raw, model):
    raw.negotiate()
    cases = [
        (99, b"", errno.ENOSYS),  # unknown command
        (p.VFIO_USER_DEVICE_GET_INFO, b"\0" * 8, errno.EINVAL),  # short payload
        (p.VFIO_USER_DEVICE_GET_INFO, struct.pack("=IIII", 16, 1, 0, 0), errno.EINVAL),  # non-zero field
        (p.VFIO_USER_DEVICE_GET_REGION_INFO, p.encode_region_info_request(50, 64), errno.EINVAL),  # no region 50
        (p.VFIO_USER_DEVICE_GET_REGION_INFO, p.encode_region_info_request(0, 8), errno.EINVAL),  # argsz too small
        (p.VFIO_USER_DEVICE_GET_IRQ_INFO, p.encode_irq_info_request(9), errno.EINVAL),
        (p.VFIO_USER_REGION_READ, p.encode_region_access(0, 7, 0), errno.EINVAL),  # count 0
        (p.VFIO_USER_REGION_READ, p.encode_region_access(250, 7, 8), errno.EINVAL),  # past the end
        (p.VFIO_USER_REGION_READ, p.encode_region_access(0, 7, 4) + b"xx", errno.EINVAL),  # trailing bytes
        (p.VFIO_USER_REGION_READ, p.encode_region_access(0, 7, (1 << 20) + 1), errno.E2BIG),
        (p.VFIO_USER_REGION_READ, p.encode_region_access(0, 3, 4), errno.EINVAL),  # empty region
        (p.VFIO_USER_REGION_READ, p.encode_region_access(2**64 - 2, 7, 4), errno.EINVAL),  # wraps
        (p.VFIO_USER_REGION_WRITE, p.encode_region_access(0, 7, 8, b"1234"), errno.EINVAL),  # short data
        (p.VFIO_USER_REGION_WRITE, p.encode_region_access(0, 2, 4, b"1234"), errno.EACCES),  # read-only
        (p.VFIO_USER_DEVICE_SET_IRQS, struct.pack("=IIIII", 99, 0x24, 2, 0, 1), errno.EINVAL),  # argsz
        (p.VFIO_USER_DEVICE_SET_IRQS, p.encode_set_irqs(0x26, 2, 0, 1), errno.EINVAL),  # two DATA bits
        (p.VFIO_USER_DEVICE_SET_IRQS, p.encode_set_irqs(0x104, 2, 0, 1), errno.EINVAL),  # unknown bit
        (p.VFIO_USER_DEVICE_SET_IRQS, p.encode_set_irqs(0x24, 2, 1, 5), errno.EINVAL),  # too many vectors
        (p.VFIO_USER_DEVICE_SET_IRQS, p.encode_set_irqs(0x24, 7, 0, 1), errno.EINVAL),  # no IRQ index 7
        (
            p.VFIO_USER_DEVICE_SET_IRQS,
            p.encode_set_irqs(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 2, b"\1"),
            errno.EINVAL,
        ),
        (
            p.VFIO_USER_DEVICE_SET_IRQS,
            p.encode_set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, 0, 0, 1),
            errno.ENOTSUP,
        ),
        (p.VFIO_USER_DMA_MAP, b"\0" * 31, errno.EINVAL),
        (p.VFIO_USER_DMA_MAP, struct.pack("=IIQQQ", 32, 8, 0, 0, PAGE), errno.EINVAL),  # unknown flag
        (p.VFIO_USER_DMA_MAP, p.encode_dma_map(0x10000, PAGE, 0), errno.ENOTSUP),  # no fd
        (p.VFIO_USER_DMA_UNMAP, p.encode_dma_unmap(0x10000, PAGE), errno.ENOENT),  # nothing mapped
        (p.VFIO_USER_DMA_UNMAP, p.encode_dma_unmap(0x10000, PAGE, flags=1), errno.ENOTSUP),  # dirty bitmap
        (p.VFIO_USER_DEVICE_RESET, b"x", errno.EINVAL),
        (p.VFIO_USER_DEVICE_GET_REGION_IO_FDS, b"\0" * 16, errno.ENOTSUP),
        (p.VFIO_USER_DMA_READ, b"\0" * 16, errno.EINVAL),  # server -> client only
    ]
    for cmd, payload, expected in cases:
        reply = raw.call(cmd, payload)
        assert error_of(reply) == expected, (p.command_name(cmd), payload, reply.error)
    # reserved flag bits, the error bit on a command
    assert error_of(raw.call(p.VFIO_USER_DEVICE_RESET, flags=0x100)) == errno.EINVAL
    assert error_of(raw.call(p.VFIO_USER_DEVICE_RESET, flags=p.FLAG_ERROR)) == errno.EINVAL
    assert error_of(raw.call(p.VFIO_USER_DEVICE_RESET, flags=3)) == errno.EINVAL  # message type 3
    assert model.resets == 0 and not any(c[0] == "write" for c in model.calls)
    # still serving
    reply = raw.call(p.VFIO_USER_REGION_READ, p.encode_region_access(0, 7, 2))
    assert not reply.is_error and reply.payload[16:] == b"\xf4\x1a"


def test_server_region_info_reply(raw, model):
    raw.negotiate()
    reply = raw.call(p.VFIO_USER_DEVICE_GET_REGION_INFO, p.encode_region_info_request(0, 1024))
    try:
        assert len(reply.fds) == 1 and os.path.samestat(os.fstat(reply.fds[0]), os.fstat(model.bar0_fd))
        argsz, info = p.decode_region_info(reply.payload, 0)
        assert argsz == len(reply.payload) == 32 + 16 + 16
        assert info.sparse_areas is not None and [(a.offset, a.size) for a in info.sparse_areas] == [(0, PAGE)]
    finally:
        reply.close_fds()
    # too small an argsz for the capability: the fixed part and the size needed
    reply = raw.call(p.VFIO_USER_DEVICE_GET_REGION_INFO, p.encode_region_info_request(1, 32))
    reply.close_fds()
    argsz, info = p.decode_region_info(reply.payload, 1)
    assert len(reply.payload) == 32 and argsz == 32 + 16 + 16 * BAR1_AREAS
    # a region that is not mappable comes without an fd
    reply = raw.call(p.VFIO_USER_DEVICE_GET_REGION_INFO, p.encode_region_info_request(7, 1024))
    assert reply.fds == [] and not p.decode_region_info(reply.payload, 7)[1].mmappable


def test_server_drops_a_connection_with_broken_framing(served):
    model, server, path = served
    for bad in (
        struct.pack("=HHIII", 1, 1, 8, 0, 0),  # size smaller than the header
        struct.pack("=HHIII", 1, 1, 1 << 30, 0, 0),  # size far above the limit
    ):
        client = RawClient(path)
        client.send_raw(bad)
        assert client.dropped()
        client.close()
        assert wait_for(lambda: not server.connected)
    assert model.gone_count == 2
    with VfioUserAccess.connect(path) as dev:
        assert dev.config_read_int(0, 2) == 0x1AF4


def test_server_drops_a_truncated_message(served):
    model, server, path = served
    client = RawClient(path)
    client.negotiate()
    client.send_raw(p.encode_header(5, p.VFIO_USER_REGION_WRITE, 20) + b"\0" * 6)
    client.close()  # gone in the middle of the message
    assert model.gone.wait(1)
    assert wait_for(lambda: not server.connected)


def test_server_drops_a_client_stalled_inside_a_message(model, sock_dir):
    path = os.path.join(sock_dir, "s")
    with VfioUserServer(model, path, timeout=0.3) as server:
        server.serve_in_thread()
        client = RawClient(path)
        client.negotiate()
        client.send_raw(p.encode_header(5, p.VFIO_USER_REGION_WRITE, 20) + b"\0" * 6)
        start = time.monotonic()
        assert client.dropped(2.0)
        assert time.monotonic() - start < 1.5
        client.close()
        assert model.gone.wait(1)


def test_server_closes_fds_a_message_did_not_use(raw):
    raw.negotiate()
    baseline = open_fds()
    r, w = os.pipe()
    efds = [os.eventfd(0) for _ in range(p.MAX_MSG_FDS + 1)]
    try:
        # an fd with a command that takes none
        reply = raw.call(p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request(), fds=[r])
        assert not reply.is_error
        # more fds than max_msg_fds: E2BIG, all of them dropped
        reply = raw.call(p.VFIO_USER_DEVICE_SET_IRQS, p.encode_set_irqs(0x24, 2, 0, 2), fds=efds)
        assert error_of(reply) == errno.E2BIG
        # not an eventfd for an interrupt
        reply = raw.call(p.VFIO_USER_DEVICE_SET_IRQS, p.encode_set_irqs(0x24, 2, 0, 1), fds=[r])
        assert error_of(reply) == errno.EINVAL
        # fd count does not match count
        reply = raw.call(p.VFIO_USER_DEVICE_SET_IRQS, p.encode_set_irqs(0x24, 2, 0, 2), fds=efds[:1])
        assert error_of(reply) == errno.EINVAL
        # DMA_MAP of a pipe, of a file too small, two fds
        reply = raw.call(p.VFIO_USER_DMA_MAP, p.encode_dma_map(0x10000, PAGE, 0), fds=[r])
        assert error_of(reply) == errno.EINVAL
        small = create_sealed_memfd("small", PAGE)
        reply = raw.call(p.VFIO_USER_DMA_MAP, p.encode_dma_map(0x10000, 2 * PAGE, 0), fds=[small])
        assert error_of(reply) == errno.EINVAL
        reply = raw.call(p.VFIO_USER_DMA_MAP, p.encode_dma_map(0x10000, PAGE, 0), fds=[small, small])
        assert error_of(reply) == errno.EINVAL
        os.close(small)
        assert open_fds() == baseline + 2 + len(efds)  # only ours: the server kept none
    finally:
        os.close(r)
        os.close(w)
        for fd in efds:
            os.close(fd)
    assert open_fds() == baseline


def test_server_dma_map_overlap_and_unmap_echo(raw, model):
    raw.negotiate()
    mem = create_sealed_memfd("dma", 4 * PAGE)
    try:
        assert not raw.call(p.VFIO_USER_DMA_MAP, p.encode_dma_map(0x100000, 2 * PAGE, 0), fds=[mem]).is_error
        reply = raw.call(p.VFIO_USER_DMA_MAP, p.encode_dma_map(0x101000, 2 * PAGE, 2 * PAGE), fds=[mem])
        assert error_of(reply) == errno.EEXIST
        reply = raw.call(p.VFIO_USER_DMA_UNMAP, p.encode_dma_unmap(0x100000, PAGE))  # not the whole mapping
        assert error_of(reply) == errno.ENOENT
        reply = raw.call(p.VFIO_USER_DMA_UNMAP, p.encode_dma_unmap(0x100000, 2 * PAGE))
        assert not reply.is_error
        assert p.decode_dma_unmap(reply.payload) == p.DmaUnmap(24, 0, 0x100000, 2 * PAGE)
        assert not model.dma
    finally:
        os.close(mem)


def unsealed_files():
    """Files a careless peer might send, none sealed against shrinking: (name, fd)."""
    plain = os.memfd_create("plain", os.MFD_CLOEXEC)  # no MFD_ALLOW_SEALING: F_SEAL_SEAL only
    sealable = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)  # could be, is not
    growonly = os.memfd_create("grow", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    tmp = tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    files = [("memfd", plain), ("sealable memfd", sealable), ("memfd sealed against growing only", growonly),
             ("file", os.dup(tmp.fileno()))]
    tmp.close()
    for _name, fd in files:
        os.ftruncate(fd, 4 * PAGE)
    import fcntl

    fcntl.fcntl(growonly, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    return files


def test_server_refuses_an_unsealed_dma_fd(raw, model):
    raw.negotiate()
    files = unsealed_files()
    try:
        for name, fd in files:
            reply = raw.call(p.VFIO_USER_DMA_MAP, p.encode_dma_map(0x100000, 2 * PAGE, 0), fds=[fd])
            assert error_of(reply) == errno.EPERM, name
        assert not any(c[0] == "dma_map" for c in model.calls)  # the model never saw them
        sealed = create_sealed_memfd("sealed", 4 * PAGE)
        try:
            assert not raw.call(p.VFIO_USER_DMA_MAP, p.encode_dma_map(0x100000, 2 * PAGE, 0), fds=[sealed]).is_error
        finally:
            os.close(sealed)
    finally:
        for _name, fd in files:
            os.close(fd)


def test_device_model_refuses_an_unsealed_dma_fd():
    # The built-in device's own check, where it mmaps (LocalAccess reaches it with no server).
    from pmd.sim.model import VirtioNetModel
    from pmd.sim.dma import PROT_RW

    files = unsealed_files()
    try:
        with VirtioNetModel() as dev:
            for name, fd in files:
                with pytest.raises(OSError) as e:
                    dev.dma_map(0x100000, 2 * PAGE, fd, 0, PROT_RW)
                assert e.value.errno == errno.EPERM and "F_SEAL_SHRINK" in str(e.value), name
            sealed = create_sealed_memfd("sealed", 2 * PAGE)
            try:
                with pytest.raises(OSError) as e:
                    dev.dma_map(0x100000, 4 * PAGE, sealed, 0, PROT_RW)  # longer than the file
                assert e.value.errno == errno.EINVAL and "SIGBUS" in str(e.value)
                dev.dma_map(0x100000, 2 * PAGE, sealed, 0, PROT_RW)
                assert len(dev.dma) == 1
            finally:
                os.close(sealed)
    finally:
        for _name, fd in files:
            os.close(fd)


def test_device_bar_memfd_is_sealed_against_shrinking():
    from pmd.sim.model import VirtioNetModel
    from pmd.memory.seals import SEALS, seals_of

    with VirtioNetModel() as dev:
        assert seals_of(dev.bar_fd) & SEALS == SEALS
        with pytest.raises(PermissionError):
            os.ftruncate(dev.bar_fd, 0)


def test_truncating_shared_memory_cannot_kill_the_device():
    """A hostile driver truncates the BAR memfd it was given and the DMA memfd it handed over;
    the built-in device process (which maps both) must refuse to be shrunk under and live on."""
    import pmd
    from pmd.sim.process import spawn_device

    with spawn_device() as sim:
        dev = VfioUserAccess.connect(sim.socket_path)
        try:
            dev.region_info(0)
            bar_fd = dev._res.region_fds[0]
            with pytest.raises(PermissionError):
                os.ftruncate(bar_fd, 0)
            mem = pmd.DmaMemory(1 << 20, lock=False)
            dev.map_memory(mem)
            with pytest.raises(PermissionError):
                os.ftruncate(mem.fd, 0)
            files = unsealed_files()  # and memory it could shrink later is not taken at all
            try:
                for name, fd in files:
                    with pytest.raises(VfioError) as e:
                        dev.dma_map(0, 0x10000000, 2 * PAGE, fd)
                    assert e.value.errno == errno.EPERM, name
            finally:
                for _name, fd in files:
                    os.close(fd)
            assert dev.config_read_int(0, 2) == 0x1AF4
        finally:
            dev.close()  # the device resets its notify area (a store into the BAR memfd) and its maps
        mem.close()
        time.sleep(0.2)
        assert sim.running, sim.log_text()
        with VfioUserAccess.connect(sim.socket_path) as again:  # and serves the next driver
            assert again.config_read_int(0, 2) == 0x1AF4


def test_server_counts_every_bad_message(served, raw):
    _model, server, _path = served
    before = server.stats()
    raw.negotiate()
    assert error_of(raw.call(99)) == errno.ENOSYS
    assert error_of(raw.call(p.VFIO_USER_REGION_READ, p.encode_region_access(0, 7, 0))) == errno.EINVAL
    r, w = os.pipe()
    try:
        assert not raw.call(p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request(), fds=[r, w]).is_error
    finally:
        os.close(r)
        os.close(w)
    raw.send(p.VFIO_USER_REGION_READ, p.encode_region_access(0, 7, 0), flags=p.FLAG_NO_REPLY)
    raw.send(p.VFIO_USER_DEVICE_GET_INFO, flags=p.TYPE_REPLY)
    assert not raw.call(p.VFIO_USER_DEVICE_GET_INFO, p.encode_device_info_request()).is_error
    raw.send_raw(struct.pack("<HHIII", 1, 1, 8, 0, 0))  # size below the header: dropped
    assert raw.dropped()
    assert wait_for(lambda: not server.connected)
    after = server.stats()
    delta = {k: after[k] - before[k] for k in ("messages", "error_replies", "silent_errors", "dropped",
                                                "ignored_replies", "unused_fds")}
    assert delta == {"messages": 8, "error_replies": 2, "silent_errors": 1, "dropped": 1,
                     "ignored_replies": 1, "unused_fds": 2}
    assert after["errnos"] == {"EINVAL": 2, "ENOSYS": 1}


def test_server_ignores_replies_and_honours_no_reply(raw, model):
    raw.negotiate()
    raw.send(p.VFIO_USER_DEVICE_GET_INFO, flags=p.TYPE_REPLY)  # a reply nobody asked for: ignored
    raw.send(p.VFIO_USER_REGION_WRITE, p.encode_region_access(0x40, 7, 2, b"ok"), flags=p.FLAG_NO_REPLY)
    raw.send(p.VFIO_USER_REGION_WRITE, p.encode_region_access(250, 7, 8, b"x" * 8), flags=p.FLAG_NO_REPLY)
    reply = raw.call(p.VFIO_USER_REGION_READ, p.encode_region_access(0x40, 7, 2))
    assert not reply.is_error and reply.payload[16:] == b"ok"  # the first reply is this one


# ---------------------------------------------------------------------------
# a fake server against the client: malformed replies
# ---------------------------------------------------------------------------


class FakeServer:
    """Answers like a minimal device unless ``hook(msg)`` returns something else to do.

    A hook returns ``None`` (answer normally), ``("send", bytes, fds)``, ``("silent",)``
    or ``("close",)``.
    """

    def __init__(self, hook=None) -> None:
        self.client_sock, self.sock = socket.socketpair()
        self.hook = hook
        self.received: list[p.Message] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def answer(self, msg: p.Message):
        cmd = msg.command
        payload = b""
        if cmd == p.VFIO_USER_VERSION:
            payload = p.encode_version(0, 1, p.Capabilities(max_msg_fds=4, max_data_xfer_size=4096))
        elif cmd == p.VFIO_USER_DEVICE_GET_INFO:
            payload = p.encode_device_info(VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET, 9, 5)
        elif cmd == p.VFIO_USER_DEVICE_GET_REGION_INFO:
            argsz, index = p.decode_region_info_request(msg.payload)
            size = 256 if index == 7 else 0
            payload = p.encode_region_info(index, RW if size else 0, size, 0, None, argsz)
        elif cmd == p.VFIO_USER_REGION_READ:
            a = p.decode_region_access(msg.payload, "read", with_data=False, max_count=4096)
            payload = p.encode_region_access(a.offset, a.region, a.count, b"\x11" * a.count)
        elif cmd == p.VFIO_USER_DEVICE_GET_IRQ_INFO:
            index = p.decode_irq_info_request(msg.payload)
            payload = p.encode_irq_info(index, IRQ_INFO_EVENTFD, 2 if index == 2 else 0)
        return p.encode_message(msg.msg_id, cmd, payload, p.TYPE_REPLY)

    def run(self) -> None:
        while True:
            try:
                msg = p.recv_message(self.sock, deadline=None, max_size=p.max_message_size())
            except (p.MessageError, OSError):
                return
            if msg is None:
                return
            msg.close_fds()
            self.received.append(msg)
            action = self.hook(msg) if self.hook else None
            try:
                if action is None:
                    p.send_message(self.sock, self.answer(msg))
                elif action[0] == "send":
                    p.send_message(self.sock, action[1], action[2] if len(action) > 2 else ())
                elif action[0] == "close":
                    self.sock.close()
                    return
            except OSError:
                return

    def device(self, timeout: float = 1.0) -> VfioUserAccess:
        return VfioUserAccess.from_socket(self.client_sock, name="fake", timeout=timeout)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(2)
        self.sock.close()
        self.client_sock.close()


def on_read(reply_for):
    """A hook that answers REGION_READ with ``reply_for(msg)``."""

    def hook(msg):
        if msg.command == p.VFIO_USER_REGION_READ:
            return reply_for(msg)
        return None

    return hook


def reply_header(msg, size_delta=0, *, flags=p.TYPE_REPLY, error=0, msg_id=None, command=None, payload=b""):
    head = struct.pack(
        "=HHIII",
        msg.msg_id if msg_id is None else msg_id,
        msg.command if command is None else command,
        p.HEADER_SIZE + len(payload) + size_delta,
        flags,
        error,
    )
    return head + payload


def good_read_payload(msg):
    a = p.decode_region_access(msg.payload, "read", with_data=False, max_count=4096)
    return p.encode_region_access(a.offset, a.region, a.count, b"\x22" * a.count)


@pytest.fixture
def fake():
    servers: list[FakeServer] = []

    def make(hook=None) -> FakeServer:
        s = FakeServer(hook)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def test_client_against_the_fake_server(fake):
    dev = fake().device()
    try:
        assert dev.server_capabilities.max_msg_fds == 4
        assert dev.config_read(0, 4) == b"\x11" * 4
        before = dev.requests
        dev.config_read(0, 256)  # 4096 max: one message
        assert dev.requests - before == 1
    finally:
        dev.close()


@pytest.mark.parametrize(
    "make_reply, err, text",
    [
        (lambda m: ("send", reply_header(m, msg_id=m.msg_id + 1, payload=good_read_payload(m))), errno.EPROTO, "id"),
        (
            lambda m: ("send", reply_header(m, command=p.VFIO_USER_REGION_WRITE, payload=good_read_payload(m))),
            errno.EPROTO,
            "REGION_WRITE",
        ),
        (lambda m: ("send", reply_header(m, -8)), errno.EPROTO, "less than its own"),
        (lambda m: ("send", reply_header(m, 1 << 30)), errno.EMSGSIZE, "more than"),
        (lambda m: ("send", reply_header(m, flags=p.TYPE_REPLY | 0x400)), errno.EPROTO, "reserved"),
        (lambda m: ("send", reply_header(m, flags=p.TYPE_REPLY | p.FLAG_NO_REPLY)), errno.EPROTO, "no-reply"),
    ],
)
def test_client_breaks_the_connection_on_a_bad_reply(fake, make_reply, err, text):
    dev = fake(on_read(make_reply)).device()
    try:
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        assert e.value.errno == err and text in str(e.value)
        assert dev.broken
        start = time.monotonic()
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)  # fails at once, saying why
        assert time.monotonic() - start < 0.1 and e.value.errno == errno.EPIPE and "broken" in str(e.value)
    finally:
        dev.close()


@pytest.mark.parametrize(
    "make_payload, text",
    [
        (lambda m: good_read_payload(m)[:-1], "payload is"),  # one data byte short
        (lambda m: good_read_payload(m) + b"x", "payload is"),  # one too many
        (lambda m: p.encode_region_access(8, 7, 4, b"abcd"), "the reply is for"),  # another offset
        (lambda m: p.encode_region_access(0, 7, 0), "count is 0"),
        (lambda m: b"\0" * 5, "shorter"),
    ],
)
def test_client_rejects_a_wrong_read_reply(fake, make_payload, text):
    dev = fake(on_read(lambda m: ("send", reply_header(m, payload=make_payload(m))))).device()
    try:
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        assert e.value.errno == errno.EPROTO and text in str(e.value)
    finally:
        dev.close()


def test_client_times_out_when_no_reply_comes(fake):
    dev = fake(on_read(lambda m: ("silent",))).device(timeout=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        elapsed = time.monotonic() - start
        assert 0.25 < elapsed < 1.0
        assert e.value.errno == errno.ETIMEDOUT and "no reply to REGION_READ within 0.3 s" in str(e.value)
        assert dev.broken and not dev.alive
    finally:
        dev.close()


def test_client_reports_a_truncated_reply(fake):
    def cut(m):
        return ("send", reply_header(m, payload=good_read_payload(m))[:20])

    server = fake()
    server.hook = on_read(cut)
    dev = server.device(timeout=0.5)
    try:
        # the fake sends 20 of 36 bytes and keeps the socket open: the rest never comes
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        assert e.value.errno == errno.ETIMEDOUT
    finally:
        dev.close()
    server2 = fake()

    def cut_and_close(m):
        p.send_message(server2.sock, reply_header(m, payload=good_read_payload(m))[:20])
        return ("close",)

    server2.hook = on_read(cut_and_close)
    dev = server2.device()
    try:
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        assert e.value.errno == errno.ECONNRESET and "20 of 36 bytes" in str(e.value)
    finally:
        dev.close()


def test_client_turns_error_replies_into_errors(fake):
    dev = fake(on_read(lambda m: ("send", reply_header(m, flags=p.TYPE_REPLY | p.FLAG_ERROR, error=errno.EPERM)))).device()
    try:
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        assert e.value.errno == errno.EPERM and "Operation not permitted" in str(e.value)
        assert "REGION_READ of 4 bytes at 0x0 of region 7" in str(e.value)
        assert dev.broken is None  # an error reply is an answer: the connection goes on
    finally:
        dev.close()


def test_client_closes_the_fds_of_a_reply_with_too_many(fake):
    efds = [os.eventfd(0) for _ in range(p.MAX_MSG_FDS + 4)]
    server = fake(on_read(lambda m: ("send", reply_header(m, payload=good_read_payload(m)), efds)))
    baseline = open_fds() - 1  # the client's end of the socketpair goes with the device
    dev = server.device()
    try:
        with pytest.raises(VfioError) as e:
            dev.config_read(0, 4)
        assert e.value.errno == errno.EPROTO and "more than" in str(e.value)
        with pytest.raises(VfioError):
            dev.config_read(0, 4)
    finally:
        dev.close()
    assert wait_for(lambda: open_fds() == baseline)
    for fd in efds:
        os.close(fd)


def test_client_refuses_commands_from_the_server_and_still_gets_its_reply(fake):
    def dma_read_first(m):
        server_cmd = p.encode_message(7, p.VFIO_USER_DMA_READ, struct.pack("=QQ", 0x1000, 8))
        return ("send", server_cmd + reply_header(m, payload=good_read_payload(m)))

    server = fake(on_read(dma_read_first))
    dev = server.device()
    try:
        assert dev.config_read(0, 4) == b"\x22" * 4
        assert wait_for(lambda: any(m.command == p.VFIO_USER_DMA_READ and m.is_reply for m in server.received))
        refusal = next(m for m in server.received if m.command == p.VFIO_USER_DMA_READ)
        assert refusal.is_error and refusal.error == errno.ENOTSUP and refusal.msg_id == 7
    finally:
        dev.close()


def version_hook(payload):
    def hook(m):
        if m.command == p.VFIO_USER_VERSION:
            return ("send", reply_header(m, payload=payload))
        return None

    return hook


@pytest.mark.parametrize(
    "payload, text",
    [
        (p.encode_version(1, 0, None), "version 1.0"),
        (p.encode_version(0, 2, None), "version 0.2"),
        (struct.pack("=HH", 0, 1) + b"{oops\0", "not UTF-8 JSON"),
        (struct.pack("=HH", 0, 1) + b'{"capabilities":{"max_msg_fds":-1}}\0', "max_msg_fds"),
        (struct.pack("=HH", 0, 1) + b'{"capabilities":{"max_data_xfer_size":true}}\0', "max_data_xfer_size"),
        (b"\0", "shorter"),
    ],
)
def test_client_rejects_a_bad_version_reply(fake, payload, text):
    baseline = open_fds()
    server = fake(version_hook(payload))
    with pytest.raises(VfioError) as e:
        server.device()
    assert e.value.errno == errno.EPROTO and text in str(e.value)
    server.close()
    assert open_fds() == baseline


def test_client_accepts_unknown_capabilities_and_defaults(fake):
    server = fake(version_hook(struct.pack("=HH", 0, 0) + b'{"capabilities":{"twin_socket":{"supported":true}}}\0'))
    dev = server.device()
    try:
        caps = dev.server_capabilities
        assert dev.version == (0, 0)
        assert caps.max_msg_fds == 1 and caps.max_data_xfer_size == 1 << 20
        assert caps.other == {"twin_socket": {"supported": True}}
    finally:
        dev.close()


def region_info_hook(index, build):
    def hook(m):
        if m.command == p.VFIO_USER_DEVICE_GET_REGION_INFO and p.decode_region_info_request(m.payload)[1] == index:
            return build(m)
        return None

    return hook


def test_client_rejects_a_sparse_area_outside_the_region(fake):
    def build(m):
        payload = p.encode_region_info(0, RW | REGION_INFO_FLAG_MMAP, PAGE, 0, [p.SparseArea(0, 2 * PAGE)], 1024)
        return ("send", reply_header(m, payload=payload))

    server = fake(region_info_hook(0, build))
    with pytest.raises(VfioError) as e:
        server.device()
    assert e.value.errno == errno.EPROTO and "outside the region" in str(e.value)


def test_client_rejects_region_info_for_another_index(fake):
    def build(m):
        return ("send", reply_header(m, payload=p.encode_region_info(3, RW, 16, 0, None, 1024)))

    with pytest.raises(VfioError) as e:
        fake(region_info_hook(0, build)).device()
    assert "describes region 3" in str(e.value)


def test_client_will_not_map_a_file_shorter_than_the_region(fake):
    small = create_sealed_memfd("small", PAGE)

    def build(m):
        payload = p.encode_region_info(0, RW | REGION_INFO_FLAG_MMAP, 4 * PAGE, 0, None, 1024)
        return ("send", reply_header(m, payload=payload), [small])

    dev = fake(region_info_hook(0, build)).device()
    try:
        assert dev.region_info(0).mmappable
        with pytest.raises(VfioError) as e:
            dev.map_region(0)
        assert e.value.errno == errno.EINVAL and "SIGBUS" in str(e.value)
    finally:
        dev.close()
        os.close(small)


def test_client_refuses_an_unsealed_region_fd(fake):
    files = unsealed_files()
    for name, fd in files:

        def build(m, fd=fd):
            payload = p.encode_region_info(0, RW | REGION_INFO_FLAG_MMAP, 4 * PAGE, 0, None, 1024)
            return ("send", reply_header(m, payload=payload), [fd])

        server = fake(region_info_hook(0, build))
        baseline = open_fds()
        dev = server.device()
        try:
            with pytest.raises(VfioError) as e:
                dev.map_region(0)
            assert e.value.errno == errno.EPERM, name
            assert "not sealed against shrinking" in str(e.value) and "MFD_ALLOW_SEALING" in str(e.value)
            assert dev.config_read(0, 4) == b"\x11" * 4  # the connection goes on
        finally:
            dev.close()
        assert open_fds() == baseline - 1  # the socketpair's client end went with the device
        os.close(fd)


SHRINKING_SERVER_CLIENT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from pmd.driver.access.vfio_user import VfioUserAccess
    dev = VfioUserAccess.connect({path!r})
    try:
        bar = dev.map_region(0).mmio(0, 4096)
    except Exception as e:
        print("refused", getattr(e, "errno", None), flush=True)
    else:
        print("mapped", flush=True)
        sys.stdin.readline()       # the server truncates its file now
        print("read", bar.read32(0), flush=True)
    dev.close()
    """
)


def test_a_server_that_shrinks_its_bar_cannot_kill_the_driver(sock_dir):
    """A vfio-user server hands out an unsealed BAR memfd and truncates it once the driver
    mapped it: the driver (in a child process, so a SIGBUS shows) must have refused the map."""
    model = ToyModel()
    os.close(model.bar0_fd)
    model.bar0.close()
    model.bar0_fd = os.memfd_create("toy-bar0-unsealed", os.MFD_CLOEXEC)
    os.ftruncate(model.bar0_fd, 3 * PAGE)
    model.bar0 = mmap.mmap(model.bar0_fd, 2 * PAGE, offset=PAGE)
    path = os.path.join(sock_dir, "s")
    with VfioUserServer(model, path) as server:
        server.serve_in_thread()
        proc = subprocess.Popen(
            [sys.executable, "-c", SHRINKING_SERVER_CLIENT.format(root=str(ROOT), path=path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().split()
            if line and line[0] == "mapped":
                model.bar0.close()
                os.ftruncate(model.bar0_fd, 0)  # under the driver's mapping
                proc.stdin.write("\n")
                proc.stdin.flush()
            assert proc.wait(10) == 0, f"the driver died with signal {-proc.returncode}"
            assert line == ["refused", str(errno.EPERM)]
        finally:
            proc.kill()
            proc.wait(5)
    model.bar0 = mmap.mmap(-1, PAGE)  # for model.close()


def test_client_refuses_a_region_too_large_to_reserve(fake):
    # Found by the fuzzer: a huge region size made the address-space reservation fail with a
    # bare OSError (EINVAL/ENOMEM) instead of a VfioError saying what the device claimed.
    bar = create_sealed_memfd("bar", 0x7000)

    def build(m):
        payload = p.encode_region_info(0, RW | REGION_INFO_FLAG_MMAP, 1 << 62, 0, [p.SparseArea(0x6000, PAGE)], 1024)
        return ("send", reply_header(m, payload=payload), [bar])

    dev = fake(region_info_hook(0, build)).device()
    try:
        with pytest.raises(VfioError) as e:
            dev.map_region(0)
        assert e.value.errno == errno.EINVAL and "described it wrongly" in str(e.value)
    finally:
        dev.close()
        os.close(bar)


def test_client_reports_pci_interrupts_and_regions_the_server_does_not_count_as_absent(fake):
    # Found by the fuzzer: a server counting 2 IRQ indexes made Port.start() fail with a
    # ValueError (a caller's mistake) when it asked for MSI-X (index 2), where kernel VFIO
    # would say "none". PCI's own indexes (5 IRQ, 9 regions) are absent, not errors.
    def hook(m):
        if m.command == p.VFIO_USER_DEVICE_GET_INFO:
            return ("send", reply_header(m, payload=p.encode_device_info(VFIO_DEVICE_FLAGS_PCI, 8, 2)))
        return None

    server = fake(hook)
    dev = server.device()
    try:
        before = dev.requests
        msix = dev.irq_info(PCI_MSIX_IRQ_INDEX)
        assert msix.count == 0 and dev.region_info(8).size == 0
        assert dev.requests == before  # nothing to ask
        with pytest.raises(ValueError):
            dev.irq_info(5)
        with pytest.raises(ValueError):
            dev.region_info(9)
    finally:
        dev.close()


def test_client_treats_a_mappable_region_without_fd_as_message_only(fake):
    def build(m):
        return ("send", reply_header(m, payload=p.encode_region_info(0, RW | REGION_INFO_FLAG_MMAP, PAGE, 0, None, 1024)))

    dev = fake(region_info_hook(0, build)).device()
    try:
        assert not dev.region_info(0).mmappable
        with pytest.raises(VfioError):
            dev.map_region(0)
    finally:
        dev.close()


# ---------------------------------------------------------------------------
# the decoders on their own: any bytes give a value or a MessageError
# ---------------------------------------------------------------------------

DECODERS = [
    p.decode_version,
    p.decode_dma_map,
    p.decode_dma_unmap,
    p.decode_device_info_request,
    p.decode_device_info,
    p.decode_region_info_request,
    lambda b: p.decode_region_info(b, 0),
    p.decode_irq_info_request,
    lambda b: p.decode_irq_info(b, 2),
    p.decode_set_irqs,
    lambda b: p.decode_region_access(b, "x", with_data=True, max_count=64),
    lambda b: p.decode_region_access(b, "x", with_data=False, max_count=64),
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, len(DECODERS) - 1))
def test_decoders_raise_only_message_errors(data, which):
    try:
        DECODERS[which](data)
    except p.MessageError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=40))
def test_region_info_decoder_on_structured_garbage(words):
    # plausible region-info replies with capability chains pointing anywhere
    data = bytearray(struct.pack(f"={len(words)}I", *words))
    struct.pack_into("=III", data, 0, len(data), (words[1] & 0xF) | 8, 0)
    struct.pack_into("=I", data, 12, words[3] % (len(data) + 8))
    try:
        p.decode_region_info(bytes(data), 0)
    except p.MessageError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120))
def test_recv_message_on_any_byte_stream(data):
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        for _ in range(20):
            try:
                msg = p.recv_message(b, deadline=time.monotonic() + 1, max_size=64)
            except p.MessageError as exc:
                assert exc.fatal
                break
            if msg is None:
                break
            try:
                p.check_flags(msg)
            except p.MessageError as exc:
                assert not exc.fatal
    finally:
        a.close()
        b.close()


def test_version_json_nested_too_deeply_is_a_message_error():
    # Found by the fuzzer: 4096 bytes of "[" made json.loads raise RecursionError, which
    # escaped the client (and became EIO with a traceback at the server).
    with pytest.raises(p.MessageError) as e:
        p.decode_version(struct.pack("<HH", 0, 1) + b"[" * 4000)
    assert e.value.errno == errno.EINVAL and "too deeply" in str(e.value)


def test_header_round_trip_and_limits():
    raw = p.encode_message(0xFFFF, p.VFIO_USER_DMA_MAP, b"x" * 4, p.TYPE_REPLY | p.FLAG_ERROR, errno.EEXIST)
    assert p.decode_header(raw[:16], 64) == (0xFFFF, 2, 20, p.TYPE_REPLY | p.FLAG_ERROR, errno.EEXIST)
    with pytest.raises(p.MessageError) as e:
        p.decode_header(raw[:16], 19)
    assert e.value.fatal and e.value.errno == errno.EMSGSIZE
    with pytest.raises(ValueError):
        p.encode_header(0x10000, 1, 0)
    assert p.max_message_size() >= 16 + 16 + p.MAX_DATA_XFER_SIZE


def test_set_irqs_decoding():
    req = p.decode_set_irqs(p.encode_set_irqs(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 2, 1, 1))
    assert (req.index, req.start, req.count, req.data_type, req.action) == (
        2,
        1,
        1,
        VFIO_IRQ_SET_DATA_EVENTFD,
        VFIO_IRQ_SET_ACTION_TRIGGER,
    )
    req = p.decode_set_irqs(p.encode_set_irqs(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 2, b"\1\0"))
    assert req.data == b"\1\0"
    with pytest.raises(p.MessageError):
        p.decode_set_irqs(p.encode_set_irqs(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 1, b"\0" * 4))
    with pytest.raises(p.MessageError):
        p.decode_set_irqs(p.encode_set_irqs(VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 1))  # no DATA bit


@pytest.mark.parametrize("protocol", ["vfio-user", "vhost-user"])
def test_received_fds_are_close_on_exec(protocol):
    # A peer's fd (DMA memory, an eventfd) must not leak into a process pmd starts
    # (MSG_CMSG_CLOEXEC, pmd.abi.stream): both protocols receive through one path.
    from pmd.abi import vhost_user as v

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    os.set_inheritable(r, True)
    try:
        if protocol == "vfio-user":
            p.send_message(a, p.encode_message(1, p.VFIO_USER_DMA_MAP, b""), [r])
            msg = p.recv_message(b, deadline=p.deadline_after(5), max_size=p.max_message_size())
        else:
            v.send_message(a, v.encode_message(v.VHOST_USER_SET_OWNER), [r])
            msg = v.recv_message(b, deadline=v.deadline_after(5))
        assert msg is not None and len(msg.fds) == 1
        assert not os.get_inheritable(msg.fds[0])
        msg.close_fds()
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_reset_between_messages_reads_as_the_peer_gone():
    # AF_UNIX reports a peer that closed with our bytes unread as a reset: between
    # messages that is the end of the session (None), not a protocol error.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        b.send(b"x" * 4)  # bytes a never reads
        a.close()
        assert p.recv_message(b, deadline=p.deadline_after(5), max_size=p.max_message_size()) is None
    finally:
        b.close()
