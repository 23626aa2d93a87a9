"""The device side of a virtqueue (Virtio 1.2 device requirements): split (2.7) or packed (2.8).

A device reads the avail ring, walks descriptor chains, moves data, writes
the used ring and decides whether to interrupt; it may ask the driver not to
notify it. A packed queue (``packed=True``) does the same over one ring of
descriptors both sides write (2.8): the same methods, the same meaning, so the
device bursts and the engine do not know which layout a queue has. The built-in software device is built on this, and the tests use
it to move packets through real ring memory in one process: it mirrors the
driver's :mod:`pmd.driver._virtqueue`.

Addresses in descriptors are IOVAs; :class:`pmd.sim._dma.DmaWindows` maps the
ranges the driver made available (DMA_MAP) to local addresses and refuses
anything else. What the device does with the chains is :mod:`pmd.sim._rx`
(serving the driver's receive queues) and :mod:`pmd.sim._tx` (its transmit queues).
"""

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memmove, memset
from posix.unistd cimport usleep, write

from pmd.memory._dma cimport DmaMemory
from pmd.includes.barrier cimport pmd_virtio_mb, pmd_virtio_rmb, pmd_virtio_wmb
from pmd.includes.compiler cimport pmd_likely, pmd_unlikely
from pmd.includes.vring cimport (
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY, vring_avail_bytes, vring_avail_event, vring_desc, vring_desc_bytes,
    vring_load16, vring_load32, vring_load64, vring_need_event, vring_store16, vring_store32,
    vring_used_bytes, vring_used_event, vring_avail, vring_used,
    RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_MASK,
    PVIRTQ_AVAIL_USED, RING_EVENT_WRAP_SHIFT, VIRTQ_DESC_F_AVAIL, pvirtq_desc, pvirtq_desc_bytes,
    pvirtq_desc_is_avail, pvirtq_event_suppress, pvirtq_need_event, pvirtq_position, vring_copy_desc,
)
from pmd.sim._dma cimport DmaWindows

from pmd.errors import DeviceError, QueueStateError

BAD_DESC_NAMES = {
    BAD_NONE: "none",
    BAD_AVAIL_IDX: "avail idx moved by more than the queue size",
    BAD_HEAD: "head index out of range",
    BAD_NEXT: "next index out of range",
    BAD_LOOP: "descriptor chain loops",
    BAD_ADDR: "buffer outside the driver's DMA memory",
    BAD_INDIRECT: "indirect descriptor (not negotiated)",
    BAD_ORDER: "device-readable descriptor after a device-writable one",
    BAD_SHORT: "packet shorter than the virtio-net header",
    BAD_TOO_LONG: "chain longer than 4 GiB",
    BAD_ID: "buffer id out of range",
    BAD_ID_BUSY: "buffer id already in flight",
    BAD_NOT_AVAIL: "descriptor after NEXT not marked available",
    BAD_INDIRECT_LEN: "indirect table length 0 or not a multiple of 16",
    BAD_INDIRECT_TOO_BIG: "indirect table longer than the queue size",
    BAD_INDIRECT_ADDR: "indirect table outside the driver's DMA memory",
    BAD_INDIRECT_NEXT: "indirect descriptor chained by NEXT",
    BAD_NESTED_INDIRECT: "indirect descriptor inside an indirect table",
    BAD_INDIRECT_IDX: "next index outside the indirect table",
    BAD_INDIRECT_LOOP: "descriptor chain in an indirect table loops",
}

# pop_chain's default bound on the bytes it copies out: the largest packet a
# tx chain may carry (64 KiB, GSO's limit) with its header. Callers that know
# better (the control queue) pass their own.
DEFAULT_MAX_READABLE = 65536 + 64


@cython.no_gc_clear   # __dealloc__ unpins `memories`
cdef class DeviceQueue:
    """``DeviceQueue(windows, size, desc_iova, avail_iova, used_iova, event_idx=False, weak_barriers=True, packed=False, in_order=False, indirect=False)``

    The device's view of a queue whose ring addresses the driver gave it.
    Every ``DmaMemory`` behind ``windows`` stays mapped until ``close()``.

    ``packed=True`` (VIRTIO_F_RING_PACKED, 2.8): ``desc_iova`` is the
    descriptor ring (16*size bytes, aligned 16), ``avail_iova`` the driver
    event suppression structure and ``used_iova`` the device's (4 bytes each,
    aligned 4, 2.8.10.1); ``size`` need not be a power of two.

    ``in_order=True`` (VIRTIO_F_IN_ORDER negotiated, 2.7.9, 2.8.9): buffers are used in
    the order they were made available (this device always does), and a run of them
    used completely (every transmit buffer) is returned with one used entry.

    ``indirect=True`` (VIRTIO_F_INDIRECT_DESC negotiated): a descriptor with
    INDIRECT is followed into its table (2.7.5.3, 2.8.7), every entry checked
    as a ring descriptor is; without it INDIRECT is refused.
    """

    def __cinit__(self):
        self.segs = NULL
        self.id_count = NULL
        self.irq_fd = -1
        self.memories = []

    def __init__(self, DmaWindows windows not None, uint32_t size, uint64_t desc_iova,
                 uint64_t avail_iova, uint64_t used_iova, *, bint event_idx=False,
                 bint weak_barriers=True, bint packed=False, bint in_order=False,
                 bint indirect=False):
        self.indirect = indirect
        if packed:
            self._init_packed(windows, size, desc_iova, avail_iova, used_iova)
        else:
            self._init_split(windows, size, desc_iova, avail_iova, used_iova)
        self.windows = windows
        self.size = size
        self.event_idx = event_idx
        self.weak_barriers = weak_barriers
        self.in_order = in_order
        self.segs = <Seg *>malloc(sizeof(Seg) * size)
        if self.segs == NULL:
            raise MemoryError()
        # The rings (and the buffers of a popped chain) are raw pointers into
        # the driver's memory: keep it mapped while this queue may use them.
        for owner in windows.owners:
            if isinstance(owner, DmaMemory):
                (<DmaMemory>owner).pin()
                self.memories.append(owner)
        if self.memories:
            self.mem0 = self.memories[0]

    cdef int _init_split(self, DmaWindows windows, uint32_t size, uint64_t desc_iova, uint64_t avail_iova,
                         uint64_t used_iova) except -1:
        if size == 0 or size > 32768 or size & (size - 1):
            raise ValueError(f"queue size must be a power of two up to 32768, got {size}")
        # Each area must lie in driver memory and be aligned as 2.7 requires.
        desc = windows.translate(desc_iova, vring_desc_bytes(size))
        avail = windows.translate(avail_iova, vring_avail_bytes(size))
        used = windows.translate(used_iova, vring_used_bytes(size))
        if desc == NULL or avail == NULL or used == NULL:
            raise DeviceError("ring addresses given by the driver are outside its DMA memory: "
                              f"desc={desc_iova:#x} avail={avail_iova:#x} used={used_iova:#x}")
        if desc_iova % 16 or avail_iova % 2 or used_iova % 4:
            raise DeviceError("ring addresses are misaligned (2.7: desc 16, avail 2, used 4)")
        self.mask = size - 1
        self.vr.num = size
        self.vr.desc = <vring_desc *>desc
        self.vr.avail = <vring_avail *>avail
        self.vr.used = <vring_used *>used
        # The device starts where the ring is now (0 on a fresh queue).
        self.used_idx = vring_load16(&self.vr.used.idx)
        self.signalled_used = self.used_idx
        self.last_avail_idx = self.used_idx
        self.shadow_avail_idx = self.used_idx
        return 0

    cdef int _init_packed(self, DmaWindows windows, uint32_t size, uint64_t desc_iova, uint64_t driver_iova,
                          uint64_t device_iova) except -1:
        # 2.8: up to 2^15 entries, any number of them (PCI does not ask for a power of two).
        if size == 0 or size > 32768:
            raise ValueError(f"packed queue size must be 1 to 32768, got {size}")
        desc = windows.translate(desc_iova, pvirtq_desc_bytes(size))
        drv = windows.translate(driver_iova, sizeof(pvirtq_event_suppress))
        dev = windows.translate(device_iova, sizeof(pvirtq_event_suppress))
        if desc == NULL or drv == NULL or dev == NULL:
            raise DeviceError("ring addresses given by the driver are outside its DMA memory: "
                              f"desc={desc_iova:#x} driver={driver_iova:#x} device={device_iova:#x}")
        if desc_iova % 16 or driver_iova % 4 or device_iova % 4:
            raise DeviceError("ring addresses are misaligned (2.8.10.1: descriptors 16, event suppression 4)")
        self.id_count = <uint16_t *>malloc(sizeof(uint16_t) * size)
        if self.id_count == NULL:
            raise MemoryError()
        memset(self.id_count, 0, sizeof(uint16_t) * size)
        self.packed = True
        self.pdesc = <pvirtq_desc *>desc
        self.driver_event = <pvirtq_event_suppress *>drv
        self.device_event = <pvirtq_event_suppress *>dev
        # 2.8.1: both wrap counters start at 1, at descriptor 0. A packed ring
        # keeps no index in memory: the device always starts at the beginning.
        self.avail_pos = 0
        self.avail_wrap = True
        self.avail_want = VIRTQ_DESC_F_AVAIL
        self.used_pos = 0
        self.used_wrap = True
        self.used_mark = PVIRTQ_AVAIL_USED
        self.signalled_pos = 0
        return 0

    def __dealloc__(self):
        free(self.segs)
        free(self.id_count)
        self._unpin()

    cdef void _unpin(self) noexcept:
        for m in self.memories:
            (<DmaMemory>m).unpin()
        self.memories = []
        self.mem0 = None

    cdef int check(self) except -1:
        cdef DmaMemory mem
        if self.is_closed:
            raise QueueStateError("device queue is closed; create it again")
        if self.mem0 is not None:
            mem = <DmaMemory>self.mem0
            if mem.closing or mem.base == NULL or len(self.memories) > 1:
                for m in self.memories:
                    mem = <DmaMemory>m
                    if mem.closing or mem.base == NULL:
                        raise QueueStateError(f"device queue: the driver's DMA memory {mem.name!r} is closed")
        return 0

    cdef int enter(self) except -1:
        """check(), then busy until leave(): close() waits for a burst in progress."""
        self.check()
        self.busy += 1
        return 0

    cdef void leave(self) noexcept:
        self.busy -= 1

    def close(self):
        """Stop using the queue: later calls raise QueueStateError. Waits for a
        device burst another thread is running now, then lets the memory go."""
        self.is_closed = True
        while self.busy:
            with nogil:
                usleep(50)
        self._unpin()

    @property
    def closed(self):
        """True once :meth:`close` ran."""
        return self.is_closed

    # ---- the data path (nogil) ----

    cdef int _pop_general(self) noexcept nogil:
        """pop() (_virtqueue.pxd) for every chain its inline path does not take."""
        if self.packed:
            return self._pop_packed()
        if pmd_unlikely(self.broken):
            return 0
        cdef uint16_t avail_idx
        if self.shadow_avail_idx == self.last_avail_idx:
            # Caught up with what we saw: look at the driver's index again
            # (once per burst, not once per chain, as DPDK's vhost does).
            avail_idx = vring_load16(&self.vr.avail.idx)
            if avail_idx == self.last_avail_idx:
                return 0
            if pmd_unlikely(<uint16_t>(avail_idx - self.last_avail_idx) > self.size):
                self.broken = True
                self._bad(BAD_AVAIL_IDX)
                return -1
            # Read ring entries only after seeing the index that covers them (2.7.13.3).
            pmd_virtio_rmb(self.weak_barriers)
            self.shadow_avail_idx = avail_idx
        cdef uint16_t head = vring_load16(&self.vr.avail.ring[self.last_avail_idx & self.mask])
        self.last_avail_idx += 1
        if pmd_unlikely(head >= self.size):
            self._bad(BAD_HEAD)
            return -1
        cdef uint16_t i = head
        cdef uint32_t count = 0
        cdef uint64_t addr
        cdef uint32_t ln
        cdef uint16_t flags
        cdef char *p
        cdef int why
        cdef bint seen_write = False
        cdef vring_desc *d = &self.vr.desc[head]
        cdef uint64_t out_len = 0, in_len = 0   # up to N descriptors of 4 GiB: wider than 32 bits
        self.head = head
        flags = vring_load16(&d.flags)
        if pmd_likely((flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT)) == 0):
            # A chain of one descriptor (what a driver posts for a small frame, 2.7.5):
            # the same checks as the walk below, without its loop and sums.
            addr = vring_load64(&d.addr)
            ln = vring_load32(&d.len)
            p = NULL
            if ln != 0:
                p = self.windows.translate(addr, ln)
                if pmd_unlikely(p == NULL):
                    return self._refuse(head, BAD_ADDR)
            return self._popped_one(p, ln, flags)
        self.nsegs = 0
        self.out_len = 0
        self.in_len = 0
        while True:
            count += 1
            if pmd_unlikely(count > self.size):
                return self._refuse(head, BAD_LOOP)
            d = &self.vr.desc[i]
            addr = vring_load64(&d.addr)
            ln = vring_load32(&d.len)
            flags = vring_load16(&d.flags)
            if pmd_unlikely(flags & VRING_DESC_F_INDIRECT):
                # 2.7.5.3.2: direct descriptors, then one INDIRECT that ends the chain
                why = self._walk_table(addr, ln, flags, &seen_write, &out_len, &in_len)
                if pmd_unlikely(why != BAD_NONE):
                    return self._refuse(head, why)
                break
            if ln == 0:
                p = NULL
            else:
                p = self.windows.translate(addr, ln)
                if pmd_unlikely(p == NULL):
                    return self._refuse(head, BAD_ADDR)
            if flags & VRING_DESC_F_WRITE:
                seen_write = True
                in_len += ln
            elif pmd_unlikely(seen_write):
                return self._refuse(head, BAD_ORDER)
            else:
                out_len += ln
            if pmd_unlikely((out_len | in_len) >> 32):
                return self._refuse(head, BAD_TOO_LONG)
            self.segs[self.nsegs].ptr = p
            self.segs[self.nsegs].len = ln
            self.segs[self.nsegs].write = (flags & VRING_DESC_F_WRITE) != 0
            self.nsegs += 1
            if not (flags & VRING_DESC_F_NEXT):
                break
            i = vring_load16(&d.next)
            if pmd_unlikely(i >= self.size):
                return self._refuse(head, BAD_NEXT)
        self.out_len = <uint32_t>out_len
        self.in_len = <uint32_t>in_len
        self.n_popped += 1
        return 1

    cdef int _refuse(self, uint16_t head, int why) noexcept nogil:
        self._bad(why)
        self.nsegs = 0
        self.out_len = 0
        self.in_len = 0
        if self.in_order:
            self._push_in_order(head, 0, False)   # nothing was written: never "used completely"
        else:
            self.push(head, 0)
        return -1

    cdef int _add_seg(self, uint64_t addr, uint32_t ln, bint write, bint *seen_write,
                      uint64_t *out_len, uint64_t *in_len) noexcept nogil:
        """One buffer of an indirect table, checked as a ring descriptor is (inside
        a DMA window, readable before writable, 2.7.4.2 and 2.8.18, the chain within
        4 GiB) and appended to ``segs``: BAD_NONE, or why not."""
        cdef char *p = NULL
        if ln != 0:
            p = self.windows.translate(addr, ln)
            if pmd_unlikely(p == NULL):
                return BAD_ADDR
        if write:
            seen_write[0] = True
            in_len[0] += ln
        elif pmd_unlikely(seen_write[0]):
            return BAD_ORDER
        else:
            out_len[0] += ln
        if pmd_unlikely((out_len[0] | in_len[0]) >> 32):
            return BAD_TOO_LONG
        self.segs[self.nsegs].ptr = p
        self.segs[self.nsegs].len = ln
        self.segs[self.nsegs].write = write
        self.nsegs += 1
        return BAD_NONE

    cdef int _walk_table(self, uint64_t addr, uint32_t ln, uint16_t flags, bint *seen_write,
                         uint64_t *out_len, uint64_t *in_len) noexcept nogil:
        """Follow an INDIRECT descriptor (``addr``, ``ln``, ``flags`` as read) into its
        table and append the table's buffers to ``segs``: BAD_NONE, or why not.

        The table is ``ln / 16`` descriptors (2.7.5.3): ``ln`` a nonzero multiple of
        16, no more entries than the queue has (with the chain's descriptors before
        it, 2.7.5.3.1), all of it inside one DMA window, each entry copied out once.
        The WRITE flag of the descriptor itself is ignored (2.7.5.3.2, 2.8.7).
        Split: entry 0 first, then by ``next``, each index inside the table and the
        walk no longer than the table (a loop); INDIRECT inside it is refused
        (2.7.5.3.1). Packed: the entries one after another; only their WRITE flag
        counts, the other flags and the id are reserved and ignored (2.8.7).
        """
        cdef uint32_t n, k, i = 0, count = 0
        cdef const char *table
        cdef vring_desc e
        cdef pvirtq_desc pe
        cdef int why
        if pmd_unlikely(not self.indirect):
            return BAD_INDIRECT
        if pmd_unlikely(flags & VRING_DESC_F_NEXT):
            return BAD_INDIRECT_NEXT
        if pmd_unlikely(ln == 0 or ln & 15):
            return BAD_INDIRECT_LEN
        n = ln >> 4
        if pmd_unlikely(n > self.size - self.nsegs):
            return BAD_INDIRECT_TOO_BIG
        table = self.windows.translate(addr, ln)
        if pmd_unlikely(table == NULL):
            return BAD_INDIRECT_ADDR
        if self.packed:
            for k in range(n):
                vring_copy_desc(&pe, table, k)
                why = self._add_seg(pe.addr, pe.len, (pe.flags & VRING_DESC_F_WRITE) != 0,
                                    seen_write, out_len, in_len)
                if pmd_unlikely(why != BAD_NONE):
                    return why
            return BAD_NONE
        while True:
            count += 1
            if pmd_unlikely(count > n):
                return BAD_INDIRECT_LOOP
            vring_copy_desc(&e, table, i)
            if pmd_unlikely(e.flags & VRING_DESC_F_INDIRECT):
                return BAD_NESTED_INDIRECT
            why = self._add_seg(e.addr, e.len, (e.flags & VRING_DESC_F_WRITE) != 0, seen_write, out_len, in_len)
            if pmd_unlikely(why != BAD_NONE):
                return why
            if not (e.flags & VRING_DESC_F_NEXT):
                return BAD_NONE
            i = e.next
            if pmd_unlikely(i >= n):
                return BAD_INDIRECT_IDX

    cdef void _bad(self, int why) noexcept nogil:
        self.n_bad_desc += 1
        self.last_bad = why

    cdef uint16_t pending(self) noexcept nogil:
        """Chains available and not yet popped (0 when the index is implausible)."""
        if self.packed:
            return self._pending_packed()
        cdef uint16_t n = vring_load16(&self.vr.avail.idx) - self.last_avail_idx
        return 0 if n > self.size else n

    cdef void unpop(self) noexcept nogil:
        """Give the chain just popped back to the avail ring (no room to use it now)."""
        cdef uint16_t n
        if self.packed:
            # back over the chain's descriptors, counted at pop (2.8.6)
            n = self.id_count[self.head]
            if self.avail_pos < n:
                self.avail_pos += <uint16_t>(self.size - n)
                self._flip_avail()
            else:
                self.avail_pos -= n
            self.id_count[self.head] = 0
            self.n_popped -= 1
            self.nsegs = 0
            return
        self.last_avail_idx -= 1
        self.n_popped -= 1
        self.nsegs = 0

    cdef void _push_general(self, uint16_t head, uint32_t length) noexcept nogil:
        """push() (_virtqueue.pxd) on a packed ring or with VIRTIO_F_IN_ORDER."""
        cdef uint16_t n = 1
        cdef bint whole
        if self.in_order:
            # the chain just popped, used whole (a transmit chain: nothing to write), joins
            # the open batch; one not used whole with no batch open is a batch of its own
            # and written as it is, below
            whole = head == self.head and length == self.in_len
            if whole or self.io_n:
                if self.packed:
                    self._push_in_order(head, length, whole)
                    return
                # split, inline: the batch's one entry is written when it closes
                self.io_n += 1
                self.io_id = head
                self.io_len = length
                if not whole or self.io_n == self.size:
                    self._io_close()
                return
        if self.packed:
            # The chain's length was kept at pop: skip that many slots (2.8.6).
            if pmd_likely(head < self.size):
                n = self.id_count[head]
                self.id_count[head] = 0
                if pmd_unlikely(n == 0):
                    n = 1           # not in flight: a bug of ours; keep the ring moving
            self._push_packed(head, length, n)
            return
        cdef uint16_t slot = self.used_idx & self.mask
        vring_store32(&self.vr.used.ring[slot].id, head)
        vring_store32(&self.vr.used.ring[slot].len, length)
        self.used_idx += 1
        self.n_used_entries += 1

    cdef void publish(self) noexcept nogil:
        """Entries first, then the index that shows them (2.7.8.2 device requirements)."""
        if self.io_n:
            self._io_close()
        if self.packed:
            self._publish_packed()
            return
        pmd_virtio_wmb(self.weak_barriers)
        vring_store16(&self.vr.used.idx, self.used_idx)

    cdef bint need_interrupt(self) noexcept nogil:
        """Does the driver want an interrupt for what was published since the last decision?

        Full barrier: the used idx store must be visible before we read the
        driver's suppression state (2.7.7.2).
        """
        if self.packed:
            return self._need_interrupt_packed()
        cdef uint16_t old = self.signalled_used
        cdef uint16_t new = self.used_idx
        if new == old:
            return False
        pmd_virtio_mb(self.weak_barriers)
        self.signalled_used = new
        if self.event_idx:
            return vring_need_event(vring_load16(vring_used_event(&self.vr)), new, old)
        return not (vring_load16(&self.vr.avail.flags) & VRING_AVAIL_F_NO_INTERRUPT)

    cdef void interrupt(self) noexcept nogil:
        cdef uint64_t one = 1
        self.n_interrupts += 1
        if self.irq_fd >= 0:
            write(self.irq_fd, &one, 8)

    cdef void flush(self) noexcept nogil:
        if self.io_n:
            self._io_close()
        if self.packed:
            if self.batch_n == 0:
                return
        elif self.used_idx == vring_load16(&self.vr.used.idx):
            return
        self.publish()
        if self.need_interrupt():
            self.interrupt()
        else:
            self.n_interrupts_suppressed += 1

    cdef uint32_t write_in(self, uint32_t skip, const char *src, uint32_t n) noexcept nogil:
        """Copy ``n`` bytes into the chain's writable part, from byte ``skip`` of it.
        Returns bytes written (less than n only if the chain is too small)."""
        cdef uint16_t k
        cdef uint32_t done = 0, take
        cdef Seg *s
        for k in range(self.nsegs):
            s = &self.segs[k]
            if not s.write:
                continue
            if skip >= s.len:
                skip -= s.len
                continue
            take = s.len - skip
            if take > n - done:
                take = n - done
            if src == NULL:
                memset(s.ptr + skip, 0, take)
            else:
                # memmove: the source may be driver memory too (loopback), and
                # the driver may make its buffers overlap.
                memmove(s.ptr + skip, src + done, take)
            done += take
            skip = 0
            if done == n:
                break
        return done

    cdef uint32_t read_out(self, uint32_t skip, char *dst, uint32_t n) noexcept nogil:
        """Copy ``n`` bytes out of the chain's readable part, from byte ``skip`` of it."""
        cdef uint16_t k
        cdef uint32_t done = 0, take
        cdef Seg *s
        for k in range(self.nsegs):
            s = &self.segs[k]
            if s.write:
                break
            if skip >= s.len:
                skip -= s.len
                continue
            take = s.len - skip
            if take > n - done:
                take = n - done
            memmove(dst + done, s.ptr + skip, take)   # dst may overlap: see write_in
            done += take
            skip = 0
            if done == n:
                break
        return done

    # ---- the packed ring's data path (2.8) ----

    cdef int _pop_packed(self) noexcept nogil:
        """pop() for a packed ring: the chain starting at ``avail_pos`` (a list of one
        descriptor that passes every check is taken by the inline pop() first).

        Its descriptors are consecutive (wrapping at the ring's end, which
        flips the wrap counter), linked by NEXT; the buffer id is in the last
        one (2.8.6). Every field of every descriptor is read once. A refused
        chain is still walked to its end, to learn its id and length: with a
        valid id it goes back to the driver at once with length 0. A chain
        whose end cannot be found (a loop, or NEXT into a descriptor not made
        available) leaves nowhere to resume: the queue is broken until reset.
        """
        if pmd_unlikely(self.broken):
            return 0
        cdef uint16_t pos = self.avail_pos
        cdef bint wrap = self.avail_wrap
        cdef pvirtq_desc *d = &self.pdesc[pos]
        cdef uint16_t flags = vring_load16(&d.flags)
        if not pvirtq_desc_is_avail(flags, wrap):
            return 0
        # The driver writes the first descriptor's flags last, after a write
        # barrier (2.8.6, 2.8.21.1): read the chain only after seeing them.
        pmd_virtio_rmb(self.weak_barriers)
        cdef uint32_t count = 0
        cdef int why = BAD_NONE
        cdef uint64_t addr
        cdef uint32_t ln
        cdef uint16_t id
        cdef char *p
        cdef bint seen_write = False
        cdef uint64_t out_len = 0, in_len = 0   # up to N descriptors of 4 GiB: wider than 32 bits
        self.nsegs = 0
        self.out_len = 0
        self.in_len = 0
        while True:
            count += 1
            if count > 1:
                flags = vring_load16(&d.flags)
                if pmd_unlikely(not pvirtq_desc_is_avail(flags, wrap)):
                    # 2.8.6: every descriptor of a list is marked available, not just the first.
                    self.nsegs = 0
                    self.broken = True
                    self._bad(BAD_NOT_AVAIL)
                    return -1
            if pmd_likely(why == BAD_NONE):
                addr = vring_load64(&d.addr)
                ln = vring_load32(&d.len)
                p = NULL
                if pmd_unlikely(flags & VRING_DESC_F_INDIRECT):
                    if not self.indirect:
                        why = BAD_INDIRECT
                    elif count > 1:
                        why = BAD_INDIRECT_NEXT     # 2.8.19: never in a list linked by NEXT
                    else:
                        why = self._walk_table(addr, ln, flags, &seen_write, &out_len, &in_len)
                elif ln != 0:
                    p = self.windows.translate(addr, ln)
                    if pmd_unlikely(p == NULL):
                        why = BAD_ADDR
                if why == BAD_NONE and not (flags & VRING_DESC_F_INDIRECT):
                    if flags & VRING_DESC_F_WRITE:
                        seen_write = True
                        in_len += ln
                    elif pmd_unlikely(seen_write):
                        why = BAD_ORDER
                    else:
                        out_len += ln
                    if pmd_unlikely((out_len | in_len) >> 32):
                        why = BAD_TOO_LONG
                if why == BAD_NONE and not (flags & VRING_DESC_F_INDIRECT):
                    self.segs[self.nsegs].ptr = p
                    self.segs[self.nsegs].len = ln
                    self.segs[self.nsegs].write = (flags & VRING_DESC_F_WRITE) != 0
                    self.nsegs += 1
            if not (flags & VRING_DESC_F_NEXT):
                break
            if pmd_unlikely(count == self.size):
                # 2.8.17: no list is longer than the queue (NEXT all the way round).
                self.nsegs = 0
                self.broken = True
                self._bad(BAD_LOOP)
                return -1
            pos += 1
            if pos == self.size:
                pos = 0
                wrap = not wrap
            d = &self.pdesc[pos]
        id = vring_load16(&d.id)
        # The chain is taken, whatever its id: the next one starts after it.
        pos += 1
        if pos == self.size:
            pos = 0
            wrap = not wrap
        self.avail_pos = pos
        if wrap != self.avail_wrap:
            self._flip_avail()
        if pmd_unlikely(id >= self.size):
            self.nsegs = 0
            self._bad(BAD_ID)
            return -1
        if pmd_unlikely(self.id_count[id] != 0):
            # Two chains in flight under one id: a used descriptor could not
            # say which one it returns, so this one is not returned at all.
            self.nsegs = 0
            self._bad(BAD_ID_BUSY)
            return -1
        self.id_count[id] = <uint16_t>count
        self.head = id
        if pmd_unlikely(why != BAD_NONE):
            return self._refuse(id, why)
        self.out_len = <uint32_t>out_len
        self.in_len = <uint32_t>in_len
        self.n_popped += 1
        return 1

    cdef uint16_t _pending_packed(self) noexcept nogil:
        """Whole chains available from ``avail_pos`` on: descriptors marked
        available, counted where one ends (no NEXT); at most a ring's worth."""
        cdef uint16_t pos = self.avail_pos
        cdef bint wrap = self.avail_wrap
        cdef uint16_t flags, n = 0
        cdef uint32_t k
        for k in range(self.size):
            flags = vring_load16(&self.pdesc[pos].flags)
            if not pvirtq_desc_is_avail(flags, wrap):
                break
            if not (flags & VRING_DESC_F_NEXT):
                n += 1
            pos += 1
            if pos == self.size:
                pos = 0
                wrap = not wrap
        return n

    cdef void _push_in_order(self, uint16_t head, uint32_t length, bint whole) noexcept nogil:
        """push() with VIRTIO_F_IN_ORDER: the buffer joins the open batch; a buffer not
        used whole (``whole``: every writable byte written, or none to write) closes it,
        since only the batch's last buffer has its length said (2.7.9: the skipped ones
        were used completely)."""
        cdef uint16_t n = 1
        if self.packed and pmd_likely(head < self.size):
            n = self.id_count[head]
            self.id_count[head] = 0
            if pmd_unlikely(n == 0):
                n = 1           # not in flight: a bug of ours; keep the ring moving
        self.io_n += 1
        self.io_id = head
        self.io_len = length
        self.io_skip += n
        if not whole or self.io_skip >= self.size:
            self._io_close()

    cdef void _io_close(self) noexcept nogil:
        """Write the open batch's one used entry: at its first buffer's place, the id and
        length of its last; the used index (split) or position (packed) moves past all
        of it (2.7.9, 2.8.9)."""
        cdef uint16_t slot
        if self.packed:
            self._push_packed(self.io_id, self.io_len, <uint16_t>self.io_skip)
        else:
            slot = self.used_idx & self.mask
            vring_store32(&self.vr.used.ring[slot].id, self.io_id)
            vring_store32(&self.vr.used.ring[slot].len, self.io_len)
            self.used_idx += self.io_n
            self.n_used_entries += 1
        self.io_n = 0
        self.io_skip = 0

    cdef void _publish_packed(self) noexcept nogil:
        """Show the batch: everything written so far, a write barrier, then the
        first descriptor's flags. The driver polls only that one (2.8.2), and
        reads a descriptor's id and len after its flags; we change none after
        its USED bit (2.8.15). One barrier per burst, as the split ring's one
        index store."""
        if self.batch_n == 0:
            return
        pmd_virtio_wmb(self.weak_barriers)
        vring_store16(&self.pdesc[self.batch_first].flags, self.batch_flags)
        self.batch_n = 0

    cdef bint _need_interrupt_packed(self) noexcept nogil:
        """need_interrupt() from the driver event suppression structure (2.8.10, 2.8.14).

        Full barrier: the used flags must be visible before we read the
        driver's suppression state, or an interrupt it asked for is lost.
        DESC counts only with EVENT_IDX; a reserved value (3), or DESC without
        it, is taken as ENABLE: an interrupt too many rather than one lost.
        """
        cdef uint32_t old = self.signalled_pos
        cdef uint32_t new = pvirtq_position(self.size, self.used_pos, self.used_wrap)
        if new == old:
            return False
        pmd_virtio_mb(self.weak_barriers)
        self.signalled_pos = new
        # off_wrap and flags in one 32-bit load (the structure is 4 bytes, aligned 4):
        # a pair the driver wrote together, never a new flags with an old offset.
        cdef uint32_t ev = vring_load32(<uint32_t *>self.driver_event)
        cdef uint16_t flags = (ev >> 16) & RING_EVENT_FLAGS_MASK
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            return pvirtq_need_event(self.size, <uint16_t>ev, new, old)
        return True

    # ---- control and Python access (tests, the built-in device) ----

    def set_interrupt_eventfd(self, int fd):
        """Interrupt the driver by writing this eventfd (an MSI-X vector); -1 for none."""
        self.irq_fd = fd

    def disable_notify(self):
        """Ask the driver not to notify (we poll): NO_NOTIFY, or with EVENT_IDX
        an avail_event the driver will not pass (the flag must stay 0, 2.7.10.1).
        Packed: RING_EVENT_FLAGS_DISABLE in the device event suppression structure (2.8.10)."""
        self.check()
        if self.packed:
            vring_store16(&self.device_event.flags, RING_EVENT_FLAGS_DISABLE)
        elif self.event_idx:
            vring_store16(vring_avail_event(&self.vr), <uint16_t>(self.last_avail_idx - 1))
        else:
            self.used_flags |= VRING_USED_F_NO_NOTIFY
            vring_store16(&self.vr.used.flags, self.used_flags)

    def enable_notify(self):
        """Ask for a notification when the next buffer is made available.
        Packed: RING_EVENT_FLAGS_ENABLE, or with EVENT_IDX RING_EVENT_FLAGS_DESC
        at the next descriptor we will read (off_wrap and flags in one 32-bit
        store: the driver never reads the new flags with the old offset)."""
        self.check()
        cdef uint32_t off_wrap
        if self.packed:
            if self.event_idx:
                off_wrap = self.avail_pos | (<uint32_t>self.avail_wrap << RING_EVENT_WRAP_SHIFT)
                vring_store32(<uint32_t *>self.device_event, off_wrap | (<uint32_t>RING_EVENT_FLAGS_DESC << 16))
            else:
                vring_store16(&self.device_event.flags, RING_EVENT_FLAGS_ENABLE)
        elif self.event_idx:
            vring_store16(vring_avail_event(&self.vr), self.last_avail_idx)
        else:
            self.used_flags &= ~VRING_USED_F_NO_NOTIFY
            vring_store16(&self.vr.used.flags, self.used_flags)
        pmd_virtio_mb(self.weak_barriers)

    def pop_chain(self, uint32_t max_readable=DEFAULT_MAX_READABLE):
        """Pop one chain for Python: ``(head, readable_bytes, writable_capacity)``,
        ``None`` when nothing is available. A refused chain raises DeviceError
        (it was counted, and returned to the driver when its head was valid).

        The readable bytes are copied out only up to ``max_readable``: the
        driver chooses the descriptor lengths, so a chain with more comes back
        as ``(head, None, writable_capacity)``, counted (``too_long``) and
        copied nowhere: the caller answers it (an error status, say) with
        ``complete``."""
        self.check()
        r = self.pop()
        if r == 0:
            return None
        self.pop_generation = self.windows.generation
        if r < 0:
            raise DeviceError(f"device queue: refused a chain: {BAD_DESC_NAMES[self.last_bad]}")
        if self.out_len > max_readable:
            self.n_too_long += 1
            return self.head, None, self.in_len
        out = bytearray(self.out_len)
        cdef char *p = out
        self.read_out(0, p, self.out_len)
        return self.head, bytes(out), self.in_len

    def complete(self, uint16_t head, data=b""):
        """Write ``data`` into the writable part of the chain popped last (``head``)
        and push a used entry for it with the data's length (not yet published).
        With no data, any head may be completed (length 0); on a packed ring,
        any buffer id in flight (popped and not yet completed)."""
        self.check()
        if self.packed and (head >= self.size or self.id_count[head] == 0):
            raise ValueError(f"complete({head}): buffer id {head} is not in flight on this packed queue")
        cdef const unsigned char[:] v = data
        if len(data):
            if self.nsegs == 0 or head != self.head:
                raise ValueError(f"complete({head}) with data: the chain popped last is "
                                 f"{self.head if self.nsegs else 'none'}; write data only into that one")
            if self.pop_generation != self.windows.generation:
                raise QueueStateError("the DMA windows changed since the chain was popped; "
                                      "its buffers may be gone: complete it without data")
        if len(data) > self.in_len:
            raise ValueError(f"{len(data)} bytes do not fit the chain's {self.in_len} writable bytes")
        if len(data):
            self.write_in(0, <const char *>&v[0], <uint32_t>len(data))
        self.push(head, <uint32_t>len(data))

    def push_raw(self, uint32_t id, uint32_t length, *, skip=None):
        """Write an arbitrary used entry (tests of the driver's validation).

        Packed: a used descriptor with this id (at most 0xFFFF) and len at the
        next used position, advanced by ``skip`` slots (default 1), in flight
        or not; it is published with the others (``publish_used``). In order, a run of
        buffers pushed before it gets its used entry first."""
        self.check()
        cdef uint32_t n
        if self.io_n:
            self._io_close()
        if self.packed:
            n = 1 if skip is None else skip
            if id > 0xFFFF or not 1 <= n <= self.size:
                raise ValueError(f"packed used descriptor: id {id} must fit 16 bits and skip {n} "
                                 f"be 1 to {self.size}")
            self._push_packed(<uint16_t>id, length, <uint16_t>n)
            return
        if skip is not None:
            raise ValueError("skip is for packed queues: a split used entry takes one slot")
        cdef uint16_t slot = self.used_idx & self.mask
        vring_store32(&self.vr.used.ring[slot].id, id)
        vring_store32(&self.vr.used.ring[slot].len, length)
        self.used_idx += 1

    def set_used_idx(self, uint16_t idx):
        """Publish an arbitrary used index (tests of the driver's validation).
        A packed ring has no used index: QueueStateError (use push_raw)."""
        self.check()
        if self.packed:
            raise QueueStateError("a packed queue has no used index (2.8): write used descriptors "
                                  "with push_raw(id, length, skip=...) and publish_used()")
        self.used_idx = idx
        self.publish()

    def publish_used(self):
        """Publish pushed entries and interrupt if the driver wants it. Returns True if interrupted."""
        self.check()
        cdef uint64_t before = self.n_interrupts
        self.flush()
        return self.n_interrupts != before

    @property
    def avail_pending(self):
        """Chains the driver has made available and we have not popped."""
        self.check()
        if self.packed:
            return self._pending_packed()
        return <uint16_t>(vring_load16(&self.vr.avail.idx) - self.last_avail_idx)

    @property
    def next_avail_idx(self):
        """Split: the next avail ring index (free-running). Packed: the next
        descriptor to read as ``offset | wrap_counter << 15`` (2.8.14's off_wrap)."""
        if self.packed:
            return self.avail_pos | (<uint16_t>self.avail_wrap << RING_EVENT_WRAP_SHIFT)
        return self.last_avail_idx

    @property
    def next_used_idx(self):
        """Split: the next used ring index (free-running). Packed: where the next
        used descriptor goes, as ``offset | wrap_counter << 15``."""
        if self.packed:
            return self.used_pos | (<uint16_t>self.used_wrap << RING_EVENT_WRAP_SHIFT)
        return self.used_idx

    @property
    def last_error(self):
        """The kind of the last bad descriptor chain seen (a name; ``"none"`` before any)."""
        return BAD_DESC_NAMES[self.last_bad]

    def stats(self):
        """The device side's counters: chains popped, bad descriptors, interrupts sent and
        suppressed, packets dropped or too long, used entries, the last error, broken."""
        return {"popped": self.n_popped, "bad_descriptors": self.n_bad_desc,
                "interrupts": self.n_interrupts, "interrupts_suppressed": self.n_interrupts_suppressed,
                "dropped": self.n_dropped, "too_long": self.n_too_long, "last_error": self.last_error,
                "broken": self.broken, "used_entries": self.n_used_entries}
