"""virtio-net device logic over any transport (Virtio 1.2 section 5.1).

The pieces a port needs that do not depend on the transport: the status
handshake (3.1.1), feature negotiation (what pmd asks for and requires), the
device configuration (MAC, link status, queue pairs, MTU, speed and duplex,
5.1.4), the control virtqueue (5.1.6.5) and queue numbering (5.1.2).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._memory import DmaMemory
from .._virtqueue import Virtqueue
from ..errors import DeviceError, QueueStateError
from . import features as F
from .transport import Transport

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
    """

    BUF = 4096

    def __init__(self, vq: Virtqueue, memory: DmaMemory, timeout: float = 2.0) -> None:
        self.vq = vq
        self.memory = memory
        self.timeout = timeout
        self.offset = memory.alloc(self.BUF, 64)
        self.view = memory.view(self.offset, self.BUF)
        self.commands = 0

    def command(self, cls: int, cmd: int, data: bytes = b"") -> None:
        if len(data) + 3 > self.BUF:
            raise ValueError("control command too long")
        n = len(data) + 2
        self.view[0] = cls
        self.view[1] = cmd
        self.view[2:n] = np.frombuffer(data, dtype=np.uint8)
        ack_off = (n + 63) & ~63
        self.view[ack_off] = 0xFF
        base = self.memory.iova(self.offset)
        self.vq.add([(base, n)], [(base + ack_off, 1)])
        self.vq.kick()
        deadline = time.monotonic() + self.timeout
        while True:
            used = self.vq.get_used()
            if used is not None:
                break
            if time.monotonic() > deadline:
                raise DeviceError(f"control command {cls}.{cmd} not completed within {self.timeout} s; "
                                  "the device is not processing its control queue")
            time.sleep(0.0002)
        self.commands += 1
        ack = int(self.view[ack_off])
        if ack != F.CTRL_OK:
            raise DeviceError(f"the device refused control command class {cls} command {cmd} (ack {ack})")

    def close(self) -> None:
        del self.view


LinkCallback = Callable[[Link], None]

__all__ = ["WANTED", "MANDATORY", "negotiate", "hdr_len_for", "Link", "NetConfig", "read_net_config",
           "link_from", "random_mac", "format_mac", "parse_mac", "ControlQueue", "rx_queue_index",
           "tx_queue_index", "ctrl_queue_index", "QueueStateError"]
