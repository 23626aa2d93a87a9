"""The driver side of a virtqueue, split (Virtio 1.2 section 2.7) or packed (2.8).

The ring lives in DMA memory; free descriptors form a chain through our
shadow ``next`` links (O(1) allocation); a side array maps each descriptor to
the caller's cookie (a buffer id). Buffers are added without publishing;
``flush`` publishes a whole burst with one avail idx store and notifies only
if the device asked (VRING_USED_F_NO_NOTIFY, or avail_event with
VIRTIO_F_EVENT_IDX). Used entries are validated before anything is done with
them: an id out of range or not in flight, or a length larger than the
buffer, is counted and never followed.

The packed ring (``packed=True``) keeps the same buffer-id bookkeeping: a
chain of n descriptors takes n ids, the device writes back the first; a burst
becomes visible when ``publish`` writes its first descriptor's flags; a used
descriptor is taken when its AVAIL and USED bits both equal the driver's wrap
counter, and one naming no buffer in flight stops the queue (nothing says how
far the next one is). See docs/rings.md.

The Python methods here are for the control path and for tests; the bursts
(pmd.driver._rx, pmd.driver._tx) use the inline methods of _virtqueue.pxd without the GIL. Each
Python method that touches the ring checks first that the queue and its
memory are open (with the GIL held the memory cannot go meanwhile); the
bursts pin the memory instead.
"""

import numpy as np

from libc.stdint cimport uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from pmd.memory._dma cimport DmaMemory
from pmd.driver._mmio cimport Mmio
from pmd.includes.vring cimport (
    RING_EVENT_FLAGS_ENABLE, pvirtq_size, vring_store32,
    VRING_AVAIL_F_NO_INTERRUPT, VRING_LEGACY_ALIGN, VRING_MAX_SIZE, vring_avail_bytes,
    vring_desc_bytes, vring_init, vring_load16, vring_size, vring_store16, vring_used_bytes,
    vring_used_event, vring_avail_event, vring_need_event, vring_desc, vring_used_elem,
)
from pmd.includes.virtio_net cimport virtio_net_hdr

from pmd.errors import DeviceError, QueueStateError

USED_RESULTS = {USED_OK: "ok", USED_BAD_ID: "bad id", USED_NOT_IN_FLIGHT: "not in flight",
                USED_BAD_LEN: "bad len"}


def ring_size(uint32_t num, size_t align=VRING_LEGACY_ALIGN, bint packed=False):
    """Bytes of a contiguous ring of ``num`` entries: split (Linux's vring_size) or
    packed (the descriptor ring and the two 4-byte event areas)."""
    _check_ring_params(num, align)
    return pvirtq_size(num) if packed else vring_size(num, align)


def ring_layout(uint32_t num, size_t align=VRING_LEGACY_ALIGN, bint packed=False):
    """Offsets and sizes of the three areas: dict of (offset, size) per area
    (packed: "desc", "driver", "device")."""
    _check_ring_params(num, align)
    if packed:
        return {"desc": (0, 16 * num), "driver": (16 * num, 4), "device": (16 * num + 4, 4),
                "total": pvirtq_size(num)}
    desc = vring_desc_bytes(num)
    avail_off = desc
    used_off = (desc + vring_avail_bytes(num) + align - 1) & ~(align - 1)
    return {"desc": (0, desc), "avail": (avail_off, vring_avail_bytes(num)),
            "used": (used_off, vring_used_bytes(num)), "total": vring_size(num, align)}


def indirect_table_bytes(uint32_t num, uint32_t indirect_max):
    """Bytes of DMA memory the indirect tables of a ``num``-entry queue take (with
    their alignment): one table of ``indirect_max`` descriptors per descriptor id."""
    if indirect_max == 0:
        return 0
    cdef size_t stride = _indirect_stride(indirect_max)
    return num * stride + stride


cdef size_t _indirect_stride(uint32_t indirect_max):
    # A power of two at least 16 * indirect_max and at most 4096: tables aligned to it
    # never straddle a page, so each has one contiguous IOVA range (physical addresses).
    cdef size_t stride = 16
    while stride < 16 * <size_t>indirect_max:
        stride <<= 1
    return stride


MAX_INDIRECT = 256      # 16 * 256 = 4096 bytes: a table within one page


def need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old):
    """vring_need_event (2.7.10): should moving an index from old to new signal event_idx?"""
    return vring_need_event(event_idx, new_idx, old)


def _check_ring_params(uint32_t num, size_t align):
    if num == 0 or num > VRING_MAX_SIZE or num & (num - 1):
        raise ValueError(f"queue size must be a power of two from 1 to {VRING_MAX_SIZE} "
                         f"(Virtio 1.2 2.7), got {num}")
    if align < 4 or align & (align - 1):
        raise ValueError(f"ring alignment must be a power of two >= 4, got {align}")


cdef class Virtqueue:
    """``Virtqueue(memory, size, queue_index=0, event_idx=False, weak_barriers=True, align=4096, interrupts=False, packed=False, in_order=False)``

    Carves a ring of ``size`` entries out of ``memory``. ``event_idx`` is
    VIRTIO_F_EVENT_IDX as negotiated; ``weak_barriers`` is true unless
    VIRTIO_F_ORDER_PLATFORM was negotiated (real hardware); ``interrupts``
    is the initial state of used-buffer notifications (off for polling);
    ``packed`` is VIRTIO_F_RING_PACKED (2.8); ``in_order`` is VIRTIO_F_IN_ORDER
    (2.7.9, 2.8.9): ids in ring order, and one used entry may retire a batch. ``indirect_max`` (2 to 256, at
    most ``size``; 0 = off) is for VIRTIO_F_INDIRECT_DESC: each descriptor id
    gets a table of that many descriptors in ``memory``, and a chain of 2 to
    ``indirect_max`` buffers then takes one descriptor (2.7.5.3, 2.8.7).
    """

    def __cinit__(self):
        self.extra = NULL
        self.ind_iova = NULL
        self.ind_cookies = NULL
        self.notify_fd = -1

    def __init__(self, DmaMemory memory not None, uint32_t size, uint16_t queue_index=0, *,
                 bint event_idx=False, bint weak_barriers=True, size_t align=VRING_LEGACY_ALIGN,
                 bint interrupts=False, bint packed=False, bint in_order=False,
                 uint32_t indirect_max=0):
        memory._check_open()
        _check_ring_params(size, align)
        if indirect_max and not 2 <= indirect_max <= min(size, MAX_INDIRECT):
            raise ValueError(f"indirect_max {indirect_max}: an indirect table holds 2 to {min(size, MAX_INDIRECT)} "
                             f"descriptors on a queue of {size} (no chain longer than the queue, 2.7.5.3.1; "
                             f"a table within one 4 KiB page); pass 0 for no indirect tables")
        cdef size_t nbytes = pvirtq_size(size) if packed else vring_size(size, align)
        cdef size_t off = memory.alloc(nbytes, max(align, 16))
        if not memory.range_iova_contiguous(off, nbytes):
            raise ValueError(f"the {nbytes}-byte ring would span pages with non-contiguous IOVAs "
                             "(physical addresses without huge pages): use huge pages or a smaller queue")
        self.memory = memory
        self.offset = off
        self.size = size
        self.align = align
        self.mask = size - 1
        self.queue_index = queue_index
        self.event_idx = event_idx
        self.weak_barriers = weak_barriers
        memset(memory.base + off, 0, nbytes)
        self.packed = packed
        if packed:
            # 2.8.13: ring, then the driver's and the device's event suppression areas;
            # both wrap counters start at 1 (2.8.1), so the first lap's descriptors say AVAIL
            self.pdesc = <pvirtq_desc *>(memory.base + off)
            self.driver_event = <pvirtq_event_suppress *>(memory.base + off + 16 * size)
            self.device_event = <pvirtq_event_suppress *>(memory.base + off + 16 * size + 4)
            self.avail_wrap_flags = VIRTQ_DESC_F_AVAIL
            self.used_wrap = 1
        else:
            vring_init(&self.vr, size, memory.base + off, align)
        self.extra = <DescExtra *>malloc(sizeof(DescExtra) * size)
        if self.extra == NULL:
            raise MemoryError()
        cdef uint32_t i
        for i in range(size):
            self.extra[i].next = <uint16_t>(i + 1)
            self.extra[i].ndescs = 0
            self.extra[i].nind = 0
            self.extra[i].cookie = 0
            self.extra[i].writable = 0
            self.extra[i].mark = 0
        if indirect_max:
            self._setup_indirect(indirect_max)
        self.free_head = 0
        self.num_free = size
        self.in_order = in_order
        if in_order:
            # 2.7.5: in order, descriptor x is followed by x + 1 and the last by 0;
            # allocation then walks the ring and release never touches the links
            self.extra[size - 1].next = 0
        self.notify_kind = NOTIFY_NONE
        self.notify_data = queue_index
        if interrupts:
            self.enable_interrupts()
        else:
            self.disable_interrupts()

    cdef int _setup_indirect(self, uint32_t indirect_max) except -1:
        # All tables now, in the queue's DMA memory (mapped for the device and the
        # IOMMU like the ring): nothing is allocated per packet.
        cdef size_t stride = _indirect_stride(indirect_max)
        cdef size_t off = self.memory.alloc(self.size * stride, stride)
        cdef uint32_t i
        self.ind_iova = <uint64_t *>malloc(sizeof(uint64_t) * self.size)
        self.ind_cookies = <uint32_t *>malloc(sizeof(uint32_t) * self.size * indirect_max)
        if self.ind_iova == NULL or self.ind_cookies == NULL:
            raise MemoryError()
        memset(self.memory.base + off, 0, self.size * stride)
        memset(self.ind_cookies, 0, sizeof(uint32_t) * self.size * indirect_max)
        for i in range(self.size):
            self.ind_iova[i] = self.memory.iova_of(off + i * stride)
        self.ind_base = self.memory.base + off
        self.ind_stride = <uint32_t>stride
        self.indirect_offset = off
        self.indirect_max = <uint16_t>indirect_max
        return 0

    def __dealloc__(self):
        free(self.extra)
        free(self.ind_iova)
        free(self.ind_cookies)

    cdef int raise_unusable(self) except -1:
        if self.is_closed:
            raise QueueStateError(f"virtqueue {self.queue_index} is closed")
        self.memory._check_open()
        if self.fail_reason is not None:
            raise DeviceError(f"virtqueue {self.queue_index}: {self.fail_reason}")
        if self.broken and self.in_order:
            raise DeviceError(f"virtqueue {self.queue_index}: the device (VIRTIO_F_IN_ORDER) wrote a used entry "
                              "that names no buffer in flight after the last one it returned, or a batch its "
                              "used index does not cover (or took a used descriptor back), so where the next "
                              "one is cannot be known; the queue is stopped: reset the device")
        if self.broken and self.packed:
            raise DeviceError(f"virtqueue {self.queue_index}: the device wrote a used descriptor that names "
                              "no buffer in flight (or took one back), so where the next one is cannot be "
                              "known (packed ring); the queue is stopped: reset the device")
        if self.broken:
            raise DeviceError(f"virtqueue {self.queue_index}: the device published a used index "
                              f"covering more entries than are in flight (queue size {self.size}); "
                              "the queue is stopped: reset the device")
        return 0

    cdef int check_raw(self) except -1:
        # An RxQueue/TxQueue keeps buffer ids as cookies and frees what comes
        # back: a chain added behind its back would name buffers it never gave.
        if self.owned:
            raise QueueStateError(f"virtqueue {self.queue_index} belongs to an RxQueue/TxQueue: "
                                  "use its bursts, or a Virtqueue of its own for raw access")
        return self.check_usable()

    cdef void disown_cookies(self) noexcept:
        # A queue taking over a virtqueue: chains added through the raw API
        # carry the caller's cookies, which must never be taken for buffer ids.
        cdef uint32_t i
        for i in range(self.size):
            self.extra[i].cookie = 0xffffffff
        for i in range(self.size * self.indirect_max):
            self.ind_cookies[i] = 0xffffffff

    cdef int check_mapped(self) except -1:
        if self.is_closed:
            raise QueueStateError(f"virtqueue {self.queue_index} is closed")
        return self.memory._check_open()

    # ---- where the device finds the ring (given to queue_desc/driver/device) ----
    @property
    def desc_iova(self):
        """The descriptor area's IOVA, as the device sees it (``queue_desc``)."""
        self.check_mapped()
        return self.memory.iova_of(self.offset)

    @property
    def avail_iova(self):
        """The driver area: the avail ring, or the packed ring's driver event suppression."""
        self.check_mapped()
        if self.packed:
            return self.memory.iova_of(self.offset + 16 * self.size)
        return self.memory.iova_of(self.offset + (<char *>self.vr.avail - <char *>self.vr.desc))

    @property
    def used_iova(self):
        """The device area: the used ring, or the packed ring's device event suppression."""
        self.check_mapped()
        if self.packed:
            return self.memory.iova_of(self.offset + 16 * self.size + 4)
        return self.memory.iova_of(self.offset + (<char *>self.vr.used - <char *>self.vr.desc))

    @property
    def ring_address(self):
        """Virtual address of the descriptor table (the start of the ring)."""
        return <uintptr_t>(self.pdesc if self.packed else self.vr.desc)

    @property
    def ring_bytes(self):
        """Bytes of the ring in memory (all three areas)."""
        return pvirtq_size(self.size) if self.packed else vring_size(self.size, self.align)

    @property
    def avail_state(self):
        """Packed ring: (next avail position, avail wrap counter); split: (avail idx, None).
        What SET_VRING_BASE-style resumption needs."""
        if self.packed:
            return self.avail_pos, 1 if self.avail_wrap_flags & VIRTQ_DESC_F_AVAIL else 0
        return self.avail_idx, None

    def used_frontier(self):
        """Where the device will write its next used entry, read from the ring: split,
        the used ring's idx; packed, (position, wrap counter) just past the used
        descriptors it wrote that the driver has not taken yet (walked like nused).
        What a restarted device resumes from (SET_VRING_BASE)."""
        self.check_mapped()
        if not self.packed:
            return vring_load16(&self.vr.used.idx), None
        cdef uint32_t pos = self.used_pos
        cdef uint16_t wrap = self.used_wrap
        if self.in_order:
            self.io_p_walk(&pos, &wrap)
        else:
            self.p_walk_used(&pos, &wrap)
        return pos, wrap

    @property
    def used_state(self):
        """Packed ring: (next used position, used wrap counter); split: (last used idx, None)."""
        if self.packed:
            return self.used_pos, self.used_wrap
        return self.last_used_idx, None

    def indirect_table_iova(self, uint16_t head):
        """IOVA of the indirect table of descriptor id ``head`` (tests, diagnostics)."""
        self.check_mapped()
        if not self.indirect_max:
            raise QueueStateError(f"virtqueue {self.queue_index} has no indirect tables (indirect_max=0)")
        if head >= self.size:
            raise ValueError(f"descriptor id {head} is outside the queue (size {self.size})")
        return self.ind_iova[head]

    @property
    def indirect(self):
        """True when chains of 2 to ``indirect_max`` buffers go in indirect tables."""
        return self.indirect_max != 0

    @property
    def free_descriptors(self):
        """Descriptors not in flight."""
        return self.num_free

    @property
    def next_avail_idx(self):
        """The driver's next avail index (free-running, 16 bits)."""
        return self.avail_idx

    @property
    def next_used_idx(self):
        """The next used entry the driver will read (free-running, 16 bits)."""
        return self.last_used_idx

    @property
    def in_flight(self):
        """Descriptors given to the device and not yet returned."""
        return self.size - self.num_free

    @property
    def buffers_in_flight(self):
        """Buffers (cookies) the device holds: ``in_flight`` counts descriptors, and a
        chain in an indirect table holds several buffers behind one (a scan: not for
        the data path)."""
        cdef uint32_t i, n = 0
        for i in range(self.size):
            if self.extra[i].ndescs:
                n += self.extra[i].nind if self.extra[i].nind else self.extra[i].ndescs
        return n

    # ---- notification configuration ----
    def set_notify_mmio(self, Mmio window not None, size_t offset, notify_data=None):
        """Notify by a 16-bit store at ``offset`` in ``window`` (modern PCI notify area)."""
        self.notify_addr = window.at(offset, 2)
        self.notify_owner = window
        self.notify_kind = NOTIFY_MMIO16
        if notify_data is not None:
            self.notify_data = notify_data

    def set_notify_pwrite(self, int fd, long offset, notify_data=None):
        """Notify by ``pwrite`` of the queue index at ``offset`` of ``fd`` (legacy I/O BAR via VFIO)."""
        if fd < 0:
            raise ValueError("notify fd must be an open file descriptor")
        self.notify_fd = fd
        self.notify_offset = offset
        self.notify_kind = NOTIFY_PWRITE16
        if notify_data is not None:
            self.notify_data = notify_data

    def set_notify_eventfd(self, int fd):
        """Notify by writing 1 to an eventfd."""
        if fd < 0:
            raise ValueError("notify eventfd must be an open file descriptor")
        self.notify_fd = fd
        self.notify_kind = NOTIFY_EVENTFD

    def set_notify_none(self):
        """The device polls; notifications are only counted."""
        self.notify_kind = NOTIFY_NONE
        self.notify_owner = None

    # ---- used-buffer notification (interrupt) suppression, 2.7.7 ----
    def disable_interrupts(self):
        """Ask the device not to interrupt (polling mode).

        Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT. With it the flag must
        stay 0 (2.7.7.1): used_event is set one behind the next used entry,
        which the device reaches only after 65535 more, i.e. never while we poll.
        A closed queue (or one whose memory is closed) has nothing to disable.
        """
        if self.is_closed or self.memory.closed:
            return
        if self.packed:
            vring_store16(&self.driver_event.flags, RING_EVENT_FLAGS_DISABLE)   # 2.8.10
        elif self.event_idx:
            vring_store16(vring_used_event(&self.vr), <uint16_t>(self.last_used_idx - 1))
        else:
            self.avail_flags |= VRING_AVAIL_F_NO_INTERRUPT
            vring_store16(&self.vr.avail.flags, self.avail_flags)
        self.interrupts_enabled = False

    def enable_interrupts(self):
        """Ask for an interrupt at the next used entry. Returns True if entries
        are already pending: then process them instead of sleeping, or a
        wake-up is lost (the device may have written them before it saw this).
        """
        self.check_mapped()
        if self.packed:
            # 2.8.10: with EVENT_IDX, at the descriptor we expect next (offset and wrap counter)
            if self.event_idx:     # offset, wrap and DESC in one 32-bit store
                vring_store32(<uint32_t *>self.driver_event,
                              (self.used_pos | (<uint32_t>self.used_wrap << 15)) | (<uint32_t>RING_EVENT_FLAGS_DESC << 16))
            else:
                vring_store16(&self.driver_event.flags, RING_EVENT_FLAGS_ENABLE)
            self.interrupts_enabled = True
            pmd_virtio_mb(self.weak_barriers)
            return self.size != self.num_free and (self.p_is_used(self.used_pos) or (self.in_order and self.io_left != 0))
        if self.event_idx:
            vring_store16(vring_used_event(&self.vr), self.last_used_idx)
        else:
            self.avail_flags &= ~VRING_AVAIL_F_NO_INTERRUPT
            vring_store16(&self.vr.avail.flags, self.avail_flags)
        self.interrupts_enabled = True
        pmd_virtio_mb(self.weak_barriers)  # our store before re-reading used->idx
        return vring_load16(&self.vr.used.idx) != self.last_used_idx

    # ---- Python access for the control path and tests ----
    def add(self, list out_bufs, list in_bufs=None, uint32_t cookie=0):
        """Add a chain: ``out_bufs`` device-readable then ``in_bufs`` device-writable,
        each a list of ``(iova, length)``. Not published until ``flush``. Returns the head.
        """
        self.check_raw()
        in_bufs = in_bufs or []
        cdef Py_ssize_t n = len(out_bufs) + len(in_bufs)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        if n > self.size:
            raise ValueError(f"a chain of {n} buffers is longer than the queue ({self.size}): "
                             "Virtio 1.2 2.7.5.3.1 and 2.8.18 forbid it")
        cdef uint16_t need = self.descs_for(<uint16_t>n)
        if need > self.num_free:
            raise QueueStateError(f"virtqueue {self.queue_index} is full: {need} descriptors needed, "
                                  f"{self.num_free} free; reclaim used buffers first")
        a = np.empty(n, dtype=np.uint64)
        l = np.empty(n, dtype=np.uint32)
        c = np.full(n, cookie, dtype=np.uint32)
        for k, (addr, ln) in enumerate(list(out_bufs) + list(in_bufs)):
            a[k] = addr
            l[k] = ln
        cdef uint64_t[::1] av = a
        cdef uint32_t[::1] lv = l
        cdef uint32_t[::1] cv = c
        return self.add_chain(&av[0], &lv[0], &cv[0], <uint16_t>n, <uint16_t>len(out_bufs))

    def kick(self):
        """Publish what was added and notify if the device wants it. Returns True if notified."""
        self.check_raw()
        cdef uint64_t before = self.n_notify
        self.flush()
        return self.n_notify != before

    def get_used(self):
        """Reclaim one used entry: ``(cookies, length)`` or ``None`` when none is ready.

        A bad entry raises DeviceError after it has been counted (and its
        chain reclaimed when it named one).
        """
        self.check_raw()
        if self.nused() == 0:
            self.check_usable()
            return None
        cdef uint16_t head = 0
        cdef uint32_t length = 0
        cdef uint32_t cookies[64]
        r = self.pop_used(&head, &length)
        if r == USED_BAD_ID or r == USED_NOT_IN_FLIGHT:
            raise DeviceError(f"virtqueue {self.queue_index}: used entry {USED_RESULTS[r]} "
                              f"(id out of range or not the head of an in-flight chain); ignored")
        n = self.detach(head, cookies, 64)
        if n > 64:
            raise ValueError(f"virtqueue {self.queue_index}: a chain of {n} descriptors came back; "
                             "get_used returns the cookies of at most 64 (descriptors reclaimed)")
        if r == USED_BAD_LEN:
            raise DeviceError(f"virtqueue {self.queue_index}: used length {length} is larger than the "
                              "chain's device-writable bytes; buffer reclaimed, data dropped")
        return [cookies[k] for k in range(n)], length

    def stats(self):
        """Counters: notifications and every kind of bad used entry."""
        return {
            "notifications": self.n_notify,
            "notifications_suppressed": self.n_notify_suppressed,
            "notify_errors": self.n_notify_errors,
            "bad_used_id": self.n_bad_id,
            "used_not_in_flight": self.n_not_in_flight,
            "bad_used_len": self.n_bad_len,
            "bad_used_idx": self.n_bad_used_idx,
            "in_order_batches": self.n_io_batches,
        }

    def fail(self, reason):
        """Stop the queue from outside the data path (the device went away, for
        example): every later burst raises DeviceError with ``reason``. Safe from
        any thread: a burst in progress finishes, the next one raises."""
        self.fail_reason = str(reason)
        self.broken = True

    def close(self):
        """Stop using the queue. The device must have been reset (or the queue
        disabled) first; the ring memory goes with its DmaMemory."""
        self.is_closed = True
        self.notify_owner = None
        self.notify_kind = NOTIFY_NONE

    @property
    def closed(self):
        """True once :meth:`close` ran."""
        return self.is_closed

    def __repr__(self):
        return (f"<Virtqueue {self.queue_index} {'packed' if self.packed else 'split'}"
                f"{' in-order' if self.in_order else ''} size {self.size}, "
                f"{self.size - self.num_free} in flight, "
                f"avail {self.avail_idx}, used {self.last_used_idx}{', broken' if self.broken else ''}>")
