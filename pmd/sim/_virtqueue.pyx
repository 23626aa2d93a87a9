"""The device side of a split virtqueue (Virtio 1.2 2.7, device requirements).

A device reads the avail ring, walks descriptor chains, moves data, writes
the used ring and decides whether to interrupt; it may ask the driver not to
notify it. The built-in software device is built on this, and the tests use
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
}

# pop_chain's default bound on the bytes it copies out: the largest packet a
# tx chain may carry (64 KiB, GSO's limit) with its header. Callers that know
# better (the control queue) pass their own.
DEFAULT_MAX_READABLE = 65536 + 64


@cython.no_gc_clear   # __dealloc__ unpins `memories`
cdef class DeviceQueue:
    """``DeviceQueue(windows, size, desc_iova, avail_iova, used_iova, event_idx=False, weak_barriers=True)``

    The device's view of a queue whose ring addresses the driver gave it.
    Every ``DmaMemory`` behind ``windows`` stays mapped until ``close()``.
    """

    def __cinit__(self):
        self.segs = NULL
        self.irq_fd = -1
        self.memories = []

    def __init__(self, DmaWindows windows not None, uint32_t size, uint64_t desc_iova,
                 uint64_t avail_iova, uint64_t used_iova, *, bint event_idx=False,
                 bint weak_barriers=True):
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
        self.windows = windows
        self.size = size
        self.mask = size - 1
        self.vr.num = size
        self.vr.desc = <vring_desc *>desc
        self.vr.avail = <vring_avail *>avail
        self.vr.used = <vring_used *>used
        self.event_idx = event_idx
        self.weak_barriers = weak_barriers
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
        # The device starts where the ring is now (0 on a fresh queue).
        self.used_idx = vring_load16(&self.vr.used.idx)
        self.signalled_used = self.used_idx
        self.last_avail_idx = self.used_idx
        self.shadow_avail_idx = self.used_idx

    def __dealloc__(self):
        free(self.segs)
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
        return self.is_closed

    # ---- the data path (nogil) ----

    cdef int pop(self) noexcept nogil:
        """Take the next available chain into ``segs``: 1 done, 0 none, -1 refused.

        A refused chain is counted; if its head was valid it is returned to the
        driver at once with length 0, so the driver can reclaim its buffers.
        """
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
        cdef bint seen_write = False
        cdef vring_desc *d
        cdef uint64_t out_len = 0, in_len = 0   # up to N descriptors of 4 GiB: wider than 32 bits
        self.head = head
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
                return self._refuse(head, BAD_INDIRECT)
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
        self.push(head, 0)
        return -1

    cdef void _bad(self, int why) noexcept nogil:
        self.n_bad_desc += 1
        self.last_bad = why

    cdef uint16_t pending(self) noexcept nogil:
        """Chains available and not yet popped (0 when the index is implausible)."""
        cdef uint16_t n = vring_load16(&self.vr.avail.idx) - self.last_avail_idx
        return 0 if n > self.size else n

    cdef void unpop(self) noexcept nogil:
        """Give the chain just popped back to the avail ring (no room to use it now)."""
        self.last_avail_idx -= 1
        self.n_popped -= 1
        self.nsegs = 0

    cdef void push(self, uint16_t head, uint32_t length) noexcept nogil:
        """Write one used entry (not yet published)."""
        cdef uint16_t slot = self.used_idx & self.mask
        vring_store32(&self.vr.used.ring[slot].id, head)
        vring_store32(&self.vr.used.ring[slot].len, length)
        self.used_idx += 1

    cdef void publish(self) noexcept nogil:
        """Entries first, then the index that shows them (2.7.8.2 device requirements)."""
        pmd_virtio_wmb(self.weak_barriers)
        vring_store16(&self.vr.used.idx, self.used_idx)

    cdef bint need_interrupt(self) noexcept nogil:
        """Does the driver want an interrupt for what was published since the last decision?

        Full barrier: the used idx store must be visible before we read the
        driver's suppression state (2.7.7.2).
        """
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
        if self.used_idx == vring_load16(&self.vr.used.idx):
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

    # ---- control and Python access (tests, the built-in device) ----

    def set_interrupt_eventfd(self, int fd):
        """Interrupt the driver by writing this eventfd (an MSI-X vector); -1 for none."""
        self.irq_fd = fd

    def disable_notify(self):
        """Ask the driver not to notify (we poll): NO_NOTIFY, or with EVENT_IDX
        an avail_event the driver will not pass (the flag must stay 0, 2.7.10.1)."""
        self.check()
        if self.event_idx:
            vring_store16(vring_avail_event(&self.vr), <uint16_t>(self.last_avail_idx - 1))
        else:
            self.used_flags |= VRING_USED_F_NO_NOTIFY
            vring_store16(&self.vr.used.flags, self.used_flags)

    def enable_notify(self):
        """Ask for a notification when the next buffer is made available."""
        self.check()
        if self.event_idx:
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
        With no data, any head may be completed (length 0)."""
        self.check()
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

    def push_raw(self, uint32_t id, uint32_t length):
        """Write an arbitrary used entry (tests of the driver's validation)."""
        self.check()
        cdef uint16_t slot = self.used_idx & self.mask
        vring_store32(&self.vr.used.ring[slot].id, id)
        vring_store32(&self.vr.used.ring[slot].len, length)
        self.used_idx += 1

    def set_used_idx(self, uint16_t idx):
        """Publish an arbitrary used index (tests of the driver's validation)."""
        self.check()
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
        return <uint16_t>(vring_load16(&self.vr.avail.idx) - self.last_avail_idx)

    @property
    def next_avail_idx(self):
        return self.last_avail_idx

    @property
    def next_used_idx(self):
        return self.used_idx

    @property
    def last_error(self):
        return BAD_DESC_NAMES[self.last_bad]

    def stats(self):
        return {"popped": self.n_popped, "bad_descriptors": self.n_bad_desc,
                "interrupts": self.n_interrupts, "interrupts_suppressed": self.n_interrupts_suppressed,
                "dropped": self.n_dropped, "too_long": self.n_too_long, "last_error": self.last_error,
                "broken": self.broken}
