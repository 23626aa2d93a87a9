"""Ring fuzzers: a peer that writes garbage into shared ring memory.

Four targets, each a seeded loop that runs for a fixed time in a child
interpreter (so a signal is seen, not suffered):

driver   the device corrupts the used rings of pmd's driver queues (ids out of
         range or not in flight, lengths too long, too short, runts, used index
         jumps, mergeable num_buffers garbage) between good packets; half the
         episodes are packed (2.8): used descriptors with ids out of range, not
         in flight or chain members (the queue must stop: counted once, then
         DeviceError), lengths 0 or too long, flags of the wrong lap or taken
         back after being marked used (never followed), random device event
         suppression; in half the episodes INDIRECT_DESC is on (multi-buffer
         transmit chains in indirect tables) and the device scribbles over tables
         it has read, which the driver must never read back;
device   the driver corrupts avail rings and descriptors (avail index jumps,
         heads and next links out of range, loops, addresses outside the DMA
         window or wrapping, indirect, readable after writable, chains past
         4 GiB) against DeviceQueue and the device bursts; in half the episodes
         INDIRECT_DESC is negotiated and chains end in indirect tables (2.7.5.3),
         good and bad: length, size, address, NEXT, loops, nested tables, links
         past the table, bad buffers, order, unaligned tables;
device_packed  the same on packed rings (2.8): buffer ids out of range or
         still held by the device, addresses outside the window, readable
         after writable, indirect, a descriptor after NEXT not marked
         available, NEXT all the way round, random driver event areas; checked
         against what the driver gave (ids, writable bytes, tx bytes), not a
         model of the device.
device_packed_indirect
         the driver writes packed lists (2.8) and indirect tables (2.8.7, 2.8.19) one
         at a time: bad lengths, sizes and addresses of tables, INDIRECT with or after
         NEXT, bad buffers and order inside tables, reserved flags and ids in table
         entries (ignored), INDIRECT without the feature, buffer ids out of range.

Each keeps an exact model of what the other side must conclude and asserts,
after every step: every bad value is counted in the right counter or refused
with the right error; good packets after bad ones arrive byte-exact; a queue
the peer broke fails cleanly (DeviceError, or no more chains) and closes; pool
buffers all come back; no byte outside the DMA window changes; no fd leaks.

PMD_FUZZ_SECONDS (default 8 per target) and PMD_FUZZ_SEED set the budget and
the seed; a long run: PMD_FUZZ_SECONDS=300 pytest tests/test_fuzz_rings.py -s
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
from collections import Counter, deque

import numpy as np
import pytest

from .isolated import check_isolated

SECONDS = float(os.environ.get("PMD_FUZZ_SECONDS", "8"))
SEED = int(os.environ.get("PMD_FUZZ_SEED", "20240508"))
HDR = 12
ETH_HLEN = 14


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def net_hdr(num_buffers: int = 1) -> bytes:
    return bytes(10) + (num_buffers & 0xFFFF).to_bytes(2, "little")


# =============================================================================
# driver side: the device writes the used rings
# =============================================================================

RX_KEYS = ("bad_used_id", "used_not_in_flight", "bad_used_len", "bad_used_idx", "runt",
           "bad_num_buffers", "zc_multi_dropped", "foreign_chains", "truncated")
TX_KEYS = ("bad_used_id", "used_not_in_flight", "bad_used_len", "bad_used_idx", "foreign_chains")
# 2.8.13: a packed descriptor; AVAIL and USED flag bits (2.8.1)
PDESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
P_AVAIL, P_USED = 1 << 7, 1 << 15


class DriverEpisode:
    """One Loopback whose device side also writes bad used entries at packet boundaries."""

    def __init__(self, rng: np.random.Generator, totals: Counter) -> None:
        from pmd.loopback import Loopback

        self.rng = rng
        self.totals = totals
        self.q = int(rng.choice([8, 16, 64, 256]))
        self.mergeable = bool(rng.random() < 0.4)
        self.packed = bool(rng.random() < 0.5)
        # VIRTIO_F_IN_ORDER on both sides in half the packed episodes: the same rules for a
        # bad used descriptor (it stops the queue), transmit bursts batched by the device
        self.in_order = self.packed and bool(rng.random() < 0.5)
        self.layout = "packed" if self.packed else "split"
        self.maxlen = 9000 if self.mergeable else 1984
        # INDIRECT_DESC in half the episodes: multi-buffer transmit chains in tables (2.7.5.3, 2.8.7)
        self.indirect = bool(rng.random() < 0.5)
        self.lb = Loopback(queue_size=self.q, mergeable=self.mergeable, event_idx=bool(rng.random() < 0.5),
                           max_packet_len=self.maxlen, packed=self.packed, in_order=self.in_order,
                           indirect=self.indirect)
        self.rx, self.tx = self.lb.driver_rx, self.lb.driver_tx
        self.drx, self.dtx, self.pool = self.lb.device_rx, self.lb.device_tx, self.lb.pool
        self.sent: deque[bytes] = deque()      # sent by the driver, not yet taken by the device
        self.expect: deque[bytes] = deque()    # in the rx ring, not yet harvested, in order
        self.want_rx: Counter = Counter()
        self.want_tx: Counter = Counter()
        self.out = np.zeros((512, self.maxlen), np.uint8)
        self.lens = np.zeros(512, np.uint32)
        self.ids = np.zeros(512, np.uint32)
        self.broken: str | None = None
        self.break_key = "bad_used_idx"        # the counter the break must show (packed: a bad id)
        if self.packed:
            base = self.lb.memory.iova(0)
            mem = np.frombuffer(self.lb.memory, np.uint8)
            self.pdesc = {}
            self.device_event = {}
            for vq in (self.rx.vq, self.tx.vq):
                d = vq.desc_iova - base
                self.pdesc[vq.queue_index] = mem[d:d + 16 * self.q].view(PDESC)
                e = vq.used_iova - base           # 2.8.10: the device event suppression area
                self.device_event[vq.queue_index] = mem[e:e + 4].view("<u4")
        if self.indirect:
            # the transmit queue's indirect tables: device-reachable memory the device may scribble on
            vq = self.tx.vq
            off = vq.indirect_offset
            stride = vq.indirect_table_iova(1) - vq.indirect_table_iova(0) if self.q > 1 else 16 * vq.indirect_max
            self.tables = np.frombuffer(self.lb.memory, np.uint8)[off:off + self.q * stride]

    # ---- what the driver does ----
    def send(self) -> None:
        rng = self.rng
        k = int(rng.integers(0, 9))
        if k == 0:
            return
        short = rng.random() < 0.7
        lengths = rng.integers(ETH_HLEN, 200 if short else self.maxlen + 1, k).astype(np.uint32)
        if rng.random() < 0.3:
            # zero-copy: the application writes the data into pool buffers itself
            lengths = np.minimum(lengths, self.pool.data_room).astype(np.uint32)
            if self.pool.available < k + 16:
                return
            ids = self.pool.alloc(k)
            for i, b in enumerate(ids):
                self.pool.data[b, :lengths[i]] = rng.integers(0, 256, int(lengths[i]), dtype=np.uint8)
            n = self.tx.tx_burst_zc(ids, lengths[:len(ids)])
            self.sent.extend(self.pool.data[ids[i], :lengths[i]].tobytes() for i in range(n))
            if n < len(ids):
                self.pool.free(ids[n:])
            return
        data = rng.integers(0, 256, (k, int(lengths.max())), dtype=np.uint8)
        n = self.tx.tx_burst(data, lengths)
        self.sent.extend(data[i, :lengths[i]].tobytes() for i in range(n))

    def harvest(self, upto: int | None = None) -> None:
        """Receive; the driver must return exactly the first ``upto`` packets expected (all by default)."""
        mode = self.rng.choice(["copy", "zc", "discard"])
        upto = len(self.expect) if upto is None else upto
        expected = [self.expect.popleft() for _ in range(upto)]
        if mode == "copy":
            n = self.rx.rx_burst(self.out, self.lens)
            got = [self.out[i, :self.lens[i]].tobytes() for i in range(n)]
        elif mode == "zc":
            n = self.rx.rx_burst_zc(self.ids, self.lens)
            got = [self.pool.data[self.ids[i], :self.lens[i]].tobytes() for i in range(n)]
            self.pool.free(self.ids[:n])
            if self.mergeable:   # zero-copy hands out one buffer a packet: longer ones are dropped, counted
                kept = [p for p in expected if len(p) <= self.pool.data_room]
                self.want_rx["zc_multi_dropped"] += len(expected) - len(kept)
                expected = kept
        else:
            n = self.rx.rx_discard(256)
            got = None
        if got is None:
            assert n == len(expected), (n, len(expected))
        else:
            assert len(got) == len(expected), (len(got), len(expected))
            for i, (g, e) in enumerate(zip(got, expected)):
                assert g == e, f"packet {i} of {len(got)}: {len(g)} bytes, expected {len(e)}"
        self.totals["packets_checked"] += n

    # ---- what the device does ----
    def step(self) -> None:
        moved = self.lb.step(int(self.rng.integers(1, 64)))
        for _ in range(moved):
            self.expect.append(self.sent.popleft())
        assert self.dtx.stats()["dropped"] == 0 and self.drx.stats()["dropped"] == 0

    @staticmethod
    def room(dq, vq) -> int:
        """Used entries the device may still write before the driver must call it
        a lie: the driver's in-flight descriptors less the entries pending."""
        pending = (dq.next_used_idx - vq.next_used_idx) & 0xFFFF
        return vq.in_flight - pending

    def inject_rx(self) -> None:
        rng, dq, vq, q = self.rng, self.drx, self.rx.vq, self.q
        kinds = ["bad_id", "dup", "long", "short", "runt", "jump"] + (["num_buffers"] if self.mergeable else [])
        kind = str(rng.choice(kinds))
        if kind == "jump" and rng.random() < 0.97:
            kind = "bad_id"      # keep episodes long: index jumps end them
        room = self.room(dq, vq)
        if kind == "bad_id":
            if room < 1:
                return
            dq.push_raw(int(rng.integers(q, 1 << 32)), int(rng.integers(0, 1 << 32)))
            self.want_rx["bad_used_id"] += 1
        elif kind == "jump":
            # more entries than the driver has in flight: the queue is broken
            jump = int(rng.integers(vq.in_flight + 1, 1 << 16))
            dq.set_used_idx((vq.next_used_idx + jump) & 0xFFFF)
            self.want_rx["bad_used_idx"] += 1
            self.broken = "rx"
        else:
            if dq.avail_pending < 1 or room < 2:
                return
            head, _, cap = dq.pop_chain()
            if kind == "dup":        # a good packet, then its id again: not in flight any more
                payload = rng.integers(0, 256, int(rng.integers(ETH_HLEN, cap - HDR + 1)), dtype=np.uint8).tobytes()
                dq.complete(head, net_hdr() + payload)
                dq.push_raw(head, int(rng.integers(0, 1 << 32)))
                self.expect.append(payload)
                self.want_rx["used_not_in_flight"] += 1
            elif kind == "long":
                dq.push_raw(head, int(rng.integers(cap + 1, 1 << 32)))
                self.want_rx["bad_used_len"] += 1
            elif kind == "short":
                dq.push_raw(head, int(rng.integers(0, HDR)))
                self.want_rx["bad_used_len"] += 1
            elif kind == "runt":
                dq.complete(head, net_hdr() + bytes(int(rng.integers(0, ETH_HLEN))))
                self.want_rx["runt"] += 1
            else:                    # num_buffers 0 or more than the ring
                nb = 0 if rng.random() < 0.5 else int(rng.integers(q + 1, 1 << 16))
                dq.complete(head, net_hdr(nb) + bytes(60))
                self.want_rx["bad_num_buffers"] += 1
        dq.publish_used()
        self.totals[f"rx_{kind}"] += 1

    def inject_tx(self) -> None:
        rng, dq, vq, q = self.rng, self.dtx, self.tx.vq, self.q
        kind = str(rng.choice(["bad_id", "dup", "any_len", "jump"]))
        if kind == "jump" and rng.random() < 0.97:
            kind = "any_len"
        room = self.room(dq, vq)
        if kind == "bad_id":
            if room < 1:
                return
            dq.push_raw(int(rng.integers(q, 1 << 32)), int(rng.integers(0, 1 << 32)))
            self.want_tx["bad_used_id"] += 1
        elif kind == "jump":
            jump = int(rng.integers(vq.in_flight + 1, 1 << 16))
            dq.set_used_idx((vq.next_used_idx + jump) & 0xFFFF)
            self.want_tx["bad_used_idx"] += 1
            self.broken = "tx"
        else:
            if dq.avail_pending < 1 or room < 2:
                return
            head, _, _ = dq.pop_chain()    # the device takes the packet and never sends it
            self.sent.popleft()
            self.scribble()
            if kind == "dup":
                dq.complete(head)
                dq.push_raw(head, 0)
                self.want_tx["used_not_in_flight"] += 1
            else:                          # a transmit length is ignored (2.7.8.1)
                dq.push_raw(head, int(rng.integers(0, 1 << 32)))
        dq.publish_used()
        self.totals[f"tx_{kind}"] += 1


    # ---- the packed ring (2.8): what the device writes into the descriptors ----
    def chain_len(self, dq, vq) -> int:
        """Descriptors in the chain at the device's avail position (consecutive, NEXT on all but the last)."""
        d = self.pdesc[vq.queue_index]
        pos, n = dq.next_avail_idx & 0x7FFF, 1
        while d["flags"][pos] & F_NEXT and n < self.q:
            pos, n = (pos + 1) % self.q, n + 1
        return n

    def unpopped_ids(self, dq, vq) -> set[int]:
        """Buffer ids of the chains still available to the device (in flight, not taken)."""
        d, ids, pos = self.pdesc[vq.queue_index], set(), dq.next_avail_idx & 0x7FFF
        for _ in range(dq.avail_pending):
            while d["flags"][pos] & F_NEXT:
                pos = (pos + 1) % self.q
            ids.add(int(d["id"][pos]))
            pos = (pos + 1) % self.q
        return ids

    def take(self, dq, vq) -> tuple[int, int, int]:
        n = self.chain_len(dq, vq)
        head, _, cap = dq.pop_chain()
        return head, cap, n

    def complete_len(self, dq, vq, head: int, length: int) -> None:
        """A used descriptor for an in-flight chain with any length: completed (so the
        device's side forgets the id, as push_raw would not), then its len rewritten
        before publish_used shows it."""
        slot = dq.next_used_idx & 0x7FFF
        dq.complete(head, b"")
        self.pdesc[vq.queue_index]["len"][slot] = length

    def stray_id(self, dq, vq, held: int) -> int:
        """An id below the queue size naming no chain in flight (free, or a chain member)."""
        busy = self.unpopped_ids(dq, vq) | {held}
        free = [i for i in range(self.q) if i not in busy]
        return int(self.rng.choice(free)) if free else int(self.rng.integers(self.q, 1 << 16))

    def hide(self, vq, slot: int) -> int:
        """Take a used descriptor back: flags the driver must not read as used on this
        lap (AVAIL != USED, or both the other lap's counter). Returns the old flags."""
        d = self.pdesc[vq.queue_index]
        old = int(d["flags"][slot])
        used = old & (P_AVAIL | P_USED)
        bad = [f for f in (0, P_AVAIL, P_USED, P_AVAIL | P_USED) if f != used]
        d["flags"][slot] = (old & ~(P_AVAIL | P_USED) & 0xFFFF) | int(self.rng.choice(bad))
        return old

    def scribble(self) -> None:
        """A hostile device writes garbage over indirect tables it has read (those of
        chains it holds and of free ids): the driver never reads them back, so nothing
        it does may change (2.7.5.3: the tables are driver memory the device reaches)."""
        if not self.indirect or self.rng.random() < 0.5 or self.dtx.avail_pending:
            return
        self.tables[:] = self.rng.integers(0, 256, len(self.tables), dtype=np.uint8)
        self.totals["tx_scribbled_tables"] += 1

    def broken_by(self, which: str, key: str) -> None:
        self.broken, self.break_key = which, key
        (self.want_rx if which == "rx" else self.want_tx)[key] += 1

    def inject_event(self) -> None:
        """Random device event suppression (2.8.10): offsets, wrap bits, reserved flags."""
        q = int(self.rng.integers(0, 2))
        self.device_event[q][0] = int(self.rng.integers(0, 1 << 32))
        self.totals[f"packed_{'rx' if q == 0 else 'tx'}_event"] += 1

    def inject_rx_packed(self) -> None:
        rng, dq, vq, q = self.rng, self.drx, self.rx.vq, self.q
        kinds = ["long", "short", "zero", "runt", "take_back", "event", "fatal"] + \
            (["num_buffers"] if self.mergeable else [])
        kind = str(rng.choice(kinds))
        if kind == "fatal":
            if rng.random() < 0.9:
                kind = "long"            # keep episodes long: a bad id ends them
            else:
                kind = str(rng.choice(["bad_id", "dup", "stray"]))
        if kind == "event":
            self.inject_event()
            return
        need = 2 if kind == "dup" else 1
        if dq.avail_pending < need:
            return
        head, cap, n = self.take(dq, vq)
        if kind == "bad_id":             # out of range: the queue stops (nothing says where the next is)
            dq.push_raw(int(rng.integers(q, 1 << 16)), int(rng.integers(0, 1 << 32)), skip=n)
            self.broken_by("rx", "bad_used_id")
        elif kind == "dup":              # a good packet, then its id again over the next chain
            dq.complete(head, net_hdr() + bytes(60))
            self.expect.append(bytes(60))            # received: it comes before the bad one
            h2, _, n2 = self.take(dq, vq)
            dq.push_raw(head, int(rng.integers(0, 1 << 32)), skip=n2)
            self.broken_by("rx", "used_not_in_flight")
        elif kind == "stray":            # in range, not in flight: a free id or a chain member
            sid = self.stray_id(dq, vq, head)
            dq.push_raw(sid, int(rng.integers(0, 1 << 32)), skip=n)
            self.broken_by("rx", "bad_used_id" if sid >= q else "used_not_in_flight")
        elif kind == "long":
            self.complete_len(dq, vq, head, int(rng.integers(cap + 1, 1 << 32)))
            self.want_rx["bad_used_len"] += 1
        elif kind in ("short", "zero"):
            self.complete_len(dq, vq, head, 0 if kind == "zero" else int(rng.integers(1, HDR)))
            self.want_rx["bad_used_len"] += 1
        elif kind == "runt":
            dq.complete(head, net_hdr() + bytes(int(rng.integers(0, ETH_HLEN))))
            self.want_rx["runt"] += 1
        elif kind == "num_buffers":
            nb = 0 if rng.random() < 0.5 else int(rng.integers(q + 1, 1 << 16))
            dq.complete(head, net_hdr(nb) + bytes(60))
            self.want_rx["bad_num_buffers"] += 1
        else:                            # take_back: a good packet marked used, then unmarked
            slot = dq.next_used_idx & 0x7FFF
            payload = rng.integers(0, 256, int(rng.integers(ETH_HLEN, cap - HDR + 1)), dtype=np.uint8).tobytes()
            dq.complete(head, net_hdr() + payload)
            dq.publish_used()
            old = self.hide(vq, slot)
            before = len(self.expect)
            self.harvest(before)         # what came before it, and nothing from it on
            assert not self.expect and vq.in_flight >= n
            self.pdesc[vq.queue_index]["flags"][slot] = old
            self.expect.append(payload)
        dq.publish_used()
        self.totals[f"packed_rx_{kind}"] += 1

    def inject_tx_packed(self) -> None:
        rng, dq, vq, q = self.rng, self.dtx, self.tx.vq, self.q
        kind = str(rng.choice(["any_len", "take_back", "event", "fatal"]))
        if kind == "fatal":
            if rng.random() < 0.9:
                kind = "any_len"
            else:
                kind = str(rng.choice(["bad_id", "dup", "stray"]))
        if kind == "event":
            self.inject_event()
            return
        need = 2 if kind == "dup" else 1
        if dq.avail_pending < need:
            return
        head, _, n = self.take(dq, vq)   # the device takes the packet and never sends it
        self.sent.popleft()
        self.scribble()
        if kind == "bad_id":
            dq.push_raw(int(rng.integers(q, 1 << 16)), 0, skip=n)
            self.broken_by("tx", "bad_used_id")
        elif kind == "dup":
            dq.complete(head)
            h2, _, n2 = self.take(dq, vq)
            self.sent.popleft()
            dq.push_raw(head, 0, skip=n2)
            self.broken_by("tx", "used_not_in_flight")
        elif kind == "stray":
            sid = self.stray_id(dq, vq, head)
            dq.push_raw(sid, 0, skip=n)
            self.broken_by("tx", "bad_used_id" if sid >= q else "used_not_in_flight")
        elif kind == "any_len":          # a transmit length is ignored (2.7.8.1)
            self.complete_len(dq, vq, head, int(rng.integers(0, 1 << 32)))
        else:                            # take_back
            slot = dq.next_used_idx & 0x7FFF
            dq.complete(head)
            dq.publish_used()
            old = self.hide(vq, slot)
            self.tx.reclaim()
            assert vq.in_flight >= n, "the driver reclaimed a descriptor the device took back"
            assert self.pool.available + self.rx.vq.in_flight + vq.buffers_in_flight == self.pool.n_buffers
            self.pdesc[vq.queue_index]["flags"][slot] = old
        dq.publish_used()
        self.totals[f"packed_tx_{kind}"] += 1

    def check_packed_break(self) -> None:
        """2.8.6: a used id out of range or not in flight leaves no way to know where the next
        used descriptor is: counted once, the queue stopped, every later burst DeviceError."""
        from pmd.errors import DeviceError

        q = self.rx if self.broken == "rx" else self.tx
        if q is self.rx and self.expect:
            # the packets before the bad descriptor come back, exactly, and the error is the
            # next call's (test_a_burst_that_meets_a_bad_used_entry_...); a burst that gets none
            # of them (dropped: zero-copy of a multi-buffer packet) raises at once
            try:
                self.harvest()
            except DeviceError:
                pass
        for _ in range(2):
            if q is self.rx:
                # rx_burst and rx_discard here; rx_burst_zc's deferral of the error past the
                # packets it hands out is test_a_burst_that_meets_a_bad_used_entry_...
                with pytest.raises(DeviceError, match="names no buffer in flight"):
                    if self.rng.random() < 0.5:
                        self.rx.rx_burst(self.out, self.lens)
                    else:
                        self.rx.rx_discard(256)
            else:
                with pytest.raises(DeviceError, match="names no buffer in flight"):
                    self.tx.reclaim()
        s = q.stats()
        want = self.want_rx if q is self.rx else self.want_tx
        for k in ("bad_used_id", "used_not_in_flight"):
            assert s[k] == want[k], (k, s[k], want[k])
        assert s["bad_used_idx"] == 0
        assert self.pool.available + self.rx.vq.in_flight + self.tx.vq.buffers_in_flight == self.pool.n_buffers

    # ---- checks ----
    def check_counters(self) -> None:
        rs, ts = self.rx.stats(), self.tx.stats()
        for k in RX_KEYS:
            assert rs[k] == self.want_rx[k], (k, rs[k], self.want_rx[k])
        for k in TX_KEYS:
            assert ts[k] == self.want_tx[k], (k, ts[k], self.want_tx[k])
        assert self.drx.stats()["bad_descriptors"] == 0 and self.dtx.stats()["bad_descriptors"] == 0
        # every buffer is in exactly one place: free, in the rx ring, in the tx ring
        assert self.pool.available + self.rx.vq.in_flight + self.tx.vq.buffers_in_flight == self.pool.n_buffers

    def run(self) -> None:
        from pmd.errors import DeviceError

        rng = self.rng
        for _ in range(int(rng.integers(20, 200))):
            self.send()
            for _ in range(int(rng.integers(0, 3))):
                self.step()
            # Bad entries go in just before the driver looks: a device may complete
            # every chain in flight, so an extra entry (a bad id, an id twice) is
            # only not a used index past what is in flight if the driver reads it
            # first. inject_* check that room; a jump breaks the queue on purpose.
            inject_rx = self.inject_rx_packed if self.packed else self.inject_rx
            inject_tx = self.inject_tx_packed if self.packed else self.inject_tx
            if rng.random() < 0.6:
                for _ in range(int(rng.integers(1, 4))):
                    inject_rx()
                    if self.broken:
                        break
            if not self.broken and rng.random() < 0.4:
                for _ in range(int(rng.integers(1, 3))):
                    inject_tx()
                    if self.broken:
                        break
            self.totals["rounds"] += 1
            self.totals[f"{self.layout}_rounds"] += 1
            if self.broken and self.packed:
                self.check_packed_break()
                self.totals["packed_broken_queues"] += 1
                self.totals["in_order_broken_queues"] += self.in_order
                return
            if self.broken:
                q = self.rx if self.broken == "rx" else self.tx
                for _ in range(2):       # fails cleanly, every time
                    with pytest.raises(DeviceError, match="used index"):
                        if q is self.rx:
                            self.rx.rx_burst(self.out, self.lens)
                        else:
                            self.tx.reclaim()
                assert q.stats()["bad_used_idx"] == 1
                self.totals["broken_queues"] += 1
                return
            self.tx.reclaim()
            self.harvest()
            self.check_counters()
            if not self.sent:
                self.scribble()             # every table is free or already read
        # drain what is left, byte-exact
        for _ in range(64):
            self.step()
            self.tx.reclaim()
            self.harvest()
            if not self.sent:
                break
        self.check_counters()

    def tally(self) -> None:
        """The driver's counters of this episode, per layout: proof the layout was exercised."""
        for side, q in (("rx", self.rx), ("tx", self.tx)):
            for k, v in q.stats().items():
                if k in RX_KEYS and v:
                    self.totals[f"{self.layout}_{side}_{k}"] += v
                    if self.in_order:
                        self.totals[f"in_order_{side}_{k}"] += v

    def close(self) -> None:
        self.tally()
        self.lb.close()
        assert self.pool.available == self.pool.n_buffers, "a buffer leaked"
        memory = self.lb.memory
        del self.lb, self.rx, self.tx, self.drx, self.dtx
        self.pdesc = self.device_event = {}       # numpy views of the memory
        self.tables = None
        gc.collect()                              # and tracebacks (pytest.raises) holding them
        assert memory.pins == 0 and memory.fd == -1, "the memory stayed mapped"


def fuzz_driver(seed: int, seconds: float) -> dict[str, int]:
    import logging

    logging.getLogger("pmd.burst").setLevel(logging.ERROR)   # every bad entry is logged: thousands
    rng = np.random.default_rng(seed)
    totals: Counter = Counter()
    fds = open_fds()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ep = DriverEpisode(rng, totals)
        ep.run()        # a failure ends the run here: the child reports it
        ep.close()
        totals["episodes"] += 1
        totals[f"{ep.layout}_episodes"] += 1
        totals["in_order_episodes"] += ep.in_order
        totals[f"{ep.layout}_indirect_episodes"] += ep.indirect
    gc.collect()
    assert open_fds() == fds, "file descriptors leaked"
    return dict(totals)


# =============================================================================
# device side: the driver writes the avail rings and descriptors
# =============================================================================

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
REFUSALS = ("avail idx moved by more than the queue size", "head index out of range",
            "next index out of range", "descriptor chain loops", "buffer outside the driver's DMA memory",
            "indirect descriptor (not negotiated)", "device-readable descriptor after a device-writable one",
            "packet shorter than the virtio-net header", "chain longer than 4 GiB")
# with INDIRECT_DESC negotiated (2.7.5.3): the table's own refusals, in the order the device checks
IND_REFUSALS = ("indirect descriptor chained by NEXT", "indirect table length 0 or not a multiple of 16",
                "indirect table longer than the queue size", "indirect table outside the driver's DMA memory",
                "descriptor chain in an indirect table loops", "indirect descriptor inside an indirect table",
                "next index outside the indirect table")
SPLIT_DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])


class RingModel:
    """What pmd._device.DeviceQueue must do with a ring, in plain Python: the
    same reads in the same order, so every decision can be compared."""

    def __init__(self, ring, size: int, window: tuple[int, int], iova0: int, mirror: np.ndarray,
                 in_order: bool = False, indirect: bool = False) -> None:
        self.r = ring
        self.in_order = in_order           # VIRTIO_F_IN_ORDER: buffers used whole share one entry
        self.batch: list[int] | None = None  # [buffers, last id, its length] not yet written
        self.indirect = indirect
        self.indirect_popped = 0
        self.size = size
        self.win_iova, self.win_size = window
        self.iova0 = iova0                 # iova of byte 0 of the memory
        self.mirror = mirror               # expected bytes of the whole memory region
        self.last_avail = self.shadow = 0
        self.used_idx = 0
        self.broken = False
        self.bad = Counter()
        self.popped = self.dropped = self.too_long = 0
        self.last = ""                     # why the last chain was refused
        self.used_entries: dict[int, tuple[int, int]] = {}   # slot -> (id, len) written last
        self.chain: tuple[int, list[tuple[int, int, bool]], int, int] | None = None

    def snapshot(self) -> None:
        """Read the descriptor table (the device never writes it: every good
        buffer lies in the buffer area) before a device operation."""
        d = self.r["desc"]
        self.desc = list(zip(d["addr"].tolist(), d["len"].tolist(), d["flags"].tolist(), d["next"].tolist()))

    def inside(self, iova: int, length: int) -> bool:
        off = iova - self.win_iova
        return iova >= self.win_iova and off <= self.win_size and length <= self.win_size - off

    def push(self, head: int, length: int) -> None:
        whole = self.chain is not None and head == self.chain[0] and length == self.chain[3]
        if self.in_order and (whole or self.batch):
            # 2.7.9: a run of buffers used whole is one entry, the last one's id at the
            # first one's slot; a buffer not used whole ends the run
            n = self.batch[0] + 1 if self.batch else 1
            self.batch = [n, head, length]
            if not whole or n == self.size:
                self.close_batch()
            return
        self.used_entries[self.used_idx & (self.size - 1)] = (head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def close_batch(self) -> None:
        """The device's flush: the open run's one used entry."""
        if self.batch:
            n, head, length = self.batch
            self.used_entries[self.used_idx & (self.size - 1)] = (head, length)
            self.used_idx = (self.used_idx + n) & 0xFFFF
        self.batch = None

    def refuse(self, head: int | None, why: str) -> int:
        self.bad[why] += 1
        self.last = why
        self.chain = None
        if head is not None:
            self.push(head, 0)
        return -1

    def pop(self) -> int:
        if self.broken:
            return 0
        if self.shadow == self.last_avail:
            idx = int(self.r["avail_idx"][0])
            if idx == self.last_avail:
                return 0
            if (idx - self.last_avail) & 0xFFFF > self.size:
                self.broken = True
                self.bad[REFUSALS[0]] += 1
                self.last = REFUSALS[0]
                return -1
            self.shadow = idx
        head = int(self.r["avail_ring"][self.last_avail & (self.size - 1)])
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            return self.refuse(None, REFUSALS[1])
        i, count, desc = head, 0, self.desc
        st = {"segs": [], "out": 0, "in": 0, "seen_write": False}
        used_table = False
        while True:
            count += 1
            if count > self.size:
                return self.refuse(head, REFUSALS[3])
            addr, ln, flags, nxt = desc[i]
            if flags & F_INDIRECT:
                if not self.indirect:
                    return self.refuse(head, REFUSALS[5])
                why = self.walk_table(addr, ln, flags, st)
                if why:
                    return self.refuse(head, why)
                used_table = True
                break
            why = self.add_seg(addr, ln, flags, st)
            if why:
                return self.refuse(head, why)
            if not flags & F_NEXT:
                break
            i = nxt
            if i >= self.size:
                return self.refuse(head, REFUSALS[2])
        self.popped += 1
        self.indirect_popped += used_table
        self.chain = (head, st["segs"], st["out"], st["in"])
        return 1

    def add_seg(self, addr: int, ln: int, flags: int, st: dict) -> str | None:
        if ln and not self.inside(addr, ln):
            return REFUSALS[4]
        if flags & F_WRITE:
            st["seen_write"] = True
            st["in"] += ln
        elif st["seen_write"]:
            return REFUSALS[6]
        else:
            st["out"] += ln
        if (st["out"] | st["in"]) >> 32:
            return REFUSALS[8]
        st["segs"].append((addr, ln, bool(flags & F_WRITE)))
        return None

    def walk_table(self, addr: int, ln: int, flags: int, st: dict) -> str | None:
        """2.7.5.3: the table of an INDIRECT descriptor, read from memory as it is now."""
        if flags & F_NEXT:
            return IND_REFUSALS[0]
        if ln == 0 or ln % 16:
            return IND_REFUSALS[1]
        n = ln // 16
        if n > self.size - len(st["segs"]):
            return IND_REFUSALS[2]
        if not self.inside(addr, ln):
            return IND_REFUSALS[3]
        off = addr - self.iova0
        table = self.mirror[off:off + ln].copy().view(SPLIT_DESC)
        i = count = 0
        while True:
            count += 1
            if count > n:
                return IND_REFUSALS[4]
            e = table[i]
            if int(e["flags"]) & F_INDIRECT:
                return IND_REFUSALS[5]
            why = self.add_seg(int(e["addr"]), int(e["len"]), int(e["flags"]), st)
            if why:
                return why
            if not int(e["flags"]) & F_NEXT:
                return None
            i = int(e["next"])
            if i >= n:
                return IND_REFUSALS[6]

    def unpop(self) -> None:
        self.last_avail = (self.last_avail - 1) & 0xFFFF
        self.popped -= 1
        self.chain = None

    def read_out(self, skip: int, n: int) -> bytes:
        assert self.chain is not None
        out = bytearray()
        for addr, ln, write in self.chain[1]:
            if write:
                break
            if skip >= ln:
                skip -= ln
                continue
            off = addr - self.iova0 + skip
            take = min(ln - skip, n - len(out))
            out += self.mirror[off:off + take].tobytes()
            skip = 0
            if len(out) == n:
                break
        return bytes(out)

    def write_in(self, skip: int, data: bytes) -> None:
        assert self.chain is not None
        done = 0
        for addr, ln, write in self.chain[1]:
            if not write:
                continue
            if skip >= ln:
                skip -= ln
                continue
            take = min(ln - skip, len(data) - done)
            off = addr - self.iova0 + skip
            self.mirror[off:off + take] = np.frombuffer(data[done:done + take], np.uint8)
            done += take
            skip = 0
            if done == len(data):
                break

    def pending(self) -> int:
        n = (int(self.r["avail_idx"][0]) - self.last_avail) & 0xFFFF
        return 0 if n > self.size else n

    def deliver(self, pkt: bytes, mergeable: bool) -> int:
        """_rx_deliver: 1 written, 0 dropped (too long for the buffers), -1 no buffer."""
        r = self.pop()
        while r < 0:
            r = self.pop()
        if r == 0:
            return -1
        assert self.chain is not None
        head, _, _, in_len = self.chain
        if in_len >= HDR + len(pkt):
            self.write_in(0, net_hdr())
            self.write_in(HDR, pkt)
            self.push(head, HDR + len(pkt))
            return 1
        if not mergeable or in_len <= HDR:
            self.unpop()
            return 0
        room = in_len                       # 5.1.6.4.2: spread over buffers of this size
        need = (HDR + len(pkt) + room - 1) // room
        if need > self.size:
            self.unpop()
            return 0
        if self.pending() + 1 < need:
            self.unpop()
            return -1
        done = room - HDR
        self.write_in(0, net_hdr(need))
        self.write_in(HDR, pkt[:done])
        self.push(head, room)
        for _ in range(1, need):
            if self.pop() != 1:
                self.broken = True          # the driver withdrew buffers it had published
                return 1
            head, _, _, in_len = self.chain
            take = min(len(pkt) - done, in_len)
            self.write_in(0, pkt[done:done + take])
            self.push(head, take)
            done += take
        return 1


class DeviceEpisode:
    """Two raw rings (A and B) the fuzzer writes as a driver would, mostly well."""

    def __init__(self, rng: np.random.Generator, totals: Counter) -> None:
        import pmd
        from pmd.sim._dma import DmaWindows
        from pmd.sim._virtqueue import DeviceQueue

        from .conftest import ring_view

        self.rng, self.totals = rng, totals
        self.size = int(rng.choice([4, 8, 16, 64, 256])) if rng.random() > 0.03 else 8192
        self.mem = pmd.DmaMemory(2 << 20, lock=False, name="pmd-fuzz")
        self.vqs = [pmd.Virtqueue(self.mem, self.size, i) for i in range(2)]   # ring placement only
        # INDIRECT_DESC negotiated in half the episodes; the tables live in an area of their
        # own inside the window, which no buffer overlaps (the device never writes them)
        self.indirect = bool(rng.random() < 0.5)
        self.tbl_slots, self.tbl_slot = 64, 16 * 16
        self.tbl_off = self.mem.alloc(2 * self.tbl_slots * self.tbl_slot, 4096)
        self.tbl_next = [0, 0]
        self.buf_off = self.mem.alloc(1 << 20, 4096)
        self.buf_len = 1 << 20
        self.win_end = self.buf_off + self.buf_len          # the window: rings and buffers
        self.mem.alloc(64 << 10, 4096)                       # a canary just past the window
        self.raw = np.frombuffer(self.mem, np.uint8)
        self.raw[self.win_end:] = 0xA5
        self.raw[self.buf_off:self.win_end] = rng.integers(0, 256, self.buf_len, dtype=np.uint8)
        self.mirror = self.raw.copy()
        iova0 = self.mem.iova(0)
        self.windows = DmaWindows()
        self.windows.add(iova0, self.win_end, self.mem.address, self.mem)
        self.rings = [ring_view(vq) for vq in self.vqs]
        event_idx = bool(rng.random() < 0.5)
        self.in_order = bool(rng.random() < 0.4)     # VIRTIO_F_IN_ORDER on the device (2.7.9)
        self.dqs = [DeviceQueue(self.windows, self.size, vq.desc_iova, vq.avail_iova, vq.used_iova,
                                event_idx=event_idx, in_order=self.in_order, indirect=self.indirect)
                    for vq in self.vqs]
        self.models = [RingModel(r, self.size, (iova0, self.win_end), iova0, self.mirror, self.in_order,
                                 self.indirect)
                       for r in self.rings]
        self.avail_idx = [0, 0]

    # ---- the driver writes chains ----
    def good_buffer(self, q: int, max_len: int = 2048) -> tuple[int, int]:
        # Ring q's buffers lie in half q of the buffer area: a packet the device
        # loops from one ring to the other never overlaps its own source.
        half = self.buf_len // 2
        start = self.buf_off + q * half
        ln = int(self.rng.integers(0, max_len + 1))
        off = int(self.rng.integers(start, start + half - ln + 1))
        return self.mem.iova(0) + off, ln

    def bad_address(self, ln: int) -> tuple[int, int]:
        rng, base = self.rng, self.mem.iova(0)
        kind = int(rng.integers(0, 4))
        if kind == 0:          # past the end of the window, in the canary
            return base + self.win_end + int(rng.integers(0, 60000)), max(ln, 1)
        if kind == 1:          # straddling the end of the window
            return base + self.win_end - int(rng.integers(0, 64)), 64 + int(rng.integers(1, 64))
        if kind == 2:          # wrapping past 2^64
            return (1 << 64) - int(rng.integers(1, 4096)), 4096 + int(rng.integers(0, 4096))
        return int(rng.integers(0, base)) if base else base + self.win_end + 1, max(ln, 1)

    def write_table(self, q: int, before_writable: bool) -> tuple[int, int, int]:
        """An indirect table (2.7.5.3), mostly well formed, in ring q's table area:
        returns the INDIRECT descriptor's (addr, len, flags). ``before_writable``: the
        chain already has device-writable descriptors (its table must be all writable)."""
        rng, size = self.rng, self.size
        k = int(rng.integers(1, 9))
        n_read = 0 if before_writable else int(rng.integers(0, k + 1))
        ents = []
        for j in range(k):
            addr, ln = self.good_buffer(q)
            flags = (F_NEXT if j < k - 1 else 0) | (F_WRITE if j >= n_read else 0)
            ents.append([addr, ln, flags, j + 1 if j < k - 1 else int(rng.integers(0, 1 << 16))])
        flags = F_INDIRECT | (F_WRITE if rng.random() < 0.3 else 0)   # WRITE on it is ignored (2.7.5.3.2)
        length = 16 * k
        what = int(rng.integers(0, 12)) if rng.random() < 0.4 else -1
        j = int(rng.integers(0, k))
        if what == 0:
            flags |= F_NEXT                                         # INDIRECT with NEXT
        elif what == 1:
            length = int(rng.choice([0, 16 * k - int(rng.integers(1, 16)), 16 * k + 8]))
        elif what == 2:
            k2 = size + 1 - int(rng.integers(0, min(size, 4)))      # more than the queue
            length = 16 * k2
        elif what == 3:
            addr, length = self.bad_address(length)
            length = max(16, length - length % 16)
            return addr, length, flags
        elif what == 4 and k > 1:
            ents[-1][2] |= F_NEXT                                   # a loop inside the table
            ents[-1][3] = int(rng.integers(0, k))
        elif what == 5:
            ents[j][2] |= F_INDIRECT                                # a table inside the table
        elif what == 6:
            ents[-1][2] |= F_NEXT                                   # next past the table
            ents[-1][3] = int(rng.integers(k, 1 << 16))
        elif what == 7:
            ents[j][0], ents[j][1] = self.bad_address(ents[j][1])
        elif what == 8 and n_read < k - 1:
            ents[-1][2] &= ~F_WRITE                                 # readable after writable
        slot = self.tbl_next[q]
        self.tbl_next[q] = (slot + 1) % self.tbl_slots
        off = self.tbl_off + (q * self.tbl_slots + slot) * self.tbl_slot
        if rng.random() < 0.2:
            off += int(rng.integers(1, 16))                         # anywhere in memory: unaligned
        arr = np.array([tuple(e) for e in ents], dtype=SPLIT_DESC).view(np.uint8)
        self.raw[off:off + len(arr)] = arr
        self.mirror[off:off + len(arr)] = arr
        self.totals["indirect_tables_written"] += 1
        return self.mem.iova(0) + off, length, flags

    def write_chain(self, q: int, slot: int) -> None:
        rng, size = self.rng, self.size
        r = self.rings[q]
        if size >= 8192 and rng.random() < 0.2:
            # 4097 readable descriptors of 1 MiB: more than 4 GiB in one chain
            n = 4097
            idxs = np.arange(n) + int(rng.integers(0, size - n))
            base = self.mem.iova(0) + self.buf_off
            r["desc"][idxs] = [(base, self.buf_len, F_NEXT, int(j) + 1) for j in idxs]
            r["desc"]["flags"][idxs[-1]] = 0
            r["avail_ring"][slot] = idxs[0]
            return
        n = int(rng.integers(1, min(size, 5) + 1))
        idxs = [int(x) for x in rng.choice(size, size=n, replace=False)]
        n_read = int(rng.integers(0, n + 1))
        bad = rng.random() < 0.35
        what = int(rng.integers(0, 7)) if bad else -1
        if what == 6 or (not bad and rng.random() < (0.3 if self.indirect else 0.03)):
            what = 6                  # an indirect table: well formed or not, see write_table
        for j, di in enumerate(idxs):
            addr, ln = self.good_buffer(q)
            flags = (F_NEXT if j < n - 1 else 0) | (F_WRITE if j >= n_read else 0)
            nxt = idxs[j + 1] if j < n - 1 else int(rng.integers(0, 1 << 16))
            if what == 0 and j == n - 1:                          # a link out of range
                flags, nxt = flags | F_NEXT, int(rng.integers(size, 1 << 16))
            elif what == 1 and j == n - 1:                        # a loop
                flags, nxt = flags | F_NEXT, idxs[int(rng.integers(0, n))]
            elif what == 2 and j == int(rng.integers(0, n)):
                addr, ln = self.bad_address(ln)
            elif what == 3 and j == n - 1:
                flags |= F_INDIRECT
            elif what == 4 and j == n - 1 and n_read < n:         # readable after writable
                flags &= ~F_WRITE
            elif what == 6 and j == n - 1:                        # the chain ends in an indirect table
                addr, ln, flags = self.write_table(q, n_read < j)
            r["desc"][di] = (addr, ln, flags, nxt)
        head = idxs[0]
        if what == 5:
            head = int(rng.integers(size, 1 << 16))
        r["avail_ring"][slot] = head

    def expose(self, q: int) -> None:
        rng, m = self.rng, self.models[q]
        pending = (self.avail_idx[q] - m.last_avail) & 0xFFFF
        if pending > self.size:
            return                 # the index jumped: the device must refuse it, nothing to add
        if rng.random() < 0.02:
            # an index jump: more new entries than the ring holds
            self.avail_idx[q] = (m.last_avail + self.size + 1 + int(rng.integers(0, 30000))) & 0xFFFF
            self.rings[q]["avail_idx"][0] = self.avail_idx[q]
            self.totals["avail_idx_jumps"] += 1
            return
        k = int(rng.integers(0, self.size - pending + 1))
        k = min(k, 64)
        for j in range(k):
            self.write_chain(q, (self.avail_idx[q] + j) & (self.size - 1))
        self.avail_idx[q] = (self.avail_idx[q] + k) & 0xFFFF
        self.rings[q]["avail_idx"][0] = self.avail_idx[q]
        self.totals["chains_written"] += k

    # ---- the device consumes them ----
    def op_pop_chain(self, q: int) -> None:
        from pmd.errors import DeviceError

        dq, m = self.dqs[q], self.models[q]
        bound = int(self.rng.choice([64, 4096, 65600]))
        before = sum(m.bad.values())
        r = m.pop()
        if r == 0:
            assert dq.pop_chain(bound) is None
            return
        if r < 0:
            with pytest.raises(DeviceError) as e:
                dq.pop_chain(bound)
            assert m.last in str(e.value), (m.last, str(e.value))
            assert sum(m.bad.values()) == before + 1
            return
        head, _, out_len, in_len = m.chain
        got = dq.pop_chain(bound)
        assert got is not None and got[0] == head and got[2] == in_len
        if out_len > bound:
            assert got[1] is None
            m.too_long += 1
        else:
            assert got[1] == m.read_out(0, out_len)
        if self.rng.random() < 0.8:
            data = self.rng.integers(0, 256, int(self.rng.integers(0, in_len + 1)) if in_len < 4096 else 100,
                                     dtype=np.uint8).tobytes()
            dq.complete(head, data)
            m.write_in(0, data)
            m.push(head, len(data))
            dq.publish_used()

    def op_tx_burst(self, q: int) -> None:
        from pmd.sim._tx import device_tx_burst

        dq, m = self.dqs[q], self.models[q]
        rows, cols = int(self.rng.integers(1, 32)), int(self.rng.choice([64, 1514, 4096]))
        out = np.zeros((rows, cols), np.uint8)
        lens = np.zeros(rows, np.uint32)
        n = device_tx_burst(dq, out, lens)
        i = 0
        while i < rows:
            r = m.pop()
            if r == 0:
                break
            if r < 0:
                continue
            head, _, out_len, _ = m.chain
            if out_len < HDR:
                m.bad[REFUSALS[7]] += 1
            elif out_len - HDR > cols:
                m.dropped += 1
            else:
                pkt = m.read_out(HDR, out_len - HDR)
                assert lens[i] == len(pkt) and out[i, :len(pkt)].tobytes() == pkt, f"tx packet {i}"
                i += 1
            m.push(head, 0)
        assert n == i

    def packets(self, k: int) -> list[bytes]:
        return [self.rng.integers(0, 256, int(self.rng.integers(0, 3000)), dtype=np.uint8).tobytes()
                for _ in range(k)]

    def op_rx_burst(self, q: int) -> None:
        from pmd.sim._rx import device_rx_burst

        dq, m = self.dqs[q], self.models[q]
        pkts = self.packets(int(self.rng.integers(1, 32)))
        rows = np.zeros((len(pkts), 3000), np.uint8)
        lens = np.array([len(p) for p in pkts], np.uint32)
        for i, p in enumerate(pkts):
            rows[i, :len(p)] = np.frombuffer(p, np.uint8)
        mergeable = bool(self.rng.random() < 0.5)
        n = device_rx_burst(dq, rows, lens, mergeable=mergeable)
        i = 0
        while i < len(pkts):
            r = m.deliver(pkts[i], mergeable)
            if r < 0:
                break
            if r == 0:
                m.dropped += 1
            i += 1
        assert n == i

    def op_loopback(self, q: int) -> None:
        from pmd.sim._tx import tx_to_rx

        tx, rx = self.models[q], self.models[1 - q]
        budget = int(self.rng.integers(1, 64))
        mergeable = bool(self.rng.random() < 0.5)
        n = tx_to_rx(self.dqs[q], self.dqs[1 - q], budget, mergeable=mergeable)
        moved = 0
        while moved < budget:
            r = tx.pop()
            if r == 0:
                break
            if r < 0:
                continue
            head, segs, out_len, _ = tx.chain
            if out_len < HDR:
                tx.bad[REFUSALS[7]] += 1
                tx.push(head, 0)
                continue
            if len(segs) > 1 and out_len - HDR > 65536 + 64:
                tx.dropped += 1
                tx.push(head, 0)
                continue
            pkt = tx.read_out(HDR, out_len - HDR)
            d = rx.deliver(pkt, mergeable)
            if d < 0:
                tx.unpop()
                break
            if d == 0:
                tx.dropped += 1
            else:
                moved += 1
            tx.push(head, 0)
        assert n == moved

    # ---- checks ----
    def check(self) -> None:
        for dq, m, r in zip(self.dqs, self.models, self.rings):
            s = dq.stats()
            assert s["bad_descriptors"] == sum(m.bad.values()), (s, dict(m.bad))
            assert s["popped"] == m.popped and s["dropped"] == m.dropped and s["too_long"] == m.too_long
            assert s["broken"] == m.broken
            assert dq.next_avail_idx == m.last_avail and dq.next_used_idx == m.used_idx
            for slot, (head, length) in m.used_entries.items():
                assert tuple(r["used_ring"][slot]) == (head, length), slot
        assert (self.raw[self.win_end:] == 0xA5).all(), "the device wrote outside the DMA window"
        assert (self.raw[self.buf_off:self.win_end] == self.mirror[self.buf_off:self.win_end]).all(), \
            "the device wrote buffer bytes the model did not"

    def run(self) -> None:
        rng = self.rng
        ops = (self.op_pop_chain, self.op_tx_burst, self.op_rx_burst, self.op_loopback)
        for _ in range(int(rng.integers(10, 80))):
            for q in (0, 1):
                if rng.random() < 0.7:
                    self.expose(q)
            for m in self.models:
                m.snapshot()
            for _ in range(int(rng.integers(1, 4))):
                ops[int(rng.integers(0, len(ops)))](int(rng.integers(0, 2)))
                for m in self.models:
                    m.close_batch()          # every device operation ends with its flush
            self.check()
            self.totals["rounds"] += 1
            if all(m.broken for m in self.models):
                break
        for m in self.models:
            for why, n in m.bad.items():
                self.totals[why] += n
            self.totals["chains_popped"] += m.popped
            self.totals["indirect_chains_popped"] += m.indirect_popped
            self.totals["broken_queues"] += m.broken
        if self.in_order:
            self.totals["in_order_episodes"] += 1
            self.totals["in_order_used_entries"] += sum(dq.stats()["used_entries"] for dq in self.dqs)
            self.totals["in_order_chains_popped"] += sum(m.popped for m in self.models)

    def close(self) -> None:
        for dq in self.dqs:
            dq.close()
        self.windows.clear()
        for vq in self.vqs:
            vq.close()
        del self.rings, self.raw, self.models     # numpy views of the memory
        gc.collect()                              # and tracebacks (pytest.raises) holding them
        self.mem.close()
        assert self.mem.pins == 0 and self.mem.fd == -1, "the memory stayed mapped"


def fuzz_device(seed: int, seconds: float) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    totals: Counter = Counter()
    fds = open_fds()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ep = DeviceEpisode(rng, totals)
        ep.run()        # a failure ends the run here: the child reports it
        ep.close()
        totals["episodes"] += 1
    gc.collect()
    assert open_fds() == fds, "file descriptors leaked"
    return dict(totals)


# =============================================================================
# device side, packed rings (2.8): the driver writes the descriptors
# =============================================================================

# The refusals a packed chain can earn, by what the fuzzer's driver did wrong,
# and whether the queue survives them (a chain whose end cannot be found leaves
# nowhere to resume, 2.8.6 / 2.8.17: broken).
P_BAD = {
    "id_range": ("buffer id out of range", False),
    "id_busy": ("buffer id already in flight", False),
    "addr": ("buffer outside the driver's DMA memory", False),
    "order": ("device-readable descriptor after a device-writable one", False),
    "indirect": ("indirect descriptor (not negotiated)", False),
    "not_avail": ("descriptor after NEXT not marked available", True),
    "loop": ("descriptor chain loops", True),
}


class PackedChain:
    """One chain the fuzzer's driver made available: where, under which id, what it holds."""

    def __init__(self, start: int, n: int, bid: int, kind: str, readable: bytes, cap: int,
                 writable: list[tuple[int, int]]) -> None:
        self.start, self.n, self.id, self.kind = start, n, bid, kind
        self.readable, self.cap, self.writable = readable, cap, writable


class PackedDeviceEpisode:
    """Two packed rings (A and B) a driver writes, mostly well (2.8.21): the device's
    bursts and pop_chain over them, against what the driver knows it gave.

    After every step: no byte changes outside the device-writable buffers of the
    good chains and the descriptor ring (the canary past the DMA window, every
    readable buffer, the driver event areas); every used descriptor the driver
    finds carries an id it gave and has not had back, a length within that
    chain's writable bytes (0 and no WRITE flag for a refused chain); every
    chain the device took is counted as taken or refused for the right reason,
    and a queue broken by a chain without an end stays broken; tx packets come
    out byte-exact, in ring order.
    """

    def __init__(self, rng: np.random.Generator, totals: Counter) -> None:
        import pmd
        from pmd.sim._dma import DmaWindows
        from pmd.sim._virtqueue import DeviceQueue

        self.rng, self.totals = rng, totals
        self.size = int(rng.choice([2, 4, 8, 16, 64, 256]))
        self.mem = pmd.DmaMemory(2 << 20, lock=False, name="pmd-fuzz")
        self.raw = np.frombuffer(self.mem, np.uint8)
        self.desc, self.drv_event, dev_events, dqs = [], [], [], []
        self.windows = DmaWindows()
        event_idx = bool(rng.random() < 0.5)
        ring_offs = []
        for _ in range(2):
            off = self.mem.alloc(16 * self.size, 16)
            ev = self.mem.alloc(8, 4)
            ring_offs.append((off, ev))
        self.buf_off = self.mem.alloc(512 << 10, 4096)
        self.buf_len = 512 << 10
        self.win_end = self.buf_off + self.buf_len
        self.mem.alloc(64 << 10, 4096)                      # a canary just past the window
        self.raw[self.win_end:] = 0xA5
        self.raw[self.buf_off:self.win_end] = rng.integers(0, 256, self.buf_len, dtype=np.uint8)
        self.mirror = self.raw.copy()
        self.may_write = np.zeros(len(self.raw), bool)       # device-writable bytes of good chains
        for off, ev in ring_offs:
            self.may_write[off:off + 16 * self.size] = True   # the device writes used descriptors
            self.may_write[ev + 4:ev + 8] = True              # and its event suppression area
        iova0 = self.mem.iova(0)
        self.windows.add(iova0, self.win_end, self.mem.address, self.mem)
        for off, ev in ring_offs:
            self.desc.append(self.raw[off:off + 16 * self.size].view(PDESC))
            self.drv_event.append(self.raw[ev:ev + 4].view("<u2"))
            dqs.append(DeviceQueue(self.windows, self.size, self.mem.iova(off), self.mem.iova(ev),
                                   self.mem.iova(ev + 4), event_idx=event_idx, packed=True))
        self.dqs = dqs
        # the driver's view of each ring
        self.ev_off = [ev for _off, ev in ring_offs]
        self.avail = [0, 0]                   # descriptors made available, ever (position = mod 2N)
        self.used = [0, 0]                    # where the driver reads the next used descriptor, ever
        # per id, the chains under it the device took and the driver has not had back, in
        # order (a driver may reuse an id the device returned before it read that back)
        self.in_flight: list[dict[int, deque]] = [{}, {}]
        self.held: list[dict[int, PackedChain]] = [{}, {}]   # popped by pop_chain, not completed
        self.chains: list[deque] = [deque(), deque()]       # made available, not yet taken
        self.taken = [0, 0]                   # descriptors the device has taken, ever
        self.broken = [False, False]
        self.refused = [Counter(), Counter()]
        self.popped = [0, 0]

    # ---- positions: a descriptor count, ever, as the spec's offset and wrap counter ----
    def pos(self, count: int) -> tuple[int, int]:
        return count % self.size, 1 - (count // self.size) % 2

    def device_taken(self, q: int) -> int:
        """How many descriptors the device has taken, from its next_avail_idx."""
        off_wrap = self.dqs[q].next_avail_idx
        theirs = (off_wrap & 0x7FFF) + (0 if off_wrap >> 15 else self.size)
        off, wrap = self.pos(self.taken[q])
        mine = off + (0 if wrap else self.size)
        return self.taken[q] + (theirs - mine) % (2 * self.size)

    # ---- the driver makes chains available ----
    def buffer(self, ln: int, write: bool) -> int:
        # readable buffers in the first half, writable in the second: what the device
        # writes never changes bytes a later tx chain is checked against
        half = self.buf_len // 2
        start = self.buf_off + (half if write else 0)
        return int(self.rng.integers(start, start + half - ln + 1))

    def expose(self, q: int) -> None:
        rng, size = self.rng, self.size
        room = size - (self.avail[q] - self.used[q])     # 2.8.21.3: never past what came back
        if room <= 0 or self.broken[q]:
            return
        pending = {c.id for c in self.chains[q]}
        free_ids = [i for i in range(size) if not self.in_flight[q].get(i) and i not in pending]
        kind = "good"
        if rng.random() < 0.3:
            kind = str(rng.choice(list(P_BAD)))
        if kind == "loop" and room < size:
            kind = "good"
        if kind == "id_busy" and not self.held[q]:
            kind = "good"
        if not free_ids and kind not in ("id_range", "id_busy"):
            return
        n = size if kind == "loop" else int(rng.integers(1, min(room, 4) + 1))
        if kind in ("not_avail", "order") and n < 2:
            kind = "good"
        n_read = int(rng.integers(0, n + 1))
        if kind == "order":
            n_read = int(rng.integers(0, n - 1))             # a writable one, then the last readable
        bad_j = int(rng.integers(0, n))
        readable, writable, cap = b"", [], 0
        start = self.avail[q]
        rows = []
        for j in range(n):
            ln = int(rng.choice([0, 12, 60, 1500, 2048, int(rng.integers(0, 4000))]))
            write = j >= n_read
            if kind == "order" and j == n - 1:
                write = False                               # readable after writable
            off = self.buffer(ln, write)
            addr = self.mem.iova(off)
            if kind == "addr" and j == bad_j:
                ln = max(ln, 1)
                addr = self.mem.iova(0) + self.win_end + int(rng.integers(-ln + 1, 60000)) \
                    if rng.random() < 0.7 else (1 << 64) - int(rng.integers(1, 4096))
            flags = (F_NEXT if j < n - 1 else 0) | (F_WRITE if write else 0)
            if kind == "loop":
                flags |= F_NEXT
            if kind == "indirect" and j == bad_j:
                flags |= 4
            rows.append([addr, ln, flags])
            if write:
                writable.append((off, ln))
                cap += ln
            else:
                readable += self.raw[off:off + ln].tobytes()
        if kind == "id_range":
            bid = int(rng.integers(size, 1 << 16))
        elif kind == "id_busy":          # busy if the device still holds it when it takes this one
            bid = int(rng.choice(list(self.held[q])))
        else:
            bid = int(rng.choice(free_ids))
        # 2.8.21.3: every descriptor but the first, then the first's flags (in memory
        # this fuzzer and the device share one thread, so the order is the spec's only)
        d = self.desc[q]
        first = None
        for j, (addr, ln, flags) in enumerate(rows):
            off, wrap = self.pos(start + j)
            avail = (P_AVAIL if wrap else P_USED)
            if kind == "not_avail" and j == max(1, bad_j):
                avail = P_USED if wrap else P_AVAIL         # this lap's "used" pattern
            d["addr"][off], d["len"][off], d["id"][off] = addr, ln, bid if j == n - 1 else rng.integers(0, 1 << 16)
            if j == 0:
                first = (off, flags | avail)
            else:
                d["flags"][off] = flags | avail
        d["flags"][first[0]] = first[1]
        if kind in ("good", "id_busy"):
            for off, ln in writable:
                self.may_write[off:off + ln] = True
        chain = PackedChain(start, n, bid, kind, readable, cap, writable)
        self.chains[q].append(chain)
        self.avail[q] += n
        self.totals[f"p_made_{kind}"] += 1
        if rng.random() < 0.1:                               # the driver event area, any value
            self.drv_event[q][:] = rng.integers(0, 1 << 16, 2)
            ev = self.ev_off[q]
            self.mirror[ev:ev + 4] = self.raw[ev:ev + 4]

    # ---- what the device took ----
    def account(self, q: int, merging: bool = False) -> list[PackedChain]:
        """The chains the device has taken since last asked, in ring order. ``merging``:
        it was delivering packets over several rx buffers (MRG_RXBUF)."""
        upto = self.device_taken(q)
        out = []
        while self.chains[q] and self.chains[q][0].start < upto:
            c = self.chains[q].popleft()
            out.append(c)
            self.taken[q] = c.start + c.n
            if c.kind == "id_busy" and c.id not in self.held[q]:
                c.kind = "good"                            # the device had given that id back
            if c.kind == "good":
                self.in_flight[q].setdefault(c.id, deque()).append(c)
                continue
            why, breaks = P_BAD[c.kind]
            assert not breaks, f"the device went past a chain without an end ({c.kind})"
            self.refused[q][why] += 1
            if c.kind not in ("id_range", "id_busy"):     # those are never returned
                self.in_flight[q].setdefault(c.id, deque()).append(c)   # returned at once, length 0
        assert self.taken[q] == upto, (self.taken[q], upto)
        st = self.dqs[q].stats()
        if not self.broken[q] and st["broken"]:
            front = self.chains[q][0] if self.chains[q] else None
            if front is not None and P_BAD.get(front.kind, ("", False)) == (st["last_error"], True):
                # it stopped at the chain without an end, and stays there (nowhere to resume)
                self.refused[q][P_BAD[front.kind][0]] += 1
                out.append(self.chains[q].popleft())
            else:
                # a refused buffer among those of one merged packet: the packet's first
                # buffer already says how many follow (num_buffers), so the queue stops
                assert merging and any(c.kind != "good" for c in out), \
                    (st, merging, [c.kind for c in out], front and front.kind)
                self.totals["p_broken_mid_packet"] += 1
            self.broken[q] = True
            self.chains[q].clear()
        return out

    # ---- device operations ----
    def op_pop_chain(self, q: int) -> None:
        from pmd.errors import DeviceError

        dq = self.dqs[q]
        try:
            r = dq.pop_chain()
        except DeviceError as e:
            took = self.account(q)
            assert took and took[-1].kind != "good" and P_BAD[took[-1].kind][0] in str(e), (str(e), took[-1].kind)
            return
        took = self.account(q)
        if r is None:
            assert not took or self.broken[q]
            return
        head, data, cap = r
        assert took and took[-1].kind == "good" and all(c.kind != "good" for c in took[:-1])
        c = took[-1]
        assert head == c.id and cap == c.cap
        assert data == c.readable or (data is None and len(c.readable) > 65536 + 64)
        k = int(self.rng.integers(0, cap + 1)) if cap else 0
        payload = self.rng.integers(0, 256, k, dtype=np.uint8).tobytes()
        dq.complete(head, payload)
        dq.publish_used()
        self.popped[q] += 1

    def op_hold(self, q: int) -> None:
        """pop_chain and keep the chain: the device holds its id until op_release."""
        from pmd.errors import DeviceError

        try:
            r = self.dqs[q].pop_chain()
        except DeviceError:
            self.account(q)
            return
        took = self.account(q)
        if r is not None:
            c = took[-1]
            assert c.kind == "good" and r[0] == c.id and r[2] == c.cap
            self.held[q][c.id] = c
            self.popped[q] += 1

    def op_release(self, q: int) -> None:
        if self.held[q]:
            bid = int(self.rng.choice(list(self.held[q])))
            del self.held[q][bid]
            self.dqs[q].complete(bid)                       # length 0: any id in flight
            self.dqs[q].publish_used()

    def op_tx_burst(self, q: int) -> None:
        from pmd.sim._tx import device_tx_burst

        rows, cols = int(self.rng.integers(1, 32)), int(self.rng.choice([64, 1514, 4096]))
        out = np.zeros((rows, cols), np.uint8)
        lens = np.zeros(rows, np.uint32)
        n = device_tx_burst(self.dqs[q], out, lens)
        took = self.account(q)
        pkts = [c.readable[HDR:] for c in took if c.kind == "good" and HDR <= len(c.readable) <= HDR + cols]
        short = sum(1 for c in took if c.kind == "good" and len(c.readable) < HDR)
        self.refused[q]["packet shorter than the virtio-net header"] += short
        for c in took:
            if c.kind == "good" and len(c.readable) < HDR:
                c.cap = 0                                   # refused: comes back with length 0
        assert n == len(pkts), (n, len(pkts))
        for i, p in enumerate(pkts):
            assert lens[i] == len(p) and out[i, :len(p)].tobytes() == p, f"tx packet {i}"
        self.popped[q] += sum(1 for c in took if c.kind == "good")

    def op_rx_burst(self, q: int) -> None:
        from pmd.sim._rx import device_rx_burst

        k = int(self.rng.integers(1, 32))
        rows = self.rng.integers(0, 256, (k, 3000), dtype=np.uint8)
        lens = self.rng.integers(0, 3000, k).astype(np.uint32)
        mergeable = bool(self.rng.random() < 0.5)
        device_rx_burst(self.dqs[q], rows, lens, mergeable=mergeable)
        self.popped[q] += sum(1 for c in self.account(q, mergeable) if c.kind == "good")

    def op_loopback(self, q: int) -> None:
        from pmd.sim._tx import tx_to_rx

        mergeable = bool(self.rng.random() < 0.5)
        tx_to_rx(self.dqs[q], self.dqs[1 - q], int(self.rng.integers(1, 64)), mergeable=mergeable)
        for r in (q, 1 - q):
            took = self.account(r, mergeable and r != q)
            for c in took:
                if r == q and c.kind == "good" and len(c.readable) < HDR:
                    self.refused[r]["packet shorter than the virtio-net header"] += 1
                    c.cap = 0
            self.popped[r] += sum(1 for c in took if c.kind == "good")

    # ---- the driver reads what came back ----
    def harvest(self, q: int) -> None:
        d = self.desc[q]
        while True:
            off, wrap = self.pos(self.used[q])
            flags = int(d["flags"][off])
            want = (P_AVAIL | P_USED) if wrap else 0
            if flags & (P_AVAIL | P_USED) != want:
                return
            bid, ln = int(d["id"][off]), int(d["len"][off])
            chains = self.in_flight[q].get(bid)
            assert chains, f"ring {q}: used id {bid} was not in flight"
            c = chains.popleft()
            assert bid not in self.held[q] or chains, f"ring {q}: id {bid} came back while held"
            if c.kind != "good":
                assert ln == 0 and not flags & F_WRITE, (c.kind, ln, flags)
            assert ln <= c.cap, (ln, c.cap)
            assert (ln != 0) == bool(flags & F_WRITE), (ln, flags)
            self.used[q] += c.n
            self.totals["p_used_checked"] += 1

    def check(self) -> None:
        for q in (0, 1):
            self.harvest(q)
            s = self.dqs[q].stats()
            assert s["broken"] == self.broken[q], (s, self.broken[q])
            assert s["bad_descriptors"] == sum(self.refused[q].values()), (s, dict(self.refused[q]))
        n = self.win_end + (64 << 10)                         # the canary past the window included
        wrong = (self.raw[:n] != self.mirror[:n]) & ~self.may_write[:n]
        assert not wrong.any(), f"the device wrote bytes it was not given, at {np.flatnonzero(wrong)[:4]}"

    def run(self) -> None:
        rng = self.rng
        ops = (self.op_pop_chain, self.op_tx_burst, self.op_rx_burst, self.op_loopback,
               self.op_hold, self.op_release)
        for _ in range(int(rng.integers(10, 120))):
            for q in (0, 1):
                for _ in range(int(rng.integers(0, 4))):
                    self.expose(q)
            for _ in range(int(rng.integers(1, 4))):
                ops[int(rng.integers(0, len(ops)))](int(rng.integers(0, 2)))
            self.check()
            self.totals["p_rounds"] += 1
            if all(self.broken):
                break
        for q in (0, 1):
            for why, n in self.refused[q].items():
                self.totals["p_" + why] += n
            self.totals["p_broken_queues"] += self.broken[q]
            self.totals["p_chains_popped"] += self.popped[q]

    def close(self) -> None:
        for dq in self.dqs:
            dq.close()
        self.windows.clear()
        del self.desc, self.drv_event, self.raw
        gc.collect()
        self.mem.close()
        assert self.mem.pins == 0 and self.mem.fd == -1, "the memory stayed mapped"


def fuzz_device_packed(seed: int, seconds: float) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    totals: Counter = Counter()
    fds = open_fds()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ep = PackedDeviceEpisode(rng, totals)
        ep.run()
        ep.close()
        totals["p_episodes"] += 1
    gc.collect()
    assert open_fds() == fds, "file descriptors leaked"
    return dict(totals)


# =============================================================================
# device side, packed ring: the driver writes lists and indirect tables, one at a time
# =============================================================================

P_IDESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])


class PackedIndirectEpisode:
    """One packed ring (2.8) fed list after list by a driver that is mostly good: direct
    lists and indirect tables (2.8.7, 2.8.19), with bad lengths, sizes, addresses,
    INDIRECT with NEXT or after NEXT, bad buffers and order in tables, reserved flags and
    ids in table entries (ignored by the device), and INDIRECT without the feature. Each
    list is popped at once and compared with what the spec says: the bytes and capacity,
    or the refusal and its used descriptor of length 0; the device writes nowhere else."""

    def __init__(self, rng: np.random.Generator, totals: Counter) -> None:
        import pmd
        from pmd.sim._dma import DmaWindows
        from pmd.sim._virtqueue import DeviceQueue

        self.rng, self.totals = rng, totals
        self.size = int(rng.integers(1, 65))
        self.indirect = bool(rng.random() < 0.7)
        self.mem = pmd.DmaMemory(2 << 20, lock=False, name="pmd-fuzz-packed")
        self.raw = np.frombuffer(self.mem, np.uint8)
        off = self.mem.alloc(16 * self.size, 16)
        self.desc = self.raw[off:off + 16 * self.size].view(P_IDESC)
        ev = self.mem.alloc(8, 4)
        self.tbl_off = self.mem.alloc(64 << 10, 4096)          # tables: the device never writes here
        self.buf_off = self.mem.alloc(1 << 20, 4096)
        self.win_end = self.buf_off + (1 << 20)
        self.mem.alloc(64 << 10, 4096)                          # a canary past the window
        self.raw[self.win_end:] = 0xA5
        self.raw[self.buf_off:self.win_end] = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
        self.iova0 = self.mem.iova(0)
        self.windows = DmaWindows()
        self.windows.add(self.iova0, self.win_end, self.mem.address, self.mem)
        self.dq = DeviceQueue(self.windows, self.size, self.iova0 + off, self.iova0 + ev, self.iova0 + ev + 4,
                              packed=True, indirect=self.indirect)
        self.pos, self.wrap = 0, 1            # the driver's avail position and wrap counter
        self.used_pos, self.used_wrap = 0, 1

    def inside(self, iova: int, ln: int) -> bool:
        o = iova - self.iova0
        return iova >= self.iova0 and o <= self.win_end and ln <= self.win_end - o

    def buffers(self, k: int) -> list[tuple[int, int]]:
        """k buffers that do not overlap one another, inside the buffer area."""
        lens = [int(x) for x in self.rng.integers(0, 4096, k)]
        start = int(self.rng.integers(self.buf_off, self.win_end - sum(lens) - 16 * k))
        out = []
        for ln in lens:
            out.append((self.iova0 + start, ln))
            start += ln + int(self.rng.integers(0, 16))
        return out

    def bad_address(self) -> int:
        return [self.iova0 + self.win_end + int(self.rng.integers(0, 4096)),    # past the window
                (1 << 64) - 16, self.iova0 + self.win_end - 8][int(self.rng.integers(0, 3))]   # wrapping, straddling

    def model(self, descs, table) -> tuple[str | None, list[tuple[int, int, bool]]]:
        """What the device must conclude (2.8.6, 2.8.7, 2.8.18, 2.8.19), in its order."""
        segs, seen_write, out_len, in_len = [], False, 0, 0

        def add(addr, ln, write):
            nonlocal seen_write, out_len, in_len
            if ln and not self.inside(addr, ln):
                return "buffer outside the driver's DMA memory"
            if write:
                seen_write, in_len = True, in_len + ln
            elif seen_write:
                return "device-readable descriptor after a device-writable one"
            else:
                out_len += ln
            segs.append((addr, ln, write))
            return None

        for k, (addr, ln, flags) in enumerate(descs):
            if flags & F_INDIRECT:
                if not self.indirect:
                    return "indirect descriptor (not negotiated)", []
                if k > 0 or k + 1 < len(descs):   # post() links all but the last with NEXT
                    return "indirect descriptor chained by NEXT", []
                if ln == 0 or ln % 16:
                    return "indirect table length 0 or not a multiple of 16", []
                if ln // 16 > self.size:
                    return "indirect table longer than the queue size", []
                if not self.inside(addr, ln):
                    return "indirect table outside the driver's DMA memory", []
                o = addr - self.iova0           # the table as it is in memory now
                for e in self.raw[o:o + ln].copy().view(P_IDESC):
                    why = add(int(e["addr"]), int(e["len"]), bool(int(e["flags"]) & F_WRITE))
                    if why:
                        return why, []
            else:
                why = add(addr, ln, bool(flags & F_WRITE))
                if why:
                    return why, []
        return None, segs

    def write_list(self) -> tuple[list, np.ndarray | None, int]:
        rng, size = self.rng, self.size
        bid = int(rng.integers(0, size)) if rng.random() > 0.03 else int(rng.integers(size, 1 << 16))
        if rng.random() < 0.4:                                 # a direct list
            n = int(rng.integers(1, min(size, 4) + 1))
            n_read = int(rng.integers(0, n + 1))
            descs = [(a, ln, F_WRITE if j >= n_read else 0) for j, (a, ln) in enumerate(self.buffers(n))]
            if rng.random() < 0.1:                             # INDIRECT after NEXT (2.8.19)
                descs[-1] = (descs[-1][0], 16, F_INDIRECT)
            return descs, None, bid
        k = int(rng.integers(1, min(size, 8) + 1))
        n_read = int(rng.integers(0, k + 1))
        ents = np.zeros(k, P_IDESC)
        for j, (a, ln) in enumerate(self.buffers(k)):
            reserved = int(rng.integers(0, 1 << 16)) & ~F_WRITE if rng.random() < 0.3 else 0
            ents[j] = (a, ln, int(rng.integers(0, 1 << 16)), reserved | (F_WRITE if j >= n_read else 0))
        length, flags = 16 * k, F_INDIRECT | (F_WRITE if rng.random() < 0.3 else 0)
        what = int(rng.integers(0, 8)) if rng.random() < 0.4 else -1
        j = int(rng.integers(0, k))
        t_off = self.tbl_off + int(rng.integers(0, (60 << 10) - 16 * k))   # any alignment
        addr = self.iova0 + t_off
        if what == 0:
            length = int(rng.choice([0, 16 * k - int(rng.integers(1, 16)), 16 * k + 4]))
        elif what == 1:
            length = 16 * (size + 1 + int(rng.integers(0, 4)))
        elif what == 2:
            addr = self.bad_address()
        elif what == 3:
            ents[j]["addr"] = np.uint64(self.bad_address())
            ents[j]["len"] = max(int(ents[j]["len"]), 1)
        elif what == 4 and n_read < k and j < n_read:         # readable after writable
            ents[-1]["flags"] = int(ents[-1]["flags"]) & ~F_WRITE
        self.raw[t_off:t_off + 16 * k] = ents.view(np.uint8)
        descs = [(addr, length, flags)]
        if what == 5 and size > 1:                             # INDIRECT with NEXT: a list of two
            a, ln = self.buffers(1)[0]
            descs.append((a, ln, 0))
        return descs, ents, bid

    def post(self, descs, bid) -> None:
        """Make the list available (2.8.21): NEXT on all but the last, the id in the
        last (2.8.6), the first descriptor's flags written last."""
        first, first_flags = self.pos, 0
        for k, (addr, ln, flags) in enumerate(descs):
            f = flags | (F_NEXT if k + 1 < len(descs) else 0) | (P_AVAIL if self.wrap else P_USED)
            self.desc[self.pos] = (np.uint64(addr), ln, bid if k + 1 == len(descs) else 0xBEEF, 0)
            if k == 0:
                first_flags = f
            else:
                self.desc[self.pos]["flags"] = f
            self.pos += 1
            if self.pos == self.size:
                self.pos, self.wrap = 0, self.wrap ^ 1
        self.desc[first]["flags"] = first_flags

    def used(self, n: int) -> tuple[int, int]:
        d = self.desc[self.used_pos]
        want = (P_AVAIL | P_USED) if self.used_wrap else 0
        assert int(d["flags"]) & (P_AVAIL | P_USED) == want, "no used descriptor where the device must write"
        self.used_pos += n
        if self.used_pos >= self.size:
            self.used_pos, self.used_wrap = self.used_pos - self.size, self.used_wrap ^ 1
        return int(d["id"]), int(d["len"])

    def step(self) -> None:
        from pmd.errors import DeviceError

        descs, table, bid = self.write_list()
        if len(descs) > self.size:
            return
        why, segs = self.model(descs, table)
        if bid >= self.size:            # checked first: without an id nothing can be returned
            why = "buffer id out of range"
        self.post(descs, bid)
        before = self.dq.n_bad_desc
        if why is not None:
            with pytest.raises(DeviceError, match=re.escape(why)):
                self.dq.pop_chain()
            assert self.dq.n_bad_desc == before + 1 and self.dq.last_error == why
            self.dq.publish_used()
            if why != "buffer id out of range":     # returned at once with length 0
                assert self.used(len(descs)) == (bid, 0)
            # else no id to return: nothing is written, the device's used position stays
            self.totals[why] += 1
            return
        readable = b"".join(self.raw[a - self.iova0:a - self.iova0 + ln].tobytes() for a, ln, w in segs if not w)
        cap = sum(ln for _, ln, w in segs if w)
        got = self.dq.pop_chain(1 << 20)
        assert got == (bid, readable, cap), (got[0], len(got[1] or b""), got[2], bid, len(readable), cap)
        data = self.rng.integers(0, 256, int(self.rng.integers(0, cap + 1)), dtype=np.uint8).tobytes()
        self.dq.complete(bid, data)
        self.dq.publish_used()
        assert self.used(len(descs)) == (bid, len(data))
        done = 0
        for a, ln, w in segs:
            if w and done < len(data):
                take = min(ln, len(data) - done)
                o = a - self.iova0
                assert self.raw[o:o + take].tobytes() == data[done:done + take]
                done += take
        self.totals["packed_indirect_popped" if table is not None else "packed_direct_popped"] += 1

    def run(self) -> None:
        for _ in range(int(self.rng.integers(20, 200))):
            self.step()
            assert not self.dq.broken
        assert (self.raw[self.win_end:] == 0xA5).all(), "the device wrote outside the DMA window"

    def close(self) -> None:
        self.dq.close()
        self.windows.clear()
        del self.raw, self.desc
        gc.collect()
        self.mem.close()
        assert self.mem.pins == 0 and self.mem.fd == -1, "the memory stayed mapped"


def fuzz_device_packed_indirect(seed: int, seconds: float) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    totals: Counter = Counter()
    fds = open_fds()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ep = PackedIndirectEpisode(rng, totals)
        ep.run()
        ep.close()
        totals["episodes"] += 1
    gc.collect()
    assert open_fds() == fds, "file descriptors leaked"
    return dict(totals)


# =============================================================================

def run_fuzzer(name: str, seed: int, seconds: float) -> dict[str, int]:
    out = check_isolated(f"""
import json
from tests.test_fuzz_rings import fuzz_{name}
print(json.dumps(fuzz_{name}({seed}, {seconds})))
""", timeout=seconds * 4 + 120)
    totals = json.loads(out.strip().splitlines()[-1])
    print(f"\nfuzz {name}: seed {seed}, {seconds:g} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    return totals


def test_fuzz_driver_used_rings_written_by_a_hostile_device():
    totals = run_fuzzer("driver", SEED, SECONDS)
    assert totals["rounds"] > 0 and totals["packets_checked"] > 0
    # every kind of bad entry was tried (a short run may miss the rarest)
    tried = {k for k in totals if k.startswith(("rx_", "tx_"))}
    assert {"rx_bad_id", "rx_dup", "rx_long", "rx_short", "rx_runt", "tx_bad_id", "tx_dup"} <= tried, tried
    # the packed ring ran, not silently skipped: a good share of the episodes, and its bad
    # used descriptors were counted by the driver (rx and tx alike)
    assert totals.get("packed_episodes", 0) * 4 >= totals["episodes"], totals
    assert totals.get("split_episodes", 0) * 4 >= totals["episodes"], totals
    for k in ("packed_rx_bad_used_len", "packed_rx_runt", "packed_rx_take_back", "packed_tx_take_back",
              "packed_broken_queues"):
        assert totals.get(k, 0) > 0, (k, totals)
    assert totals.get("packed_rx_bad_used_id", 0) + totals.get("packed_tx_bad_used_id", 0) > 0, totals
    assert totals.get("packed_rx_used_not_in_flight", 0) + totals.get("packed_tx_used_not_in_flight", 0) > 0
    # and half the packed episodes ran with VIRTIO_F_IN_ORDER on both sides: its bad used
    # descriptors stopped the queue and were counted too
    assert totals.get("in_order_episodes", 0) * 8 >= totals["episodes"], totals
    assert totals.get("in_order_broken_queues", 0) > 0 and totals.get("in_order_rx_bad_used_len", 0) > 0, totals
    # indirect transmit tables on both layouts, and a device scribbling on them
    assert totals.get("split_indirect_episodes", 0) > 0 and totals.get("packed_indirect_episodes", 0) > 0, totals
    assert totals.get("tx_scribbled_tables", 0) > 0, totals


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split-strict"])
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zc", "copy"])
def test_a_burst_that_meets_a_bad_used_entry_returns_what_came_before_and_the_next_call_raises(packed, zero_copy):
    # Found by the packed driver fuzzer: rx_burst_zc handed out the buffers of the good packets
    # before a bad used descriptor, then raised, so the caller never learnt the count and the
    # buffers leaked (rx_burst lost the copied packets). Now the burst returns them; the error
    # (a broken packed ring; a strict queue) is raised by the next call.
    from pmd.errors import DeviceError
    from pmd.loopback import Loopback

    with Loopback(queue_size=8, packed=packed, strict=not packed) as lb:
        dq, pool = lb.device_rx, lb.pool
        head, _, _ = dq.pop_chain()
        dq.complete(head, net_hdr() + bytes(60))       # a good packet
        dq.pop_chain()
        dq.push_raw(100, 0)                            # then an id out of range
        dq.publish_used()
        ids = np.full(32, 0xFFFFFFFF, np.uint32)
        lens = np.zeros(32, np.uint32)
        out = np.zeros((32, lb.driver_rx.max_packet_len), np.uint8)
        got = lb.driver_rx.rx_burst_zc(ids, lens) if zero_copy else lb.driver_rx.rx_burst(out, lens)
        assert got == 1 and lens[0] == 60
        if zero_copy:
            assert (ids[1:] == 0xFFFFFFFF).all()
            pool.free(ids[:1])                         # the application gives back what it got
        with pytest.raises(DeviceError):
            lb.driver_rx.rx_burst_zc(ids, lens)
        assert lb.driver_rx.stats()["bad_used_id"] == 1
    # every buffer is back in the pool or in the ring at close (Loopback checks nothing leaked)


def test_fuzz_device_avail_rings_and_descriptors_written_by_a_hostile_driver():
    totals = run_fuzzer("device", SEED + 1, SECONDS)
    assert totals["rounds"] > 0 and totals["chains_popped"] > 0
    # the in-order device (one used entry per run of buffers used whole) ran too
    assert totals.get("in_order_episodes", 0) > 0 and totals["in_order_chains_popped"] > 0, totals
    refused = {k for k in totals if k in REFUSALS}
    assert len(refused) >= 6, refused
    # indirect tables were followed, and refused for each reason of their own
    assert totals.get("indirect_chains_popped", 0) > 0, totals
    assert {k for k in totals if k in IND_REFUSALS} == set(IND_REFUSALS), totals


def test_fuzz_device_packed_descriptors_written_by_a_hostile_driver():
    totals = run_fuzzer("device_packed", SEED + 2, SECONDS)
    assert totals["p_rounds"] > 0 and totals["p_chains_popped"] > 0 and totals["p_used_checked"] > 0
    # every kind of bad chain was made, and refused for its reason (a short run may miss the rarest)
    made = {k for k in totals if k.startswith("p_made_") and k != "p_made_good"}
    assert len(made) >= 5, made
    refused = {k[2:] for k in totals if k[2:] in {why for why, _breaks in P_BAD.values()}}
    assert len(refused) >= 5, refused
    assert totals["p_broken_queues"] > 0, totals


def test_fuzz_packed_device_lists_and_indirect_tables_written_by_a_hostile_driver():
    totals = run_fuzzer("device_packed_indirect", SEED + 3, SECONDS / 2)
    assert totals.get("packed_indirect_popped", 0) > 0 and totals.get("packed_direct_popped", 0) > 0, totals
    for why in ("indirect descriptor (not negotiated)", "indirect descriptor chained by NEXT",
                "indirect table length 0 or not a multiple of 16", "indirect table longer than the queue size",
                "indirect table outside the driver's DMA memory", "buffer outside the driver's DMA memory",
                "device-readable descriptor after a device-writable one", "buffer id out of range"):
        assert totals.get(why, 0) > 0, (why, totals)
