"""Interrupts without MSI-X: MSI, else INTx with the ISR read (Virtio 1.2 4.1.4.5).

A device without an MSI-X capability (QEMU's ``virtio-net-pci,vectors=0``; the
built-in device with ``msix_vectors=0``) interrupts through one MSI or the INTx
line for every source. The driver then writes no vector register, reads the ISR
status to learn the cause (bit 0 a queue, bit 1 a configuration change; the read
clears it and deasserts INTx) and, for INTx, unmasks the line VFIO masked when it
fired. rx_wait and the link callbacks behave as with MSI-X.
"""
from __future__ import annotations

import os
import threading
import time
import numpy as np
import pytest

import pmd
from pmd.abi.pci import parse_config
from pmd.abi.vfio import IrqInfo
from pmd.abi.virtio import NO_VECTOR
from pmd.driver.virtio.pci_common import PciTransport
from pmd.errors import DeviceError
from tests.test_port import PortTests, local_port, one_frame
from tests.test_vfio import FakeAccess

# IRQ info flags: EVENTFD 1, MASKABLE 2, AUTOMASKED 4, NORESIZE 8
MSIX = IrqInfo(2, 0x9, 4)
MSI = IrqInfo(1, 0x9, 1)
INTX = IrqInfo(0, 0x7, 1)


class UnmaskRecorder(FakeAccess):
    def __init__(self, irqs: dict[int, IrqInfo]) -> None:
        super().__init__(irqs)
        self.unmasked: list[tuple[int, int, int]] = []
        self.disabled: list[int] = []

    def unmask_irq(self, index: int, start: int = 0, count: int = 1) -> None:
        self.unmasked.append((index, start, count))

    def disable_irqs(self, index: int) -> None:
        self.disabled.append(index)


# Just PciTransport's interrupt and DMA logic over an access: the register parts are not used.
BarePci = type("BarePci", (PciTransport,), {name: (lambda *a, **k: None) for name in PciTransport.__abstractmethods__})


def transport(irqs: dict[int, IrqInfo]) -> tuple[PciTransport, UnmaskRecorder]:
    access = UnmaskRecorder(irqs)
    return BarePci(access), access


# ---------------------------------------------------------------- the transport picks the mode

@pytest.mark.parametrize("irqs, mode, vectors", [
    ({2: MSIX, 1: MSI, 0: INTX}, "msix", 4),
    ({2: IrqInfo(2, 0x9, 0), 1: MSI, 0: INTX}, "msi", 1),        # MSI-X index with count 0: no MSI-X
    ({1: IrqInfo(1, 0x9, 4), 0: INTX}, "msi", 1),                # multi-message MSI is still one interrupt
    ({0: INTX}, "intx", 1),
    ({2: IrqInfo(2, 0x8, 4), 0: INTX}, "intx", 1),              # MSI-X without eventfds cannot be used
    ({}, "none", 0),
])
def test_transport_falls_back_from_msix_to_msi_to_intx(irqs, mode, vectors):
    t, _ = transport(irqs)
    assert t.interrupt_mode() == mode
    assert t.interrupt_vectors() == vectors


def test_msi_and_intx_take_one_eventfd_on_their_own_index():
    for irqs, index in (({1: MSI, 0: INTX}, 1), ({0: INTX}, 0)):
        t, access = transport(irqs)
        t.set_interrupts([17])
        assert access.calls == [(index, 0, [17])]
        with pytest.raises(DeviceError, match="one interrupt for every source"):
            t.set_interrupts([17, 18])
        t.disable_interrupts()
        assert access.disabled == [index]


def test_only_intx_is_unmasked():
    t, access = transport({0: INTX})
    t.unmask_interrupt()
    assert access.unmasked == [(0, 0, 1)]
    for irqs in ({2: MSIX, 0: INTX}, {1: MSI, 0: INTX}, {}):
        t, access = transport(irqs)
        t.unmask_interrupt()                     # edge-triggered, or nothing: no unmask
        assert access.unmasked == []


def test_a_device_with_no_interrupt_says_so():
    t, _ = transport({})
    with pytest.raises(DeviceError, match="signals no interrupts"):
        t.set_interrupts([17])


def test_rx_interrupts_on_a_device_with_no_interrupt_at_all_is_a_clear_error():
    from pmd.sim.model import VirtioNetModel

    class NoIrqModel(VirtioNetModel):
        def irq_info(self, index):
            return 0, 0

    with pytest.raises(DeviceError, match="no MSI-X, MSI or INTx"):
        local_port(NoIrqModel(), rx_interrupts=True)
    port, m = local_port(NoIrqModel())           # without rx interrupts it starts, and polls
    try:
        assert port.interrupt_mode == "none" and port.info()["interrupts"] == "none"
    finally:
        port.close()
        m.close()


# ---------------------------------------------------------------- a port on a device without MSI-X

@pytest.fixture
def intx_port():
    from pmd.sim.model import VirtioNetModel

    # two pairs, automatic steering (no RSS): each frame stays on the pair it was sent on
    port, m = local_port(VirtioNetModel(msix_vectors=0, queue_pairs=2, features_off="RSS,HASH_REPORT"),
                         queue_pairs=2, rx_interrupts=True)
    yield port, m
    port.close()
    m.close()


def test_the_device_has_no_msix_capability_and_an_intx_pin():
    from pmd.sim.model import VirtioNetModel

    with VirtioNetModel(msix_vectors=0) as m:
        cs = parse_config(m.pci.snapshot())
        assert cs.msix is None and cs.interrupt_pin == 1
        assert m.irq_info(2) == (0, 0) and m.irq_info(0)[0] == 1


def test_the_port_uses_intx_and_writes_no_vector(intx_port):
    port, m = intx_port
    assert port.interrupt_mode == "intx" and port.info()["interrupts"] == "intx"
    assert m.config_msix_vector == NO_VECTOR
    assert all(q.msix_vector == NO_VECTOR for q in m.queues)


def test_every_link_change_reaches_the_callback_through_isr_and_unmask(intx_port):
    # The second change comes only if the line was unmasked after the first: VFIO
    # (here the model) masks INTx when it fires.
    port, m = intx_port
    seen: list = []
    changed = threading.Event()
    port.on_link_change(lambda link: (seen.append(link.up), changed.set()))
    for up in (False, True, False):
        changed.clear()
        m.set_link(up)
        assert changed.wait(10), f"no callback for link {'up' if up else 'down'} (line left masked?)"
    assert seen == [False, True, False]
    st = port.stats()
    assert st["config_interrupts"] == 3 and st["rx_interrupts"] == 0
    assert m.isr == 0                                  # read, so cleared (4.1.4.5)


def test_rx_wait_wakes_on_intx_and_only_the_queue_with_packets_reports_them(intx_port):
    port, m = intx_port
    out = np.zeros((4, port.rx_queue(0).max_packet_len), np.uint8)
    lens = np.zeros(4, np.uint32)
    t0 = time.monotonic()
    assert port.rx_wait(0, timeout=0.3) is False and time.monotonic() - t0 >= 0.29
    for q, other in ((1, 0), (0, 1), (1, 0)):
        woke: dict[int, bool] = {}
        sleepers = {k: threading.Thread(target=lambda k=k: woke.__setitem__(k, port.rx_wait(k, timeout=5)))
                    for k in (q, other)}
        for t in sleepers.values():
            t.start()
        time.sleep(0.1)
        one_frame(port, q)
        sleepers[q].join(10)
        assert woke.get(q) is True
        sleepers[other].join(10)
        assert woke.get(other) is False                # woken, found its ring empty, slept on
        assert port.rx_burst(out, lens, queue=q) == 1 and lens[0] == 60
    assert port.stats()["rx_interrupts"] >= 3


def test_an_isr_with_no_cause_is_spurious_and_the_line_is_unmasked(intx_port):
    # A shared INTx line fires for another device: ISR reads 0. Reserved ISR bits
    # from a misbehaving device are no cause either. Neither is a link change or a
    # packet; the line is unmasked all the same.
    port, m = intx_port
    calls: list = []
    port.on_link_change(calls.append)
    for isr in (0, 0xFC):
        with m._cfg_lock:
            m.isr, m._intx_masked = isr, True
        before = port.stats()["spurious_interrupts"]
        port._line_event.signal()                      # as VFIO would
        deadline = time.monotonic() + 5
        while port.stats()["spurious_interrupts"] == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert port.stats()["spurious_interrupts"] == before + 1
        deadline = time.monotonic() + 5
        while m._intx_masked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not m._intx_masked and m.isr == 0
    assert calls == [] and port.stats()["config_interrupts"] == 0


def test_stop_and_restart_release_and_set_up_the_line_again(intx_port):
    port, m = intx_port
    line = port._line_event
    port.stop()
    assert line.closed and m._intx_fd == -1
    port.start(rx_interrupts=True)
    seen = threading.Event()
    port.on_link_change(lambda link: seen.set())
    m.set_link(False)
    assert seen.wait(10)


# ---------------------------------------------------------------- the built-in device over vfio-user

def test_a_device_without_msix_over_vfio_user_interrupts_on_intx():
    port = pmd.open_port("sim", msix_vectors=0)
    try:
        port.start(rx_interrupts=True)
        assert port.interrupt_mode == "intx"
        seen: list = []
        changed = threading.Event()
        port.on_link_change(lambda link: (seen.append(link.up), changed.set()))
        for up in (False, True):
            changed.clear()
            port.sim.set_link(up)
            assert changed.wait(20), f"no link {'up' if up else 'down'} callback over INTx"
        assert seen == [False, True]
        threading.Timer(0.3, one_frame, args=(port, 0)).start()
        assert port.rx_wait(0, timeout=20) is True
        assert port.rx_queue(0).rx_discard() == 1
    finally:
        port.close()


# ---------------------------------------------------------------- QEMU's device without MSI-X, in the guest

@pytest.mark.vfio
@pytest.mark.skipif(not os.environ.get("PMD_VFIO_INTX_DEVICE"),
                    reason="PMD_VFIO_INTX_DEVICE is not set: runs in the QEMU guest "
                           "(tests/vm/harness.py --intx: virtio-net-pci,vectors=0 behind vfio-pci)")
class TestIntxVfio:
    """QEMU's virtio-net-pci with ``vectors=0`` bound to vfio-pci: no MSI-X capability,
    VFIO reports 0 MSI-X vectors and no MSI, so the port runs on INTx. Link changes
    (QMP ``set_link``) and rx interrupts must arrive through the line and the ISR."""

    net = "intx"
    # test_port.PortTests's own tests, on this device (its fixtures too)
    port = PortTests.port
    host = PortTests.host
    start_kw: dict = {}
    test_link_change_reaches_the_callback = PortTests.test_link_change_reaches_the_callback
    test_rx_wait_sleeps_without_burning_cpu_and_wakes_on_traffic = \
        PortTests.test_rx_wait_sleeps_without_burning_cpu_and_wakes_on_traffic

    def open(self, **kw):
        return pmd.open_port(os.environ["PMD_VFIO_INTX_DEVICE"], **kw)

    def test_vfio_offers_intx_and_no_msix(self):
        from pmd.abi.vfio import PCI_INTX_IRQ_INDEX, PCI_MSI_IRQ_INDEX, PCI_MSIX_IRQ_INDEX
        from pmd.driver.access.vfio import VfioAccess

        with VfioAccess.open(os.environ["PMD_VFIO_INTX_DEVICE"]) as dev:
            assert parse_config(dev.config_read(0, 256)).msix is None
            assert dev.irq_info(PCI_MSIX_IRQ_INDEX).count == 0
            assert dev.irq_info(PCI_MSI_IRQ_INDEX).count == 0
            intx = dev.irq_info(PCI_INTX_IRQ_INDEX)
            assert intx.count == 1 and intx.eventfd and intx.automasked

    def test_the_port_runs_on_intx_and_link_changes_keep_coming(self, port, host):
        assert port.interrupt_mode == "intx" and port.info()["interrupts"] == "intx"
        seen: list = []
        changed = threading.Event()
        port.on_link_change(lambda link: (seen.append(link.up), changed.set()))
        for up in (False, True, False, True):           # each needs the line unmasked after the last
            changed.clear()
            host.set_link(up, net=self.net)
            assert changed.wait(20), f"no link {'up' if up else 'down'} callback over INTx"
        assert seen == [False, True, False, True]
        assert port.stats()["config_interrupts"] >= 4


def test_pmd_info_says_which_interrupt_mode_the_device_gives():
    from pmd.cli.data import virtio_data
    from pmd.cli.text import format_virtio

    text = format_virtio(1 << 32, transport_bits=64, transport="modern", interrupts="intx")
    assert "interrupts: INTx" in text and "ISR" in text
    assert "interrupts:" not in format_virtio(1 << 32, transport_bits=64, transport="modern")
    assert virtio_data(1 << 32, transport_bits=64, transport="modern", interrupts="msi")["interrupts"] == "msi"


def test_the_transport_interface_names_the_isr_bits_as_the_pci_spec_does():
    from pmd.abi import virtio_pci
    from pmd.driver.virtio import transport as T

    assert (T.ISR_QUEUE, T.ISR_CONFIG) == (virtio_pci.ISR_QUEUE, virtio_pci.ISR_CONFIG) == (1, 2)


def test_closing_the_intx_device_and_its_port_leaves_no_fd_and_no_thread():
    from pmd.sim.model import VirtioNetModel

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    port, m = local_port(VirtioNetModel(msix_vectors=0), rx_interrupts=True)   # warm up imports, the interrupt thread
    port.close()
    m.close()
    before, threads = fds(), {t.name for t in threading.enumerate()}
    for _ in range(3):
        port, m = local_port(VirtioNetModel(msix_vectors=0), rx_interrupts=True)
        assert any(t.name.endswith("-intx") for t in threading.enumerate())
        port.close()
        m.close()
    assert fds() == before
    assert {t.name for t in threading.enumerate()} <= threads
