"""virtio-net device logic over any transport (Virtio 1.2 section 5.1).

The pieces a port needs that do not depend on the transport: the status
handshake (3.1.1), feature negotiation (what pmd asks for and requires), the
device configuration (MAC, link status, queue pairs, MTU, speed and duplex,
5.1.4), the control virtqueue (5.1.6.5) and queue numbering (5.1.2).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._memory import DmaMemory
from .._virtqueue import Virtqueue
from ..errors import DeviceError, QueueStateError
from . import features as F
from .transport import Transport

log = logging.getLogger("pmd.virtio.net")

# What pmd asks for when the device offers it (the feature table in docs/port.md).
WANTED = (F.bit(F.VERSION_1) | F.bit(F.ACCESS_PLATFORM) | F.bit(F.NET_MAC) | F.bit(F.NET_STATUS)
          | F.bit(F.NET_MRG_RXBUF) | F.bit(F.NET_CTRL_VQ) | F.bit(F.NET_CTRL_RX) | F.bit(F.NET_MQ)
          | F.bit(F.RING_EVENT_IDX) | F.bit(F.NET_MTU) | F.bit(F.NET_SPEED_DUPLEX)
          | F.bit(F.NET_CTRL_MAC_ADDR))
# Turning these off would make pmd misbehave, not just do less.
MANDATORY = F.bit(F.VERSION_1) | F.bit(F.ACCESS_PLATFORM)
# Features that need the control queue (5.1.3.1).
NEEDS_CTRL_VQ = (F.bit(F.NET_CTRL_RX) | F.bit(F.NET_MQ) | F.bit(F.NET_CTRL_MAC_ADDR)
                 | F.bit(F.NET_CTRL_VLAN) | F.bit(F.NET_GUEST_ANNOUNCE))


def negotiate(offered: int, *, transport_bits: int = 64, disable: int = 0) -> int:
    """The driver features pmd accepts from ``offered``.

    - VERSION_1 is required on a transport that can carry it (a device without
      it is a legacy-only device: error naming the feature);
    - ACCESS_PLATFORM is accepted whenever offered (6.1: a device that needs
      the IOMMU must not be driven with physical addresses);
    - the rest of WANTED is taken when offered, unless ``disable`` turns it off;
    - features that depend on CTRL_VQ go with it.
    """
    if disable & MANDATORY & offered:
        raise ValueError(f"cannot disable {', '.join(F.names(disable & MANDATORY))}: "
                         "pmd needs them when the device offers them")
    if transport_bits > 32 and not offered & F.bit(F.VERSION_1):
        raise DeviceError("the device does not offer VIRTIO_F_VERSION_1 (feature bit 32): it is a "
                          "legacy-only device; pmd drives it only through the legacy interface "
                          "(open_port(..., legacy=True)) when it is transitional")
    mask = (1 << transport_bits) - 1
    accepted = offered & WANTED & ~disable & mask
    if not accepted & F.bit(F.NET_CTRL_VQ):
        accepted &= ~NEEDS_CTRL_VQ
    return accepted


def hdr_len_for(features: int) -> int:
    """virtio-net header length (5.1.6): 12 with VERSION_1 or MRG_RXBUF, else 10."""
    return 12 if features & (F.bit(F.VERSION_1) | F.bit(F.NET_MRG_RXBUF)) else 10


def rx_queue_index(pair: int) -> int:
    return 2 * pair          # 5.1.2: receiveq1, transmitq1, ..., receiveqN, transmitqN, controlq


def tx_queue_index(pair: int) -> int:
    return 2 * pair + 1


def ctrl_queue_index(features: int, max_pairs: int) -> int:
    return 2 * max_pairs if features & F.bit(F.NET_MQ) else 2


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


def read_net_config(transport: Transport, features: int) -> NetConfig:
    """The fields of the device configuration that the negotiated features make valid,
    as one consistent snapshot (2.5.1). Values are checked, not trusted."""
    fields: list[tuple[int, int]] = []
    has = {name: bool(features & F.bit(bitno)) for name, bitno in
           (("mac", F.NET_MAC), ("status", F.NET_STATUS), ("mq", F.NET_MQ), ("mtu", F.NET_MTU),
            ("speed", F.NET_SPEED_DUPLEX))}
    if has["mac"]:
        fields += [(F.NET_CFG_MAC + i, 1) for i in range(6)]
    if has["status"]:
        fields.append((F.NET_CFG_STATUS, 2))
    if has["mq"]:
        fields.append((F.NET_CFG_MAX_QUEUE_PAIRS, 2))
    if has["mtu"]:
        fields.append((F.NET_CFG_MTU, 2))
    if has["speed"]:
        fields += [(F.NET_CFG_SPEED, 4), (F.NET_CFG_DUPLEX, 1)]
    values = iter(transport.read_config(fields)) if fields else iter(())
    mac = bytes(next(values) for _ in range(6)) if has["mac"] else None
    status = next(values) if has["status"] else None
    pairs = next(values) if has["mq"] else 1
    if not 1 <= pairs <= 0x8000:
        raise DeviceError(f"device reports max_virtqueue_pairs = {pairs}; the spec allows 1 to 0x8000 "
                          "(5.1.4.1)")
    mtu = next(values) if has["mtu"] else None
    if mtu is not None and mtu < 68:
        raise DeviceError(f"device reports an MTU of {mtu}, below the minimum of 68 (5.1.4.1)")
    speed = duplex = None
    if has["speed"]:
        speed, duplex = next(values), next(values)
    return NetConfig(mac, status, pairs, mtu, speed, duplex)


def link_from(cfg: NetConfig) -> Link:
    up = True if cfg.status is None else bool(cfg.status & F.NET_S_LINK_UP)
    speed = None if cfg.speed in (None, 0xFFFFFFFF) else cfg.speed
    duplex = {0: "half", 1: "full"}.get(cfg.duplex) if cfg.duplex is not None else None
    return Link(up, speed, duplex)


def random_mac() -> bytes:
    """A locally administered unicast address (the driver's own when the device has none, 5.1.5)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return bytes(b)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{x:02x}" for x in mac)


def parse_mac(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        if len(text) != 6:
            raise ValueError(f"a MAC address is 6 bytes, got {len(text)}")
        return text
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}; expected xx:xx:xx:xx:xx:xx")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}; expected xx:xx:xx:xx:xx:xx") from None


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
        if ack != F.CTRL_OK:
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


LinkCallback = Callable[[Link], None]

__all__ = ["WANTED", "MANDATORY", "negotiate", "hdr_len_for", "Link", "NetConfig", "read_net_config",
           "link_from", "random_mac", "format_mac", "parse_mac", "ControlQueue", "rx_queue_index",
           "tx_queue_index", "ctrl_queue_index", "QueueStateError"]
