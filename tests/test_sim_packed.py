"""The device side of the packed virtqueue (Virtio 1.2 2.8): pmd.sim._virtqueue.DeviceQueue(packed=True).

The driver here is a few lines of Python (:class:`PackedDriver`) writing packed
descriptors into DMA memory with numpy, the way 2.8.21 and 2.8.22 describe it,
independently of the code under test. One test per rule of the spec, named
after it; then every kind of bad descriptor, a property test of random
add/complete sequences over many laps, the device bursts (pmd.sim._rx,
pmd.sim._tx) over packed rings, and the device model offering RING_PACKED.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pmd
from pmd.errors import DeviceError, QueueStateError
from pmd.sim._dma import DmaWindows
from pmd.sim._virtqueue import DeviceQueue

# 2.8.13 and 2.8.1-2.8.7: the layout and flags, written out here as the spec has them
DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
ENABLE, DISABLE, DESC_EVENT = 0, 1, 2
BUF = 2048                  # bytes of driver memory per descriptor
MAX_CHAIN = 4               # descriptors per chain the test driver can give memory to


class PackedDriver:
    """A driver of one packed queue in plain Python (2.8.21.3 and 2.8.22's examples).

    Its buffers are ``BUF`` bytes per (id, descriptor of the chain): an id owns
    its memory while in flight, whichever ring slots its chain or its used
    descriptor take.
    """

    def __init__(self, memory: pmd.DmaMemory, size: int, *, event_idx: bool = False,
                 windows: DmaWindows | None = None, device: bool = True) -> None:
        self.memory, self.size = memory, size
        raw = np.frombuffer(memory, np.uint8)
        off = memory.alloc(16 * size, 16)
        self.desc_iova = memory.iova(off)
        self.desc = raw[off:off + 16 * size].view(DESC)
        ev = memory.alloc(8, 4)
        self.driver_iova, self.device_iova = memory.iova(ev), memory.iova(ev + 4)
        self.driver_event = raw[ev:ev + 4].view("<u2")       # [off_wrap, flags]: we write
        self.device_event = raw[ev + 4:ev + 8].view("<u2")   # the device writes
        boff = memory.alloc(BUF * MAX_CHAIN * size, 64)
        self.buf_iova = memory.iova(boff)
        self.bufs = raw[boff:boff + BUF * MAX_CHAIN * size]
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.free_ids = list(range(size))
        self.chain_len: dict[int, int] = {}
        self.in_flight = 0                       # descriptors not yet returned
        if windows is None:
            windows = DmaWindows()
            windows.add_memory(memory)
        self.windows = windows
        if device:          # the device's view of the same ring (else the test's model makes it)
            self.dq = DeviceQueue(windows, size, self.desc_iova, self.driver_iova, self.device_iova,
                                  event_idx=event_idx, packed=True)

    @property
    def free_descriptors(self) -> int:
        return self.size - self.in_flight

    def buf(self, bid: int, k: int) -> tuple[int, np.ndarray]:
        off = (bid * MAX_CHAIN + k) * BUF
        return self.buf_iova + off, self.bufs[off:off + BUF]

    def add(self, outs: list[bytes] = (), ins: list[int] = (), *, bid: int | None = None) -> int:
        """Make one buffer available: readable elements with these bytes, then writable
        ones of these sizes. Returns its id."""
        descs = []
        for k, data in enumerate(outs):
            descs.append((k, len(data), 0, data))
        for k, cap in enumerate(ins, len(outs)):
            descs.append((k, cap, WRITE, None))
        bid = self.free_ids[0] if bid is None else bid
        raw = []
        for k, ln, flags, data in descs:
            addr, view = self.buf(bid, k)
            if data is not None:
                view[:ln] = np.frombuffer(data, np.uint8)
            raw.append((addr, ln, flags))
        return self.add_raw(raw, bid)

    def add_raw(self, descs: list[tuple[int, int, int]], bid: int, *, ids: int | None = None,
                flags_first: int | None = None, mark: bool = True) -> int:
        """Write descriptors (addr, len, flags without AVAIL/USED/NEXT) as one chain with
        buffer id ``bid`` in the last one (2.8.6), the first one's flags last
        (``flags_first`` overrides what it gets). ``ids`` is written into the others."""
        n = len(descs)
        assert n <= self.free_descriptors, "the driver checks for room first (2.8.17)"
        if bid in self.free_ids:
            self.free_ids.remove(bid)
        first, first_flags = self.next_avail, 0
        for k, (addr, ln, flags) in enumerate(descs):
            f = flags | (AVAIL if self.avail_wrap else USED) if mark else flags
            if k < n - 1:
                f |= NEXT
            d = self.desc[self.next_avail]
            d["addr"], d["len"] = addr, ln
            d["id"] = bid if k == n - 1 else (0xBEEF if ids is None else ids)
            if k == 0:
                first_flags = f
            else:
                d["flags"] = f
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.desc[first]["flags"] = first_flags if flags_first is None else flags_first
        self.chain_len[bid] = n
        self.in_flight += n
        return bid

    def used(self) -> tuple[int, int, int] | None:
        """The next used descriptor, as (id, len, flags), skipping its chain (2.8.22), or None."""
        d = self.desc[self.next_used]
        flags = int(d["flags"])
        # Both bits (2.8.1): with every descriptor in flight, the slot holds one made
        # available a lap ahead, whose USED bit alone equals our wrap counter.
        if bool(flags & USED) != self.used_wrap or bool(flags & AVAIL) != self.used_wrap:
            return None
        bid, ln = int(d["id"]), int(d["len"])
        n = self.chain_len.pop(bid)
        self.in_flight -= n
        self.free_ids.append(bid)
        self.next_used += n
        if self.next_used >= self.size:
            self.next_used, self.used_wrap = self.next_used - self.size, self.used_wrap ^ 1
        return bid, ln, flags

    def all_used(self) -> list[tuple[int, int, int]]:
        out = []
        while (u := self.used()) is not None:
            out.append(u)
        return out

    def written(self, bid: int, k: int, n: int) -> bytes:
        return bytes(self.buf(bid, k)[1][:n])

    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        self.driver_event[0] = off | wrap << 15
        self.driver_event[1] = flags


@pytest.fixture
def memory():
    m = pmd.DmaMemory(8 << 20, lock=False, name="pmd-test-packed")
    yield m
    m.close()


@pytest.fixture
def drv(memory):
    d = PackedDriver(memory, 8)
    yield d
    d.dq.close()


# ====================================================================== rings and descriptors (2.8.1-2.8.6)

def test_a_packed_queue_takes_a_descriptor_ring_and_two_event_structures(drv):
    assert drv.dq.packed and drv.dq.size == 8
    assert drv.dq.next_avail_idx == 1 << 15 and drv.dq.next_used_idx == 1 << 15   # offset 0, wrap 1


def test_ring_addresses_must_lie_in_dma_memory_and_be_aligned(memory):
    w = DmaWindows()
    w.add_memory(memory)
    base = memory.iova(memory.alloc(4096, 4096))
    with pytest.raises(DeviceError, match="outside"):
        DeviceQueue(w, 8, 0x10, base, base + 4, packed=True)
    with pytest.raises(DeviceError, match="misaligned"):
        DeviceQueue(w, 8, base + 8, base + 256, base + 260, packed=True)
    with pytest.raises(DeviceError, match="misaligned"):
        DeviceQueue(w, 8, base, base + 256, base + 258, packed=True)
    with pytest.raises(ValueError, match="1 to 32768"):
        DeviceQueue(w, 0, base, base + 256, base + 260, packed=True)


def test_the_queue_size_need_not_be_a_power_of_two(memory):
    d = PackedDriver(memory, 5)
    for lap in range(3):
        for _ in range(5):
            bid = d.add([b"x"])
            assert d.dq.pop_chain()[0] == bid
            d.dq.complete(bid)
            d.dq.publish_used()
            assert d.used()[0] == bid
    assert d.dq.next_avail_idx == d.dq.next_used_idx == 0    # three laps: wrap counter 0


def test_a_fresh_ring_has_nothing_available(drv):
    assert drv.dq.pop_chain() is None and drv.dq.avail_pending == 0


def test_a_descriptor_is_available_when_avail_matches_the_wrap_counter_and_used_does_not(drv):
    addr, _ = drv.buf(0, 0)
    for flags in (0, AVAIL | USED, USED):           # zeroed; used-looking; available for wrap 0
        drv.desc[0] = (addr, 4, 3, flags)
        assert drv.dq.pop_chain() is None
    drv.desc[0]["flags"] = AVAIL
    assert drv.dq.pop_chain() == (3, bytes(drv.buf(0, 0)[1][:4]), 0)


def test_a_single_readable_buffer_is_read(drv):
    bid = drv.add([b"hello"])
    assert drv.dq.avail_pending == 1
    assert drv.dq.pop_chain() == (bid, b"hello", 0)
    assert drv.dq.pop_chain() is None


def test_a_chain_is_consecutive_descriptors_and_its_id_is_in_the_last(drv):
    bid = drv.add([b"ab", b"cd"], [100, 50], bid=5)
    assert drv.desc[0]["id"] == 0xBEEF and drv.desc[3]["id"] == 5   # only the last one counts
    assert drv.dq.pop_chain() == (5, b"abcd", 150)
    assert drv.dq.nsegs == 4 and bid == 5


def test_a_chain_may_wrap_around_the_ring_end_flipping_the_wrap_counter(drv):
    for _ in range(6):
        drv.add([b"."])
        drv.dq.complete(drv.dq.pop_chain()[0])
    drv.dq.publish_used()
    assert len(drv.all_used()) == 6
    bid = drv.add([b"12", b"34", b"56", b"78"])       # slots 6, 7, then 0, 1 with wrap 0
    assert drv.desc[6]["flags"] & AVAIL and drv.desc[0]["flags"] & USED and not drv.desc[0]["flags"] & AVAIL
    assert drv.dq.pop_chain() == (bid, b"12345678", 0)
    assert drv.dq.next_avail_idx == 2                 # offset 2, wrap counter 0


def test_the_used_descriptor_has_the_id_the_length_and_both_bits_equal_to_the_wrap_counter(drv):
    bid = drv.add([], [64], bid=2)
    head, _, cap = drv.dq.pop_chain()
    drv.dq.complete(head, b"x" * 10)
    drv.dq.publish_used()
    assert drv.used() == (2, 10, AVAIL | USED | WRITE)
    assert drv.written(bid, 0, 10) == b"x" * 10


def test_a_used_descriptor_without_data_has_no_write_flag(drv):
    drv.add([b"abc"], bid=1)
    drv.dq.complete(drv.dq.pop_chain()[0])
    drv.dq.publish_used()
    assert drv.used() == (1, 0, AVAIL | USED)


def test_used_descriptors_are_written_with_wrap_counter_zero_on_the_second_lap(drv):
    for lap in range(2):
        for _ in range(8):
            drv.add([b"."])
            drv.dq.complete(drv.dq.pop_chain()[0])
            drv.dq.publish_used()
            bid, ln, flags = drv.used()
            assert flags == (AVAIL | USED if lap == 0 else 0)


def test_the_device_skips_the_rest_of_a_chain_after_its_used_descriptor(drv):
    a = drv.add([b"1", b"2", b"3"])
    b = drv.add([b"4"])
    for _ in range(2):
        drv.dq.complete(drv.dq.pop_chain()[0])
    assert drv.dq.next_used_idx == (1 << 15) | 4
    drv.dq.publish_used()
    assert drv.desc[0]["id"] == a and drv.desc[3]["id"] == b      # slots 1 and 2 skipped
    assert [u[0] for u in drv.all_used()] == [a, b]


def test_buffers_may_complete_out_of_order(drv):
    ids = [drv.add([b"%d" % i], [16]) for i in range(4)]
    popped = [drv.dq.pop_chain() for _ in range(4)]
    assert [p[0] for p in popped] == ids
    for bid in (ids[2], ids[0], ids[3], ids[1]):
        drv.dq.complete(bid)
    drv.dq.publish_used()
    assert [u[0] for u in drv.all_used()] == [ids[2], ids[0], ids[3], ids[1]]
    more = drv.add([b"again"])             # ids come back in any order; the ring goes on
    assert drv.dq.pop_chain()[0] == more


def test_out_of_order_completion_with_chains_of_different_lengths_over_laps(drv):
    rng = np.random.default_rng(1)
    held: list[int] = []
    returned = 0
    for step in range(400):
        n = int(rng.integers(1, 4))
        if drv.free_descriptors >= n and rng.random() < 0.6:
            drv.add([bytes([step & 0xFF])] * n)
        while (c := drv.dq.pop_chain()) is not None:
            held.append(c[0])
        if held and rng.random() < 0.5:
            drv.dq.complete(held.pop(int(rng.integers(0, len(held)))))
            drv.dq.publish_used()
        returned += len(drv.all_used())
    assert drv.dq.n_bad_desc == 0 and returned > 10 * drv.size      # many laps


def test_a_batch_is_shown_at_once_by_writing_its_first_flags_last(drv):
    a, b, c = drv.add([b"a"]), drv.add([b"b"]), drv.add([b"c"])
    for _ in range(3):
        drv.dq.complete(drv.dq.pop_chain()[0])
    assert drv.used() is None                       # nothing visible before publish
    assert drv.desc[1]["flags"] & USED              # the rest of the batch is already written
    drv.dq.publish_used()
    assert [u[0] for u in drv.all_used()] == [a, b, c]


def test_complete_only_takes_an_id_in_flight(drv):
    with pytest.raises(ValueError, match="not in flight"):
        drv.dq.complete(0)
    bid = drv.add([b"q"])
    drv.dq.pop_chain()
    drv.dq.complete(bid)
    with pytest.raises(ValueError, match="not in flight"):
        drv.dq.complete(bid)


def test_a_packed_queue_has_no_used_index(drv):
    with pytest.raises(QueueStateError, match="no used index"):
        drv.dq.set_used_idx(3)


def test_push_raw_writes_any_used_descriptor_and_skips_as_told(drv):
    drv.dq.push_raw(7, 12, skip=3)
    drv.dq.push_raw(0xFFFF, 0)
    drv.dq.publish_used()
    assert tuple(drv.desc[0])[1:] == (12, 7, AVAIL | USED | WRITE)
    assert tuple(drv.desc[3])[1:] == (0, 0xFFFF, AVAIL | USED)
    assert drv.dq.next_used_idx == (1 << 15) | 4
    with pytest.raises(ValueError):
        drv.dq.push_raw(1 << 16, 0)
    with pytest.raises(ValueError):
        drv.dq.push_raw(0, 0, skip=9)


# ====================================================================== event suppression (2.8.10, 2.8.14)

def one_round(drv, n=1):
    for _ in range(n):
        drv.add([b"."])
    for _ in range(n):
        drv.dq.complete(drv.dq.pop_chain()[0])
    interrupted = drv.dq.publish_used()
    drv.all_used()
    return interrupted


def test_driver_event_enable_asks_for_an_interrupt_after_every_batch(drv):
    drv.set_driver_event(ENABLE)
    assert [one_round(drv) for _ in range(5)] == [True] * 5
    assert drv.dq.n_interrupts == 5


def test_driver_event_disable_suppresses_interrupts(drv):
    drv.set_driver_event(DISABLE)
    assert [one_round(drv) for _ in range(5)] == [False] * 5
    assert drv.dq.n_interrupts == 0 and drv.dq.n_interrupts_suppressed == 5


def test_no_interrupt_decision_without_a_new_used_descriptor(drv):
    assert drv.dq.publish_used() is False and drv.dq.n_interrupts_suppressed == 0


@pytest.mark.parametrize("size", [8, 5])
def test_driver_event_desc_interrupts_only_when_the_descriptor_at_off_wrap_is_used(memory, size):
    d = PackedDriver(memory, size, event_idx=True)
    # Ask for descriptor 3 of the second lap (wrap counter 0): rounds of one buffer.
    d.set_driver_event(DESC_EVENT, 3, 0)
    got = [one_round(d) for _ in range(2 * size)]
    want = [i == size + 3 for i in range(2 * size)]   # round i writes slot i % size
    assert got == want
    d.dq.close()


def test_driver_event_desc_fires_when_a_batch_passes_over_the_descriptor(memory):
    d = PackedDriver(memory, 8, event_idx=True)
    d.set_driver_event(DESC_EVENT, 2, 1)
    assert one_round(d, 2) is False        # slots 0, 1
    assert one_round(d, 3) is True         # slots 2, 3, 4: 2 among them
    d.set_driver_event(DESC_EVENT, 6, 1)   # inside a chain's skipped slots also counts
    d.add([b"a", b"b", b"c"])              # slots 5, 6, 7
    d.dq.complete(d.dq.pop_chain()[0])
    assert d.dq.publish_used() is True
    d.dq.close()


def test_driver_event_desc_without_event_idx_is_taken_as_enable(drv):
    drv.set_driver_event(DESC_EVENT, 7, 0)
    assert one_round(drv) is True


def test_a_reserved_driver_event_flags_value_is_taken_as_enable(drv):
    drv.set_driver_event(3)
    assert one_round(drv) is True


@pytest.mark.parametrize("event_idx", [False, True])
def test_device_event_disable_and_enable_tell_the_driver_whether_to_notify(memory, event_idx):
    d = PackedDriver(memory, 8, event_idx=event_idx)
    d.dq.disable_notify()
    assert d.device_event[1] == DISABLE
    d.add([b"1"], bid=0)
    d.add([b"2", b"3"], bid=1)
    d.dq.pop_chain()
    d.dq.pop_chain()
    d.dq.enable_notify()
    if event_idx:
        assert d.device_event[1] == DESC_EVENT and d.device_event[0] == (1 << 15) | 3
    else:
        assert d.device_event[1] == ENABLE
    d.dq.close()


def test_enable_notify_with_event_idx_carries_the_wrap_counter(memory):
    d = PackedDriver(memory, 4, event_idx=True)
    for _ in range(5):
        one_round(d)
    d.dq.enable_notify()
    assert d.device_event[0] == 1 and d.device_event[1] == DESC_EVENT     # offset 1, wrap 0
    d.dq.close()


def test_an_interrupt_writes_the_queue_eventfd(drv):
    import os
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        drv.dq.set_interrupt_eventfd(fd)
        assert one_round(drv) is True
        assert os.eventfd_read(fd) == 1
    finally:
        drv.dq.set_interrupt_eventfd(-1)
        os.close(fd)


# ====================================================================== bad descriptors (every value untrusted)

def big_window(memory):
    """DMA windows with the memory and an 8 GiB range at 1 TiB (mapped nowhere
    useful: only a chain refused before any byte is touched may point there)."""
    w = DmaWindows()
    w.add_memory(memory)
    w.add(1 << 40, 8 << 30, memory.address)
    return w


def refused(d, reason):
    with pytest.raises(DeviceError, match=re.escape(reason)):
        d.dq.pop_chain()
    assert d.dq.n_bad_desc == 1 and d.dq.last_error == reason


@pytest.mark.parametrize("kind, reason", [
    ("address", "buffer outside the driver's DMA memory"),
    ("straddle", "buffer outside the driver's DMA memory"),
    ("order", "device-readable descriptor after a device-writable one"),
    ("indirect", "indirect descriptor (not negotiated)"),
    ("too-long", "chain longer than 4 GiB"),
])
def test_a_bad_chain_with_a_valid_id_is_refused_counted_and_returned_with_length_0(memory, kind, reason):
    d = PackedDriver(memory, 8, windows=big_window(memory))
    good, _ = d.buf(3, 0)
    end = memory.iova(0) + memory.size
    descs = {
        "address": [(good, 16, 0), (end + 4096, 16, 0)],
        "straddle": [(end - 8, 16, WRITE)],
        "order": [(good, 16, WRITE), (good + 64, 16, 0)],
        "indirect": [(good, 16, INDIRECT)],
        "too-long": [(1 << 40, 0xFFFFFFFF, WRITE), (1 << 40, 0xFFFFFFFF, WRITE)],
    }[kind]
    d.add_raw(descs, 3)
    refused(d, reason)
    d.dq.publish_used()
    assert d.used() == (3, 0, AVAIL | USED)              # the driver gets its buffer back
    assert d.next_used == len(descs)
    ok = d.add([b"fine"])                                # and the queue goes on
    assert d.dq.pop_chain()[:2] == (ok, b"fine")
    d.dq.close()


def test_a_buffer_id_out_of_range_is_refused_and_not_returned(drv):
    drv.add_raw([(drv.buf(0, 0)[0], 4, 0)], 8)
    refused(drv, "buffer id out of range")
    drv.dq.publish_used()
    assert drv.used() is None and drv.dq.next_avail_idx == (1 << 15) | 1   # taken, not returned
    drv.chain_len.pop(8)
    ok = drv.add([b"next"])
    assert drv.dq.pop_chain()[:2] == (ok, b"next")


def test_a_buffer_id_already_in_flight_is_refused_and_not_returned(drv):
    drv.add([b"first"], bid=4)
    assert drv.dq.pop_chain()[0] == 4
    drv.add_raw([(drv.buf(4, 1)[0], 4, 0)], 4)
    refused(drv, "buffer id already in flight")
    drv.dq.complete(4)                                  # the first one is still ours to return
    drv.dq.publish_used()
    assert drv.desc[0]["id"] == 4 and drv.desc[0]["flags"] == AVAIL | USED


def test_a_chain_longer_than_the_ring_is_a_loop_and_breaks_the_queue(drv):
    addr = drv.buf(0, 0)[0]
    # Every descriptor NEXT, all marked available: no end, no id.
    for k in range(8):
        drv.desc[k] = (addr, 4, 0, AVAIL | NEXT)
    refused(drv, "descriptor chain loops")
    assert drv.dq.broken and drv.dq.pop_chain() is None and drv.dq.n_bad_desc == 1


def test_next_into_a_descriptor_not_made_available_breaks_the_queue(drv):
    addr = drv.buf(0, 0)[0]
    drv.desc[1] = (addr, 4, 1, 0)                       # never made available
    drv.desc[0] = (addr, 4, 0, AVAIL | NEXT)
    refused(drv, "descriptor after NEXT not marked available")
    assert drv.dq.broken and drv.dq.pop_chain() is None


def test_a_chain_as_long_as_the_ring_is_allowed(memory):
    # 2.8.17: a list may be as long as the queue; NEXT on the last of them is a loop (above).
    d = PackedDriver(memory, 4)
    d.add([b"a", b"b", b"c", b"d"])
    assert d.dq.pop_chain()[1] == b"abcd"
    d.dq.close()


def test_refused_chains_with_the_bursts_do_not_stall_them(memory):
    from pmd.sim._tx import device_tx_burst
    d = PackedDriver(memory, 8)
    d.add_raw([(d.buf(0, 0)[0], 32, WRITE), (d.buf(0, 1)[0], 32, 0)], 0)     # order: refused
    hdr = bytes(12)
    d.add([hdr + b"pkt"], bid=1)
    out = np.zeros((4, 64), np.uint8)
    lens = np.zeros(4, np.uint32)
    assert device_tx_burst(d.dq, out, lens) == 1
    assert bytes(out[0, :lens[0]]) == b"pkt" and d.dq.n_bad_desc == 1
    assert sorted(u[0] for u in d.all_used()) == [0, 1]
    d.dq.close()


# ====================================================================== random sequences (hypothesis)

class PackedRingMachine(RuleBasedStateMachine):
    """Random add / pop / complete / publish / harvest over many laps of a small ring.

    The device completes in any order with any length that fits; the driver
    sees each id back exactly once, with its length and its data, and the
    positions and wrap counters of both sides agree whenever nothing is between them.
    """

    @initialize(size=st.sampled_from([1, 2, 3, 4, 5, 8]), event_idx=st.booleans())
    def choose_ring(self, size, event_idx):
        self.memory = pmd.DmaMemory(1 << 20, lock=False, name="pmd-test-packed-h")
        self.d = PackedDriver(self.memory, size, event_idx=event_idx)
        self.added = {}          # id -> (readable bytes, writable capacity, readable descriptors)
        self.held = []           # (id, capacity, readable descriptors) popped by the device
        self.done = {}           # id -> (length, readable descriptors) completed, not yet seen
        self.unpublished = 0
        self.seq = 0
        self.last_popped = None  # complete() writes data only into the chain popped last

    def teardown(self):
        if hasattr(self, "d"):
            self.d.dq.close()
            self.memory.close()

    @rule(n_out=st.integers(0, 2), n_in=st.integers(0, 2))
    def add(self, n_out, n_in):
        n = n_out + n_in
        if n == 0 or n > self.d.free_descriptors or not self.d.free_ids:
            return
        self.seq += 1
        outs = [bytes([self.seq & 0xFF, k]) * 3 for k in range(n_out)]
        bid = self.d.add(outs, [24] * n_in)
        self.added[bid] = (b"".join(outs), 24 * n_in, n_out)

    @rule()
    def device_pop(self):
        c = self.d.dq.pop_chain()
        if c is None:
            assert not self.added
            return
        bid, readable, cap = c
        want, want_cap, n_out = self.added.pop(bid)
        assert (readable, cap) == (want, want_cap)
        self.held.append((bid, cap, n_out))
        self.last_popped = bid

    @rule(pick=st.integers(0, 1000), frac=st.floats(0, 1))
    @precondition(lambda self: self.held)
    def device_complete(self, pick, frac):
        bid, cap, n_out = self.held.pop(pick % len(self.held))
        n = int(cap * frac) if bid == self.last_popped else 0
        self.d.dq.complete(bid, bytes([bid]) * n)
        self.last_popped = None
        self.done[bid] = (n, n_out)
        self.unpublished += 1

    @rule()
    def publish(self):
        self.d.dq.publish_used()
        self.unpublished = 0

    @rule()
    def harvest(self):
        for bid, ln, flags in self.d.all_used():
            want, n_out = self.done.pop(bid)
            assert ln == want and bool(flags & WRITE) == (ln > 0)
            k = min(ln, 24)
            assert self.d.written(bid, n_out, k) == bytes([bid]) * k

    @invariant()
    def both_sides_agree(self):
        if not hasattr(self, "d"):
            return
        dq, d = self.d.dq, self.d
        assert dq.n_bad_desc == 0 and not dq.broken
        assert dq.avail_pending == len(self.added)
        if not self.added:
            assert dq.next_avail_idx == d.next_avail | d.avail_wrap << 15
        if not self.unpublished and not self.done:
            assert dq.next_used_idx == d.next_used | d.used_wrap << 15


TestPackedRingMachine = PackedRingMachine.TestCase
TestPackedRingMachine.settings = settings(max_examples=60, stateful_step_count=120, deadline=None)


# ====================================================================== the device bursts over packed rings

HDR = 12


def test_rx_burst_delivers_packets_into_packed_receive_buffers(memory):
    from pmd.sim._rx import device_rx_burst
    d = PackedDriver(memory, 8)
    ids = [d.add([], [1536]) for _ in range(3)]
    pkts = np.zeros((4, 64), np.uint8)
    lens = np.array([60, 64, 14, 30], np.uint32)
    for i in range(4):
        pkts[i, :lens[i]] = i + 1
    assert device_rx_burst(d.dq, pkts, lens) == 3        # three buffers, three packets
    used = d.all_used()
    assert [u[0] for u in used] == ids
    for (bid, ln, flags), i in zip(used, range(3)):
        assert ln == HDR + lens[i] and flags & WRITE
        got = d.written(bid, 0, ln)
        assert struct.unpack_from("<H", got, 10)[0] == 1 and got[HDR:] == bytes([i + 1]) * lens[i]
    d.dq.close()


def test_rx_mergeable_spreads_a_packet_over_several_packed_buffers(memory):
    from pmd.sim._rx import device_rx_burst
    d = PackedDriver(memory, 8)
    ids = [d.add([], [100]) for _ in range(3)]
    pkt = (np.arange(250) % 251).astype(np.uint8).reshape(1, 250)
    assert device_rx_burst(d.dq, pkt, np.array([250], np.uint32), mergeable=True) == 1
    used = d.all_used()
    assert [u[0] for u in used] == ids and [u[1] for u in used] == [100, 100, 62]
    data = b"".join(d.written(b, 0, ln) for b, ln, _ in used)
    assert struct.unpack_from("<H", data, 10)[0] == 3 and data[HDR:] == pkt.tobytes()
    d.dq.close()


def test_rx_without_room_gives_the_chain_back_and_drops_nothing(memory):
    from pmd.sim._rx import device_rx_burst
    d = PackedDriver(memory, 8)
    d.add([], [40])                                     # too small for the packet, no MRG_RXBUF
    bid = d.add([], [40])
    pkt = np.zeros((1, 100), np.uint8)
    assert device_rx_burst(d.dq, pkt, np.array([100], np.uint32)) == 1   # consumed: dropped
    assert d.dq.n_dropped == 1 and d.all_used() == []   # the buffer was given back (unpop)
    small = np.zeros((1, 20), np.uint8)
    assert device_rx_burst(d.dq, small, np.array([20], np.uint32)) == 1
    assert d.all_used()[0][:2] == (0, HDR + 20)         # the first buffer, which was given back
    assert bid == 1
    d.dq.close()


def test_tx_burst_takes_packets_from_packed_transmit_chains(memory):
    from pmd.sim._tx import device_tx_burst
    d = PackedDriver(memory, 8)
    a = d.add([bytes(HDR) + b"one"])
    b = d.add([bytes(HDR), b"two-", b"parts"])          # header and data in separate descriptors
    out = np.zeros((4, 64), np.uint8)
    lens = np.zeros(4, np.uint32)
    assert device_tx_burst(d.dq, out, lens) == 2
    assert bytes(out[0, :lens[0]]) == b"one" and bytes(out[1, :lens[1]]) == b"two-parts"
    assert d.all_used() == [(a, 0, AVAIL | USED), (b, 0, AVAIL | USED)]
    d.dq.close()


@pytest.mark.parametrize("rx_packed", [True, False], ids=["packed-to-packed", "packed-to-split"])
def test_tx_to_rx_moves_packets_between_rings(memory, rx_packed):
    from pmd.sim._tx import tx_to_rx
    tx = PackedDriver(memory, 8)
    if rx_packed:
        rx = PackedDriver(memory, 16, windows=tx.windows)
        rx_ids = [rx.add([], [256]) for _ in range(4)]
        rxq = rx.dq
    else:
        vq = pmd.Virtqueue(memory, 16, 0)
        rxq = DeviceQueue(tx.windows, 16, vq.desc_iova, vq.avail_iova, vq.used_iova)
        bufs = [memory.iova(memory.alloc(256)) for _ in range(4)]
        for b in bufs:
            vq.add([], [(b, 256)])
        vq.kick()
    for i in range(6):
        tx.add([bytes(HDR) + bytes([i]) * (10 + i)])
    assert tx_to_rx(tx.dq, rxq) == 4                     # four rx buffers
    assert len(tx.all_used()) == 4                       # the other two wait (back-pressure)
    if rx_packed:
        used = rx.all_used()
        assert [u[0] for u in used] == rx_ids
        assert [rx.written(b, 0, ln)[HDR:] for b, ln, _ in used] == [bytes([i]) * (10 + i) for i in range(4)]
    rxq.close()
    tx.dq.close()


def test_tx_chains_given_back_across_the_ring_end_are_moved_byte_exactly_later(memory):
    """Back-pressure on multi-descriptor chains that wrap: unpop steps back over the
    chain's descriptors and flips the wrap counter back (2.8.1, 2.8.6)."""
    from pmd.sim._tx import tx_to_rx
    tx = PackedDriver(memory, 8)
    rx = PackedDriver(memory, 16, windows=tx.windows)
    sent = []
    for lap in range(4):                                 # 3-descriptor chains over 8 slots
        payload = [bytes([lap]) * 5, bytes([lap + 100]) * (7 + lap)]
        tx.add([bytes(HDR)] + payload)
        tx.add([bytes(HDR), bytes([lap + 50]) * 3, bytes([lap + 60]) * 2])
        sent += [b"".join(payload), bytes([lap + 50]) * 3 + bytes([lap + 60]) * 2]
        # no rx buffer: both chains, the second across the ring end on odd laps, go back
        assert tx_to_rx(tx.dq, rx.dq) == 0 and tx.all_used() == []
        assert tx_to_rx(tx.dq, rx.dq) == 0              # and are found again, unchanged
        ids = [rx.add([], [256]) for _ in range(2)]
        assert tx_to_rx(tx.dq, rx.dq) == 2
        assert len(tx.all_used()) == 2
        got = [rx.written(b, 0, ln)[HDR:] for b, ln, _ in rx.all_used()]
        assert got == sent[-2:]
        assert ids == sorted(ids)
    assert tx.dq.n_dropped == 0 and not tx.dq.broken
    rx.dq.close()
    tx.dq.close()


def test_tx_to_rx_on_packed_rings_moves_packets_over_laps_and_hands_an_unusual_chain_to_the_general_path(memory):
    """tx_to_rx's one loop over two packed rings (pmd.sim._tx.tx_to_rx_packed) takes a tx
    buffer of one descriptor and an rx buffer of one, each pair used at once, across the
    ring ends on both sides (the wrap counters flip in avail and used, 2.8.1); it stops at
    a chain of several descriptors, which the general path takes, and goes on after it.
    Every packet arrives in order and byte-exact; the batch's first flags come last (2.8.9)."""
    from pmd.sim._tx import tx_to_rx
    tx = PackedDriver(memory, 8)
    rx = PackedDriver(memory, 6, windows=tx.windows)
    sent, got = [], []
    for lap in range(7):                                # 7 laps of 4 packets: both rings wrap often
        for k in range(4):
            body = bytes([lap * 16 + k]) * (20 + 3 * k + lap)
            if k == 2 and lap % 2:                      # a chain of three: header, two pieces
                tx.add([bytes(HDR), body[:5], body[5:]])
            else:
                tx.add([bytes(HDR) + body])
            sent.append(body)
        rx_ids = [rx.add([], [256]) for _ in range(4)]
        assert tx_to_rx(tx.dq, rx.dq) == 4
        used = rx.all_used()
        assert [u[0] for u in used] == rx_ids
        got += [rx.written(b, 0, ln)[HDR:] for b, ln, _ in used]
        assert [ln for _, ln, _ in tx.all_used()] == [0] * 4
    assert got == sent
    assert tx.dq.n_bad_desc == rx.dq.n_bad_desc == 0 and not tx.dq.broken and not rx.dq.broken
    rx.dq.close()
    tx.dq.close()


def test_tx_to_rx_on_packed_rings_leaves_a_buffer_id_in_flight_to_the_general_path_which_refuses_it(memory):
    """The one loop checks a buffer id as pop() does (in range, not in flight, 2.8.6) and
    stops before it otherwise: the general path refuses and counts it; the packets before
    and after it move."""
    from pmd.sim._tx import tx_to_rx
    tx = PackedDriver(memory, 8)
    rx = PackedDriver(memory, 8, windows=tx.windows)
    tx.add([bytes(HDR) + b"held"], bid=5)
    assert tx.dq.pop_chain()[0] == 5                    # id 5 in flight on the device
    tx.add([bytes(HDR) + b"before"], bid=1)
    tx.add_raw([(tx.buf(5, 1)[0], HDR + 4, 0)], 5)      # id 5 again, while in flight
    tx.chain_len[5] = 1
    tx.add([bytes(HDR) + b"after"], bid=2)
    for _ in range(3):
        rx.add([], [256])
    assert tx_to_rx(tx.dq, rx.dq) == 2
    assert [rx.written(b, 0, ln)[HDR:] for b, ln, _ in rx.all_used()] == [b"before", b"after"]
    assert tx.dq.n_bad_desc == 1
    rx.dq.close()
    tx.dq.close()


# ====================================================================== the device offers RING_PACKED (6)

def test_the_device_offers_ring_packed_and_it_can_be_turned_off():
    from pmd.abi import virtio as V
    from pmd.sim.model import VirtioNetModel
    m = VirtioNetModel()
    try:
        assert m.offered & V.bit(V.RING_PACKED)
    finally:
        m.close()
    m = VirtioNetModel(features_off="RING_PACKED")
    try:
        assert not m.offered & V.bit(V.RING_PACKED) and m.offered & V.bit(V.VERSION_1)
    finally:
        m.close()


def model_queue(memory, features_names, size=8, packed_layout=True, features_off=0):
    """Negotiate ``features_names`` with a model by its registers and enable queue 0
    (rx) at a packed layout; returns (model, device queue or None)."""
    from pmd.abi import virtio as V
    from pmd.abi import virtio_net as N
    from pmd.abi import virtio_pci as P
    from pmd.sim.model import VirtioNetModel

    m = VirtioNetModel(features_off=features_off)
    m.dma_map(memory.iova(0), memory.size, memory.fd, 0, 3)

    def w(off, width, value):
        m.region_write(0, off, value.to_bytes(width, "little"))

    def r(off, width):
        return int.from_bytes(m.region_read(0, off, width), "little")

    feats = N.parse_features(features_names)
    w(P.DEVICE_STATUS, 1, V.STATUS_ACKNOWLEDGE)
    w(P.DEVICE_STATUS, 1, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER)
    for sel in (0, 1):
        w(P.DRIVER_FEATURE_SELECT, 4, sel)
        w(P.DRIVER_FEATURE, 4, feats >> 32 * sel & 0xFFFFFFFF)
    w(P.DEVICE_STATUS, 1, r(P.DEVICE_STATUS, 1) | V.STATUS_FEATURES_OK)
    assert r(P.DEVICE_STATUS, 1) & V.STATUS_FEATURES_OK, m.stats()["features_refusal"]
    off = memory.alloc(16 * size + 64, 64)
    w(P.QUEUE_SELECT, 2, 0)
    w(P.QUEUE_SIZE, 2, size)
    if packed_layout:
        addrs = (memory.iova(off), memory.iova(off + 16 * size), memory.iova(off + 16 * size + 4))
    else:
        vq = pmd.Virtqueue(memory, size, 0)
        addrs = (vq.desc_iova, vq.avail_iova, vq.used_iova)
    for reg, addr in zip((P.QUEUE_DESC, P.QUEUE_DRIVER, P.QUEUE_DEVICE), addrs):
        w(reg, 8, addr)
    w(P.QUEUE_ENABLE, 2, 1)
    return m, m.device_queues.get(0), r(P.QUEUE_SIZE, 2)


def test_queues_are_packed_when_ring_packed_is_negotiated(memory):
    m, dq, _ = model_queue(memory, "VERSION_1,ACCESS_PLATFORM,RING_PACKED")
    try:
        assert dq is not None and dq.packed
    finally:
        m.close()


def test_queues_stay_split_without_ring_packed(memory):
    m, dq, _ = model_queue(memory, "VERSION_1,ACCESS_PLATFORM", packed_layout=False)
    try:
        assert dq is not None and not dq.packed
    finally:
        m.close()


def test_a_packed_queue_size_need_not_be_a_power_of_two_at_the_register(memory):
    m, dq, size = model_queue(memory, "VERSION_1,ACCESS_PLATFORM,RING_PACKED", size=6)
    try:
        assert size == 6 and dq is not None and dq.packed and dq.size == 6
    finally:
        m.close()


def test_ring_packed_turned_off_is_refused_at_features_ok(memory):
    with pytest.raises(AssertionError, match="not offered"):
        model_queue(memory, "VERSION_1,ACCESS_PLATFORM,RING_PACKED", features_off="RING_PACKED")


def test_the_engine_loops_packets_back_over_packed_queues(memory):
    """A model with RING_PACKED negotiated, DRIVER_OK: its engine serves packed rings
    with the same bursts as split ones (LoopbackWire: what is sent comes back)."""
    import time

    from pmd.abi import virtio as V
    from pmd.abi import virtio_net as N
    from pmd.abi import virtio_pci as P
    from pmd.abi.pci import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
    from pmd.abi.vfio import PCI_CONFIG_REGION_INDEX
    from pmd.sim.model import VirtioNetModel

    m = VirtioNetModel()
    try:
        m.dma_map(memory.iova(0), memory.size, memory.fd, 0, 3)

        def w(off, width, value):
            m.region_write(0, off, value.to_bytes(width, "little"))

        feats = N.parse_features("VERSION_1,ACCESS_PLATFORM,RING_PACKED,MAC")
        w(P.DEVICE_STATUS, 1, V.STATUS_ACKNOWLEDGE)
        w(P.DEVICE_STATUS, 1, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER)
        for sel in (0, 1):
            w(P.DRIVER_FEATURE_SELECT, 4, sel)
            w(P.DRIVER_FEATURE, 4, feats >> 32 * sel & 0xFFFFFFFF)
        w(P.DEVICE_STATUS, 1, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK)
        rx = PackedDriver(memory, 16, device=False)
        tx = PackedDriver(memory, 16, device=False)
        for index, d in ((0, rx), (1, tx)):
            w(P.QUEUE_SELECT, 2, index)
            w(P.QUEUE_SIZE, 2, d.size)
            for reg, addr in zip((P.QUEUE_DESC, P.QUEUE_DRIVER, P.QUEUE_DEVICE),
                                 (d.desc_iova, d.driver_iova, d.device_iova)):
                w(reg, 8, addr)
            w(P.QUEUE_ENABLE, 2, 1)
        assert m.device_queues[0].packed and m.device_queues[1].packed
        m.region_write(PCI_CONFIG_REGION_INDEX, PCI_COMMAND,
                       (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER).to_bytes(2, "little"))
        w(P.DEVICE_STATUS, 1, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK
          | V.STATUS_DRIVER_OK)
        rx_ids = [rx.add([], [1536]) for _ in range(8)]
        frames = [bytes.fromhex("02504d440001") + bytes(6) + b"\x08\x00" + bytes([i]) * 50 for i in range(5)]
        tx_ids = [tx.add([bytes(HDR) + f]) for f in frames]
        got, t0 = [], time.monotonic()
        while len(got) < 5 and time.monotonic() - t0 < 5:
            m.engine.kick()
            got += rx.all_used()
            time.sleep(0.005)
        assert [g[0] for g in got] == rx_ids[:5]
        assert [rx.written(b, 0, ln)[HDR:] for b, ln, _ in got] == frames
        assert sorted(u[0] for u in tx.all_used()) == sorted(tx_ids)
        assert tx.device_event[1] == DISABLE           # the engine polls: no notifications
    finally:
        m.close()
