"""VIRTIO_F_IN_ORDER (feature bit 35), rule by rule, split (Virtio 1.2 2.7.9) and packed (2.8.9).

The device uses buffers in the order they were made available and may write one
used entry for a batch: the id of the batch's last buffer at the place of its first
(split: used->idx advances by the batch's size; packed: the used position skips the
batch's descriptors); the skipped buffers were used completely. The driver gives out
descriptors in ring order (2.7.5: `next` is x + 1, and 0 for the last in the table).

Driver rules are checked against a device that writes used entries by hand (split:
the used ring through tests.conftest.ring_view; packed: tests.test_virtqueue_packed's
numpy PackedDevice); device rules against pmd's DeviceQueue and the bytes it writes.
"""

from __future__ import annotations

import numpy as np
import pytest

import pmd
from pmd.driver._pool import PacketPool
from pmd.driver._tx import TxQueue
from pmd.driver._virtqueue import Virtqueue
from pmd.errors import DeviceError
from pmd.loopback import Loopback
from pmd.sim._dma import DmaWindows
from pmd.sim._virtqueue import DeviceQueue

from .conftest import ring_view
from .test_virtqueue_packed import PackedDevice

LAYOUTS = ["split", "packed"]


@pytest.fixture
def memory():
    m = pmd.DmaMemory(4 << 20, lock=False, name="in-order-test")
    yield m
    m.close()


class HandDevice:
    """Takes the driver's chains in order and writes used entries as told, either layout."""

    def __init__(self, vq: Virtqueue) -> None:
        self.vq = vq
        self.packed = vq.packed
        if self.packed:
            self.dev = PackedDevice(vq)
        else:
            self.r = ring_view(vq)
            self.avail = 0
            self.used = 0
        self.taken: list[tuple[int, int]] = []     # (head or id, descriptors), in avail order

    def take_all(self) -> None:
        if self.packed:
            while (c := self.dev.take()) is not None:
                self.taken.append((c[0], len(c[1])))
            return
        desc = self.r["desc"]
        while self.avail != int(self.r["avail_idx"][0]):
            head = int(self.r["avail_ring"][self.avail % self.vq.size])
            n, i = 1, head
            while desc[i]["flags"] & 1:
                i = int(desc[i]["next"])
                n += 1
            self.taken.append((head, n))
            self.avail += 1

    def use_batch(self, nbufs: int, length: int, *, name: int | None = None, cover: int | None = None) -> None:
        """One used entry for the oldest ``nbufs`` buffers taken: the last one's id (or
        ``name``) and ``length``; split: used->idx advances by ``cover`` (the batch size)."""
        batch, self.taken = self.taken[:nbufs], self.taken[nbufs:]
        last = batch[-1][0] if name is None else name
        if self.packed:
            self.dev.use(last, length, skip=sum(n for _, n in batch))
            return
        self.r["used_ring"][self.used % self.vq.size] = (last, length)
        self.used += nbufs if cover is None else cover
        self.r["used_idx"][0] = self.used % 65536


def in_order_ring(memory, layout, size=8):
    vq = Virtqueue(memory, size, 0, packed=layout == "packed", in_order=True)
    return vq, HandDevice(vq)


def add_rx(vq, memory, n, length=64):
    """``n`` single-buffer device-writable chains, cookies 0..n-1; returns the heads."""
    return [vq.add([], [(memory.iova(memory.alloc(length)), length)], cookie=c) for c in range(n)]


# ---- the driver (2.7.5, 2.7.9, 2.8.9) ----

@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_descriptors_are_used_in_ring_order_wrapping_at_the_table_end(memory, layout):
    vq, dev = in_order_ring(memory, layout)
    buf = [(memory.iova(memory.alloc(16)), 16)]
    heads = []
    for _ in range(3):                       # three laps of 3-descriptor chains over 8 slots
        for _ in range(2):
            heads.append(vq.add(buf * 3, [], cookie=len(heads)))
        vq.kick()
        dev.take_all()
        dev.use_batch(2, 0)
        assert vq.get_used()[0] == [len(heads) - 2] * 3 and vq.get_used()[0] == [len(heads) - 1] * 3
    assert heads == [0, 3, 6, 1, 4, 7]        # each chain starts where the last ended, mod 8
    if layout == "split":
        desc = ring_view(vq)["desc"]
        assert int(desc[6]["next"]) == 7 and int(desc[7]["next"]) == 0      # 2.7.5: x + 1, the last -> 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_one_used_entry_retires_the_whole_batch(memory, layout):
    vq, dev = in_order_ring(memory, layout)
    add_rx(vq, memory, 5)
    vq.kick()
    dev.take_all()
    dev.use_batch(5, 40)
    got = [vq.get_used() for _ in range(5)]
    # 2.7.9: the skipped buffers were used completely; the last has the length written
    assert got == [([0], 64), ([1], 64), ([2], 64), ([3], 64), ([4], 40)]
    assert vq.get_used() is None and vq.free_descriptors == 8 and vq.stats()["in_order_batches"] == 1
    s = vq.stats()
    assert s["bad_used_id"] == s["used_not_in_flight"] == s["bad_used_len"] == s["bad_used_idx"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_a_batch_of_chains_is_skipped_by_their_descriptors(memory, layout):
    vq, dev = in_order_ring(memory, layout)
    buf = (memory.iova(memory.alloc(32)), 32)
    for c, (n_out, n_in) in enumerate([(1, 1), (0, 1), (2, 1)]):
        vq.add([buf] * n_out, [buf] * n_in, cookie=c)
    vq.kick()
    dev.take_all()
    dev.use_batch(3, 7)
    assert [vq.get_used() for _ in range(3)] == [([0, 0], 32), ([1], 32), ([2, 2, 2], 7)]
    add_rx(vq, memory, 2)                     # the next batch starts where this one ended
    vq.kick()
    dev.take_all()
    dev.use_batch(1, 9)
    dev.use_batch(1, 10)
    assert vq.get_used() == ([0], 9) and vq.get_used() == ([1], 10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_an_entry_for_each_buffer_is_taken_as_a_batch_of_one(memory, layout):
    vq, dev = in_order_ring(memory, layout)
    add_rx(vq, memory, 4)
    vq.kick()
    dev.take_all()
    for k in range(4):
        dev.use_batch(1, 20 + k)
    assert [vq.get_used() for _ in range(4)] == [([k], 20 + k) for k in range(4)]
    assert vq.stats()["in_order_batches"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["retired", "not-made-available", "chain-member", "out-of-range"])
def test_in_order_used_id_out_of_order_breaks_the_queue(memory, layout, case):
    vq, dev = in_order_ring(memory, layout)
    buf = (memory.iova(memory.alloc(32)), 32)
    vq.add([], [buf], cookie=0)               # id 0
    vq.add([buf], [buf], cookie=1)            # ids 1, 2
    vq.add([], [buf], cookie=2)               # id 3
    vq.kick()
    dev.take_all()
    dev.use_batch(1, 8)
    assert vq.get_used() == ([0], 8)          # 0 is retired now
    name, counter = {"retired": (0, "used_not_in_flight"), "not-made-available": (5, "used_not_in_flight"),
                     "chain-member": (2, "used_not_in_flight"), "out-of-range": (8, "bad_used_id")}[case]
    dev.use_batch(1, 8, name=name)
    with pytest.raises(DeviceError):
        vq.get_used()
    assert vq.broken and vq.stats()[counter] == 1
    with pytest.raises(DeviceError, match="IN_ORDER"):
        vq.get_used()                         # stopped: reset the device
    assert vq.stats()[counter] == 1           # counted once


def test_in_order_a_batch_the_used_index_does_not_cover_breaks_the_queue(memory):
    vq, dev = in_order_ring(memory, "split")
    add_rx(vq, memory, 4)
    vq.kick()
    dev.take_all()
    dev.use_batch(4, 8, cover=2)              # names the 4th buffer, says 2 were used
    with pytest.raises(DeviceError):
        vq.get_used()
    assert vq.broken and vq.stats()["bad_used_idx"] == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_a_batch_length_past_the_last_buffer_is_counted_and_reclaimed(memory, layout):
    vq, dev = in_order_ring(memory, layout)
    add_rx(vq, memory, 3)
    vq.kick()
    dev.take_all()
    dev.use_batch(3, 65)
    assert vq.get_used() == ([0], 64) and vq.get_used() == ([1], 64)
    with pytest.raises(DeviceError, match="larger than"):
        vq.get_used()
    assert vq.stats()["bad_used_len"] == 1 and vq.free_descriptors == 8 and not vq.broken


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_transmit_reclaim_frees_a_whole_batch_in_one_step(memory, layout):
    pool = PacketPool(memory, 64, 2048)
    vq = Virtqueue(memory, 16, 1, packed=layout == "packed", in_order=True)
    txq = TxQueue(vq, pool)
    dev = HandDevice(vq)
    pkts = np.zeros((10, 100), np.uint8)
    assert txq.tx_burst(pkts, np.full(10, 100, np.uint32)) == 10
    dev.take_all()
    dev.use_batch(6, 0)
    free_before = pool.available
    assert txq.reclaim() == 6 and pool.available == free_before + 6
    assert vq.in_flight == 4 and vq.stats()["in_order_batches"] == 1
    dev.use_batch(4, 0)
    assert txq.reclaim() == 4 and vq.in_flight == 0 and txq.stats()["foreign_chains"] == 0
    txq.close()
    pool.close()


def test_in_order_packed_nused_counts_the_buffers_of_every_batch(memory):
    vq, dev = in_order_ring(memory, "packed")
    add_rx(vq, memory, 6)
    vq.kick()
    dev.take_all()
    dev.use_batch(2, 5)
    dev.use_batch(3, 6)
    assert vq.used_frontier() == (5, 1)      # past both batches
    assert [vq.get_used() for _ in range(5)] == [([0], 64), ([1], 5), ([2], 64), ([3], 64), ([4], 6)]
    assert vq.get_used() is None and vq.in_flight == 1


# ---- the device (pmd.sim) ----

def device_pair(memory, layout, *, in_order=True, size=16):
    vq = Virtqueue(memory, size, 0, packed=layout == "packed", in_order=in_order)
    w = DmaWindows()
    w.add_memory(memory)
    dq = DeviceQueue(w, size, vq.desc_iova, vq.avail_iova, vq.used_iova, packed=layout == "packed",
                     in_order=in_order)
    return vq, dq


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "not-negotiated"])
def test_in_order_device_returns_a_transmit_burst_with_one_used_entry(memory, layout, in_order):
    vq, dq = device_pair(memory, layout, in_order=in_order)
    buf = (memory.iova(memory.alloc(64)), 64)
    for c in range(5):
        vq.add([buf], [], cookie=c)
    vq.kick()
    for _ in range(5):
        head, _, _ = dq.pop_chain()
        dq.complete(head)                     # a transmit chain: used whole, nothing written
    dq.publish_used()
    # one entry for the five when negotiated, one each when not (the driver then
    # expects one per buffer)
    assert dq.stats()["used_entries"] == (1 if in_order else 5)
    if layout == "split":
        r = ring_view(vq)
        assert int(r["used_idx"][0]) == 5
        if in_order:
            assert tuple(r["used_ring"][0]) == (4, 0)     # the last buffer's id, at the first's place
    assert [vq.get_used()[0] for _ in range(5)] == [[c] for c in range(5)]
    assert vq.get_used() is None and vq.free_descriptors == 16


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_device_writes_an_entry_for_each_buffer_it_did_not_fill(memory, layout):
    vq, dq = device_pair(memory, layout)
    add_rx(vq, memory, 4, length=64)
    vq.kick()
    lengths = [64, 10, 64, 64]                 # filled, partly, filled, filled
    for ln in lengths:
        head, _, cap = dq.pop_chain()
        dq.complete(head, bytes(ln))
    dq.publish_used()
    # 0 and 1 close at 1 (its length must be said); 2 and 3 are one batch
    assert dq.stats()["used_entries"] == 2
    assert [vq.get_used() for _ in range(4)] == [([c], ln) for c, ln in enumerate(lengths)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_device_never_skips_a_refused_chain(memory, layout):
    vq, dq = device_pair(memory, layout)
    buf = (memory.iova(memory.alloc(64)), 64)
    vq.add([buf], [], cookie=0)
    vq.add([(0xdead_0000_0000, 64)], [(memory.iova(memory.alloc(64)), 64)], cookie=1)   # outside the windows
    vq.add([buf], [], cookie=2)
    vq.kick()
    head, _, _ = dq.pop_chain()
    dq.complete(head)                         # a transmit chain, used whole: the batch is open
    with pytest.raises(DeviceError, match="refused"):
        dq.pop_chain()                        # returned at once with length 0: never skipped
    head, _, _ = dq.pop_chain()
    dq.complete(head)
    dq.publish_used()
    assert dq.stats()["bad_descriptors"] == 1
    got = [vq.get_used() for _ in range(3)]
    assert [g[0][0] for g in got] == [0, 1, 2] and got[1][1] == 0    # the refused one: 0 bytes, not 64


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_order_loopback_is_byte_exact(layout):
    rng = np.random.default_rng(35)
    with Loopback(queue_size=64, packed=layout == "packed", in_order=True) as lb:
        out = np.zeros((64, lb.driver_rx.max_packet_len), np.uint8)
        lens = np.zeros(64, np.uint32)
        sent, got = [], []
        for _ in range(600):
            n = int(rng.integers(1, 65))
            ln = rng.integers(14, 1515, n).astype(np.uint32)
            pk = rng.integers(0, 256, (n, 1514), dtype=np.uint8)
            k = lb.driver_tx.tx_burst(pk, ln)
            sent += [bytes(pk[i, :ln[i]]) for i in range(k)]
            lb.step(int(rng.integers(1, 65)))
            m = lb.driver_rx.rx_burst(out[:int(rng.integers(1, 65))], lens)
            got += [bytes(out[i, :lens[i]]) for i in range(m)]
        for _ in range(64):
            lb.driver_tx.reclaim()
            lb.step()
            m = lb.driver_rx.rx_burst(out, lens)
            got += [bytes(out[i, :lens[i]]) for i in range(m)]
        assert got == sent and len(sent) > 5000
        s = lb.stats()
        assert s["device_tx"]["used_entries"] < len(sent) // 4     # transmit batches: one entry each
        assert s["driver_tx"]["in_order_batches"] > 0
        for side in ("driver_rx", "driver_tx"):
            assert s[side]["bad_used_id"] == s[side]["used_not_in_flight"] == s[side]["bad_used_len"] == 0
