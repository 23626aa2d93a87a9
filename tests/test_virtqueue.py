"""Driver side of the split virtqueue, rule by rule (Virtio 1.2 2.7).

The device side here is pmd._device.DeviceQueue over the same memory, and
the ring is also inspected raw (tests.conftest.ring_view), so a rule is
checked against the bytes a device would see.
"""

import os

import numpy as np
import pytest

import pmd
from pmd.errors import DeviceError, QueueStateError

from .conftest import make_pair, ring_view


def add_buf(vq, memory, n=1, *, writable=True, length=64, cookie=0):
    """Add one chain of n device-writable (or readable) buffers."""
    bufs = [(memory.iova(memory.alloc(length)), length) for _ in range(n)]
    if writable:
        return vq.add([], bufs, cookie)
    return vq.add(bufs, [], cookie)


# ---- adding and publishing ----

def test_added_buffers_are_invisible_until_flush(ring_pair, memory):
    vq, dq = ring_pair
    for i in range(3):
        add_buf(vq, memory, cookie=i)
    r = ring_view(vq)
    assert r["avail_idx"][0] == 0 and dq.avail_pending == 0
    vq.kick()
    assert r["avail_idx"][0] == 3 and dq.avail_pending == 3


def test_one_avail_index_store_per_burst(ring_pair, memory):
    # The index moves by the whole burst at once: 0 -> 5, never 1, 2, ...
    vq, dq = ring_pair
    r = ring_view(vq)
    for _ in range(5):
        add_buf(vq, memory)
        assert r["avail_idx"][0] == 0
    vq.kick()
    assert r["avail_idx"][0] == 5


def test_descriptor_written_as_the_spec_lays_it_out(ring_pair, memory):
    vq, _ = ring_pair
    off = memory.alloc(100)
    head = vq.add([], [(memory.iova(off), 100)], 42)
    d = ring_view(vq)["desc"][head]
    assert d["addr"] == memory.iova(off) and d["len"] == 100
    assert d["flags"] == 2  # VRING_DESC_F_WRITE, no NEXT
    assert ring_view(vq)["avail_ring"][0] == head


def test_chained_descriptors_readable_first_then_writable(ring_pair, memory):
    vq, dq = ring_pair
    outs = [(memory.iova(memory.alloc(16)), 16), (memory.iova(memory.alloc(32)), 32)]
    ins = [(memory.iova(memory.alloc(64)), 64)]
    head = vq.add(outs, ins, 7)
    vq.kick()
    desc = ring_view(vq)["desc"]
    i, flags = head, []
    for _ in range(3):
        flags.append(int(desc[i]["flags"]))
        i = int(desc[i]["next"])
    assert flags == [1, 1, 2 | 0]  # NEXT, NEXT, WRITE (last has no NEXT)
    h, readable, capacity = dq.pop_chain()
    assert h == head and len(readable) == 48 and capacity == 64
    dq.complete(h, b"x" * 10)
    dq.publish_used()
    cookies, length = vq.get_used()
    assert cookies == [7, 7, 7] and length == 10
    assert vq.free_descriptors == 8


def test_free_descriptors_are_reused_in_O1_order(ring_pair, memory):
    vq, dq = ring_pair
    heads = [add_buf(vq, memory) for _ in range(8)]
    assert sorted(heads) == list(range(8))
    with pytest.raises(QueueStateError, match="full"):
        add_buf(vq, memory)
    vq.kick()
    h, _, _ = dq.pop_chain()
    dq.complete(h)
    dq.publish_used()
    vq.get_used()
    assert add_buf(vq, memory) == h  # the freed one is the free list's head


def test_ring_addresses_are_iovas_not_virtual_addresses():
    with pmd.DmaMemory(1 << 20, lock=False) as m:
        m.set_iova_translator(lambda va: va + 0x7000_0000_0000)
        vq = pmd.Virtqueue(m, 16)
        assert vq.desc_iova == vq.ring_address + 0x7000_0000_0000


def test_ring_must_be_iova_contiguous():
    with pmd.DmaMemory(16 * 4096, hugepages=False, lock=False) as m:
        base = m.address
        m.set_iova_translator(lambda va: 0x1000_0000 + (15 - (va - base) // 4096) * 4096)
        with pytest.raises(ValueError, match="non-contiguous"):
            pmd.Virtqueue(m, 256)


# ---- wraparound of the 16-bit indices ----

@pytest.mark.parametrize("event_idx", [False, True])
def test_both_indices_wrap_past_65535(memory, event_idx):
    vq, dq = make_pair(memory, 4, event_idx=event_idx)
    r = ring_view(vq)
    total = 65536 + 300
    bufs = [memory.iova(memory.alloc(64)) for _ in range(4)]
    done = 0
    while done < total:
        for k in range(4):
            vq.add([], [(bufs[k], 64)], done + k)
        vq.kick()
        for k in range(4):
            h, _, _ = dq.pop_chain()
            dq.complete(h, bytes([k]))
        dq.publish_used()
        for k in range(4):
            cookies, length = vq.get_used()
            assert cookies == [done + k] and length == 1
        done += 4
    assert vq.next_avail_idx == total % 65536 == r["avail_idx"][0]
    assert vq.next_used_idx == total % 65536 == r["used_idx"][0]
    assert vq.get_used() is None
    assert vq.free_descriptors == 4


# ---- driver -> device notifications (2.7.10) ----

def test_notify_when_device_has_not_suppressed(ring_pair, memory):
    vq, dq = ring_pair
    add_buf(vq, memory)
    assert vq.kick() is True
    assert vq.stats()["notifications"] == 1


def test_no_notify_flag_suppresses_notification(ring_pair, memory):
    vq, dq = ring_pair
    dq.disable_notify()
    assert ring_view(vq)["used_flags"][0] == 1
    add_buf(vq, memory)
    assert vq.kick() is False
    assert vq.stats()["notifications_suppressed"] == 1
    dq.enable_notify()
    add_buf(vq, memory)
    assert vq.kick() is True


def test_no_notify_without_new_buffers(ring_pair, memory):
    vq, _ = ring_pair
    assert vq.kick() is False
    assert vq.stats()["notifications"] == 0


def test_event_idx_notifies_only_when_avail_event_is_crossed(memory):
    vq, dq = make_pair(memory, 8, event_idx=True)
    r = ring_view(vq)
    r["avail_event"][0] = 2          # device: "tell me when entry 2 is made available"
    add_buf(vq, memory)
    assert vq.kick() is False        # idx 0 -> 1: 2 not in [0, 1)
    add_buf(vq, memory)
    assert vq.kick() is False        # 1 -> 2: 2 not in [1, 2)
    add_buf(vq, memory)
    add_buf(vq, memory)
    assert vq.kick() is True         # 2 -> 4: 2 in [2, 4)


def test_event_idx_ignores_the_no_notify_flag(memory):
    vq, dq = make_pair(memory, 8, event_idx=True)
    r = ring_view(vq)
    r["used_flags"][0] = 1
    r["avail_event"][0] = 0
    add_buf(vq, memory)
    assert vq.kick() is True


def test_device_disable_notify_with_event_idx_keeps_flags_zero(memory):
    vq, dq = make_pair(memory, 8, event_idx=True)
    dq.disable_notify()
    assert ring_view(vq)["used_flags"][0] == 0   # 2.7.10.1: must stay 0 with EVENT_IDX
    for _ in range(8):
        add_buf(vq, memory)
    assert vq.kick() is False


# ---- device -> driver interrupts (2.7.7) ----

def complete_one(vq, dq, memory):
    add_buf(vq, memory)
    vq.kick()
    h, _, _ = dq.pop_chain()
    dq.complete(h, b"\0")
    return dq.publish_used()


def test_polling_queue_sets_no_interrupt(ring_pair, memory):
    vq, dq = ring_pair
    assert ring_view(vq)["avail_flags"][0] == 1
    assert complete_one(vq, dq, memory) is False
    assert dq.stats()["interrupts_suppressed"] == 1


def test_enabled_interrupts_are_delivered(ring_pair, memory):
    vq, dq = ring_pair
    assert vq.enable_interrupts() is False
    assert ring_view(vq)["avail_flags"][0] == 0
    assert complete_one(vq, dq, memory) is True


def test_enable_interrupts_reports_pending_entries(ring_pair, memory):
    # The re-check that keeps a wake-up from being lost.
    vq, dq = ring_pair
    complete_one(vq, dq, memory)
    assert vq.enable_interrupts() is True


def test_event_idx_interrupt_only_at_used_event(memory):
    vq, dq = make_pair(memory, 8, event_idx=True)
    vq.enable_interrupts()                 # used_event = 0: interrupt at the first entry
    r = ring_view(vq)
    assert r["avail_flags"][0] == 0 and r["used_event"][0] == 0
    assert complete_one(vq, dq, memory) is True
    assert complete_one(vq, dq, memory) is False    # used_event still 0, already passed
    vq.get_used()
    vq.get_used()
    vq.enable_interrupts()                 # used_event = 2
    assert complete_one(vq, dq, memory) is True


def test_event_idx_disable_keeps_flags_zero_and_suppresses(memory):
    vq, dq = make_pair(memory, 8, event_idx=True)
    vq.disable_interrupts()
    assert ring_view(vq)["avail_flags"][0] == 0   # 2.7.7.1
    for _ in range(4):
        assert complete_one(vq, dq, memory) is False
        vq.get_used()


def test_interrupt_written_to_eventfd(ring_pair, memory):
    vq, dq = ring_pair
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        dq.set_interrupt_eventfd(fd)
        vq.enable_interrupts()
        complete_one(vq, dq, memory)
        assert os.eventfd_read(fd) == 1
    finally:
        os.close(fd)


# ---- notification mechanisms ----

def test_notify_by_eventfd(ring_pair, memory):
    vq, _ = ring_pair
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vq.set_notify_eventfd(fd)
        add_buf(vq, memory)
        vq.kick()
        assert os.eventfd_read(fd) == 1
    finally:
        os.close(fd)


def test_notify_by_mmio_store_of_queue_index(memory):
    vq = pmd.Virtqueue(memory, 8, queue_index=5)
    reg = bytearray(8)
    win = pmd.Mmio(reg)
    vq.set_notify_mmio(win, 4)
    add_buf(vq, memory)
    vq.kick()
    assert reg[4:6] == (5).to_bytes(2, "little")
    vq.close()
    win.close()


def test_notify_by_pwrite_at_offset(memory, tmp_path):
    vq = pmd.Virtqueue(memory, 8, queue_index=3)
    f = tmp_path / "ioport"
    f.write_bytes(bytes(32))
    fd = os.open(f, os.O_RDWR)
    try:
        vq.set_notify_pwrite(fd, 16)     # legacy VIRTIO_PCI_QUEUE_NOTIFY is at 16
        add_buf(vq, memory)
        vq.kick()
        assert f.read_bytes()[16:18] == (3).to_bytes(2, "little")
    finally:
        os.close(fd)


# ---- every kind of bad used entry is rejected and counted ----

def test_used_id_out_of_range_is_counted_and_ignored(ring_pair, memory):
    vq, dq = ring_pair
    add_buf(vq, memory)
    vq.kick()
    dq.push_raw(8, 0)           # queue size is 8: ids 0..7
    dq.publish_used()
    with pytest.raises(DeviceError, match="bad id"):
        vq.get_used()
    assert vq.stats()["bad_used_id"] == 1
    assert vq.in_flight == 1    # nothing was reclaimed


def test_used_id_not_in_flight_is_counted_and_ignored(ring_pair, memory):
    vq, dq = ring_pair
    add_buf(vq, memory)        # head 0 in flight
    vq.kick()
    dq.push_raw(5, 0)          # 5 was never made available
    dq.publish_used()
    with pytest.raises(DeviceError, match="not in flight"):
        vq.get_used()
    assert vq.stats()["used_not_in_flight"] == 1


def test_used_id_of_chain_member_not_head_is_refused(ring_pair, memory):
    vq, dq = ring_pair
    head = add_buf(vq, memory, n=3)
    vq.kick()
    second = int(ring_view(vq)["desc"][head]["next"])
    dq.push_raw(second, 0)
    dq.publish_used()
    with pytest.raises(DeviceError, match="not in flight"):
        vq.get_used()
    assert vq.in_flight == 3


def test_used_id_completed_twice_is_refused_the_second_time(ring_pair, memory):
    vq, dq = ring_pair
    head = add_buf(vq, memory)
    add_buf(vq, memory)        # two in flight, so two used entries are plausible
    vq.kick()
    dq.push_raw(head, 1)
    dq.push_raw(head, 1)
    dq.publish_used()
    assert vq.get_used() == ([0], 1)
    with pytest.raises(DeviceError, match="not in flight"):
        vq.get_used()


def test_used_len_larger_than_buffer_is_counted_and_buffer_reclaimed(ring_pair, memory):
    vq, dq = ring_pair
    head = add_buf(vq, memory, length=64)
    vq.kick()
    dq.push_raw(head, 65)
    dq.publish_used()
    with pytest.raises(DeviceError, match="larger than"):
        vq.get_used()
    assert vq.stats()["bad_used_len"] == 1
    assert vq.in_flight == 0


def test_used_idx_beyond_in_flight_breaks_the_queue(ring_pair, memory):
    vq, dq = ring_pair
    add_buf(vq, memory)
    vq.kick()
    dq.set_used_idx(100)        # claims 100 entries; 1 is in flight
    with pytest.raises(DeviceError, match="reset the device"):
        vq.get_used()
    assert vq.broken and vq.stats()["bad_used_idx"] == 1
    with pytest.raises(DeviceError):
        vq.kick()


# ---- state ----

def test_closed_queue_refuses_work(ring_pair, memory):
    vq, _ = ring_pair
    vq.close()
    with pytest.raises(QueueStateError, match="closed"):
        add_buf(vq, memory)


def test_queue_on_closed_memory_refuses_work():
    m = pmd.DmaMemory(1 << 20, lock=False)
    vq = pmd.Virtqueue(m, 8)
    m.close()
    with pytest.raises(QueueStateError, match="closed"):
        vq.kick()


def test_empty_chain_is_refused(ring_pair):
    vq, _ = ring_pair
    with pytest.raises(ValueError, match="at least one"):
        vq.add([], [])
