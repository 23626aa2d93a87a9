import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

from ._pool import PacketPool
from ._queue import _Queue
from ._virtqueue import Virtqueue

MAX_TX_CHAIN: int

@disjoint_base
class TxQueue(_Queue):
    ring_full: int
    def __init__(self, vq: Virtqueue, pool: PacketPool, *, hdr_len: int = 12, strict: bool = False) -> None: ...
    @property
    def max_packet_len(self) -> int: ...
    def reclaim(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    def tx_burst(self, packets: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32]) -> int: ...
    def tx_burst_zc(self, ids: npt.NDArray[np.uint32], lengths: npt.NDArray[np.uint32]) -> int: ...
