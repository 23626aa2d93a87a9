"""Device side of the split virtqueue: everything the driver writes is checked.

Bad descriptors are written raw into the ring (as a buggy or hostile driver
would) and the device must refuse them, count them, and never touch memory
outside the DMA windows.
"""

import numpy as np
import pytest

import pmd
from pmd.sim._dma import DmaWindows
from pmd.sim._virtqueue import DeviceQueue
from pmd.errors import DeviceError

from .conftest import ring_view


@pytest.fixture
def raw(memory):
    """A ring written by hand: (device queue, ring views, a valid buffer iova)."""
    vq = pmd.Virtqueue(memory, 8)
    w = DmaWindows()
    w.add_memory(memory)
    dq = DeviceQueue(w, 8, vq.desc_iova, vq.avail_iova, vq.used_iova)
    buf = memory.iova(memory.alloc(256))
    return dq, ring_view(vq), buf


def expose(r, *heads):
    for k, h in enumerate(heads):
        r["avail_ring"][(int(r["avail_idx"][0]) + k) % 8] = h
    r["avail_idx"][0] = (int(r["avail_idx"][0]) + len(heads)) & 0xFFFF


def set_desc(r, i, addr, length, flags=0, nxt=0):
    r["desc"][i] = (addr, length, flags, nxt)


def test_valid_chain_is_popped(raw):
    dq, r, buf = raw
    set_desc(r, 0, buf, 16, 1, 1)
    set_desc(r, 1, buf + 16, 100, 2)
    expose(r, 0)
    head, readable, capacity = dq.pop_chain()
    assert head == 0 and len(readable) == 16 and capacity == 100


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda r, b: set_desc(r, 0, b, 16, 1, 8), "next index out of range"),
        (lambda r, b: (set_desc(r, 0, b, 16, 1, 1), set_desc(r, 1, b, 16, 1, 0)), "loops"),
        (lambda r, b: set_desc(r, 0, b, 16, 1, 0), "loops"),   # a descriptor pointing at itself
        (lambda r, b: set_desc(r, 0, 0x1234, 16), "outside the driver's DMA memory"),
        (lambda r, b: set_desc(r, 0, 2**64 - 8, 16), "outside the driver's DMA memory"),
        (lambda r, b: set_desc(r, 0, b, 2**32 - 1), "outside the driver's DMA memory"),
        (lambda r, b: set_desc(r, 0, b, 16, 4), "indirect"),
        (lambda r, b: (set_desc(r, 0, b, 16, 2 | 1, 1), set_desc(r, 1, b, 16, 0)), "after a device-writable"),
    ],
    ids=["next-out-of-range", "two-loop", "self-loop", "addr-outside", "addr-overflow",
         "len-past-end", "indirect", "readable-after-writable"],
)
def test_bad_chain_is_refused_counted_and_returned_empty(raw, setup, reason):
    dq, r, buf = raw
    setup(r, buf)
    expose(r, 0)
    with pytest.raises(DeviceError, match=reason):
        dq.pop_chain()
    assert dq.stats()["bad_descriptors"] == 1
    # The head goes back to the driver with length 0, so it can reclaim it.
    dq.publish_used()
    assert r["used_idx"][0] == 1 and tuple(r["used_ring"][0]) == (0, 0)


def test_head_out_of_range_is_refused_and_not_returned(raw):
    dq, r, buf = raw
    expose(r, 9)
    with pytest.raises(DeviceError, match="head index out of range"):
        dq.pop_chain()
    dq.publish_used()
    assert r["used_idx"][0] == 0


def test_avail_index_jump_breaks_the_queue(raw):
    dq, r, buf = raw
    r["avail_idx"][0] = 9       # 9 new entries on a ring of 8
    with pytest.raises(DeviceError, match="more than the queue size"):
        dq.pop_chain()
    assert dq.stats()["broken"]
    assert dq.pop_chain() is None


def test_device_never_writes_outside_the_windows(memory):
    # Two windows; a writable descriptor spanning the gap between them is refused.
    vq = pmd.Virtqueue(memory, 8)
    w = DmaWindows()
    w.add(memory.iova(0), 65536, memory.address, memory)   # ring lives in the first 64 KiB
    r = ring_view(vq)
    dq = DeviceQueue(w, 8, vq.desc_iova, vq.avail_iova, vq.used_iova)
    set_desc(r, 0, memory.iova(65536 - 8), 16, 2)
    expose(r, 0)
    with pytest.raises(DeviceError, match="outside"):
        dq.pop_chain()
    assert not np.frombuffer(memory, dtype=np.uint8)[65536:65536 + 64].any()


def test_ring_outside_driver_memory_is_refused(memory):
    w = DmaWindows()
    w.add_memory(memory)
    with pytest.raises(DeviceError, match="outside its DMA memory"):
        DeviceQueue(w, 8, 0x1000, 0x2000, 0x3000)


def test_misaligned_ring_is_refused(memory):
    w = DmaWindows()
    w.add_memory(memory)
    base = memory.iova(0)
    with pytest.raises(DeviceError, match="misaligned"):
        DeviceQueue(w, 8, base + 8, base + 4096, base + 8192)


def test_windows_translate_exactly_their_ranges(memory):
    w = DmaWindows()
    w.add(0x10000, 0x1000, memory.address, memory)
    assert w.local_address(0x10000, 0x1000) == memory.address
    assert w.local_address(0x10fff, 1) == memory.address + 0xfff
    assert w.local_address(0x10fff, 2) is None
    assert w.local_address(0xffff, 1) is None
    assert w.local_address(0x11000, 1) is None
    w.remove(0x10000)
    assert len(w) == 0 and w.local_address(0x10000) is None


def test_bad_window_is_refused():
    w = DmaWindows()
    with pytest.raises(ValueError):
        w.add(2**64 - 10, 100, 0x1000)
    with pytest.raises(ValueError):
        w.add(0, 0, 0x1000)


def test_complete_more_than_the_chain_holds_is_refused(raw):
    dq, r, buf = raw
    set_desc(r, 0, buf, 8, 2)
    expose(r, 0)
    head, _, cap = dq.pop_chain()
    with pytest.raises(ValueError, match="do not fit"):
        dq.complete(head, b"x" * 9)


# ---- the wire side: device_tx_burst / device_rx_burst ----

def test_wire_round_trip_through_both_rings():
    from pmd.sim._rx import device_rx_burst
    from pmd.sim._tx import device_tx_burst
    from pmd.loopback import Loopback

    rng = np.random.default_rng(5)
    with Loopback(queue_size=64) as lb:
        lengths = rng.integers(60, 1515, 40).astype(np.uint32)
        data = rng.integers(0, 256, (40, 1514), dtype=np.uint8)
        lb.driver_tx.tx_burst(data, lengths)
        wire = np.zeros((64, 1514), np.uint8)
        wlen = np.zeros(64, np.uint32)
        n = device_tx_burst(lb.device_tx, wire, wlen)
        assert n == 40 and (wlen[:n] == lengths).all()
        assert all((wire[i, :wlen[i]] == data[i, :lengths[i]]).all() for i in range(n))
        assert device_rx_burst(lb.device_rx, wire, wlen, n) == 40
        out = np.zeros((64, 2048), np.uint8)
        olen = np.zeros(64, np.uint32)
        assert lb.driver_rx.rx_burst(out, olen) == 40
        assert (olen[:40] == lengths).all()
        assert all((out[i, :olen[i]] == data[i, :lengths[i]]).all() for i in range(40))


def test_wire_delivery_stops_when_the_driver_has_no_buffers():
    from pmd.sim._rx import device_rx_burst
    from pmd.loopback import Loopback

    with Loopback(queue_size=8) as lb:
        pk = np.zeros((20, 100), np.uint8)
        ln = np.full(20, 100, np.uint32)
        assert device_rx_burst(lb.device_rx, pk, ln) == 8      # the ring holds 8 buffers
        assert device_rx_burst(lb.device_rx, pk, ln) == 0


def test_wire_jumbo_over_mergeable_buffers():
    from pmd.sim._rx import device_rx_burst
    from pmd.loopback import Loopback

    with Loopback(queue_size=16, mergeable=True) as lb:
        pk = np.random.default_rng(6).integers(0, 256, (1, 9000), dtype=np.uint8)
        assert device_rx_burst(lb.device_rx, pk, np.array([9000], np.uint32), mergeable=True) == 1
        out = np.zeros((1, 9216), np.uint8)
        ol = np.zeros(1, np.uint32)
        assert lb.driver_rx.rx_burst(out, ol) == 1 and ol[0] == 9000 and (out[0, :9000] == pk[0]).all()


def test_wire_tx_drops_packets_longer_than_the_row():
    from pmd.sim._tx import device_tx_burst
    from pmd.loopback import Loopback

    with Loopback(queue_size=8) as lb:
        lb.driver_tx.tx_burst(np.zeros((2, 1000), np.uint8), np.array([1000, 50], np.uint32))
        wire = np.zeros((4, 500), np.uint8)
        wl = np.zeros(4, np.uint32)
        assert device_tx_burst(lb.device_tx, wire, wl) == 1 and wl[0] == 50
        assert lb.device_tx.stats()["dropped"] == 1


# ---- the device side copies out what the command needs, not what the driver says ----

def long_chain(memory, size, n_out, length, n_in=0):
    """A driver queue of ``size`` entries with one chain: ``n_out`` readable
    descriptors of ``length`` bytes at the start of memory, then ``n_in`` writable bytes."""
    vq = pmd.Virtqueue(memory, size)
    w = DmaWindows()
    w.add_memory(memory)
    dq = DeviceQueue(w, size, vq.desc_iova, vq.avail_iova, vq.used_iova)
    ack = memory.alloc(64)
    vq.add([(memory.iova(0), length)] * n_out, [(memory.iova(ack), n_in)] if n_in else [])
    vq.kick()
    return vq, dq, ack


def test_pop_chain_copies_no_more_than_its_bound(memory):
    # Before: 16 descriptors over the whole region made pop_chain allocate and
    # copy 16 times its size (1 GiB for 64 MiB), with the GIL held.
    vq, dq, _ = long_chain(memory, 16, 16, memory.size)
    head, readable, capacity = dq.pop_chain()
    assert readable is None and capacity == 0
    assert dq.stats()["too_long"] == 1 and dq.stats()["bad_descriptors"] == 0
    dq.complete(head)
    dq.publish_used()
    assert vq.get_used() == ([0] * 16, 0)        # returned to the driver, nothing read


def test_pop_chain_bound_is_the_callers(memory):
    _, dq, _ = long_chain(memory, 8, 2, 100)
    assert dq.pop_chain(max_readable=199)[1] is None
    _, dq, _ = long_chain(memory, 8, 2, 100)
    assert len(dq.pop_chain(max_readable=200)[1]) == 200


@pytest.mark.parametrize("writable", [False, True], ids=["readable", "writable"])
def test_chain_bytes_past_32_bits_are_refused(memory, writable):
    # 513 descriptors of 8 MiB: 4 GiB + 8 MiB, which a 32-bit sum wraps to 8 MiB.
    vq = pmd.Virtqueue(memory, 1024)
    w = DmaWindows()
    w.add_memory(memory)
    dq = DeviceQueue(w, 1024, vq.desc_iova, vq.avail_iova, vq.used_iova)
    bufs = [(memory.iova(0), memory.size)] * 513
    vq.add([] if writable else bufs, bufs if writable else [])
    vq.kick()
    with pytest.raises(DeviceError, match="longer than 4 GiB"):
        dq.pop_chain()
    assert dq.stats()["bad_descriptors"] == 1


def serve_control(dq):
    from pmd.sim.engine import Engine, RxFilter

    calls = []
    engine = Engine(None, RxFilter(mac=bytes(6)), lambda c, m, d: calls.append((c, m, len(d))) or 0)
    engine._serve_control(dq)
    return engine, calls


def test_control_command_longer_than_any_the_device_accepts_gets_err_unread(memory):
    # 5.1.6.5: the largest command is MAC_TABLE_SET with two tables of 64
    # entries: 2 + 2 * (4 + 64 * 6) = 778 bytes. One byte more is answered
    # VIRTIO_NET_ERR (1) without being copied or handed to the model.
    vq, dq, ack = long_chain(memory, 8, 1, 779, n_in=1)
    memory.view(ack, 1)[0] = 0xFF
    engine, calls = serve_control(dq)
    assert calls == [] and engine.ctrl_errors == 1
    assert vq.get_used()[1] == 1 and memory.view(ack, 1)[0] == 1
    vq, dq, ack = long_chain(memory, 8, 1, 778, n_in=1)
    engine, calls = serve_control(dq)
    assert [n for _, _, n in calls] == [776] and engine.ctrl_errors == 0    # handed over whole
