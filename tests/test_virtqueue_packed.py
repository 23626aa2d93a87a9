"""Driver side of the packed virtqueue, rule by rule (Virtio 1.2 2.8).

The device here is :class:`PackedDevice`, a few lines of numpy over the ring's
bytes that do what 2.8 says a device does: take available descriptors in ring
order while their AVAIL bit equals its wrap counter and USED does not, write one
used descriptor per chain (id, len, AVAIL = USED = its used wrap counter) and
skip the chain's length. So each rule is checked against the bytes a device sees
and writes, independent of pmd's own device side.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pmd
from pmd.driver._pool import PacketPool
from pmd.driver._rx import RxQueue
from pmd.driver._tx import TxQueue
from pmd.driver._virtqueue import Virtqueue, ring_layout, ring_size
from pmd.errors import DeviceError

AVAIL, USED = 1 << 7, 1 << 15
NEXT, WRITE = 1, 2
ENABLE, DISABLE, DESC = 0, 1, 2
PACKED_DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
EVENT = np.dtype([("off_wrap", "<u2"), ("flags", "<u2")])


class PackedDevice:
    """What a device does with a packed ring (2.8), over the ring's memory."""

    def __init__(self, vq: Virtqueue) -> None:
        self.vq = vq
        self.size = vq.size
        raw = vq.memory.view(vq.offset, vq.ring_bytes)
        self.desc = np.frombuffer(raw, PACKED_DESC, count=vq.size)
        self.driver_event = np.frombuffer(raw, EVENT, count=1, offset=16 * vq.size)
        self.device_event = np.frombuffer(raw, EVENT, count=1, offset=16 * vq.size + 4)
        self.avail_pos, self.avail_wrap = 0, 1
        self.used_pos, self.used_wrap = 0, 1
        self.taken: dict[int, int] = {}      # buffer id -> descriptors in its chain

    def available(self) -> bool:
        f = int(self.desc[self.avail_pos]["flags"])
        return bool(f & AVAIL) == bool(self.avail_wrap) and bool(f & USED) != bool(self.avail_wrap)

    def take(self) -> tuple[int, list[tuple[int, int, int]]] | None:
        """The next available chain: (buffer id, [(addr, len, flags)]), or None."""
        if not self.available():
            return None
        chain = []
        while True:
            d = self.desc[self.avail_pos]
            chain.append((int(d["addr"]), int(d["len"]), int(d["flags"])))
            buf_id = int(d["id"])
            self.avail_pos += 1
            if self.avail_pos == self.size:
                self.avail_pos, self.avail_wrap = 0, self.avail_wrap ^ 1
            if not chain[-1][2] & NEXT:
                break
        self.taken[buf_id] = len(chain)
        return buf_id, chain

    def use(self, buf_id: int, length: int = 0, *, skip: int | None = None) -> None:
        """Write the used descriptor of ``buf_id`` at the used position, flags last."""
        d = self.desc[self.used_pos]
        d["id"] = buf_id
        d["len"] = length
        wrap = AVAIL | USED if self.used_wrap else 0
        d["flags"] = wrap | (WRITE if length else 0)
        n = self.taken.pop(buf_id, 1) if skip is None else skip
        self.used_pos += n
        if self.used_pos >= self.size:
            self.used_pos -= self.size
            self.used_wrap ^= 1


@pytest.fixture
def memory():
    m = pmd.DmaMemory(4 << 20, lock=False, name="packed-test")
    yield m
    m.close()


def buffer(memory, length=64) -> tuple[int, int]:
    return memory.iova(memory.alloc(length)), length


def ring(memory, size=8, **kw) -> tuple[Virtqueue, PackedDevice]:
    vq = Virtqueue(memory, size, 0, packed=True, **kw)
    return vq, PackedDevice(vq)


# ---- layout (2.8.13) ----

def test_layout_is_the_descriptor_ring_then_the_two_event_areas(memory):
    assert ring_size(256, packed=True) == 16 * 256 + 8
    assert ring_layout(8, packed=True) == {"desc": (0, 128), "driver": (128, 4), "device": (132, 4), "total": 136}
    vq, _ = ring(memory)
    assert vq.packed and vq.desc_iova % 16 == 0
    assert vq.avail_iova == vq.desc_iova + 128 and vq.used_iova == vq.desc_iova + 132
    assert "packed" in repr(vq)


# ---- making buffers available (2.8.1, 2.8.21) ----

def test_a_descriptor_says_avail_on_the_first_lap_and_is_invisible_until_published(memory):
    vq, dev = ring(memory)
    addr, ln = buffer(memory)
    buf = vq.add([], [(addr, ln)], cookie=5)
    d = dev.desc[0]
    assert (int(d["addr"]), int(d["len"]), int(d["id"])) == (addr, ln, buf)
    assert d["flags"] == 0 and not dev.available()          # the batch's first flags wait for publish
    vq.kick()
    assert d["flags"] == AVAIL | WRITE and dev.available()   # wrap counter 1: AVAIL set, USED clear


def test_a_batch_becomes_visible_at_once_by_its_first_descriptors_flags(memory):
    vq, dev = ring(memory)
    for i in range(3):
        vq.add([buffer(memory)], [], cookie=i)
    # the later ones are written whole, but the device stops at the first
    assert [int(f) for f in dev.desc["flags"][:3]] == [0, AVAIL, AVAIL]
    assert dev.take() is None
    vq.kick()
    assert [dev.take()[0] for _ in range(3)] == [0, 1, 2] and dev.take() is None


def test_a_chain_is_consecutive_descriptors_with_next_and_the_buffer_id_in_each(memory):
    vq, dev = ring(memory)
    out, inn = [buffer(memory, 12)], [buffer(memory, 100), buffer(memory, 200)]
    buf = vq.add(out, inn, cookie=9)
    vq.kick()
    got_id, chain = dev.take()
    assert got_id == buf and [a for a, _, _ in chain] == [out[0][0], inn[0][0], inn[1][0]]
    assert [f & (NEXT | WRITE) for _, _, f in chain] == [NEXT, NEXT | WRITE, WRITE]   # readable first
    assert {int(i) for i in dev.desc["id"][:3]} == {buf}                               # 2.8.6: id in the last


def test_descriptors_say_the_wrap_counter_of_their_lap(memory):
    vq, dev = ring(memory, size=4)
    for lap in range(3):
        for _ in range(4):
            vq.add([buffer(memory)], [])
        vq.kick()
        want = AVAIL if lap % 2 == 0 else USED                # counter 1: AVAIL; counter 0: USED
        assert all(int(f) & (AVAIL | USED) == want for f in dev.desc["flags"])
        for _ in range(4):
            dev.use(dev.take()[0])
        while vq.get_used() is not None:
            pass


# ---- taking used buffers (2.8.2, 2.8.6) ----

def test_used_chains_are_taken_by_their_id_and_skipped_by_their_length(memory):
    vq, dev = ring(memory)
    a = vq.add([], [buffer(memory), buffer(memory), buffer(memory)], cookie=1)   # 3 descriptors
    b = vq.add([], [buffer(memory)], cookie=2)
    vq.kick()
    dev.take(), dev.take()
    dev.use(a, 150)
    dev.use(b, 60)
    assert dev.used_pos == 4                        # the device skipped a's three
    assert vq.get_used() == ([1, 1, 1], 150) and vq.get_used() == ([2], 60) and vq.get_used() is None
    assert vq.used_state == (4, 1) and vq.free_descriptors == 8


def test_out_of_order_completion_is_taken_by_id(memory):
    vq, dev = ring(memory)
    ids = [vq.add([], [buffer(memory)], cookie=10 + i) for i in range(4)]
    vq.kick()
    for _ in ids:
        dev.take()
    for i in (2, 0, 3, 1):
        dev.use(ids[i], 64)
    assert [vq.get_used()[0][0] for _ in range(4)] == [12, 10, 13, 11]


def test_a_descriptor_from_the_last_lap_is_not_taken_as_used(memory):
    # after a full lap the driver's used wrap counter is 0: a descriptor still
    # saying AVAIL = USED = 1 is last lap's, not a new used one
    vq, dev = ring(memory, size=4)
    for _ in range(4):
        vq.add([buffer(memory)], [])
    vq.kick()
    for _ in range(4):
        dev.use(dev.take()[0])
    for _ in range(4):
        assert vq.get_used() is not None
    assert vq.used_state == (0, 0) and vq.get_used() is None


# ---- every kind of bad used descriptor (validated, counted, never followed) ----

def test_a_used_id_out_of_range_breaks_the_queue(memory):
    vq, dev = ring(memory)
    vq.add([], [buffer(memory)])
    vq.kick()
    dev.take()
    dev.use(99, 0, skip=1)
    with pytest.raises(DeviceError, match="id out of range"):
        vq.get_used()
    assert vq.stats()["bad_used_id"] == 1 and vq.broken
    with pytest.raises(DeviceError, match="packed ring"):
        vq.kick()


def test_a_used_id_not_in_flight_breaks_the_queue(memory):
    # nothing says how far the next used descriptor is: the queue stops (Linux and DPDK do)
    vq, dev = ring(memory)
    first = vq.add([], [buffer(memory)])
    vq.kick()
    dev.take()
    dev.use(first + 1, 0, skip=1)
    with pytest.raises(DeviceError):
        vq.get_used()
    assert vq.stats()["used_not_in_flight"] == 1 and vq.broken


def test_a_used_id_of_a_chain_member_is_not_in_flight(memory):
    vq, dev = ring(memory)
    head = vq.add([], [buffer(memory), buffer(memory)])
    vq.kick()
    dev.take()
    assert head == 0                      # a fresh queue hands out ids 0, 1, ...: the chain has 0 and 1
    dev.use(1, 0, skip=2)
    with pytest.raises(DeviceError):
        vq.get_used()
    assert vq.stats()["used_not_in_flight"] == 1


def test_a_used_length_past_the_buffer_is_counted_and_the_buffer_reclaimed(memory):
    vq, dev = ring(memory)
    buf = vq.add([], [buffer(memory, 64)], cookie=3)
    vq.kick()
    dev.take()
    dev.use(buf, 65)
    with pytest.raises(DeviceError, match="larger than"):
        vq.get_used()
    assert vq.stats()["bad_used_len"] == 1 and vq.free_descriptors == 8 and not vq.broken


def test_nused_counts_only_what_is_in_flight(memory):
    # a device that marks the whole ring used with ids it was never given
    vq, dev = ring(memory)
    vq.add([], [buffer(memory)])
    vq.kick()
    dev.take()
    for pos in range(8):
        dev.desc[pos]["id"] = 0
        dev.desc[pos]["flags"] = AVAIL | USED
    assert vq.get_used() is not None and vq.get_used() is None     # one in flight, one taken
    assert not vq.broken


# ---- notifications: the device event suppression structure (2.8.10, 2.8.21.4) ----

def test_the_driver_notifies_unless_the_device_disabled_it(memory):
    vq, dev = ring(memory)
    vq.add([buffer(memory)], [])
    assert vq.kick() is True
    dev.device_event["flags"] = DISABLE
    vq.add([buffer(memory)], [])
    assert vq.kick() is False
    assert vq.stats()["notifications"] == 1 and vq.stats()["notifications_suppressed"] == 1


@pytest.mark.parametrize("wrap_lap", [False, True])
def test_with_event_idx_the_driver_notifies_only_past_the_descriptor_asked_for(memory, wrap_lap):
    vq, dev = ring(memory, size=8, event_idx=True)
    if wrap_lap:                                   # move both sides one lap on (wrap counters 0)
        for _ in range(8):
            vq.add([buffer(memory)], [])
        vq.kick()
        for _ in range(8):
            dev.use(dev.take()[0])
        while vq.get_used() is not None:
            pass
    wrap = 0 if wrap_lap else 1
    dev.device_event["off_wrap"] = 3 | wrap << 15     # tell me when position 3 is made available
    dev.device_event["flags"] = DESC
    for _ in range(2):
        vq.add([buffer(memory)], [])
    assert vq.kick() is False                          # positions 0, 1
    vq.add([buffer(memory)], [])
    assert vq.kick() is False                          # 2
    vq.add([buffer(memory)], [])
    vq.add([buffer(memory)], [])
    assert vq.kick() is True                           # 3, 4: crossed 3
    # an offset on the other lap is the lap behind the used position: stale, so notify
    dev.device_event["off_wrap"] = 6 | (wrap ^ 1) << 15
    vq.add([buffer(memory)], [])
    assert vq.kick() is True


def test_an_event_offset_the_device_has_already_used_is_stale_so_the_driver_notifies(memory):
    # QEMU's packed device (packed=on) can leave DESC at an offset it has since used
    # (docs/rings.md): no batch would ever cross it again, so without this it stalls.
    vq, dev = ring(memory, size=8, event_idx=True)
    for _ in range(4):
        vq.add([buffer(memory)], [])
    vq.kick()
    for _ in range(4):
        dev.use(dev.take()[0])
    while vq.get_used() is not None:
        pass
    dev.device_event["off_wrap"] = 2 | 1 << 15          # behind the used position (4)
    dev.device_event["flags"] = DESC
    vq.add([buffer(memory)], [])
    assert vq.kick() is True


def test_an_event_offset_in_flight_or_ahead_is_not_stale(memory):
    vq, dev = ring(memory, size=8, event_idx=True)
    for _ in range(4):
        vq.add([buffer(memory)], [])
    vq.kick()
    dev.device_event["flags"] = DESC
    dev.device_event["off_wrap"] = 1 | 1 << 15          # in flight: the device still works on it
    vq.add([buffer(memory)], [])
    assert vq.kick() is False
    dev.device_event["off_wrap"] = 7 | 1 << 15          # ahead: not crossed yet
    vq.add([buffer(memory)], [])
    assert vq.kick() is False
    vq.add([buffer(memory)], [])
    vq.add([buffer(memory)], [])
    assert vq.kick() is True                            # 6, 7: crossed 7


# ---- interrupts: the driver event suppression structure ----

def test_polling_disables_interrupts_and_enabling_asks_for_the_next_used(memory):
    vq, dev = ring(memory)
    assert dev.driver_event["flags"] == DISABLE
    assert vq.enable_interrupts() is False and dev.driver_event["flags"] == ENABLE
    vq.disable_interrupts()
    assert dev.driver_event["flags"] == DISABLE


def test_with_event_idx_interrupts_are_asked_for_at_the_next_used_position(memory):
    vq, dev = ring(memory, size=4, event_idx=True)
    for _ in range(3):
        vq.add([buffer(memory)], [])
    vq.kick()
    for _ in range(3):
        dev.use(dev.take()[0])
    for _ in range(3):
        vq.get_used()
    assert vq.enable_interrupts() is False
    assert dev.driver_event["flags"] == DESC and dev.driver_event["off_wrap"] == 3 | 1 << 15
    vq.add([buffer(memory)], [])
    vq.kick()
    dev.use(dev.take()[0])
    assert vq.enable_interrupts() is True      # pending: process instead of sleeping


# ---- random sequences over many laps ----

@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2), st.booleans()), min_size=1, max_size=120),
       st.randoms(use_true_random=False))
def test_random_chains_completed_in_any_order_come_back_exactly(ops, rnd):
    memory = pmd.DmaMemory(1 << 20, lock=False, name="packed-prop")
    try:
        vq = Virtqueue(memory, 8, 0, packed=True)
        dev = PackedDevice(vq)
        pending: dict[int, int] = {}       # buffer id -> cookie, as the device holds it
        want: dict[int, tuple[list[int], int]] = {}
        cookie = 0
        for n, done, shuffle in ops:
            if vq.free_descriptors >= n:
                cookie += 1
                vq.add([], [(0x1000 * k + 0x100000, 64) for k in range(n)], cookie=cookie)
                vq.kick()
                got = dev.take()
                assert got is not None and len(got[1]) == n
                pending[got[0]] = cookie
                want[cookie] = ([cookie] * n, 32 * n)
            ids = list(pending)
            if shuffle:
                rnd.shuffle(ids)
            for buf in ids[:done]:
                dev.use(buf, 32 * dev.taken[buf])
                pending.pop(buf)
            while (r := vq.get_used()) is not None:
                assert r == want.pop(r[0][0])
        for buf in list(pending):
            dev.use(buf, 32 * dev.taken[buf])
        while (r := vq.get_used()) is not None:
            assert r == want.pop(r[0][0])
        assert not want and vq.free_descriptors == 8 and not vq.broken
    finally:
        memory.close()


# ---- the bursts over a packed ring ----

def test_rx_and_tx_bursts_run_over_packed_rings(memory):
    pool = PacketPool(memory, 64)
    rvq, rdev = ring(memory, size=16)
    tvq, tdev = ring(memory, size=16)
    rxq, txq = RxQueue(rvq, pool, hdr_len=12), TxQueue(tvq, pool, hdr_len=12)
    rxq.fill()
    frames = [bytes([i]) * (60 + i) for i in range(10)]
    for f in frames:                              # the device receives: writes header + frame
        buf, chain = rdev.take()
        addr, _, _ = chain[0]
        off = addr - memory.iova(0)
        memory.view(off, 12)[:] = 0
        memory.view(off + 12, len(f))[:] = np.frombuffer(f, np.uint8)
        rdev.use(buf, 12 + len(f))
    out = np.zeros((16, 2048), np.uint8)
    lens = np.zeros(16, np.uint32)
    n = rxq.rx_burst(out, lens)
    assert [bytes(out[i, :lens[i]]) for i in range(n)] == frames
    assert txq.tx_burst(out[:n], lens[:n]) == n
    sent = []
    while (got := tdev.take()) is not None:
        buf, chain = got
        addr, ln, _ = chain[0]
        sent.append(bytes(memory.view(addr - memory.iova(0) + 12, ln - 12)))
        tdev.use(buf)
    assert sent == frames
    txq.reclaim()
    assert tvq.free_descriptors == 16 and not rvq.broken and not tvq.broken
    assert rxq.stats()["packets"] == txq.stats()["packets"] == 10
    rxq.close()
    txq.close()


def _receive(memory, dev, frame):
    """The device takes the next available buffer, writes header + frame, uses it."""
    buf, chain = dev.take()
    addr, ln, flags = chain[0]
    assert flags & WRITE and ln >= 12 + len(frame)
    off = addr - memory.iova(0)
    memory.view(off, 12)[:] = 0
    memory.view(off + 12, len(frame))[:] = np.frombuffer(frame, np.uint8)
    dev.use(buf, 12 + len(frame))
    return buf


@pytest.mark.parametrize("zero_copy", [False, True])
def test_a_received_buffers_id_is_made_available_again_in_the_same_burst_over_laps(memory, zero_copy):
    """harvest_packed puts each good packet's id back at the avail position at once (2.8.21.1),
    in one batch published by its first descriptor's flags (2.8.21.3): over several laps of a
    full ring (both wrap counters flipping) every frame comes back exact, the device always
    finds a full ring of device-writable buffers, and nothing is counted as the device's error."""
    pool = PacketPool(memory, 64)
    rvq, rdev = ring(memory, size=8)
    rxq = RxQueue(rvq, pool, hdr_len=12)
    assert rxq.fill() == 8
    out, lens = np.zeros((8, 2048), np.uint8), np.zeros(8, np.uint32)
    ids = np.zeros(8, np.uint32)
    for lap in range(5):
        frames = [bytes([lap * 8 + i]) * (60 + i) for i in range(8)]
        for f in frames:
            _receive(memory, rdev, f)
        assert not rdev.available()                  # all 8 the device's, none reposted yet
        if zero_copy:
            n = rxq.rx_burst_zc(ids, lens)
            assert [bytes(pool.data[ids[i], :lens[i]]) for i in range(n)] == frames
            pool.free(ids[:n])
        else:
            n = rxq.rx_burst(out, lens)
            assert [bytes(out[i, :lens[i]]) for i in range(n)] == frames
        assert n == 8 and rvq.free_descriptors == 0    # all 8 made available again
    s = rxq.stats()
    assert s["packets"] == 40 and s["used_not_in_flight"] == s["bad_used_len"] == 0 and not rvq.broken
    rxq.close()


def test_a_used_id_named_twice_in_one_packed_burst_is_not_in_flight_the_second_time(memory):
    """The id of a packet taken in this burst is reposted at once but is not the device's
    before publish: a second used descriptor naming it in the same burst names no chain
    in flight (counted, the queue broken, as p_take treats it), and gives no packet."""
    pool = PacketPool(memory, 64)
    rvq, rdev = ring(memory, size=8)
    rxq = RxQueue(rvq, pool, hdr_len=12)
    rxq.fill()
    buf = _receive(memory, rdev, b"\x01" * 60)
    rdev.taken[buf] = 1
    rdev.use(buf, 12 + 60)                           # again, in the next used slot
    out, lens = np.zeros((8, 2048), np.uint8), np.zeros(8, np.uint32)
    assert rxq.rx_burst(out, lens) == 1 and lens[0] == 60
    assert rxq.stats()["used_not_in_flight"] == 1 and rvq.broken
    rxq.close()
