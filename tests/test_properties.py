"""Property-based tests: arbitrary sequences of ring operations against a model.

The driver and the device side run over shared ring memory, split (2.7) or
packed (2.8); the device may complete chains in any order (both layouts allow
it), with any valid length.
After every step the queue agrees with a plain-Python model: descriptors are
conserved, every completion returns exactly its chain's cookies, nothing is
reported bad. The indirect machines run the same sequences with
VIRTIO_F_INDIRECT_DESC on both sides, split and packed, in order or not: a chain
of two or more buffers then takes one descriptor (2.7.5.3, 2.8.7).
"""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pmd
from pmd.sim._dma import DmaWindows
from pmd.sim._virtqueue import DeviceQueue


class RingMachine(RuleBasedStateMachine):
    size = 8
    event_idx = False
    packed = False
    indirect = False

    def __init__(self):
        super().__init__()
        self.memory = pmd.DmaMemory(1 << 20, lock=False)
        self.setup_queue()

    def setup_queue(self):
        self.vq = pmd.Virtqueue(self.memory, self.size, event_idx=self.event_idx, packed=self.packed,
                                indirect_max=self.size if self.indirect else 0)
        w = DmaWindows()
        w.add_memory(self.memory)
        # packed: avail_iova and used_iova are the driver and device event areas
        self.dq = DeviceQueue(w, self.size, self.vq.desc_iova, self.vq.avail_iova,
                              self.vq.used_iova, event_idx=self.event_idx, packed=self.packed,
                              indirect=self.indirect)
        self.last_popped = None
        self.buf = self.memory.iova(self.memory.alloc(4096))
        self.cookie = 0
        self.added = {}          # cookie -> (n descriptors, writable bytes), not yet popped
        self.popped = []         # (head, cookie, writable) the device holds
        self.completed = {}      # head -> (cookie, n, length) published, not yet harvested
        self.unpublished = []
        self.pending_avail = 0
        self.heads = {}          # head -> cookie for chains in flight
        self.ndesc = {}          # cookie -> descriptors of its chain, until harvested

    def teardown(self):
        self.memory.close()

    @rule(n_out=st.integers(0, 3), n_in=st.integers(0, 3))
    def add(self, n_out, n_in):
        n = n_out + n_in
        need = 1 if self.indirect and n >= 2 else n       # a table's one descriptor
        if n == 0 or need > self.vq.free_descriptors:
            return
        outs = [(self.buf + 64 * k, 16) for k in range(n_out)]
        ins = [(self.buf + 1024 + 64 * k, 32) for k in range(n_in)]
        head = self.vq.add(outs, ins, self.cookie)
        assert head not in self.heads
        self.heads[head] = self.cookie
        self.added[self.cookie] = (n, 32 * n_in)
        self.ndesc[self.cookie] = need
        self.cookie += 1
        self.pending_avail += 1

    @rule()
    def kick(self):
        self.vq.kick()
        self.pending_avail = 0

    @rule()
    def device_pop(self):
        chain = self.dq.pop_chain()
        if chain is None:
            return
        head, readable, capacity = chain
        cookie = self.heads[head]
        n, writable = self.added.pop(cookie)
        assert capacity == writable
        assert len(readable) == 16 * (n - writable // 32)
        self.popped.append((head, cookie, writable))
        self.last_popped = head

    @rule(pick=st.integers(0, 100), frac=st.floats(0, 1))
    @precondition(lambda self: self.popped)
    def device_complete(self, pick, frac):
        head, cookie, writable = self.popped.pop(pick % len(self.popped))   # any order
        length = int(writable * frac)
        if self.packed:
            # complete() skips the chain's slots and frees its id (2.8.6); data only
            # into the chain popped last, so another comes back empty
            if head != self.last_popped:
                length = 0
            self.dq.complete(head, bytes(length))
            if head == self.last_popped:
                self.last_popped = None
        else:
            self.dq.push_raw(head, length)
        self.unpublished.append((head, cookie, length))

    @rule()
    def device_publish(self):
        self.dq.publish_used()
        for head, cookie, length in self.unpublished:
            self.completed[head] = (cookie, length)
        self.unpublished = []

    @rule()
    def driver_harvest(self):
        while True:
            r = self.vq.get_used()
            if r is None:
                break
            cookies, length = r
            assert len(set(cookies)) == 1
            cookie = cookies[0]
            head = next(h for h, c in self.heads.items() if c == cookie)
            assert self.completed.pop(head) == (cookie, length)
            del self.heads[head]
            del self.ndesc[cookie]
        assert not self.completed

    @invariant()
    def descriptors_are_conserved(self):
        s = self.vq.stats()
        assert s["bad_used_id"] == s["used_not_in_flight"] == s["bad_used_len"] == 0
        assert self.dq.stats()["bad_descriptors"] == 0
        assert self.vq.in_flight == sum(self.ndesc.values())
        assert self.vq.free_descriptors == self.size - self.vq.in_flight


class EventIdxRingMachine(RingMachine):
    size = 4
    event_idx = True


class PackedRingMachine(RingMachine):
    """The same over a packed ring."""

    packed = True


class PackedEventIdxRingMachine(PackedRingMachine):
    size = 4
    event_idx = True


class IndirectSplitRingMachine(RingMachine):
    indirect = True


class IndirectPackedRingMachine(PackedRingMachine):
    indirect = True


TestRing = RingMachine.TestCase
TestRing.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestEventIdxRing = EventIdxRingMachine.TestCase
TestEventIdxRing.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)
TestPackedRing = PackedRingMachine.TestCase
TestPackedRing.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestPackedEventIdxRing = PackedEventIdxRingMachine.TestCase
TestPackedEventIdxRing.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)


class InOrderRingMachine(RuleBasedStateMachine):
    """VIRTIO_F_IN_ORDER (2.7.9, 2.8.9): the device uses chains in the order they were
    made available and returns any run of them with one used entry (the last one's id
    at the first one's place; split: used->idx moves by the run's size, packed: the
    used position by its descriptors), or each with its own. Every buffer comes back
    once, in order, the skipped ones with their whole writable length."""

    packed = False
    indirect = False

    def __init__(self):
        super().__init__()
        self.memory = pmd.DmaMemory(1 << 20, lock=False)
        self.size = 8
        self.vq = pmd.Virtqueue(self.memory, self.size, packed=self.packed, in_order=True,
                                indirect_max=self.size if self.indirect else 0)
        w = DmaWindows()
        w.add_memory(self.memory)
        self.dq = DeviceQueue(w, self.size, self.vq.desc_iova, self.vq.avail_iova, self.vq.used_iova,
                              packed=self.packed, in_order=True, indirect=self.indirect)
        self.buf = self.memory.iova(self.memory.alloc(4096))
        self.cookie = 0
        self.added = []          # (cookie, n, writable) made available, not popped, in order
        self.popped = []         # (head, cookie, n, writable) the device holds, in order
        self.completed = []      # (cookie, n, length) published, not yet harvested, in order
        self.ndesc = {}          # cookie -> descriptors of its chain, until harvested

    def teardown(self):
        self.memory.close()

    @rule(n_out=st.integers(0, 3), n_in=st.integers(0, 3))
    def add(self, n_out, n_in):
        n = n_out + n_in
        need = 1 if self.indirect and n >= 2 else n       # a table's one descriptor
        if n == 0 or need > self.vq.free_descriptors:
            return
        outs = [(self.buf + 64 * k, 16) for k in range(n_out)]
        ins = [(self.buf + 1024 + 64 * k, 32) for k in range(n_in)]
        self.vq.add(outs, ins, self.cookie)
        self.added.append((self.cookie, n, 32 * n_in))
        self.ndesc[self.cookie] = need
        self.cookie += 1

    @rule()
    def kick(self):
        self.vq.kick()

    @rule()
    def device_pop(self):
        chain = self.dq.pop_chain()
        if chain is None:
            return
        head, _, capacity = chain
        cookie, n, writable = self.added.pop(0)     # in ring order
        assert capacity == writable
        self.popped.append((head, cookie, n, writable))

    @rule(k=st.integers(1, 8), frac=st.floats(0, 1))
    @precondition(lambda self: self.popped and not self.packed)
    def device_writes_one_entry_for_a_run(self, k, frac):
        # any run, by hand (split: the entry, then used->idx moved by the run's size)
        run, self.popped = self.popped[:k], self.popped[k:]
        head, cookie, n, writable = run[-1]
        length = int(writable * frac)
        self.dq.push_raw(head, length)
        self.dq.set_used_idx((self.dq.next_used_idx + len(run) - 1) & 0xFFFF)
        self.completed += [(c, nd, w) for _, c, nd, w in run[:-1]] + [(cookie, n, length)]

    @rule(k=st.integers(1, 8), frac=st.floats(0, 1))
    @precondition(lambda self: not self.popped)
    def device_fills_a_run(self, k, frac):
        # the device's own runs: chains filled whole are held back, the first one not
        # filled whole (or the publish) writes the run's one entry
        for i in range(k):
            chain = self.dq.pop_chain()
            if chain is None:
                break
            head, _, writable = chain
            cookie, n, w = self.added.pop(0)
            length = writable if i + 1 < k else int(writable * frac)
            self.dq.complete(head, bytes(length))
            self.completed.append((cookie, n, length))
        self.dq.publish_used()

    @rule()
    @precondition(lambda self: self.popped)
    def device_completes_the_oldest_itself(self):
        head, cookie, n, writable = self.popped.pop(0)
        self.dq.complete(head)          # nothing written: its own entry, or a run (nothing to write)
        self.dq.publish_used()
        self.completed.append((cookie, n, 0))

    @rule()
    def driver_harvest(self):
        while (r := self.vq.get_used()) is not None:
            cookies, length = r
            cookie, n, want = self.completed.pop(0)
            assert cookies == [cookie] * n and length == want
            del self.ndesc[cookie]
        assert not self.completed

    @invariant()
    def descriptors_are_conserved(self):
        s = self.vq.stats()
        assert s["bad_used_id"] == s["used_not_in_flight"] == s["bad_used_len"] == s["bad_used_idx"] == 0
        assert not self.vq.broken and self.dq.stats()["bad_descriptors"] == 0
        assert self.vq.in_flight == sum(self.ndesc.values())
        assert self.vq.free_descriptors == self.size - self.vq.in_flight


class PackedInOrderRingMachine(InOrderRingMachine):
    packed = True


TestInOrderRing = InOrderRingMachine.TestCase
TestInOrderRing.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestPackedInOrderRing = PackedInOrderRingMachine.TestCase
TestPackedInOrderRing.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


class IndirectInOrderRingMachine(InOrderRingMachine):
    indirect = True


class IndirectPackedInOrderRingMachine(InOrderRingMachine):
    indirect = True
    packed = True


TestIndirectSplitRing = IndirectSplitRingMachine.TestCase
TestIndirectSplitRing.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)
TestIndirectPackedRing = IndirectPackedRingMachine.TestCase
TestIndirectPackedRing.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)
TestIndirectInOrderRing = IndirectInOrderRingMachine.TestCase
TestIndirectInOrderRing.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)
TestIndirectPackedInOrderRing = IndirectPackedInOrderRingMachine.TestCase
TestIndirectPackedInOrderRing.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)
