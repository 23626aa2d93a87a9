"""The virtio-net driver and its Port API.

Host tests cover the pieces that need no device (negotiation, configuration
parsing, transport selection). ``PortTests`` is the driver test class: one
base class, one subclass per way of reaching a device. The kernel-VFIO
subclasses run inside the QEMU guest (``vfio`` marker) against QEMU's own
virtio-net: modern at PMD_VFIO_DEVICE, transitional through its legacy
interface at PMD_VFIO_LEGACY_DEVICE. The host peer on the other end of
QEMU's ``-netdev dgram`` is driven through tests/vm/guest.py.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pmd
from pmd.errors import DeviceError, QueueStateError
from pmd.abi import virtio as V, virtio_net as N
from pmd.driver.virtio.net import Link, link_from, negotiate, read_net_config
from pmd.abi.ethernet import parse_mac
from pmd.abi.virtio_net import hdr_len_for
from pmd.driver.virtio.transport import Transport

DATA = Path(__file__).parent / "data" / "pci-config"


# ---------------------------------------------------------------- host: negotiation

def bits(*names: str) -> int:
    return N.parse_features(",".join(names))


def test_version_1_is_required_on_a_modern_transport():
    with pytest.raises(DeviceError, match="VERSION_1"):
        negotiate(bits("MAC", "STATUS"))


def test_access_platform_is_accepted_when_offered():
    assert negotiate(bits("VERSION_1", "ACCESS_PLATFORM")) & bits("ACCESS_PLATFORM")


def test_mandatory_features_cannot_be_disabled():
    with pytest.raises(ValueError, match="ACCESS_PLATFORM"):
        negotiate(bits("VERSION_1", "ACCESS_PLATFORM"), disable=bits("ACCESS_PLATFORM"))


def test_wanted_features_taken_when_offered_and_not_disabled():
    offered = bits("VERSION_1", "MAC", "STATUS", "MRG_RXBUF", "CTRL_VQ", "CTRL_RX", "MQ", "EVENT_IDX",
                   "GUEST_TSO4", "CSUM")
    got = negotiate(offered, disable=bits("EVENT_IDX"))
    assert N.feature_names(got) == ["MAC", "MRG_RXBUF", "STATUS", "CTRL_VQ", "CTRL_RX", "MQ", "VERSION_1"]


def test_features_needing_the_control_queue_go_with_it():
    got = negotiate(bits("VERSION_1", "CTRL_VQ", "CTRL_RX", "MQ"), disable=bits("CTRL_VQ"))
    assert not got & bits("CTRL_RX", "MQ", "CTRL_VQ")


def test_legacy_transport_negotiates_32_bits_without_version_1():
    got = negotiate(bits("MAC", "STATUS", "MRG_RXBUF", "VERSION_1"), transport_bits=32)
    assert got == bits("MAC", "STATUS", "MRG_RXBUF")


def test_header_is_12_bytes_with_version_1_or_mrg_rxbuf_else_10():
    assert hdr_len_for(bits("VERSION_1")) == 12
    assert hdr_len_for(bits("MRG_RXBUF")) == 12
    assert hdr_len_for(bits("MAC")) == 10


def test_packed_ring_is_taken_only_when_asked_for():
    offered = bits("VERSION_1", "RING_PACKED")
    assert not negotiate(offered) & bits("RING_PACKED")
    assert negotiate(offered, enable=bits("RING_PACKED")) & bits("RING_PACKED")
    assert not negotiate(bits("VERSION_1"), enable=bits("RING_PACKED")) & bits("RING_PACKED")   # not offered
    with pytest.raises(ValueError, match="enable= takes RING_PACKED, IN_ORDER; MRG_RXBUF are taken whenever offered"):
        negotiate(offered, enable=bits("MRG_RXBUF"))


def test_in_order_is_taken_only_when_asked_for():
    # correct on both layouts, but not faster on the loopback (docs/rings.md): opt-in
    offered = bits("VERSION_1", "RING_PACKED", "IN_ORDER")
    assert not negotiate(offered) & bits("IN_ORDER")
    assert negotiate(offered, enable=bits("IN_ORDER")) & bits("IN_ORDER")
    assert negotiate(offered, enable=bits("IN_ORDER", "RING_PACKED")) & bits("IN_ORDER", "RING_PACKED") == \
        bits("IN_ORDER", "RING_PACKED")
    assert not negotiate(bits("VERSION_1"), enable=bits("IN_ORDER")) & bits("IN_ORDER")   # not offered


def test_unknown_feature_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown virtio feature 'NOPE'"):
        N.parse_features("MAC,NOPE")


def test_mac_parsing():
    assert parse_mac("52:54:00:12:34:51") == bytes.fromhex("525400123451")
    with pytest.raises(ValueError, match="xx:xx"):
        parse_mac("52:54:00")


# ---------------------------------------------------------------- host: device configuration

class FakeTransport(Transport):
    """Device configuration in a bytearray, with a generation counter that can be
    made to move while the driver reads."""

    kind = "fake"

    def __init__(self, cfg: bytes, churn: int = 0):
        self.cfg = bytearray(cfg)
        self.gen = 0
        self.churn = churn   # bump the generation on the next N reads
        self.status = 0

    def get_status(self): return self.status
    def set_status(self, s): self.status = s
    def device_features(self): return 0
    def set_driver_features(self, f): pass
    def num_queues(self): return 3
    def queue_max_size(self, i): return 256
    def setup_queue(self, i, vq, vector=0xFFFF): pass
    def queue_size_fixed(self): return False
    def set_config_vector(self, v): pass
    def read_isr(self): return 0
    def device_config_length(self): return len(self.cfg)
    def write_config(self, o, w, v): self.cfg[o:o + w] = v.to_bytes(w, "little")
    def close(self): pass

    def config_generation(self):
        if self.churn:
            self.churn -= 1
            self.gen += 1
        return self.gen

    def _read_config(self, offset, width):
        return int.from_bytes(self.cfg[offset:offset + width], "little")


def net_cfg(mac=bytes.fromhex("525400123451"), status=1, pairs=1, mtu=1500, speed=10000, duplex=1):
    return (mac + status.to_bytes(2, "little") + pairs.to_bytes(2, "little") + mtu.to_bytes(2, "little")
            + speed.to_bytes(4, "little") + bytes([duplex]) + bytes(7))


ALL_CFG = bits("VERSION_1", "MAC", "STATUS", "MQ", "MTU", "SPEED_DUPLEX")


def test_config_fields_read_as_the_features_allow():
    cfg = read_net_config(FakeTransport(net_cfg(pairs=4)), ALL_CFG)
    assert cfg.mac == bytes.fromhex("525400123451") and cfg.max_queue_pairs == 4 and cfg.mtu == 1500
    assert link_from(cfg) == Link(True, 10000, "full")
    cfg = read_net_config(FakeTransport(net_cfg(pairs=4)), bits("VERSION_1"))
    assert cfg.mac is None and cfg.max_queue_pairs == 1 and link_from(cfg) == Link(True)


def test_link_down_and_unknown_speed():
    cfg = read_net_config(FakeTransport(net_cfg(status=0, speed=0xFFFFFFFF, duplex=0xFF)), ALL_CFG)
    assert link_from(cfg) == Link(False, None, None)


def test_config_read_retries_while_generation_moves():
    t = FakeTransport(net_cfg(), churn=3)
    assert read_net_config(t, ALL_CFG).mac == bytes.fromhex("525400123451")


def test_config_generation_never_stable_is_an_error():
    with pytest.raises(DeviceError, match="kept changing"):
        read_net_config(FakeTransport(net_cfg(), churn=10**6), ALL_CFG)


@pytest.mark.parametrize("pairs, mtu, match", [(0, 1500, "max_virtqueue_pairs"),
                                               (0x8001, 1500, "max_virtqueue_pairs"),
                                               (1, 20, "MTU")])
def test_implausible_config_values_are_refused(pairs, mtu, match):
    with pytest.raises(DeviceError, match=match):
        read_net_config(FakeTransport(net_cfg(pairs=pairs, mtu=mtu)), ALL_CFG)


# ---------------------------------------------------------------- host: transport selection

class ConfigOnlyAccess:
    """A DeviceAccess stand-in that only has a config space (for open_transport's checks)."""

    def __init__(self, raw: bytes):
        self.raw = raw + bytes(256 - len(raw)) if len(raw) < 256 else raw

    def config_read(self, offset, size):
        return self.raw[offset:offset + size]


def test_non_virtio_device_is_refused():
    from pmd.driver.virtio.pci import open_transport

    raw = (DATA / "0000_00_00_0_8086_0d57.bin").read_bytes()
    with pytest.raises(DeviceError, match="not a virtio device"):
        open_transport(ConfigOnlyAccess(raw))  # type: ignore[arg-type]


def test_modern_only_device_has_no_legacy_interface():
    from pmd.driver.virtio.pci import open_transport

    raw = (DATA / "0000_00_03_0_1af4_1041.bin").read_bytes()
    with pytest.raises(DeviceError, match="not transitional"):
        open_transport(ConfigOnlyAccess(raw), legacy=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the driver test class

def forward(port, stop: threading.Event, mode: str = "io", burst: int = 32) -> None:
    """pmd forwarding loop (zero-copy): rx -> (macswap) -> tx, until stop."""
    rxq, txq, pool = port.rx_queue(0), port.tx_queue(0), port.pool(0)
    ids = np.zeros(burst, np.uint32)
    lens = np.zeros(burst, np.uint32)
    data = pool.data
    while not stop.is_set():
        n = rxq.rx_burst_zc(ids, lens)
        if not n:
            txq.reclaim()
            time.sleep(0)
            continue
        got = ids[:n]
        if mode == "macswap":
            dst = data[got, 0:6].copy()
            data[got, 0:6] = data[got, 6:12]
            data[got, 6:12] = dst
        sent = 0
        while sent < n and not stop.is_set():
            sent += txq.tx_burst_zc(got[sent:], lens[sent:n])


def echo_through(port, host, n: int, seed: int, mode: str = "io", *, net: str, wait: float = 300) -> dict:
    """The peer sends ``n`` frames to the port, pmd forwards them (``mode``) while it does,
    and the peer's comparison of what came back is returned."""
    stop = threading.Event()
    t = threading.Thread(target=forward, args=(port, stop, mode))
    t.start()
    try:
        host.host_traffic(n, seed=seed, dst=port.mac, net=net)
        return host.host_traffic_check(mode, wait=wait, net=net)
    finally:
        stop.set()
        t.join()


class PortTests:
    """Everything the driver must do, against one device. Subclasses say how to open it."""

    net = "modern"
    legacy: bool | None = None
    expect_mac: str | None = None
    start_kw: dict = {}
    layout: str | None = None       # "packed" or "split": asked for, on a device offering both

    def open(self, **kw):
        raise NotImplementedError

    def layout_kw(self) -> dict:
        """open_port() options that choose ``self.layout`` on a device offering RING_PACKED."""
        from pmd.driver.virtio.net import layout_options

        return layout_options(self.layout) if self.layout else {}

    def layout_args(self) -> list:
        """The same as ``pmd fwd`` options."""
        return [a for k, v in self.layout_kw().items() for a in (f"--{k}", v)]

    def test_the_ring_layout_is_the_one_asked_for(self, port):
        # no layout asked for: whichever was negotiated, and the rings built for it
        layout = self.layout or ("packed" if port.features & bits("RING_PACKED") else "split")
        assert port.ring_layout == layout
        assert bool(port.features & bits("RING_PACKED")) == (layout == "packed")
        assert all(q.vq.packed == (layout == "packed") for q in port.rxqs + port.txqs)

    @pytest.fixture
    def port(self):
        p = self.open()
        try:
            p.start(**self.start_kw)
        except BaseException:
            p.close()          # a failed start leaves the device reset; release it too
            raise
        yield p
        p.close()

    @pytest.fixture
    def host(self):
        sys.path.insert(0, str(Path(__file__).parent / "vm"))
        import guest

        guest.host_clear(self.net)
        return guest

    # -- opening and the handshake

    def test_start_reads_mac_features_and_link(self, port):
        if self.expect_mac:
            assert port.mac == parse_mac(self.expect_mac)
        assert port.started and port.link.up
        assert port.features & bits("MAC", "STATUS")
        assert port.transport.get_status() == (V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_DRIVER_OK
                                               | (0 if port.transport.kind == "legacy" else V.STATUS_FEATURES_OK))

    def test_starting_twice_is_refused(self, port):
        with pytest.raises(QueueStateError, match="already started"):
            port.start()

    def test_burst_on_stopped_port_is_refused_and_device_left_reset(self, port):
        port.stop()
        assert port.transport.get_status() == 0
        with pytest.raises(QueueStateError, match="not started"):
            port.rx_burst(np.zeros((1, 2048), np.uint8), np.zeros(1, np.uint32))
        port.start(**self.start_kw)       # and it starts again
        assert port.link.up

    def test_too_many_queue_pairs_is_a_clear_error_and_device_left_reset(self):
        p = self.open()
        try:
            with pytest.raises(ValueError, match="queue pairs"):
                p.start(queue_pairs=64)
            assert p.transport.get_status() == 0 and not p.started
        finally:
            p.close()

    # -- traffic

    def test_io_returns_10000_random_frames_byte_exact(self, port, host):
        r = echo_through(port, host, 10000, 1, net=self.net)
        assert r["received"] == r["sent"] == 10000 and r["n_mismatched"] == 0, r
        s = port.stats()
        assert s["rx_packets"] == s["tx_packets"] == 10000
        assert s["device_errors"] == 0 and s["rx_dropped"] == 0

    def test_macswap_returns_frames_with_macs_swapped(self, port, host):
        r = echo_through(port, host, 2000, 2, "macswap", net=self.net)
        assert r["received"] == 2000 and r["n_mismatched"] == 0, r

    def test_txonly_peer_receives_exactly_what_pmd_sent(self, port, host):
        rng = np.random.default_rng(3)
        n = 3000
        lengths = rng.integers(60, 1515, n).astype(np.uint32)
        data = rng.integers(0, 256, (n, 1514), dtype=np.uint8)
        data[:, 0:6] = 0xFF
        data[:, 6:12] = np.frombuffer(port.mac, np.uint8)
        sent = 0
        txq = port.tx_queue(0)
        while sent < n:
            sent += txq.tx_burst(data[sent:sent + 32], lengths[sent:sent + 32])
        digest = hashlib.sha256()
        for i in range(n):
            digest.update(data[i, :lengths[i]].tobytes())
        r = host.host_wire_digest(quiet=3.0, net=self.net)
        assert port.stats()["tx_packets"] == n
        assert r["count"] == n and r["sha256"] == digest.hexdigest()

    # -- link interrupts

    def test_link_change_reaches_the_callback(self, port, host):
        seen: list[Link] = []
        changed = threading.Event()

        def cb(link: Link) -> None:
            seen.append(link)
            changed.set()

        port.on_link_change(cb)
        host.set_link(False, net=self.net)
        assert changed.wait(20), "no link-down callback"
        assert seen[-1].up is False and port.link.up is False
        changed.clear()
        host.set_link(True, net=self.net)
        assert changed.wait(20), "no link-up callback"
        assert seen[-1].up is True and port.link.up is True
        assert port.stats()["config_interrupts"] >= 2

    # -- rx interrupt mode

    def test_rx_wait_sleeps_without_burning_cpu_and_wakes_on_traffic(self, host):
        p = self.open()
        try:
            p.start(rx_interrupts=True, **self.start_kw)
            cpu0, t0 = time.process_time(), time.monotonic()
            assert p.rx_wait(timeout=1.0) is False
            assert time.monotonic() - t0 >= 0.9
            assert time.process_time() - cpu0 < 0.5      # slept, did not spin
            frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(46)
            threading.Timer(0.5, host.host_send, args=([frame],), kwargs={"net": self.net}).start()
            assert p.rx_wait(timeout=30.0) is True
            out = np.zeros((4, p.rx_queue(0).max_packet_len), np.uint8)
            lens = np.zeros(4, np.uint32)
            deadline = time.monotonic() + 5
            got = 0
            while not got and time.monotonic() < deadline:
                got = p.rx_burst(out, lens)
            assert got == 1 and lens[0] == 60
            assert p.stats()["rx_interrupts"] >= 1
        finally:
            p.close()

    def test_rx_wait_needs_rx_interrupts(self, port):
        with pytest.raises(QueueStateError, match="rx_interrupts=True"):
            port.rx_wait(timeout=0.1)

    # -- control queue

    def test_promiscuous_off_filters_other_macs_and_on_lets_them_in(self, port, host):
        if not port.features & bits("CTRL_RX"):
            pytest.skip("device has no VIRTIO_NET_F_CTRL_RX")
        other = bytes.fromhex("02aabbccddee")

        def count_received(seconds: float) -> int:
            out = np.zeros((64, port.rx_queue(0).max_packet_len), np.uint8)
            lens = np.zeros(64, np.uint32)
            total, deadline = 0, time.monotonic() + seconds
            while time.monotonic() < deadline:
                total += port.rx_burst(out, lens)
            return total

        port.promiscuous = False
        port.set_mac_filter([])
        host.host_traffic(20, seed=4, dst=port.mac, net=self.net)
        host.host_traffic(20, seed=5, dst=other, net=self.net)
        assert count_received(3.0) == 20
        port.promiscuous = True
        host.host_traffic(20, seed=6, dst=other, net=self.net)
        assert count_received(3.0) == 20
        port.promiscuous = False
        port.set_mac_filter([other])
        host.host_traffic(20, seed=7, dst=other, net=self.net)
        assert count_received(3.0) == 20


def _vfio_env(name: str) -> str | None:
    return os.environ.get(name)


class MergeableTests:
    """For devices with MRG_RXBUF and an MTU of 9000 (the modern QEMU device, the built-in one)."""

    def test_jumbo_frames_over_mergeable_buffers(self, port, host):
        assert port.features & bits("MRG_RXBUF") and port.mtu == 9000
        self.echo_jumbo_frames(port, host)

    def test_jumbo_frames_are_transmitted_over_indirect_tables_when_offered(self, port, host):
        # QEMU's device, the built-in one and DPDK's vhost all offer INDIRECT_DESC (2.7.5.3, 2.8.7):
        # each multi-buffer transmit chain is then one descriptor pointing to a table
        assert port.features & bits("INDIRECT_DESC")
        txq = port.tx_queue(0)
        assert txq.vq.indirect and txq.vq.indirect_max == min(32, txq.vq.size)
        self.echo_jumbo_frames(port, host)

    def test_jumbo_frames_with_indirect_descriptors_turned_off(self, host):
        port = self.open(disable="INDIRECT_DESC")
        try:
            port.start(**self.start_kw)
            assert not port.features & bits("INDIRECT_DESC") and not port.tx_queue(0).vq.indirect
            self.echo_jumbo_frames(port, host)
        finally:
            port.close()

    def echo_jumbo_frames(self, port, host):
        stop = threading.Event()
        # zero-copy cannot carry multi-buffer packets: forward in copy mode
        def fwd():
            rxq, txq = port.rx_queue(0), port.tx_queue(0)
            out = np.zeros((32, rxq.max_packet_len), np.uint8)
            lens = np.zeros(32, np.uint32)
            while not stop.is_set():
                n = rxq.rx_burst(out, lens)
                sent = 0
                while sent < n:
                    sent += txq.tx_burst(out[sent:n], lens[sent:n])
        t = threading.Thread(target=fwd)
        t.start()
        try:
            host.host_traffic(500, seed=8, min_len=60, max_len=9014, dst=port.mac, net=self.net)
            r = host.host_traffic_check("io", wait=300, net=self.net)
        finally:
            stop.set()
            t.join()
        assert r["received"] == 500 and r["n_mismatched"] == 0, r


@pytest.mark.vfio
@pytest.mark.skipif(not _vfio_env("PMD_VFIO_DEVICE"),
                    reason="PMD_VFIO_DEVICE is not set: runs in the QEMU guest (tests/vm)")
class TestPortModernVfio(PortTests, MergeableTests):
    net = "modern"
    expect_mac = "52:54:00:12:34:51"

    layout = "packed"       # QEMU's device has packed=on (tests/vm/harness.py)

    def open(self, **kw):
        return pmd.open_port(os.environ["PMD_VFIO_DEVICE"], **{**self.layout_kw(), **kw})

    def test_pmd_fwd_command_echoes_traffic_and_prints_a_summary(self, host, tmp_path):
        import re
        import subprocess

        proc = subprocess.Popen([sys.executable, "-m", "pmd", "fwd", os.environ["PMD_VFIO_DEVICE"],
                                 "--mode", "io", "--duration", "20", "--pcap", str(tmp_path / "rx.pcap"),
                                 *self.layout_args()],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = proc.stdout.readline()                 # printed once the port is started
            assert line.startswith("pmd fwd:"), line
            host.host_traffic(1000, seed=11, dst=parse_mac(self.expect_mac), net=self.net)
            r = host.host_traffic_check("io", wait=60, net=self.net)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out
        assert r["received"] == 1000 and r["n_mismatched"] == 0, r
        summary = [l for l in out.splitlines() if l.startswith("summary:")][-1]
        assert re.search(r"rx=1000 tx=1000 mpps=[0-9.]+ gbps=[0-9.]+ drops=0 errors=0", summary), summary
        from pmd.abi.pcap import read_pcap
        assert len(list(read_pcap(tmp_path / "rx.pcap"))) == 1000


@pytest.mark.vfio
@pytest.mark.skipif(not _vfio_env("PMD_VFIO_DEVICE"),
                    reason="PMD_VFIO_DEVICE is not set: runs in the QEMU guest (tests/vm)")
class TestPortModernVfioSplit(TestPortModernVfio):
    """The same on the split ring: QEMU's packed=on device offers both layouts."""

    layout = "split"


@pytest.mark.vfio
@pytest.mark.skipif(not _vfio_env("PMD_VFIO_LEGACY_DEVICE"),
                    reason="PMD_VFIO_LEGACY_DEVICE is not set: runs in the QEMU guest (tests/vm --legacy)")
class TestPortLegacyVfio(PortTests):
    net = "legacy"
    legacy = True
    expect_mac = "52:54:00:12:34:52"
    start_kw = {"queue_size": 0, "hugepages": True}   # the device's ring size; contiguous rings

    def open(self, **kw):
        return pmd.open_port(os.environ["PMD_VFIO_LEGACY_DEVICE"], legacy=True, **kw)

    def test_legacy_transport_carries_32_feature_bits(self, port):
        assert port.transport.kind == "legacy"
        assert not port.features >> 32          # 32 feature bits only
        assert port.hdr_len == (12 if port.features & bits("MRG_RXBUF") else 10)


@pytest.mark.noiommu
@pytest.mark.skipif(not _vfio_env("PMD_VFIO_NOIOMMU_DEVICE"),
                    reason="PMD_VFIO_NOIOMMU_DEVICE is not set: runs in the QEMU guest in no-IOMMU mode "
                           "(tests/vm/harness.py --noiommu)")
class TestPortNoIommuVfio(PortTests):
    """The driver test class in no-IOMMU mode: QEMU's modern virtio-net-pci (no
    ACCESS_PLATFORM) in a guest without vIOMMU, bound to vfio-pci with a vfio.ko
    rebuilt with CONFIG_VFIO_NOIOMMU: ``/dev/vfio/noiommu-N``, the VFIO_NOIOMMU_IOMMU
    container, and rings and buffers given to the device by physical address
    (/proc/self/pagemap), on huge pages so that a ring is physically contiguous."""

    net = "noiommu"
    expect_mac = "52:54:00:12:34:55"
    start_kw = {"hugepages": True}

    def open(self, **kw):
        return pmd.open_port(os.environ["PMD_VFIO_NOIOMMU_DEVICE"], **kw)

    def test_the_group_is_noiommu_and_the_device_is_given_physical_addresses(self, port):
        from pmd.abi.vfio import VFIO_NOIOMMU_IOMMU
        from pmd.driver.access.pagemap import virt_to_phys

        access = port.transport.access
        assert access.noiommu and access.iommu_type == VFIO_NOIOMMU_IOMMU and access.iova_mode == "pa"
        assert os.path.basename(str(access.group_path)).startswith("noiommu-")
        assert not port.features & bits("ACCESS_PLATFORM")
        vq = port.rx_queue(0).vq
        assert vq.desc_iova == virt_to_phys(vq.ring_address) != vq.ring_address   # the ring starts with desc


class TestPortSim(PortTests, MergeableTests):
    """The same driver tests over vfio-user, against pmd's built-in device in a
    process of its own, its dgram wire played by tests/sim_peer.py."""

    net = "sim"
    expect_mac = "02:50:4d:44:00:01"

    @pytest.fixture(autouse=True)
    def _peer(self, tmp_path):
        from tests.sim_peer import SimPeer

        self.peer = SimPeer(tmp_path)
        yield
        self.peer.close()

    @pytest.fixture
    def host(self):
        return self.peer

    def open(self, **kw):
        kw.setdefault("wire", "dgram")
        kw.setdefault("dgram_local", self.peer.device_path)
        kw.setdefault("dgram_remote", self.peer.path)
        kw.setdefault("mtu", 9000)
        port = pmd.open_port("sim", **kw)
        self.peer.sim = port.sim
        return port

    def test_device_cannot_be_made_without_version_1(self):
        # The built-in device is modern-only (0x1041), so it refuses to lack
        # VERSION_1; the driver's refusal of such a device is in
        # test_version_1_is_required_on_a_modern_transport.
        from pmd.sim.process import SimError

        with pytest.raises(SimError, match="VERSION_1 cannot be turned off"):
            self.open(features_off="VERSION_1")

    def test_several_queue_pairs_through_the_control_queue(self, host):
        p = self.open(queue_pairs=2)
        try:
            p.start(queue_pairs=2)
            assert p.features & bits("MQ") and p.queue_pairs == 2 and p.max_queue_pairs == 2
            frame = np.frombuffer(b"\xff" * 6 + p.mac + b"\x88\xb5" + bytes(46), np.uint8)
            for q in (0, 1):
                assert p.tx_queue(q).tx_burst(np.tile(frame, (50, 1)), np.full(50, 60, np.uint32)) == 50
            assert host.host_wire_digest(quiet=1.0)["count"] == 100
            assert p.stats()["control_commands"] >= 1
        finally:
            p.close()


def _needs_testpmd(cls):
    from tests.dpdk import needs_testpmd

    for name in dir(cls):
        if name.startswith("test_"):
            setattr(cls, name, needs_testpmd(getattr(cls, name)))
    return cls


@_needs_testpmd
class TestPortVhostUser(PortTests, MergeableTests):
    """The same driver tests over vhost-user, against DPDK's vhost library: one
    ``dpdk-testpmd`` in io mode between the port under test and a peer port
    (tests/vhost_user_wire.py). DPDK's back-end offers no device configuration
    (no MAC, link status or MTU) and runs no control queue."""

    net = "vhost-user"
    layout = "packed"       # DPDK's vhost offers RING_PACKED

    @pytest.fixture(autouse=True)
    def _backend(self, tmp_path):
        import tempfile

        from tests.dpdk import DpdkBackend

        # a short directory: a UNIX socket path holds 107 bytes
        d = tempfile.mkdtemp(prefix="pmdvu")
        self.path = os.path.join(d, "port.sock")
        self.testpmd = DpdkBackend(self.path, str(tmp_path / "testpmd.log"), peer=os.path.join(d, "peer.sock"))
        self.wire = None
        try:
            self.testpmd.wait_for_socket(os.path.join(d, "peer.sock"))
            yield
        finally:
            if self.wire is not None:
                self.wire.close()
            self.testpmd.stop()
            import shutil

            shutil.rmtree(d, ignore_errors=True)

    @pytest.fixture
    def host(self):
        from tests.vhost_user_wire import VhostUserWire

        if self.wire is None:
            self.wire = VhostUserWire(os.path.join(os.path.dirname(self.path), "peer.sock"))
        self.wire.host_clear()
        return self.wire

    def open(self, **kw):
        kw.setdefault("timeout", 5.0)
        kw.setdefault("wait", 30)
        kw.setdefault("mtu", 9000)      # reported by the transport (no CONFIG), told to DPDK (NET_SET_MTU)
        kw = {**self.layout_kw(), **kw}
        if getattr(self, "in_order", False):
            kw["enable"] = ",".join(x for x in (kw.get("enable"), "IN_ORDER") if x)
        return pmd.open_port("vhost-user:" + self.path, **kw)

    def test_start_reads_mac_features_and_link(self, port):
        # no CONFIG from DPDK's vhost library: no MAC or STATUS to read; pmd picks a
        # locally administered unicast MAC and the link is up
        assert port.started and port.link.up
        assert port.features & bits("VERSION_1", "MRG_RXBUF") == bits("VERSION_1", "MRG_RXBUF")
        assert not port.features & bits("MAC", "STATUS", "CTRL_RX")
        assert port.features & bits("MTU") and port.mtu == 9000
        # the transport serves the control queue for MQ; DPDK answers GET_QUEUE_NUM with its limit
        assert port.features & bits("CTRL_VQ", "MQ") == bits("CTRL_VQ", "MQ") and port.max_queue_pairs == 128
        assert port.mac[0] & 0x03 == 0x02
        assert port.transport.get_status() == (V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_DRIVER_OK
                                               | V.STATUS_FEATURES_OK)

    def test_link_change_reaches_the_callback(self, port, host):
        # A vhost-user back-end reports no link changes to a front-end that serves no
        # back-end requests (VHOST_USER_PROTOCOL_F_BACKEND_REQ), and DPDK's offers no
        # STATUS: the link is up for the port's life, and no callback is owed.
        seen: list[Link] = []
        port.on_link_change(seen.append)
        one_frame(port, 0)
        assert host.host_wire_digest(quiet=0.5)["count"] == 1
        assert port.link.up and not seen and port.stats()["config_interrupts"] == 0

    def test_promiscuous_off_filters_other_macs_and_on_lets_them_in(self, port, host):
        # no control queue over vhost-user: the receive mode cannot be set, and saying so
        # is a clear error, not a silent no-op
        with pytest.raises(pmd.PmdError, match="VIRTIO_NET_F_CTRL_RX"):
            port.promiscuous = False

    def test_too_many_queue_pairs_is_a_clear_error_and_device_left_reset(self):
        p = self.open()
        try:
            with pytest.raises(ValueError, match="at most 128"):
                p.start(queue_pairs=129)
            assert p.transport.get_status() == 0 and not p.started
        finally:
            p.close()

    def test_several_queue_pairs_each_echoed_on_its_own_queue(self, tmp_path):
        # testpmd's io mode on one port with two queues sends what queue q receives back
        # out of queue q: random frames, 60 to 1514 B, come back byte-exact on their own queue
        from tests.dpdk import DpdkBackend
        from tests.vhost_user_wire import make_frames

        path = os.path.join(os.path.dirname(self.path), "mq.sock")
        echo = DpdkBackend(path, str(tmp_path / "mq.log"), queues=2)
        try:
            echo.wait_for_socket(path)
            p = pmd.open_port("vhost-user:" + path, timeout=5.0, wait=30, **self.layout_kw())
            try:
                p.start(queue_pairs=2)
                assert p.queue_pairs == 2 and p.stats()["control_commands"] == 1
                sent = {q: make_frames(300, 20 + q, 60, 1514, b"\xff" * 6, p.mac) for q in (0, 1)}
                got: dict[int, list[bytes]] = {0: [], 1: []}
                out = np.zeros((32, 2048), np.uint8)
                lens = np.zeros(32, np.uint32)
                for q in (0, 1):
                    for i in range(0, 300, 30):           # 30 in flight: testpmd drops, not queues
                        chunk = sent[q][i:i + 30]
                        data = np.zeros((len(chunk), 1514), np.uint8)
                        for j, f in enumerate(chunk):
                            data[j, :len(f)] = np.frombuffer(f, np.uint8)
                        lengths = np.array([len(f) for f in chunk], np.uint32)
                        deadline = time.monotonic() + 10
                        k = 0
                        while k < 30 and time.monotonic() < deadline:
                            k += p.tx_queue(q).tx_burst(data[k:], lengths[k:])
                        while len(got[q]) < i + 30 and time.monotonic() < deadline:
                            n = p.rx_queue(q).rx_burst(out, lens)
                            got[q] += [bytes(out[j, :lens[j]]) for j in range(n)]
                            other = p.rx_queue(1 - q).rx_burst(out, lens)
                            assert other == 0, f"queue {1 - q} received what queue {q} sent"
                assert got == sent
            finally:
                p.close()
        finally:
            echo.stop()
        assert "Queue= 1 -> TX Port= 0/Queue= 1" in echo.output()

    def test_a_port_restarts_and_keeps_its_mac(self, port, host):
        mac = port.mac
        port.stop()
        port.start()
        assert port.mac == mac
        r = echo_through(port, host, 500, 9, net=self.net, wait=60)
        assert r["received"] == 500 and r["n_mismatched"] == 0, r



@_needs_testpmd
class TestPortVhostUserSplit(TestPortVhostUser):
    """The same on the split ring against DPDK's vhost."""

    layout = "split"


@_needs_testpmd
class TestPortVhostUserInOrder(TestPortVhostUser):
    """The same on the split ring with VIRTIO_F_IN_ORDER (enable="IN_ORDER"), which
    DPDK's vhost offers: its used entries then come in order, one per buffer."""

    layout = "split"
    in_order = True

    def test_in_order_is_negotiated_with_dpdk_and_every_queue_runs_in_order(self, port):
        assert port.features & bits("IN_ORDER")
        assert all(q.vq.in_order for q in port.rxqs + port.txqs)


@_needs_testpmd
class TestPortVhostUserPackedInOrder(TestPortVhostUserInOrder):
    """The same on the packed ring with IN_ORDER: DPDK's vhost then returns what it
    dequeued from the transmit ring as batches, one used descriptor each (2.8.9)."""

    layout = "packed"

    def test_dpdk_returns_transmit_batches_with_one_used_descriptor(self, port, host):
        r = echo_through(port, host, 2000, 9, net=self.net, wait=60)
        assert r["received"] == 2000 and r["n_mismatched"] == 0, r
        tx = port.tx_queue(0).stats()
        assert tx["in_order_batches"] > 0 and tx["used_not_in_flight"] == tx["bad_used_id"] == 0, tx


# ---------------------------------------------------------------- the driver on the built-in device, in process

def test_xstats_names_every_counter_as_dpdk_does_and_reset_counts_from_zero():
    """Extended statistics: DPDK's basic names, per-queue names, every bad-behaviour counter."""
    import re

    # Automatic steering (no RSS): the loopback keeps queue 1's traffic on queue 1; with RSS these
    # all-zero frames (not IP) would go to the unclassified queue 0 (docs/rss.md).
    with pmd.open_port("sim", wire="loopback", queue_pairs=2, disable="RSS,HASH_REPORT") as p:
        p.start(queue_pairs=2)
        x = p.xstats()
        basic = ["rx_good_packets", "tx_good_packets", "rx_good_bytes", "tx_good_bytes", "rx_errors",
                 "tx_errors", "rx_mbuf_allocation_errors"]
        assert list(x)[:len(basic)] == basic
        for q in (0, 1):
            for side in ("rx", "tx"):
                for k in ("packets", "bytes", "errors", "dropped", "bad_used_id", "used_not_in_flight",
                          "bad_used_len", "bad_used_idx", "notifications"):
                    assert f"{side}_q{q}_{k}" in x, (side, q, k)
            for k in ("runt", "bad_num_buffers", "no_buffer", "truncated", "zc_multi_dropped"):
                assert f"rx_q{q}_{k}" in x
            assert f"tx_q{q}_ring_full" in x
        assert all(re.fullmatch(r"[a-z0-9_]+", k) and isinstance(v, int) for k, v in x.items())
        # nothing moved yet: no packets, bytes or errors (the rx refill has notified)
        assert all(v == 0 for k, v in x.items() if "notif" not in k and k != "control_commands"), x
        # traffic on queue 1 shows on queue 1 and in the port totals
        frames = np.zeros((10, 64), np.uint8)
        assert p.tx_queue(1).tx_burst(frames, np.full(10, 64, np.uint32)) == 10
        out = np.zeros((32, p.rx_queue(1).max_packet_len), np.uint8)
        lens = np.zeros(32, np.uint32)
        got, deadline = 0, time.monotonic() + 10
        while got < 10 and time.monotonic() < deadline:
            got += p.rx_queue(1).rx_burst(out, lens)
        x = p.xstats()
        assert x["rx_q1_packets"] == x["tx_q1_packets"] == x["rx_good_packets"] == 10
        assert x["rx_q1_bytes"] == x["rx_good_bytes"] == 640 and x["rx_q0_packets"] == 0
        p.reset_stats()
        x = p.xstats()
        assert x["rx_good_packets"] == x["rx_q1_packets"] == x["tx_q1_bytes"] == 0
        assert p.stats()["rx_packets"] == 0 and p.stats()["rx_queues"][1]["packets"] == 0
        assert p.rx_queue(1).stats()["packets"] == 10            # the queues keep counting underneath
        assert p.tx_queue(1).tx_burst(frames[:3], np.full(3, 64, np.uint32)) == 3
        got, deadline = 0, time.monotonic() + 10
        while got < 3 and time.monotonic() < deadline:
            got += p.rx_queue(1).rx_burst(out, lens)
        assert p.xstats()["rx_good_packets"] == 3
        p.stop()
        p.start(queue_pairs=1)                                   # new queues count from 0
        x = p.xstats()
        assert x["rx_good_packets"] == 0 and "rx_q1_packets" not in x


def local_port(model=None, **start):
    """A Port on a built-in device model in this process (pmd.sim.local.LocalAccess)."""
    from pmd.sim.model import VirtioNetModel
    from pmd.backends.local import LocalAccess

    m = model or VirtioNetModel()
    port = pmd.open_port(LocalAccess(m), name="sim")
    try:
        port.start(**start)
    except BaseException:
        port.close()
        m.close()
        raise
    return port, m


def one_frame(port, queue: int) -> None:
    frame = np.frombuffer(b"\xff" * 6 + port.mac + b"\x88\xb5" + bytes(46), np.uint8)
    assert port.tx_queue(queue).tx_burst(frame.reshape(1, -1), np.full(1, 60, np.uint32)) == 1


def test_a_port_takes_a_transport_and_says_how_to_open_an_access():
    from pmd.backends.local import LocalAccess
    from pmd.sim.model import VirtioNetModel

    with VirtioNetModel() as m:
        access = LocalAccess(m)
        with pytest.raises(TypeError, match=r"use pmd\.open_port\(access\)"):
            pmd.Port(access)  # type: ignore[arg-type]
        access.close()


class OnlyTheInterface(Transport):
    """A transport that is nothing but the Transport interface, over another one:
    no device access, no PCI attribute for a Port to reach past it (as vhost-user)."""

    kind = "interface-only"

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self.name, self.ring_align, self.feature_bits, self.legacy = "bare", inner.ring_align, inner.feature_bits, inner.legacy

    def get_status(self): return self._inner.get_status()
    def set_status(self, s): self._inner.set_status(s)
    def device_features(self): return self._inner.device_features()
    def set_driver_features(self, f): self._inner.set_driver_features(f)
    def num_queues(self): return self._inner.num_queues()
    def queue_max_size(self, i): return self._inner.queue_max_size(i)
    def setup_queue(self, i, vq, vector=0xFFFF): self._inner.setup_queue(i, vq, vector)
    def queue_size_fixed(self): return self._inner.queue_size_fixed()
    def set_config_vector(self, v): self._inner.set_config_vector(v)
    def read_isr(self): return self._inner.read_isr()
    def config_generation(self): return self._inner.config_generation()
    def _read_config(self, o, w): return self._inner._read_config(o, w)
    def write_config(self, o, w, v): self._inner.write_config(o, w, v)
    def device_config_length(self): return self._inner.device_config_length()
    def interrupt_vectors(self): return self._inner.interrupt_vectors()
    def interrupt_mode(self): return self._inner.interrupt_mode()
    def unmask_interrupt(self): self._inner.unmask_interrupt()
    def set_interrupts(self, fds): self._inner.set_interrupts(fds)
    def disable_interrupts(self): self._inner.disable_interrupts()
    def map_memory(self, memory, *, iommu): return self._inner.map_memory(memory, iommu=iommu)
    def enable_dma(self): self._inner.enable_dma()
    def on_lost(self, callback): return self._inner.on_lost(callback)
    def close(self): self._inner.close()


@pytest.mark.parametrize("msix_vectors", [None, 0], ids=["msix", "intx"])
def test_a_port_needs_nothing_of_its_transport_beyond_the_interface(msix_vectors):
    # The virtio transport interface assumes no PCI (a vhost-user transport has no
    # DeviceAccess): a port on a transport that is only the interface starts,
    # moves packets, takes interrupts and closes; with MSI-X, and with INTx.
    from pmd.backends.local import LocalAccess
    from pmd.driver.virtio.pci import open_transport
    from pmd.sim.model import VirtioNetModel

    with VirtioNetModel(msix_vectors=msix_vectors) as m:
        port = pmd.Port(OnlyTheInterface(open_transport(LocalAccess(m))))
        try:
            port.start(rx_interrupts=True)
            assert port.name == "bare" and not hasattr(port.transport, "access")
            one_frame(port, 0)
            assert port.rx_wait(0, timeout=10)
            assert port.rx_queue(0).rx_discard() == 1
        finally:
            port.close()


def test_port_totals_count_runts_and_foreign_chains_of_every_queue():
    # A 10-byte frame (no Ethernet header) looped back by the device is a runt for
    # the driver: dropped and counted on its queue, and in the port's totals.
    port, m = local_port()
    try:
        assert port.tx_queue(0).tx_burst(np.zeros((1, 10), np.uint8), np.full(1, 10, np.uint32)) == 1
        deadline = time.monotonic() + 10
        while port.rx_queue(0).stats()["runt"] == 0 and time.monotonic() < deadline:
            port.rx_queue(0).rx_discard()
        st = port.stats()
        assert st["rx_runt"] == sum(q["runt"] for q in st["rx_queues"]) == 1
        assert st["rx_dropped"] >= st["rx_runt"]
        assert st["rx_foreign_chains"] == sum(q["foreign_chains"] for q in st["rx_queues"])
        assert st["tx_foreign_chains"] == sum(q["foreign_chains"] for q in st["tx_queues"])
    finally:
        port.close()
        m.close()


def test_rx_queues_share_msix_vectors_when_the_device_has_fewer():
    # Virtio 1.2 4.1.5.1.2: several queues may use one vector. Vector 0 is the
    # configuration's; 4 rx queues over 2 more vectors: pair p uses 1 + p % 2.
    from pmd.sim.model import VirtioNetModel

    # automatic steering (no RSS): each frame stays on the pair it was sent on
    port, m = local_port(VirtioNetModel(queue_pairs=4, msix_vectors=3, features_off="RSS,HASH_REPORT"), queue_pairs=4,
                         rx_interrupts=True)
    try:
        assert [m.queues[2 * p].msix_vector for p in range(4)] == [1, 2, 1, 2]
        assert m.config_msix_vector == 0
        assert all(m.queues[2 * p + 1].msix_vector == 0xFFFF for p in range(4))   # tx: no vector
    finally:
        port.close()
        m.close()


def test_rx_wait_wakes_each_queue_on_a_shared_vector_and_only_for_its_own_packets():
    # Queues 0 and 2 share vector 1. Each sleeps in rx_wait in its own thread; a
    # packet for one must wake that one, whichever of the two drained the
    # eventfd, and must not make the other report packets it does not have.
    # Which thread drains is up to the scheduler: several rounds, both orders.
    from pmd.sim.model import VirtioNetModel

    # automatic steering (no RSS): each frame stays on the pair it was sent on
    port, m = local_port(VirtioNetModel(queue_pairs=4, msix_vectors=3, features_off="RSS,HASH_REPORT"), queue_pairs=4,
                         rx_interrupts=True)
    out = np.zeros((4, port.rx_queue(0).max_packet_len), np.uint8)
    try:
        for round_ in range(8):
            first, second = (2, 0) if round_ % 2 == 0 else (0, 2)
            sent = {0: threading.Event(), 2: threading.Event()}
            woke: dict[int, bool] = {}
            errors: list[BaseException] = []

            def sleeper(q: int) -> None:
                try:
                    ready = port.rx_wait(q, timeout=20)
                    woke[q] = ready and sent[q].is_set()      # woke for a packet that was there
                except BaseException as e:                    # pragma: no cover - reported below
                    errors.append(e)

            threads = {q: threading.Thread(target=sleeper, args=(q,)) for q in (0, 2)}
            for t in threads.values():
                t.start()
            time.sleep(0.1)                                   # both asleep in rx_wait (most rounds)
            sent[first].set()
            one_frame(port, first)
            threads[first].join(10)
            assert woke.get(first) is True, (round_, woke, errors)
            assert threads[second].is_alive() and second not in woke   # nothing for it: sleeps on
            sent[second].set()
            one_frame(port, second)
            threads[second].join(10)
            assert woke.get(second) is True and not errors, (round_, woke, errors)
            for q in (0, 2):
                assert port.rx_burst(out, np.zeros(4, np.uint32), queue=q) == 1
        assert port.stats()["rx_interrupts"] > 0
    finally:
        port.close()
        m.close()


def test_reading_port_link_does_not_swallow_the_change_the_callbacks_are_owed():
    # The interrupt thread is held in another callback while the link goes down
    # and port.link is read; when it gets to the config interrupt, the callback
    # must still be called for that change.
    from pmd.driver.interrupts import EventFd, get_interrupt_thread

    port, m = local_port()
    seen: list = []
    changed = threading.Event()
    port.on_link_change(lambda link: (seen.append(link), changed.set()))
    blocker, release, inside = EventFd(), threading.Event(), threading.Event()
    intr = get_interrupt_thread()
    reg = intr.register(blocker, lambda fd, count, arg: (inside.set(), release.wait(10)))
    try:
        blocker.signal()
        assert inside.wait(5)                             # the interrupt thread is busy
        m.set_link(False)
        assert port.link.up is False                      # read before the thread saw the interrupt
        release.set()
        assert changed.wait(5), "the link-down callback never came"
        assert seen == [Link(False)]
    finally:
        release.set()
        intr.unregister(reg)
        blocker.close()
        port.close()
        m.close()


def test_stopping_a_port_while_a_config_interrupt_is_handled_does_not_deadlock():
    # stop() holds the port lock while it waits for the interrupt thread to leave
    # the config-interrupt handler: the handler must never wait for the port lock.
    # In a child process, so a deadlock is a failed test and not a hung run.
    import subprocess

    from tests.isolated import describe, run_isolated

    code = """
import threading
import pmd
from pmd.sim.model import VirtioNetModel
from pmd.backends.local import LocalAccess

m = VirtioNetModel()
port = pmd.open_port(LocalAccess(m), name="sim")
port.start()
inside, release = threading.Event(), threading.Event()
port.on_link_change(lambda link: (inside.set(), release.wait(10)))
with port._lock:                      # as stop() holds it
    m.set_link(False)
    inside.wait(5)                    # the handler runs even while the port lock is held
    release.set()
    port.stop()
port.close()
m.close()
print("stopped", inside.is_set())
"""
    try:
        r = run_isolated(code, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("stop() and the config-interrupt handler waited for each other (deadlock)")
    assert r.returncode == 0 and "stopped True" in r.stdout, describe(r)


def test_start_with_promiscuous_sets_it_through_the_control_queue():
    for on in (False, True):
        port, m = local_port(promiscuous=on)
        try:
            assert port.promiscuous is on and m.rx_filter.promiscuous is on
        finally:
            port.close()
            m.close()


class SlowControl:
    """Wraps the built-in device's control handler: the first ``slow`` commands are
    answered ``delay`` seconds late with ``ack`` (the engine thread sleeps meanwhile)."""

    def __init__(self, model, delay: float, ack: int, slow: int = 1):
        self.handler = model.engine.control
        self.delay, self.ack, self.slow = delay, ack, slow
        self.seen: list[tuple[int, int, bytes]] = []
        model.engine.control = self

    def __call__(self, cls: int, cmd: int, data: bytes) -> int:
        self.seen.append((cls, cmd, bytes(data)))
        if len(self.seen) <= self.slow:
            time.sleep(self.delay)
            return self.ack
        return int(self.handler(cls, cmd, data))


def test_a_control_command_after_a_timeout_does_not_take_the_stale_completion():
    # 5.1.6.5: the device answers each command in its own chain's ack. The first
    # command times out in the driver; the device answers it late, with an error.
    # The next command must get its own answer (OK), not the late one.
    port, m = local_port()
    slow = SlowControl(m, delay=0.5, ack=N.CTRL_ERR)
    port.ctrl.timeout = 0.2
    frontier = port.ctrl.vq.used_frontier      # where the device writes its next used entry, either layout
    try:
        before = frontier()
        with pytest.raises(DeviceError, match="not completed within 0.2 s"):
            port.promiscuous = False
        deadline = time.monotonic() + 10
        while frontier() == before and time.monotonic() < deadline:
            time.sleep(0.01)                              # the late answer is in the used ring
        assert frontier() != before
        port.ctrl.timeout = 5.0
        port.allmulticast = True                          # its own OK, not the stale ERR
        assert slow.seen == [(N.CTRL_RX, N.CTRL_RX_PROMISC, b"\x00"), (N.CTRL_RX, N.CTRL_RX_ALLMULTI, b"\x01")]
        assert port.ctrl.late_completions == 1 and port.ctrl.timeouts == 1
        port.promiscuous = False                          # and the queue goes on
        assert port.stats()["control_timeouts"] == 1
    finally:
        port.close()
        m.close()


def test_control_commands_the_device_never_answers_fill_the_queue_then_a_restart_recovers():
    # Each timed-out command keeps its buffer until the device returns it (the
    # device may still write its ack there). When every slot is held the queue
    # says so and how to recover; a restart resets the device and the queue.
    port, m = local_port()
    SlowControl(m, delay=3.0, ack=N.CTRL_OK, slow=1)
    port.ctrl.timeout = 0.05
    try:
        held = 0
        with pytest.raises(DeviceError, match="not completed"):
            port.promiscuous = False
        held += 1
        while True:
            with pytest.raises(DeviceError) as e:
                port.promiscuous = False
            if "restart the port" in str(e.value):
                break
            held += 1
            assert held < 64
        assert held == port.ctrl.slots
        port.stop()
        port.start()
        port.promiscuous = False                          # a fresh control queue after the reset
    finally:
        port.close()
        m.close()
