import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

from ._pool import PacketPool
from ._queue import _Queue
from ._virtqueue import Virtqueue

@disjoint_base
class RxQueue(_Queue):
    no_buffer: int
    truncated: int
    runt: int
    bad_num_buffers: int
    zc_multi_dropped: int
    mergeable: bool
    def __init__(self, vq: Virtqueue, pool: PacketPool, *, mergeable: bool = False,
                 max_packet_len: int = 9216, hdr_len: int = 12, strict: bool = False) -> None: ...
    @property
    def max_packet_len(self) -> int: ...
    def fill(self) -> int: ...
    def rx_burst(self, out: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], *,
                 truncate: bool = False, timestamps: npt.NDArray[np.uint64] | None = None,
                 hashes: npt.NDArray[np.uint32] | None = None,
                 hash_types: npt.NDArray[np.uint16] | npt.NDArray[np.uint8] | None = None) -> int: ...
    def rx_burst_zc(self, ids: npt.NDArray[np.uint32], lengths: npt.NDArray[np.uint32], *,
                    timestamps: npt.NDArray[np.uint64] | None = None, hashes: npt.NDArray[np.uint32] | None = None,
                    hash_types: npt.NDArray[np.uint16] | npt.NDArray[np.uint8] | None = None) -> int: ...
    def rx_discard(self, max_packets: int = 32) -> int: ...
