"""virtio-net device logic over any transport (Virtio 1.2 section 5.1).

The pieces a port needs that do not depend on the transport: feature
negotiation (what pmd asks for and requires), the device configuration (MAC,
link status, queue pairs, MTU, speed and duplex, 5.1.4, read as one consistent
snapshot) and the control virtqueue (5.1.6.5). The vocabulary they speak
(feature bits, layouts, commands, queue numbering) is :mod:`pmd.abi.virtio_net`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...errors import DeviceError
from ...memory import DmaMemory
from ...abi import virtio as V, virtio_net as N
from ...abi.ethernet import ETH_ALEN
from .._virtqueue import Virtqueue
from .transport import Transport

log = logging.getLogger("pmd.virtio.net")

# What pmd asks for when the device offers it (the feature table in docs/port.md).
WANTED = (V.bit(V.VERSION_1) | V.bit(V.ACCESS_PLATFORM) | V.bit(N.NET_MAC) | V.bit(N.NET_STATUS)
          | V.bit(N.NET_MRG_RXBUF) | V.bit(N.NET_CTRL_VQ) | V.bit(N.NET_CTRL_RX) | V.bit(N.NET_MQ)
          | V.bit(V.RING_EVENT_IDX) | V.bit(N.NET_MTU) | V.bit(N.NET_SPEED_DUPLEX)
          | V.bit(N.NET_CTRL_MAC_ADDR) | V.bit(V.RING_INDIRECT_DESC) | V.bit(N.NET_RSS) | V.bit(N.NET_HASH_REPORT))
# Taken only for several queue pairs (and RSS only with MQ, whose VQ_PAIRS_SET pmd sends
# first): with one queue there is nothing to steer, and the hash report's 20-byte
# header costs every packet.
MULTIQUEUE_ONLY = V.bit(N.NET_RSS) | V.bit(N.NET_HASH_REPORT)
# Taken only when asked for (``enable=``): the packed ring is correct against DPDK's vhost,
# QEMU's packed=on device and the built-in device, but not yet faster than split;
# IN_ORDER is correct on both layouts but measured a few per cent slower than without
# it on the loopback (docs/rings.md).
OPT_IN = V.bit(V.RING_PACKED) | V.bit(V.IN_ORDER)
# Turning these off would make pmd misbehave, not just do less.
MANDATORY = V.bit(V.VERSION_1) | V.bit(V.ACCESS_PLATFORM)


def negotiate(offered: int, *, transport_bits: int = 64, disable: int = 0, enable: int = 0,
              queue_pairs: int = 1) -> int:
    """The driver features pmd accepts from ``offered``.

    - VERSION_1 is required on a transport that can carry it (a device without
      it is a legacy-only device: error naming the feature);
    - ACCESS_PLATFORM is accepted whenever offered (6.1: a device that needs
      the IOMMU must not be driven with physical addresses);
    - the rest of WANTED is taken when offered, unless ``disable`` turns it off;
    - what ``enable`` names of OPT_IN (RING_PACKED, IN_ORDER) too, when offered;
    - RSS and HASH_REPORT only for ``queue_pairs`` > 1, RSS only with MQ;
    - features that depend on CTRL_VQ go with it.
    """
    if disable & MANDATORY & offered:
        raise ValueError(f"cannot disable {', '.join(N.feature_names(disable & MANDATORY))}: "
                         "pmd needs them when the device offers them")
    if transport_bits > 32 and not offered & V.bit(V.VERSION_1):
        raise DeviceError("the device does not offer VIRTIO_F_VERSION_1 (feature bit 32): it is a "
                          "legacy-only device; pmd drives it only through the legacy interface "
                          "(open_port(..., legacy=True)) when it is transitional")
    check_enable(enable)
    mask = (1 << transport_bits) - 1
    accepted = offered & (WANTED | enable) & ~disable & mask
    if not accepted & V.bit(N.NET_CTRL_VQ):
        accepted &= ~N.NEEDS_CTRL_VQ
    if queue_pairs < 2:
        accepted &= ~MULTIQUEUE_ONLY
    if not accepted & V.bit(N.NET_MQ):
        accepted &= ~V.bit(N.NET_RSS)
    return accepted


def check_enable(enable: int) -> None:
    """``enable=`` names only what pmd takes when asked (OPT_IN), else a clear error."""
    extra = enable & ~OPT_IN
    if extra:
        raise ValueError(f"enable= takes {', '.join(N.feature_names(OPT_IN))}; "
                         f"{', '.join(N.feature_names(extra))} are taken whenever offered (disable= turns them off)")


def layout_options(ring: str) -> dict[str, str]:
    """The ``open_port``/``Port`` options that choose ``ring`` ("packed" or "split") on a
    device offering both, whichever of them is pmd's default (the tests and benchmarks)."""
    packed = V.bit(V.RING_PACKED)
    if ring == "packed":
        return {"enable": "RING_PACKED"} if OPT_IN & packed else {}
    if ring == "split":
        return {"disable": "RING_PACKED"}
    raise ValueError(f"ring layout {ring!r}: use 'split' or 'packed'")


@dataclass(frozen=True)
class Link:
    """Link state from the device configuration (5.1.4): ``up``, ``speed`` in Mb/s
    (None when unknown), ``duplex`` ('full', 'half' or None)."""

    up: bool
    speed: int | None = None
    duplex: str | None = None


@dataclass(frozen=True)
class NetConfig:
    mac: bytes | None
    status: int | None
    max_queue_pairs: int
    mtu: int | None
    speed: int | None
    duplex: int | None
    rss_max_key_size: int = 0               # RSS or HASH_REPORT
    rss_max_table_length: int = 0           # RSS
    supported_hash_types: int = 0           # RSS or HASH_REPORT


def read_net_config(transport: Transport, features: int) -> NetConfig:
    """The fields of the device configuration that the negotiated features make valid,
    as one consistent snapshot (2.5.1). Values are checked, not trusted."""
    fields: list[tuple[int, int]] = []
    has = {name: bool(features & V.bit(bitno)) for name, bitno in
           (("mac", N.NET_MAC), ("status", N.NET_STATUS), ("mq", N.NET_MQ), ("mtu", N.NET_MTU),
            ("speed", N.NET_SPEED_DUPLEX), ("rss", N.NET_RSS), ("hash", N.NET_HASH_REPORT))}
    if has["mac"]:
        fields += [(N.NET_CFG_MAC + i, 1) for i in range(ETH_ALEN)]
    if has["status"]:
        fields.append((N.NET_CFG_STATUS, 2))
    if has["mq"] or has["rss"]:
        fields.append((N.NET_CFG_MAX_QUEUE_PAIRS, 2))
    if has["mtu"]:
        fields.append((N.NET_CFG_MTU, 2))
    if has["speed"]:
        fields += [(N.NET_CFG_SPEED, 4), (N.NET_CFG_DUPLEX, 1)]
    hashing = has["rss"] or has["hash"]
    if hashing:
        fields.append((N.NET_CFG_RSS_MAX_KEY_SIZE, 1))
    if has["rss"]:
        fields.append((N.NET_CFG_RSS_MAX_TABLE_LENGTH, 2))
    if hashing:
        fields.append((N.NET_CFG_SUPPORTED_HASH_TYPES, 4))
    values = iter(transport.read_config(fields)) if fields else iter(())
    mac = bytes(next(values) for _ in range(ETH_ALEN)) if has["mac"] else None
    status = next(values) if has["status"] else None
    pairs = next(values) if has["mq"] or has["rss"] else 1
    if not 1 <= pairs <= N.MAX_QUEUE_PAIRS:
        raise DeviceError(f"device reports max_virtqueue_pairs = {pairs}; the spec allows 1 to 0x8000 "
                          "(5.1.4.1)")
    mtu = next(values) if has["mtu"] else None
    if mtu is not None and mtu < N.MIN_MTU:
        raise DeviceError(f"device reports an MTU of {mtu}, below the minimum of 68 (5.1.4.1)")
    speed = duplex = None
    if has["speed"]:
        speed, duplex = next(values), next(values)
    key_size = next(values) if hashing else 0
    table_length = next(values) if has["rss"] else 0
    hash_types = next(values) if hashing else 0
    # 5.1.4.1: at least 40 and 128; a device that says less is not trusted with RSS at all
    if hashing and key_size < N.RSS_MIN_KEY_SIZE:
        raise DeviceError(f"device reports rss_max_key_size = {key_size}, below the 40 the spec requires "
                          "(5.1.4.1); start it with disable='RSS,HASH_REPORT'")
    if has["rss"] and table_length < N.RSS_MIN_TABLE_LENGTH:
        raise DeviceError(f"device reports rss_max_indirection_table_length = {table_length}, below the 128 "
                          "the spec requires (5.1.4.1); start it with disable='RSS'")
    return NetConfig(mac, status, pairs, mtu, speed, duplex, key_size, table_length, hash_types)


def link_from(cfg: NetConfig) -> Link:
    up = True if cfg.status is None else bool(cfg.status & N.NET_S_LINK_UP)
    speed = None if cfg.speed in (None, N.SPEED_UNKNOWN) else cfg.speed
    duplex = {0: "half", 1: "full"}.get(cfg.duplex) if cfg.duplex is not None else None
    return Link(up, speed, duplex)


class ControlQueue:
    """The control virtqueue (5.1.6.5): one command at a time, synchronous.

    Each command is a chain: device-readable ``{u8 class; u8 command; data}``
    then a device-writable ``u8 ack``. pmd waits for the device to use it
    (polling, with a timeout) and raises when the ack is not VIRTIO_NET_OK.

    A command that times out stays with the device, which may still answer it
    (write its ack, return its chain). So each command has a buffer of its own
    (one of ``slots``), named by the chain's cookie: a used entry is matched to
    its command, a late one is reclaimed and counted (``late_completions``)
    and its buffer reused only then. When every buffer is held by a command the
    device never returned, commands are refused until the port restarts (the
    reset takes the chains back, 2.4).
    """

    BUF = 4096          # one command's header, data and ack
    SLOTS = 4           # commands in flight at most: the live one and timed-out ones

    @classmethod
    def memory_needed(cls) -> int:
        return cls.BUF * cls.SLOTS + 64

    def __init__(self, vq: Virtqueue, memory: DmaMemory, timeout: float = 2.0) -> None:
        self.vq = vq
        self.memory = memory
        self.timeout = timeout
        # Each chain takes two descriptors: a ring smaller than 2 * SLOTS has fewer slots.
        self.slots = max(1, min(self.SLOTS, vq.size // 2))
        self.offset = memory.alloc(self.BUF * self.slots, 64)
        self.view = memory.view(self.offset, self.BUF * self.slots)
        self._free = list(range(self.slots - 1, -1, -1))
        self._stale: dict[int, tuple[str, int]] = {}   # slot -> (command, ack offset) that timed out
        self._lock = threading.Lock()         # one command at a time, from any thread
        self.commands = 0
        self.timeouts = 0
        self.late_completions = 0

    def command(self, cls: int, cmd: int, data: bytes = b"") -> None:
        if len(data) + 3 > self.BUF:
            raise ValueError(f"control command too long: {len(data)} data bytes, at most {self.BUF - 3}")
        with self._lock:
            self._command(cls, cmd, data)

    def _command(self, cls: int, cmd: int, data: bytes) -> None:
        self._reclaim(None, 0.0)
        if not self._free:
            raise DeviceError(f"the control queue is stuck: {len(self._stale)} earlier command(s) "
                              f"({', '.join(name for name, _ in self._stale.values())}) timed out and the device never "
                              "returned them; restart the port (stop() and start()) to reset the device")
        slot = self._free.pop()
        name = f"{cls}.{cmd}"
        base = slot * self.BUF
        n = len(data) + 2
        self.view[base] = cls
        self.view[base + 1] = cmd
        self.view[base + 2:base + n] = np.frombuffer(data, dtype=np.uint8)
        ack_off = base + ((n + 63) & ~63)
        self.view[ack_off] = 0xFF
        iova = self.memory.iova(self.offset + base)
        try:
            self.vq.add([(iova, n)], [(iova + ack_off - base, 1)], cookie=slot)
        except BaseException:
            self._free.append(slot)
            raise
        done = False
        try:
            self.vq.kick()
            done = self._reclaim(slot, self.timeout)
        finally:
            if not done:            # timed out, or a bad used entry: the chain is still the device's
                self._stale[slot] = (name, ack_off)
                self.timeouts += 1
        if not done:
            raise DeviceError(f"control command {name} not completed within {self.timeout} s; "
                              "the device is not processing its control queue")
        self._free.append(slot)
        self.commands += 1
        ack = int(self.view[ack_off])
        if ack != N.CTRL_OK:
            raise DeviceError(f"the device refused control command class {cls} command {cmd} (ack {ack})")

    def _reclaim(self, slot: int | None, timeout: float) -> bool:
        """Take used entries until ``slot``'s comes back (True) or ``timeout`` passes
        (False); entries of timed-out commands are reclaimed on the way."""
        deadline = time.monotonic() + timeout
        while True:
            used = self.vq.get_used()
            if used is None:
                if slot is None or time.monotonic() > deadline:
                    return False
                time.sleep(0.0002)
                continue
            done = used[0][0]
            if done == slot:
                return True
            # The virtqueue returns only chains it had in flight: a timed-out one.
            stale = self._stale.pop(done, None)
            if stale is None:
                log.warning("control queue: a used entry names buffer %d, held by no command; ignored", done)
                continue
            name, ack_off = stale
            self.late_completions += 1
            self._free.append(done)
            log.warning("control command %s completed after its timeout (ack %d); dropped", name,
                        int(self.view[ack_off]))

    def close(self) -> None:
        del self.view


class TransportControl:
    """Control commands carried out by the transport itself (``Transport.serves_control``),
    with the interface and counters of :class:`ControlQueue`; there is no ring (``vq`` None)."""

    vq = None
    timeouts = 0
    late_completions = 0

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.commands = 0
        self._lock = threading.Lock()

    def command(self, cls: int, cmd: int, data: bytes = b"") -> None:
        with self._lock:
            ack = self.transport.control_command(cls, cmd, bytes(data))
            self.commands += 1
        if ack != N.CTRL_OK:
            raise DeviceError(f"the {self.transport.kind} transport refused control command class {cls} "
                              f"command {cmd} (ack {ack})")

    def close(self) -> None:
        pass


LinkCallback = Callable[[Link], None]

__all__ = [
    "WANTED",
    "MULTIQUEUE_ONLY",
    "OPT_IN",
    "MANDATORY",
    "negotiate",
    "check_enable",
    "layout_options",
    "Link",
    "NetConfig",
    "read_net_config",
    "link_from",
    "ControlQueue",
    "TransportControl",
    "LinkCallback",
]
