"""Indirect descriptors (VIRTIO_F_INDIRECT_DESC, feature bit 28): Virtio 1.2 2.7.5.3
(split) and 2.8.7 / 2.8.19 (packed), driver side and device side, one test per rule.

The driver side is read back from DMA memory with numpy, the device side is fed
rings and tables written here with numpy as the spec lays them out, independently
of the code under test. Every refusal is counted with its own reason, returns the
chain with length 0, and leaves the queue working.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import pmd
from pmd.abi import virtio as V
from pmd.errors import DeviceError, QueueStateError
from pmd.sim._dma import DmaWindows
from pmd.sim._virtqueue import DeviceQueue

from .conftest import ring_view

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
SPLIT = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
PACKED = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
LAYOUTS = ["split", "packed"]


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


def raw(memory):
    return np.frombuffer(memory, np.uint8)


# ====================================================================== driver side

def driver_queue(memory, layout, size=8, indirect_max=4):
    return pmd.Virtqueue(memory, size, packed=layout == "packed", indirect_max=indirect_max)


def ring_desc(vq):
    """The ring's descriptors as the device reads them."""
    mem = raw(vq.memory)
    return mem[vq.offset:vq.offset + 16 * vq.size].view(PACKED if vq.packed else SPLIT)


def table_at(vq, iova, n):
    off = iova - vq.memory.iova(0)
    return raw(vq.memory)[off:off + 16 * n].view(PACKED if vq.packed else SPLIT)


def device_for(vq, indirect=True):
    w = DmaWindows()
    w.add_memory(vq.memory)
    return DeviceQueue(w, vq.size, vq.desc_iova, vq.avail_iova, vq.used_iova, packed=vq.packed,
                       indirect=indirect)


def test_a_multi_buffer_chain_is_published_as_one_descriptor_pointing_to_an_indirect_table(memory, layout):
    vq = driver_queue(memory, layout)
    base = memory.iova(memory.alloc(4096))
    head = vq.add([(base, 10), (base + 64, 20)], [(base + 128, 30)], cookie=7)
    vq.kick()
    d = ring_desc(vq)[0]
    # one descriptor: the table's address and 16 bytes per entry (2.7.5.3, 2.8.7)
    assert int(d["addr"]) == vq.indirect_table_iova(head) and int(d["len"]) == 48
    assert int(d["flags"]) & (INDIRECT | NEXT | WRITE) == INDIRECT
    assert vq.in_flight == 1 and vq.free_descriptors == 7
    t = table_at(vq, vq.indirect_table_iova(head), 3)
    assert [int(a) for a in t["addr"]] == [base, base + 64, base + 128]
    assert [int(x) for x in t["len"]] == [10, 20, 30]
    if layout == "split":
        # 2.7.5.3: entry 0 first, the others chained by next, readable before writable
        assert [int(f) for f in t["flags"]] == [NEXT, NEXT, WRITE]
        assert [int(x) for x in t["next"][:2]] == [1, 2]
    else:
        # 2.8.19: WRITE is the only flag a table entry carries; 2.8.7: its id is reserved
        assert [int(f) for f in t["flags"]] == [0, 0, WRITE]
        assert int(d["id"]) == head


def test_the_indirect_descriptor_never_carries_next(memory, layout):
    vq = driver_queue(memory, layout, indirect_max=8)
    base = memory.iova(memory.alloc(4096))
    for n in range(2, 9):
        head = vq.add([(base, 4)] * n, cookie=n)
        vq.kick()
        d = ring_desc(vq)
        slot = head if layout == "split" else (vq.next_avail_idx - 1) % vq.size
        assert int(d[slot]["flags"]) & (INDIRECT | NEXT) == INDIRECT, n      # 2.7.5.3.1, 2.8.19
        assert int(d[slot]["len"]) == 16 * n


def test_indirect_table_is_written_before_the_descriptor_is_made_available(memory, layout):
    vq = driver_queue(memory, layout)
    dq = device_for(vq)
    base = memory.iova(memory.alloc(4096))
    raw(memory)[base - memory.iova(0):][:16] = np.frombuffer(b"header..payload.", np.uint8)
    head = vq.add([(base, 8), (base + 8, 8)], cookie=1)
    # added, not published: the table is complete in memory, the device sees nothing yet
    t = table_at(vq, vq.indirect_table_iova(head), 2)
    assert [int(a) for a in t["addr"]] == [base, base + 8]
    assert dq.avail_pending == 0 and dq.pop_chain() is None
    vq.kick()       # the write barrier, then the avail index / the first flags (2.7.13.3.1, 2.8.21.3)
    assert dq.pop_chain() == (head, b"header..payload.", 0)
    dq.close()


def test_a_single_buffer_stays_a_direct_descriptor(memory, layout):
    vq = driver_queue(memory, layout)
    base = memory.iova(memory.alloc(4096))
    vq.add([(base, 100)], cookie=1)
    vq.kick()
    d = ring_desc(vq)[0]
    assert int(d["addr"]) == base and int(d["len"]) == 100 and not int(d["flags"]) & INDIRECT


def test_a_chain_longer_than_the_tables_goes_in_the_ring_as_a_direct_chain(memory, layout):
    vq = driver_queue(memory, layout, indirect_max=2)
    base = memory.iova(memory.alloc(4096))
    vq.add([(base, 1), (base, 2), (base, 3)], cookie=1)
    vq.kick()
    d = ring_desc(vq)
    assert vq.in_flight == 3 and not any(int(f) & INDIRECT for f in d["flags"][:3])


def test_each_descriptor_id_has_its_own_table_in_the_queues_dma_memory_made_at_setup(memory, layout):
    vq = driver_queue(memory, layout, size=16, indirect_max=16)
    allocated = memory.allocated
    tables = [vq.indirect_table_iova(i) for i in range(16)]
    stride = 16 * vq.indirect_max
    assert len(set(tables)) == 16
    assert all(b - a >= stride for a, b in zip(sorted(tables), sorted(tables)[1:]))
    lo, hi = memory.iova(0), memory.iova(0) + memory.size
    assert all(lo <= t and t + stride <= hi for t in tables)           # mapped for the device
    ring = (vq.desc_iova, vq.desc_iova + vq.ring_bytes)
    assert all(t + stride <= ring[0] or t >= ring[1] for t in tables)
    base = memory.iova(memory.alloc(4096))
    allocated = memory.allocated
    dq = device_for(vq)
    for _ in range(3):
        for k in range(16):
            vq.add([(base, 4), (base, 4)], cookie=k)
        assert vq.in_flight == 16
        vq.kick()
        while (c := dq.pop_chain()) is not None:
            dq.complete(c[0])
        dq.publish_used()
        while vq.get_used() is not None:
            pass
        # nothing allocated per packet
        assert memory.allocated == allocated and vq.in_flight == 0
    dq.close()


def test_every_cookie_of_an_indirect_chain_comes_back_and_its_one_descriptor_is_freed(memory, layout):
    vq = driver_queue(memory, layout)
    dq = device_for(vq)
    base = memory.iova(memory.alloc(4096))
    vq.add([(base, 4)], [(base + 64, 8), (base + 128, 8)], cookie=5)
    vq.kick()
    head, readable, cap = dq.pop_chain()
    assert cap == 16 and len(readable) == 4
    dq.complete(head, b"0123456789abcdef")
    dq.publish_used()
    assert vq.get_used() == ([5, 5, 5], 16)
    assert vq.free_descriptors == vq.size and vq.stats()["bad_used_len"] == 0
    dq.close()


def test_a_device_that_overwrites_an_indirect_table_changes_nothing_for_the_driver(memory, layout):
    # The driver keeps its own record of each chain: what the device writes into a
    # table (it is device-reachable memory) is never read back.
    from pmd.loopback import Loopback

    with Loopback(queue_size=16, packed=layout == "packed", indirect=True) as lb:
        data = np.random.default_rng(2).integers(0, 256, (8, 5000), dtype=np.uint8)
        assert lb.driver_tx.tx_burst(data, np.full(8, 5000, np.uint32)) == 8
        vq = lb.driver_tx.vq
        assert vq.in_flight == 8
        dq = lb.device_tx
        heads = []
        while (c := dq.pop_chain()) is not None:
            heads.append(c[0])
        for i in range(16):           # the device has read them: now it scribbles on them
            t = table_at(vq, vq.indirect_table_iova(i), vq.indirect_max)
            t.view(np.uint8)[:] = 0xEE
        for h in heads:
            dq.complete(h)
        dq.publish_used()
        before = lb.pool.available
        assert lb.driver_tx.reclaim() == 8 * 3          # 5000 bytes: three buffers each
        assert lb.pool.available == before + 24 and vq.in_flight == 0
        assert lb.driver_tx.stats()["foreign_chains"] == 0


def test_a_ring_holds_more_multi_buffer_packets_with_indirect_tables(layout):
    from pmd.loopback import Loopback

    frames = np.zeros((16, 9000), np.uint8)
    lens = np.full(16, 9000, np.uint32)
    with Loopback(queue_size=16, packed=layout == "packed", indirect=True) as lb:
        assert lb.driver_tx.tx_burst(frames, lens) == 16      # 16 packets of 5 buffers, 16 descriptors
        assert lb.driver_tx.vq.in_flight == 16
    with Loopback(queue_size=16, packed=layout == "packed") as lb:
        assert lb.driver_tx.tx_burst(frames, lens) == 3       # direct: 5 descriptors a packet
        assert lb.driver_tx.stats()["ring_full"] == 1


def test_indirect_max_out_of_range_is_a_clear_error(memory):
    for bad in (1, 9, 300):
        with pytest.raises(ValueError, match="indirect table holds 2 to 8"):
            pmd.Virtqueue(memory, 8, indirect_max=bad)
    with pytest.raises(ValueError, match="2 to 256"):
        pmd.Virtqueue(memory, 512, indirect_max=257)
    vq = pmd.Virtqueue(memory, 8)
    assert not vq.indirect
    with pytest.raises(QueueStateError, match="no indirect tables"):
        vq.indirect_table_iova(0)


def test_pmd_takes_indirect_desc_whenever_offered_and_disable_turns_it_off():
    from pmd.abi import virtio_net as N
    from pmd.driver.virtio.net import negotiate

    offered = V.bit(V.VERSION_1) | V.bit(V.RING_INDIRECT_DESC)
    assert negotiate(offered) & V.bit(V.RING_INDIRECT_DESC)
    for name in ("RING_INDIRECT_DESC", "INDIRECT_DESC"):
        assert not negotiate(offered, disable=N.parse_features(name)) & V.bit(V.RING_INDIRECT_DESC)
    assert "INDIRECT_DESC" in N.feature_names(negotiate(offered))


def test_the_built_in_device_offers_indirect_desc():
    from pmd.sim.net import OFFERED

    assert OFFERED & V.bit(V.RING_INDIRECT_DESC)


# ====================================================================== device side

class Ring:
    """One queue written by a driver in plain numpy, split or packed, for the device
    under test. Buffers and tables live in the memory's DMA window."""

    def __init__(self, memory, layout, size=8, indirect=True, windows=None):
        self.memory, self.size, self.packed = memory, size, layout == "packed"
        mem = raw(memory)
        if self.packed:
            off = memory.alloc(16 * size, 16)
            ev = memory.alloc(8, 4)
            self.desc = mem[off:off + 16 * size].view(PACKED)
            iovas = (memory.iova(off), memory.iova(ev), memory.iova(ev + 4))
            self.pos, self.wrap, self.used_pos = 0, 1, 0
        else:
            self.vq = pmd.Virtqueue(memory, size)       # ring placement only
            self.r = ring_view(self.vq)
            self.desc = self.r["desc"]
            iovas = (self.vq.desc_iova, self.vq.avail_iova, self.vq.used_iova)
            self.avail = self.next_desc = self.used_idx = 0
        boff = memory.alloc(64 << 10, 4096)
        self.buf, self.bufs = memory.iova(boff), mem[boff:boff + (64 << 10)]
        self.tables_off = memory.alloc(64 << 10, 4096)
        self.next_table = 0
        if windows is None:
            windows = DmaWindows()
            windows.add_memory(memory)
        self.dq = DeviceQueue(windows, size, *iovas, packed=self.packed, indirect=indirect)

    def data(self, k, payload: bytes) -> tuple[int, int]:
        """Buffer k (1 KiB each) holding ``payload``: (iova, len)."""
        self.bufs[1024 * k:1024 * k + len(payload)] = np.frombuffer(payload, np.uint8)
        return self.buf + 1024 * k, len(payload)

    def table(self, entries, *, dtype=None, misalign=0) -> int:
        """Write a table of raw entries (split: addr, len, flags, next; packed:
        addr, len, id, flags) and return its IOVA."""
        off = self.tables_off + self.next_table + misalign
        self.next_table += 16 * len(entries) + 64
        arr = np.array(entries, dtype=dtype or (PACKED if self.packed else SPLIT))
        raw(self.memory)[off:off + arr.nbytes] = arr.view(np.uint8)
        return self.memory.iova(off)

    def good_table(self, bufs, **kw) -> int:
        """A well-formed table of (iova, len, writable) buffers."""
        n = len(bufs)
        if self.packed:
            return self.table([(a, ln, 0, WRITE if w else 0) for a, ln, w in bufs], **kw)
        return self.table([(a, ln, (WRITE if w else 0) | (NEXT if k + 1 < n else 0), k + 1 if k + 1 < n else 0)
                           for k, (a, ln, w) in enumerate(bufs)], **kw)

    def post(self, descs, bid=3) -> int:
        """Make one chain of ring descriptors (addr, len, flags) available: NEXT on
        all but the last (add it to the last by hand to break the rules). Its head
        (split) or buffer id (packed)."""
        n = len(descs)
        if self.packed:
            first, first_flags = self.pos, 0
            for k, (addr, ln, flags) in enumerate(descs):
                f = flags | (NEXT if k + 1 < n else 0) | (AVAIL if self.wrap else USED)
                self.desc[self.pos] = (addr, ln, bid, 0)
                if k == 0:
                    first_flags = f
                else:
                    self.desc[self.pos]["flags"] = f
                self.pos += 1
                if self.pos == self.size:
                    self.pos, self.wrap = 0, self.wrap ^ 1
            self.desc[first]["flags"] = first_flags
            return bid
        idxs = [(self.next_desc + k) % self.size for k in range(n)]
        self.next_desc = (self.next_desc + n) % self.size
        for k, (addr, ln, flags) in enumerate(descs):
            self.desc[idxs[k]] = (addr, ln, flags | (NEXT if k + 1 < n else 0), idxs[(k + 1) % n])
        self.r["avail_ring"][self.avail % self.size] = idxs[0]
        self.avail += 1
        self.r["avail_idx"][0] = self.avail
        return idxs[0]

    def used(self) -> tuple[int, int]:
        """The used entry the device wrote last: (id, len)."""
        self.dq.publish_used()
        if self.packed:
            d = self.desc[self.used_pos]
            assert int(d["flags"]) & (AVAIL | USED) in (0, AVAIL | USED)
            return int(d["id"]), int(d["len"])
        e = self.r["used_ring"][(int(self.r["used_idx"][0]) - 1) % self.size]
        return int(e[0]), int(e[1])

    def close(self):
        self.dq.close()


@pytest.fixture
def ring(memory, layout):
    r = Ring(memory, layout)
    yield r
    r.close()


def refused(ring, head, reason):
    """The chain is refused with ``reason``, counted once, returned with length 0, and
    the queue takes the next chain."""
    with pytest.raises(DeviceError, match=re.escape(reason)):
        ring.dq.pop_chain()
    assert ring.dq.n_bad_desc == 1 and ring.dq.last_error == reason
    assert ring.used() == (head, 0)
    ok = ring.post([ring.data(9, b"next one") + (0,)], bid=5)
    assert ring.dq.pop_chain()[:2] == (ok, b"next one")
    assert ring.dq.n_bad_desc == 1 and not ring.dq.broken


def test_device_follows_an_indirect_table(ring):
    t = ring.good_table([(*ring.data(0, b"hdr:"), False), (*ring.data(1, b"payload"), False),
                         (ring.buf + 4096, 100, True)])
    head = ring.post([(t, 48, INDIRECT)])
    h, readable, cap = ring.dq.pop_chain()
    assert (h, readable, cap) == (head, b"hdr:payload", 100)
    ring.dq.complete(h, b"written")
    assert ring.used() == (head, 7)
    assert bytes(ring.bufs[4096:4103]) == b"written"
    assert ring.dq.n_bad_desc == 0


def test_device_ignores_write_on_the_descriptor_that_points_to_a_table(ring):
    # 2.7.5.3.2, 2.8.7: WRITE on the INDIRECT descriptor means nothing; the entries say
    t = ring.good_table([(*ring.data(0, b"readable"), False)])
    head = ring.post([(t, 16, INDIRECT | WRITE)])
    assert ring.dq.pop_chain() == (head, b"readable", 0)


def test_device_reads_a_table_at_any_alignment(ring):
    # 2.7.5.3: the table may be "anywhere in memory"
    t = ring.good_table([(*ring.data(0, b"odd"), False), (*ring.data(1, b"ly placed"), False)], misalign=5)
    head = ring.post([(t, 32, INDIRECT)])
    assert ring.dq.pop_chain() == (head, b"oddly placed", 0)


def test_device_handles_direct_descriptors_followed_by_one_indirect(memory):
    # 2.7.5.3.2: zero or more normal chained descriptors, then a single INDIRECT
    ring = Ring(memory, "split")
    t = ring.good_table([(*ring.data(1, b"-in-table"), False), (ring.buf + 4096, 64, True)])
    head = ring.post([ring.data(0, b"direct") + (0,), (t, 32, INDIRECT)])
    assert ring.dq.pop_chain() == (head, b"direct-in-table", 64)
    ring.close()


def test_device_refuses_indirect_when_not_negotiated(memory, layout):
    ring = Ring(memory, layout, indirect=False)
    t = ring.good_table([(*ring.data(0, b"x"), False)])
    refused(ring, ring.post([(t, 16, INDIRECT)]), "indirect descriptor (not negotiated)")
    ring.close()


@pytest.mark.parametrize("length", [0, 8, 17, 40])
def test_device_refuses_an_indirect_table_whose_length_is_not_a_multiple_of_16(ring, length):
    t = ring.good_table([(*ring.data(0, b"x"), False)] * 3)
    refused(ring, ring.post([(t, length, INDIRECT)]), "indirect table length 0 or not a multiple of 16")


def test_device_refuses_an_indirect_table_longer_than_the_queue(ring):
    # 2.7.5.3.1: no chain longer than the queue size (8 here), the table included
    t = ring.good_table([(*ring.data(0, b"x"), False)] * 9)
    refused(ring, ring.post([(t, 16 * 9, INDIRECT)]), "indirect table longer than the queue size")


def test_device_refuses_a_table_that_with_the_direct_descriptors_before_it_is_longer_than_the_queue(memory):
    ring = Ring(memory, "split")
    t = ring.good_table([(*ring.data(0, b"x"), False)] * 6)
    head = ring.post([ring.data(1, b"a") + (0,)] * 3 + [(t, 16 * 6, INDIRECT)])
    refused(ring, head, "indirect table longer than the queue size")
    ring.close()


@pytest.mark.parametrize("where", ["outside", "straddling", "wrapping"])
def test_device_refuses_an_indirect_table_outside_the_dma_memory(ring, where):
    end = ring.memory.iova(0) + ring.memory.size
    addr = {"outside": end + 4096, "straddling": end - 16, "wrapping": (1 << 64) - 16}[where]
    refused(ring, ring.post([(addr, 64, INDIRECT)]), "indirect table outside the driver's DMA memory")


def test_device_refuses_indirect_together_with_next(ring):
    # split 2.7.5.3.1: never both flags; packed 2.8.19: never in a list linked by NEXT
    t = ring.good_table([(*ring.data(0, b"x"), False)])
    head = ring.post([(t, 16, INDIRECT), ring.data(1, b"y") + (0,)])
    refused(ring, head, "indirect descriptor chained by NEXT")


def test_packed_device_refuses_an_indirect_descriptor_after_direct_ones_in_a_list(memory):
    # 2.8.7: "each list only contains descriptors of a given type"
    ring = Ring(memory, "packed")
    t = ring.good_table([(*ring.data(0, b"x"), False)])
    head = ring.post([ring.data(1, b"y") + (0,), (t, 16, INDIRECT)])
    refused(ring, head, "indirect descriptor chained by NEXT")
    ring.close()


def test_device_refuses_an_indirect_descriptor_inside_a_table(memory):
    # split 2.7.5.3.1: one table per descriptor
    ring = Ring(memory, "split")
    inner = ring.good_table([(*ring.data(0, b"x"), False)])
    t = ring.table([(*ring.data(1, b"y"), NEXT, 1), (inner, 16, INDIRECT, 0)])
    refused(ring, ring.post([(t, 32, INDIRECT)]), "indirect descriptor inside an indirect table")
    ring.close()


def test_packed_device_ignores_every_flag_but_write_and_the_id_inside_a_table(memory):
    # 2.8.7: WRITE is the only valid flag of a table entry; the others, and the id, are
    # reserved and ignored by the device (so neither INDIRECT nor NEXT is followed)
    ring = Ring(memory, "packed")
    t = ring.table([(*ring.data(0, b"one"), 0xBEEF, INDIRECT | NEXT | AVAIL),
                    (*ring.data(1, b"two"), 0x1234, NEXT | USED),
                    (ring.buf + 4096, 32, 0xFFFF, WRITE | INDIRECT)])
    head = ring.post([(t, 48, INDIRECT)])
    assert ring.dq.pop_chain() == (head, b"onetwo", 32)
    ring.close()


def test_device_refuses_a_next_index_outside_the_table(memory):
    ring = Ring(memory, "split")
    t = ring.table([(*ring.data(0, b"x"), NEXT, 2), (*ring.data(1, b"y"), 0, 0)])   # 2 entries, next = 2
    refused(ring, ring.post([(t, 32, INDIRECT)]), "next index outside the indirect table")
    ring.close()


def test_device_refuses_a_loop_inside_a_table(memory):
    ring = Ring(memory, "split")
    t = ring.table([(*ring.data(0, b"x"), NEXT, 1), (*ring.data(1, b"y"), NEXT, 0)])
    refused(ring, ring.post([(t, 32, INDIRECT)]), "descriptor chain in an indirect table loops")
    ring.close()


def test_device_refuses_a_buffer_in_a_table_outside_the_dma_memory(ring):
    end = ring.memory.iova(0) + ring.memory.size
    t = ring.good_table([(*ring.data(0, b"x"), False), (end + 64, 16, False)])
    refused(ring, ring.post([(t, 32, INDIRECT)]), "buffer outside the driver's DMA memory")


def test_device_refuses_readable_after_writable_in_a_table(ring):
    # 2.7.4.2, 2.8.18: readable elements first, across the whole chain
    t = ring.good_table([(ring.buf + 4096, 16, True), (*ring.data(0, b"x"), False)])
    refused(ring, ring.post([(t, 32, INDIRECT)]), "device-readable descriptor after a device-writable one")


def test_device_refuses_a_table_of_readable_buffers_after_a_writable_direct_one(memory):
    ring = Ring(memory, "split")
    t = ring.good_table([(*ring.data(0, b"x"), False)])
    head = ring.post([(ring.buf + 4096, 16, WRITE), (t, 16, INDIRECT)])
    refused(ring, head, "device-readable descriptor after a device-writable one")
    ring.close()


def test_device_refuses_a_table_whose_buffers_pass_4_gib(memory, layout):
    w = DmaWindows()
    w.add_memory(memory)
    w.add(1 << 40, 8 << 30, memory.address)      # only ever refused before a byte is touched
    ring = Ring(memory, layout, windows=w)
    t = ring.good_table([(1 << 40, 0xFFFFFFFF, True), (1 << 40, 0xFFFFFFFF, True)])
    refused(ring, ring.post([(t, 32, INDIRECT)]), "chain longer than 4 GiB")
    ring.close()


# ====================================================================== both sides

@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
def test_loopback_of_multi_buffer_frames_over_indirect_tables_is_byte_exact(layout, in_order):
    # transmit chains of up to five buffers in tables, received over mergeable buffers (5.1.6.4);
    # in order (2.7.9, 2.8.9) the device returns each transmit burst with one used entry
    from pmd.loopback import Loopback

    rng = np.random.default_rng(11)
    maxlen = 9000
    with Loopback(queue_size=64, packed=layout == "packed", indirect=True, mergeable=True,
                  max_packet_len=9216, in_order=in_order) as lb:
        out = np.zeros((256, 9216), np.uint8)
        olens = np.zeros(256, np.uint32)
        sent, got, indirect_seen = [], [], 0
        for _ in range(40):
            k = int(rng.integers(1, 40))
            lens = rng.integers(14, maxlen + 1, k).astype(np.uint32)
            frames = rng.integers(0, 256, (k, maxlen), dtype=np.uint8)
            n = lb.driver_tx.tx_burst(frames, lens)
            sent += [frames[i, :lens[i]].tobytes() for i in range(n)]
            d = ring_desc(lb.driver_tx.vq)
            indirect_seen += int(np.count_nonzero(d["flags"] & INDIRECT))
            lb.step()
            m = lb.driver_rx.rx_burst(out, olens)
            got += [out[i, :olens[i]].tobytes() for i in range(m)]
        for _ in range(50):
            lb.step()
            m = lb.driver_rx.rx_burst(out, olens)
            got += [out[i, :olens[i]].tobytes() for i in range(m)]
            lb.driver_tx.reclaim()
        assert got == sent and len(sent) > 200
        assert indirect_seen > 0                      # the tables were used, not bypassed
        s = lb.stats()
        assert s["device_tx"]["bad_descriptors"] == 0 and s["device_rx"]["bad_descriptors"] == 0
        assert lb.driver_tx.vq.in_flight == 0
        assert lb.pool.available + lb.driver_rx.vq.in_flight == lb.pool.n_buffers     # no buffer lost
