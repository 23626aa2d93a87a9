"""The virtio-net function of the built-in device (Virtio 1.2 5.1), device side.

What makes the device a network card, as a part (:class:`VirtioNetFunction`)
of the device model (:class:`pmd.sim.model.VirtioNetModel`):

- the features it offers (each can be turned off) and the ones it refuses at
  FEATURES_OK (5.1.3.1: a subset of the offer, VERSION_1, ACCESS_PLATFORM, no
  feature that needs the control queue without it);
- its queues (5.1.2: receiveq1, transmitq1, ..., controlq);
- its device configuration (5.1.4): MAC, status (LINK_UP), max_virtqueue_pairs,
  MTU, speed and duplex, laid out as :data:`pmd.abi.virtio_net.NET_CONFIG`;
  the link can go down and up (a configuration change);
- the control queue's commands (5.1.6.5): RX_PROMISC, RX_ALLMULTI,
  MAC_TABLE_SET, MAC_ADDR_SET, MQ_VQ_PAIRS_SET, MQ_RSS_CONFIG, MQ_HASH_CONFIG,
  every field checked (VIRTIO_NET_ERR otherwise); they set the receive filter,
  the active pairs and the RSS state (the engine's :class:`pmd.sim._rss.RssState`).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..abi import virtio as V, virtio_net as N
from ..abi.ethernet import ETH_ALEN
from . import pci_config as C
from .engine import RxFilter, mac_key

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["OFFERED_NAMES", "OFFERED", "MULTIQUEUE_ONLY", "MAC_TABLE_MAX", "DEFAULT_MAC", "RSS_KEY_SIZE",
           "RSS_TABLE_LENGTH", "SUPPORTED_HASH_TYPES", "VirtioNetFunction"]

log = logging.getLogger("pmd.sim")

# ---- what the device offers (each can be turned off) ----
OFFERED_NAMES = ("VERSION_1", "ACCESS_PLATFORM", "MAC", "STATUS", "MRG_RXBUF", "CTRL_VQ", "CTRL_RX",
                 "MQ", "EVENT_IDX", "MTU", "CTRL_MAC_ADDR", "RING_PACKED", "IN_ORDER",
                 "INDIRECT_DESC", "RSS", "HASH_REPORT")
OFFERED = N.parse_features(",".join(OFFERED_NAMES))
#: offered only by a device with several queue pairs (with one there is nothing to steer,
#: and the 20-byte header would cost every packet for a hash nobody asked for)
MULTIQUEUE_ONLY = V.bit(N.NET_RSS) | V.bit(N.NET_HASH_REPORT)
RSS_KEY_SIZE = N.RSS_MIN_KEY_SIZE           # rss_max_key_size: 40 (5.1.4.1)
RSS_TABLE_LENGTH = N.RSS_MIN_TABLE_LENGTH   # rss_max_indirection_table_length: 128 (5.1.4.1)
#: the hash types computed (5.1.6.4.3.1); the _EX ones (IPv6 home address / routing header) are not
SUPPORTED_HASH_TYPES = (N.HASH_TYPE_IPv4 | N.HASH_TYPE_TCPv4 | N.HASH_TYPE_UDPv4 | N.HASH_TYPE_IPv6
                        | N.HASH_TYPE_TCPv6 | N.HASH_TYPE_UDPv6)
MAC_TABLE_MAX = 64          # entries per table (QEMU's MAC_TABLE_ENTRIES)
DEFAULT_MAC = bytes.fromhex("02504d440001")     # locally administered, "PMD"


class VirtioNetFunction:
    """The virtio-net half of the built-in device: features, queues, configuration, commands.

    A part of :class:`pmd.sim.model.VirtioNetModel`, which holds the state named below.
    """

    # the state of the device model this is part of
    name: str
    features: int
    driver_features: int
    offered: int
    features_refusal: str
    max_pairs: int
    mtu: int
    mac: bytes
    link_up: bool
    config_generation: int
    rx_filter: RxFilter
    engine: Engine
    _lock: threading.RLock
    _cfg_lock: threading.Lock
    _config_changed: Callable[..., None]

    def _queue_role(self, index: int) -> tuple[str, int] | None:
        """5.1.2: receiveq1, transmitq1, ... receiveqN, transmitqN, controlq, by negotiated features."""
        # N = max_virtqueue_pairs with MQ or RSS, else 1
        mq = bool(self.features & (V.bit(N.NET_MQ) | V.bit(N.NET_RSS)))
        pairs = self.max_pairs if mq else 1
        if index < 2 * pairs:
            return ("rx" if index % 2 == 0 else "tx"), index // 2
        if self.features & V.bit(N.NET_CTRL_VQ) and index == N.ctrl_queue_index(self.features, self.max_pairs):
            return "ctrl", 0
        return None

    def _accept_features(self) -> bool:
        """FEATURES_OK: a subset of the offer and consistent (5.1.3.1), else refused."""
        f = self.driver_features
        why = ""
        if f & ~self.offered:
            why = f"features not offered: {', '.join(N.feature_names(f & ~self.offered))}"
        elif not f & V.bit(V.VERSION_1):
            why = "VERSION_1 not accepted (a modern-only device, 4.1.2.1)"
        elif self.offered & V.bit(V.ACCESS_PLATFORM) and not f & V.bit(V.ACCESS_PLATFORM):
            why = "ACCESS_PLATFORM not accepted: the device reaches memory only through DMA mappings (6.1)"
        elif f & N.NEEDS_CTRL_VQ and not f & V.bit(N.NET_CTRL_VQ):
            why = f"{', '.join(N.feature_names(f & N.NEEDS_CTRL_VQ))} without CTRL_VQ (5.1.3.1)"
        self.features_refusal = why
        if why:
            log.info("%s: FEATURES_OK refused: %s", self.name, why)
        return not why

    # ---- device configuration (5.1.4) ----
    def _device_config(self) -> bytes:
        with self._cfg_lock:
            mac, up = self.mac, self.link_up
        status = N.NET_S_LINK_UP if up or not self.offered & V.bit(N.NET_STATUS) else 0
        mtu = self.mtu if self.offered & V.bit(N.NET_MTU) else 0
        cfg = bytearray(C.DEVICE_LENGTH)
        cfg[N.NET_CFG_MAC:N.NET_CFG_MAC + ETH_ALEN] = mac
        struct.pack_into("<H", cfg, N.NET_CFG_STATUS, status)
        struct.pack_into("<H", cfg, N.NET_CFG_MAX_QUEUE_PAIRS, self.max_pairs)
        struct.pack_into("<H", cfg, N.NET_CFG_MTU, mtu)
        struct.pack_into("<I", cfg, N.NET_CFG_SPEED, N.SPEED_UNKNOWN)
        cfg[N.NET_CFG_DUPLEX] = N.DUPLEX_UNKNOWN
        if self.offered & MULTIQUEUE_ONLY:
            # 5.1.4: rss_max_key_size with RSS or HASH_REPORT, the table length with RSS
            cfg[N.NET_CFG_RSS_MAX_KEY_SIZE] = RSS_KEY_SIZE
            if self.offered & V.bit(N.NET_RSS):
                struct.pack_into("<H", cfg, N.NET_CFG_RSS_MAX_TABLE_LENGTH, RSS_TABLE_LENGTH)
            struct.pack_into("<I", cfg, N.NET_CFG_SUPPORTED_HASH_TYPES, SUPPORTED_HASH_TYPES)
        return bytes(cfg)

    # ---- the link (5.1.4 status), set from outside (the control socket, tests) ----
    def set_link(self, up: bool) -> None:
        """Link up or down (5.1.4 status LINK_UP), with a configuration change interrupt.
        While down, what the driver sends is dropped and nothing is received."""
        with self._lock:
            if bool(up) == self.link_up:
                return
            with self._cfg_lock:
                self.link_up = bool(up)
            self.engine.link_up = bool(up)
            if self.offered & V.bit(N.NET_STATUS):
                self._config_changed()

    # ---- control queue (5.1.6.5), called on the engine thread ----
    def _control(self, cls: int, cmd: int, data: bytes) -> int:
        ok, err = N.CTRL_OK, N.CTRL_ERR
        feats = self.features
        if cls == N.CTRL_RX and feats & V.bit(N.NET_CTRL_RX):
            if cmd in (N.CTRL_RX_PROMISC, N.CTRL_RX_ALLMULTI) and len(data) == 1 and data[0] in (0, 1):
                if cmd == N.CTRL_RX_PROMISC:
                    self.rx_filter.promiscuous = bool(data[0])
                else:
                    self.rx_filter.allmulti = bool(data[0])
                return ok
            return err
        if cls == N.CTRL_MAC and cmd == N.CTRL_MAC_TABLE_SET and feats & V.bit(N.NET_CTRL_RX):
            tables = self._parse_mac_tables(data)
            if tables is None:
                return err
            self.rx_filter.unicast = {mac_key(m) for m in tables[0]}
            self.rx_filter.multicast = {mac_key(m) for m in tables[1]}
            return ok
        if cls == N.CTRL_MAC and cmd == N.CTRL_MAC_ADDR_SET and feats & V.bit(N.NET_CTRL_MAC_ADDR):
            if len(data) != ETH_ALEN or data[0] & 1 or data == bytes(ETH_ALEN):
                return err
            with self._cfg_lock:
                if data != self.mac:
                    self.mac = bytes(data)
                    self.config_generation = (self.config_generation + 1) & 0xFF
            self.rx_filter.mac = bytes(data)
            return ok
        if cls == N.CTRL_MQ and cmd == N.CTRL_MQ_VQ_PAIRS_SET and feats & V.bit(N.NET_MQ):
            if len(data) != 2:
                return err
            pairs = int.from_bytes(data, "little")
            # 5.1.6.5.5: 1 (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN) to max_virtqueue_pairs.
            if not 1 <= pairs <= self.max_pairs:
                return err
            self.engine.active_pairs = pairs
            # 5.1.6.5.6: the last multiqueue command decides: automatic steering again
            # (the hash types and key stay, for the hash report)
            rss = self.engine.rss
            if rss.redirect:
                rss.configure(rss.hash_types, rss.key)
            return ok
        if cls == N.CTRL_MQ and cmd == N.CTRL_MQ_RSS_CONFIG and feats & V.bit(N.NET_RSS):
            return ok if self._rss_config(data) else err
        if cls == N.CTRL_MQ and cmd == N.CTRL_MQ_HASH_CONFIG and feats & V.bit(N.NET_HASH_REPORT):
            return ok if self._hash_config(data) else err
        return err

    def _rss_config(self, data: bytes) -> bool:
        """5.1.6.5.7.1: le32 hash_types, le16 indirection_table_mask, le16 unclassified_queue,
        le16 indirection_table[mask + 1], le16 max_tx_vq, u8 hash_key_length, key; nothing after.
        Every value is the driver's: checked against what the device said it supports."""
        if len(data) < 8:
            return False
        hash_types, mask, unclassified = struct.unpack_from("<IHH", data, 0)
        length = mask + 1
        # a power of two, no longer than rss_max_indirection_table_length (5.1.6.5.7.1)
        if length & mask or length > RSS_TABLE_LENGTH:
            return False
        pos = 8 + 2 * length
        if len(data) < pos + 3:
            return False
        table = struct.unpack_from(f"<{length}H", data, 8)
        max_tx_vq, key_len = struct.unpack_from("<HB", data, pos)
        pos += 3
        if key_len > RSS_KEY_SIZE or len(data) != pos + key_len:
            return False
        if hash_types & ~SUPPORTED_HASH_TYPES:
            return False
        # queue ids are receive queue numbers (bits 1-16 of the virtqueue index); the
        # reserved bit 15 set makes one >= 0x8000, past any queue there is
        if unclassified >= self.max_pairs or max(table) >= self.max_pairs:
            return False
        if not 1 <= max_tx_vq <= self.max_pairs:
            return False
        self.engine.rss.configure(hash_types, bytes(data[pos:pos + key_len]), table, unclassified)
        # RSS_CONFIG acts as VQ_PAIRS_SET too: every queue it names is in use
        self.engine.active_pairs = max(max_tx_vq, max(table) + 1, unclassified + 1)
        return True

    def _hash_config(self, data: bytes) -> bool:
        """5.1.6.5.6.4: le32 hash_types, le16 reserved[4] (zero), u8 hash_key_length, key;
        nothing after. Hash for the header only: packets keep the automatic steering."""
        if len(data) < 13:
            return False
        hash_types = int.from_bytes(data[0:4], "little")
        key_len = data[12]
        if any(data[4:12]) or key_len > RSS_KEY_SIZE or len(data) != 13 + key_len:
            return False
        if hash_types & ~SUPPORTED_HASH_TYPES:
            return False
        self.engine.rss.configure(hash_types, bytes(data[13:]))
        return True

    @staticmethod
    def _parse_mac_tables(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
        """5.1.6.5.2: le32 entries + macs (unicast), then le32 entries + macs (multicast), nothing after."""
        tables: list[list[bytes]] = []
        pos = 0
        for multicast in (False, True):
            if pos + 4 > len(data):
                return None
            n = int.from_bytes(data[pos:pos + 4], "little")
            pos += 4
            if n > MAC_TABLE_MAX or pos + 6 * n > len(data):
                return None
            macs = [bytes(data[pos + 6 * i:pos + 6 * i + 6]) for i in range(n)]
            if any(bool(m[0] & 1) != multicast for m in macs):
                return None
            tables.append(macs)
            pos += 6 * n
        if pos != len(data):
            return None
        return tables[0], tables[1]
