"""A pure-Python split-virtqueue loopback: the reference pmd is measured against.

The same loopback as ``pmd.loopback.Loopback`` (driver tx -> device side ->
driver rx, one process, one thread), written the way ixy.py writes its virtio
driver: ring memory is a ``bytearray`` read and written through a
``memoryview`` with ``struct.pack_into`` / ``struct.unpack_from``, every
packet goes through Python loops, and packet bytes move with slice
assignment.

It does the same work as pmd, step for step, so the ratio measures the
language and not the algorithm:

- the Virtio 1.2 split ring layout (2.7) with the legacy 4096-byte alignment
  pmd uses by default: descriptor table, avail ring, used ring;
- driver side: an O(1) free-descriptor chain and a side table of cookies
  (buffer ids), one avail ring entry per buffer, one avail idx store per burst,
  the device's NO_NOTIFY flag read per burst; every used entry is validated
  (id in range, in flight, length within the buffer) before it is followed;
- device side: avail idx and ring read, descriptor chains walked with address
  bounds and ordering checks, the 12-byte virtio-net header written on rx
  (num_buffers = 1), used entries and one used idx store per burst;
- a packet pool of 2 KiB buffers with 64 bytes of headroom and a free stack
  with per-buffer ownership states.

Where a choice had to be made it favours Python, so the ratio is if anything
understated: ``struct.Struct`` objects are compiled once, a descriptor is
written with one ``pack_into`` of its three fields (ixy.py sets each field
with its own call, and scans the whole table for a free descriptor), and
there are no barriers (one thread, one interpreter lock).

    lb = PyLoopback(queue_size=256)
    lb.driver_tx.tx_burst([b"..." * 64, ...])          # copy mode
    lb.step(32)
    n = lb.driver_rx.rx_burst(rows, lengths)           # rows: bytearrays
    ids = lb.pool.alloc(32)                            # zero-copy
    lb.pool.write(ids[0], payload)
    lb.driver_tx.tx_burst_zc(ids, lengths)
    lb.step(32)
    n = lb.driver_rx.rx_burst_zc(ids_out, lengths_out)  # lists, filled in place
"""

from __future__ import annotations

import struct

# ---- Virtio 1.2 constants (2.7.5, 2.7.6, 2.7.8, 5.1.6) ----
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VRING_LEGACY_ALIGN = 4096
HDR_LEN = 12

# struct vring_desc { le64 addr; le32 len; le16 flags; le16 next; }
DESC = struct.Struct("<QIHH")
DESC_WRITE = struct.Struct("<QIH")  # addr, len, flags: what the driver writes (next is ours)
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # struct vring_used_elem { le32 id; le32 len; }
# struct virtio_net_hdr with num_buffers = 1 (what the device writes on receive)
RX_HDR = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)

# used-entry verdicts (as pmd's UsedResult)
USED_OK, USED_BAD_ID, USED_NOT_IN_FLIGHT, USED_BAD_LEN = range(4)
# buffer ownership (as pmd's BufState)
BUF_FREE, BUF_APP, BUF_QUEUE = range(3)


def ring_layout(num: int, align: int = VRING_LEGACY_ALIGN) -> tuple[int, int, int, int]:
    """Offsets of (desc, avail, used) from the ring start, and its total size (2.7)."""
    desc = 0
    avail = 16 * num
    used = (avail + 6 + 2 * num + align - 1) & ~(align - 1)
    total = (used + 6 + 8 * num + align - 1) & ~(align - 1)
    return desc, avail, used, total


class Memory:
    """The 'DMA memory': one bytearray; an address (IOVA) is an offset into it."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.size = size
        self.top = 0

    def alloc(self, nbytes: int, align: int = 64) -> int:
        off = (self.top + align - 1) & ~(align - 1)
        if off + nbytes > self.size:
            raise MemoryError(f"{nbytes} bytes do not fit ({self.size - off} left)")
        self.top = off + nbytes
        return off


class Pool:
    """Fixed-size buffers in ``Memory`` with a LIFO free stack and ownership states."""

    def __init__(self, memory: Memory, n_buffers: int, buffer_size: int = 2048,
                 headroom: int = 64) -> None:
        self.memory = memory
        self.n_buffers = n_buffers
        self.buffer_size = buffer_size
        self.headroom = headroom
        self.data_room = buffer_size - headroom
        self.base = memory.alloc(n_buffers * buffer_size, 4096)
        self.free_stack = list(range(n_buffers - 1, -1, -1))  # top = lowest id
        self.state = bytearray(n_buffers)

    def get(self, new_state: int) -> int:
        if not self.free_stack:
            return -1
        b = self.free_stack.pop()
        self.state[b] = new_state
        return b

    def put(self, b: int) -> None:
        self.state[b] = BUF_FREE
        self.free_stack.append(b)

    def addr(self, b: int) -> int:
        return self.base + b * self.buffer_size

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free_stack):
            raise MemoryError(f"pool exhausted: {n} asked, {len(self.free_stack)} free")
        return [self.get(BUF_APP) for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        for b in ids:
            if self.state[b] != BUF_APP:
                raise ValueError(f"buffer {b} is not the application's")
            self.put(b)

    def data(self, b: int, length: int) -> memoryview:
        """Packet data of buffer ``b`` (a view)."""
        start = self.base + b * self.buffer_size + self.headroom
        return self.memory.mv[start:start + length]

    def write(self, b: int, payload: bytes) -> None:
        start = self.base + b * self.buffer_size + self.headroom
        self.memory.mv[start:start + len(payload)] = payload


class Virtqueue:
    """Driver side of a split virtqueue in ``Memory``."""

    def __init__(self, memory: Memory, size: int) -> None:
        if size == 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"queue size must be a power of two up to 32768, got {size}")
        d, a, u, total = ring_layout(size)
        base = memory.alloc(total, VRING_LEGACY_ALIGN)
        self.mv = memory.mv
        self.size = size
        self.mask = size - 1
        self.desc = base + d
        self.avail = base + a
        self.used = base + u
        self.free_head = 0
        self.num_free = size
        self.next = list(range(1, size + 1))  # free chain, our own copy (never read from the ring)
        self.cookie = [0] * size
        self.writable = [0] * size
        self.ndescs = [0] * size
        self.avail_idx = 0
        self.kicked_avail_idx = 0
        self.last_used_idx = 0
        self.broken = False
        self.n_notify = self.n_notify_suppressed = 0
        self.n_bad_id = self.n_not_in_flight = self.n_bad_len = self.n_bad_used_idx = 0

    def add1(self, addr: int, length: int, device_writes: bool, cookie: int) -> int:
        """One single-descriptor buffer in the next avail slot (not yet published)."""
        if self.num_free == 0:
            return -1
        head = self.free_head
        DESC_WRITE.pack_into(self.mv, self.desc + 16 * head, addr, length,
                             VRING_DESC_F_WRITE if device_writes else 0)
        self.free_head = self.next[head]
        self.num_free -= 1
        self.cookie[head] = cookie
        self.writable[head] = length if device_writes else 0
        self.ndescs[head] = 1
        U16.pack_into(self.mv, self.avail + 4 + 2 * (self.avail_idx & self.mask), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def flush(self) -> None:
        """Publish the avail idx (once per burst); notify only if the device asks."""
        if self.avail_idx == self.kicked_avail_idx:
            return
        U16.pack_into(self.mv, self.avail + 2, self.avail_idx)
        self.kicked_avail_idx = self.avail_idx
        (used_flags,) = U16.unpack_from(self.mv, self.used)
        if used_flags & VRING_USED_F_NO_NOTIFY:
            self.n_notify_suppressed += 1
        else:
            self.n_notify += 1  # the loopback device polls: nothing to ring

    def nused(self) -> int:
        (idx,) = U16.unpack_from(self.mv, self.used + 2)
        n = (idx - self.last_used_idx) & 0xFFFF
        if n > self.size - self.num_free:
            if not self.broken:
                self.n_bad_used_idx += 1
            self.broken = True
            return 0
        return n

    def pop_used(self, check_len: bool = True) -> tuple[int, int, int]:
        """(verdict, head, len) of the next used entry, validated."""
        slot = self.last_used_idx & self.mask
        uid, ln = USED_ELEM.unpack_from(self.mv, self.used + 4 + 8 * slot)
        self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        if uid >= self.size:
            self.n_bad_id += 1
            return USED_BAD_ID, 0, 0
        if self.ndescs[uid] == 0:
            self.n_not_in_flight += 1
            return USED_NOT_IN_FLIGHT, 0, 0
        if check_len and ln > self.writable[uid]:
            self.n_bad_len += 1
            return USED_BAD_LEN, uid, ln
        return USED_OK, uid, ln

    def detach1(self, head: int) -> int:
        self.ndescs[head] = 0
        self.next[head] = self.free_head
        self.free_head = head
        self.num_free += 1
        return self.cookie[head]


class RxQueue:
    """Receive side: each descriptor one pool buffer, header then packet."""

    def __init__(self, vq: Virtqueue, pool: Pool, hdr_len: int = HDR_LEN) -> None:
        self.vq = vq
        self.pool = pool
        self.mv = pool.memory.mv
        self.hdr_len = hdr_len
        self.buf_off = pool.headroom - hdr_len
        self.buf_len = pool.buffer_size - self.buf_off
        self.max_packet_len = self.buf_len - hdr_len
        self.packets = self.bytes = self.dropped = self.no_buffer = 0

    def refill(self) -> int:
        vq, pool = self.vq, self.pool
        added = 0
        while vq.num_free:
            b = pool.get(BUF_QUEUE)
            if b < 0:
                self.no_buffer += 1
                break
            vq.add1(pool.base + b * pool.buffer_size + self.buf_off, self.buf_len, True, b)
            added += 1
        return added

    def fill(self) -> int:
        n = self.refill()
        self.vq.flush()
        return n

    def _harvest(self, rows: list[bytearray] | None, ids: list[int] | None,
                 lengths: list[int], burst: int) -> int:
        vq, pool, mv = self.vq, self.pool, self.mv
        avail = vq.nused()
        if avail > burst:
            avail = burst
        got = 0
        for _ in range(avail):
            r, head, length = vq.pop_used()
            if r == USED_BAD_ID or r == USED_NOT_IN_FLIGHT:
                continue
            b = vq.detach1(head)
            if r == USED_BAD_LEN or length < self.hdr_len:
                self.dropped += 1
                pool.put(b)
                continue
            pkt = length - self.hdr_len
            if rows is not None:
                src = pool.base + b * pool.buffer_size + pool.headroom
                rows[got][:pkt] = mv[src:src + pkt]
                pool.put(b)
            elif ids is not None:
                pool.state[b] = BUF_APP
                ids[got] = b
            lengths[got] = pkt
            self.bytes += pkt
            got += 1
        self.packets += got
        self.refill()
        vq.flush()
        return got

    def rx_burst(self, rows: list[bytearray], lengths: list[int]) -> int:
        """Copy up to ``len(rows)`` packets into ``rows`` (bytearrays of at least
        ``max_packet_len`` bytes); ``lengths[i]`` gets packet i's length."""
        for row in rows:
            if len(row) < self.max_packet_len:
                raise ValueError(f"rows must hold {self.max_packet_len} bytes")
        return self._harvest(rows, None, lengths, len(rows))

    def rx_burst_zc(self, ids: list[int], lengths: list[int]) -> int:
        """Receive up to ``len(ids)`` buffer ids (the data stays in the pool)."""
        return self._harvest(None, ids, lengths, len(ids))


class TxQueue:
    """Transmit side: header in the headroom, then the packet, one descriptor."""

    def __init__(self, vq: Virtqueue, pool: Pool, hdr_len: int = HDR_LEN) -> None:
        self.vq = vq
        self.pool = pool
        self.mv = pool.memory.mv
        self.hdr_len = hdr_len
        self.zero_hdr = bytes(hdr_len)
        self.buf_off = pool.headroom - hdr_len
        self.packets = self.bytes = self.ring_full = 0

    def reclaim(self) -> int:
        vq, pool = self.vq, self.pool
        freed = 0
        for _ in range(vq.nused()):
            r, head, _length = vq.pop_used(False)
            if r == USED_BAD_ID or r == USED_NOT_IN_FLIGHT:
                continue
            pool.put(vq.detach1(head))
            freed += 1
        return freed

    def tx_burst(self, packets: list[bytes]) -> int:
        """Copy each packet (bytes, 1 to the data room long) into a pool buffer and send it."""
        pool, vq, mv = self.pool, self.vq, self.mv
        for i, p in enumerate(packets):
            if not 0 < len(p) <= pool.data_room:
                raise ValueError(f"packets[{i}] is {len(p)} bytes: 1 to {pool.data_room}")
        self.reclaim()
        hdr_len, zero_hdr = self.hdr_len, self.zero_hdr
        sent = 0
        for p in packets:
            if vq.num_free == 0 or not pool.free_stack:
                self.ring_full += 1
                break
            ln = len(p)
            b = pool.get(BUF_QUEUE)
            dst = pool.base + b * pool.buffer_size + self.buf_off
            mv[dst:dst + hdr_len] = zero_hdr
            mv[dst + hdr_len:dst + hdr_len + ln] = p
            vq.add1(dst, hdr_len + ln, False, b)
            self.bytes += ln
            sent += 1
        self.packets += sent
        vq.flush()
        return sent

    def tx_burst_zc(self, ids: list[int], lengths: list[int], count: int | None = None) -> int:
        """Send ``count`` (default all) pool buffers as they are; the application must own them."""
        pool, vq, mv = self.pool, self.vq, self.mv
        n = len(ids) if count is None else count
        for i in range(n):
            b = ids[i]
            err = None
            if not 0 <= b < pool.n_buffers:
                err = ValueError(f"ids[{i}] = {b} does not belong to the pool")
            elif pool.state[b] != BUF_APP:
                err = ValueError(f"ids[{i}] = {b} is not owned by the application")
            elif not 0 < lengths[i] <= pool.data_room:
                err = ValueError(f"lengths[{i}] = {lengths[i]} out of range")
            if err is not None:
                for j in range(i):
                    pool.state[ids[j]] = BUF_APP
                raise err
            pool.state[b] = BUF_QUEUE
        self.reclaim()
        hdr_len, zero_hdr = self.hdr_len, self.zero_hdr
        sent = 0
        for i in range(n):
            if vq.num_free == 0:
                self.ring_full += 1
                break
            b = ids[i]
            dst = pool.base + b * pool.buffer_size + self.buf_off
            mv[dst:dst + hdr_len] = zero_hdr
            vq.add1(dst, hdr_len + lengths[i], False, b)
            self.bytes += lengths[i]
            sent += 1
        for i in range(sent, n):
            pool.state[ids[i]] = BUF_APP
        self.packets += sent
        vq.flush()
        return sent


class DeviceQueue:
    """What a device does with a split ring whose addresses the driver gave it."""

    def __init__(self, memory: Memory, size: int, desc: int, avail: int, used: int) -> None:
        self.mv = memory.mv
        self.mem_size = memory.size
        self.size = size
        self.mask = size - 1
        self.desc = desc
        self.avail = avail
        self.used = used
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.broken = False
        self.head = 0
        self.segs: list[tuple[int, int, int]] = []  # (addr, len, writable)
        self.out_len = self.in_len = 0
        self.n_popped = self.n_bad_desc = self.n_dropped = 0
        self.n_interrupts = self.n_interrupts_suppressed = 0

    def disable_notify(self) -> None:
        U16.pack_into(self.mv, self.used, VRING_USED_F_NO_NOTIFY)

    def pop(self) -> int:
        """Next available chain into ``segs``: 1 done, 0 none, -1 refused."""
        if self.broken:
            return 0
        mv = self.mv
        (avail_idx,) = U16.unpack_from(mv, self.avail + 2)
        if avail_idx == self.last_avail_idx:
            return 0
        if (avail_idx - self.last_avail_idx) & 0xFFFF > self.size:
            self.broken = True
            self.n_bad_desc += 1
            return -1
        (head,) = U16.unpack_from(mv, self.avail + 4 + 2 * (self.last_avail_idx & self.mask))
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head >= self.size:
            self.n_bad_desc += 1
            return -1
        segs = []
        out_len = in_len = 0
        seen_write = False
        i = head
        count = 0
        while True:
            count += 1
            if count > self.size:
                return self._refuse(head)  # loop
            addr, ln, flags, nxt = DESC.unpack_from(mv, self.desc + 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                return self._refuse(head)
            if ln and addr + ln > self.mem_size:  # the 'IOMMU': only driver memory
                return self._refuse(head)
            if flags & VRING_DESC_F_WRITE:
                seen_write = True
                in_len += ln
            elif seen_write:
                return self._refuse(head)  # readable after writable
            else:
                out_len += ln
            segs.append((addr, ln, flags & VRING_DESC_F_WRITE))
            if not flags & VRING_DESC_F_NEXT:
                break
            i = nxt
            if i >= self.size:
                return self._refuse(head)
        self.head = head
        self.segs = segs
        self.out_len = out_len
        self.in_len = in_len
        self.n_popped += 1
        return 1

    def _refuse(self, head: int) -> int:
        self.n_bad_desc += 1
        self.segs = []
        self.push(head, 0)
        return -1

    def unpop(self) -> None:
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
        self.n_popped -= 1
        self.segs = []

    def push(self, head: int, length: int) -> None:
        USED_ELEM.pack_into(self.mv, self.used + 4 + 8 * (self.used_idx & self.mask), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def flush(self) -> None:
        """Publish the used idx; interrupt only if the driver wants it."""
        if self.used_idx == self.signalled_used:
            return
        U16.pack_into(self.mv, self.used + 2, self.used_idx)
        self.signalled_used = self.used_idx
        (avail_flags,) = U16.unpack_from(self.mv, self.avail)
        if avail_flags & VRING_AVAIL_F_NO_INTERRUPT:
            self.n_interrupts_suppressed += 1
        else:
            self.n_interrupts += 1  # nobody to interrupt in the loopback

    def write_in(self, skip: int, src, n: int) -> int:
        """Copy ``n`` bytes of ``src`` (a bytes-like) into the chain's writable part from byte ``skip``."""
        mv = self.mv
        done = 0
        for addr, ln, writable in self.segs:
            if not writable:
                continue
            if skip >= ln:
                skip -= ln
                continue
            take = min(ln - skip, n - done)
            mv[addr + skip:addr + skip + take] = src[done:done + take]
            done += take
            skip = 0
            if done == n:
                break
        return done


def copy_chain(src: DeviceQueue, src_skip: int, dst: DeviceQueue, dst_skip: int, n: int) -> int:
    """Copy ``n`` bytes from src's readable segments into dst's writable ones."""
    mv = src.mv
    done = 0
    for addr, ln, writable in src.segs:
        if writable:
            break
        if src_skip >= ln:
            src_skip -= ln
            continue
        take = min(ln - src_skip, n - done)
        w = dst.write_in(dst_skip + done, mv[addr + src_skip:addr + src_skip + take], take)
        done += w
        src_skip = 0
        if w < take or done == n:
            break
    return done


def loopback(tx: DeviceQueue, rx: DeviceQueue, budget: int, hdr_len: int = HDR_LEN) -> int:
    """Move up to ``budget`` packets from the driver's tx ring to its rx ring (as pmd's)."""
    moved = 0
    hdr = RX_HDR[:hdr_len]
    while moved < budget:
        r = tx.pop()
        if r == 0:
            break
        if r < 0:
            continue
        if tx.out_len < hdr_len:
            tx.n_bad_desc += 1
            tx.push(tx.head, 0)
            continue
        pkt = tx.out_len - hdr_len
        r = rx.pop()
        while r < 0:
            r = rx.pop()
        if r == 0:
            tx.unpop()
            break
        if rx.in_len < hdr_len + pkt:
            rx.unpop()
            tx.n_dropped += 1
            tx.push(tx.head, 0)
            continue
        rx.write_in(0, hdr, hdr_len)
        copy_chain(tx, hdr_len, rx, hdr_len, pkt)
        rx.push(rx.head, hdr_len + pkt)
        tx.push(tx.head, 0)
        moved += 1
    tx.flush()
    rx.flush()
    return moved


class PyLoopback:
    """Driver rx/tx queues and the device side of the same rings, in pure Python.

    Same shape and defaults as ``pmd.loopback.Loopback``.
    """

    def __init__(self, queue_size: int = 256, n_buffers: int | None = None,
                 buffer_size: int = 2048, hdr_len: int = HDR_LEN) -> None:
        if n_buffers is None:
            n_buffers = 4 * queue_size + 512
        ring = ring_layout(queue_size)[3]
        self.memory = Memory(2 * (ring + 4096) + n_buffers * buffer_size + (1 << 16))
        self.pool = Pool(self.memory, n_buffers, buffer_size)
        rx_vq = Virtqueue(self.memory, queue_size)
        tx_vq = Virtqueue(self.memory, queue_size)
        self.driver_rx = RxQueue(rx_vq, self.pool, hdr_len)
        self.driver_tx = TxQueue(tx_vq, self.pool, hdr_len)
        self.device_rx = DeviceQueue(self.memory, queue_size, rx_vq.desc, rx_vq.avail, rx_vq.used)
        self.device_tx = DeviceQueue(self.memory, queue_size, tx_vq.desc, tx_vq.avail, tx_vq.used)
        self.device_rx.disable_notify()
        self.device_tx.disable_notify()
        self.hdr_len = hdr_len
        self.driver_rx.fill()

    def step(self, budget: int = 256) -> int:
        return loopback(self.device_tx, self.device_rx, budget, self.hdr_len)

    def close(self) -> None:
        pass


if __name__ == "__main__":  # a self-check: random packets through the loopback, every byte compared
    import random
    import time

    rng = random.Random(1)
    lb = PyLoopback(256)
    rows = [bytearray(lb.driver_rx.max_packet_len) for _ in range(32)]
    lens = [0] * 32
    total = 0
    t0 = time.perf_counter()
    for _ in range(300):
        pkts = [rng.randbytes(rng.randint(60, 1514)) for _ in range(32)]
        assert lb.driver_tx.tx_burst(pkts) == 32
        assert lb.step(32) == 32
        assert lb.driver_rx.rx_burst(rows, lens) == 32
        for p, row, ln in zip(pkts, rows, lens):
            assert ln == len(p) and row[:ln] == p
        total += 32
    print(f"{total} packets intact in {time.perf_counter() - t0:.2f} s")
