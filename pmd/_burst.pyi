from typing import Any

import numpy as np
import numpy.typing as npt

from ._pool import PacketPool
from ._virtqueue import Virtqueue
from typing_extensions import disjoint_base

DEF_HDR_LEN: int

@disjoint_base
class _Queue:
    vq: Virtqueue
    pool: PacketPool
    hdr_len: int
    strict: bool
    packets: int
    bytes: int
    dropped: int
    def __init__(self, vq: Virtqueue, pool: PacketPool, *, hdr_len: int = 12, strict: bool = False) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> _Queue: ...
    def __exit__(self, *exc: object) -> None: ...

@disjoint_base
class RxQueue(_Queue):
    no_buffer: int
    truncated: int
    bad_num_buffers: int
    zc_multi_dropped: int
    mergeable: bool
    def __init__(self, vq: Virtqueue, pool: PacketPool, *, mergeable: bool = False,
                 max_packet_len: int = 9216, hdr_len: int = 12, strict: bool = False) -> None: ...
    @property
    def max_packet_len(self) -> int: ...
    def fill(self) -> int: ...
    def rx_burst(self, out: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], *,
                 truncate: bool = False) -> int: ...
    def rx_burst_zc(self, ids: npt.NDArray[np.uint32], lengths: npt.NDArray[np.uint32]) -> int: ...

@disjoint_base
class TxQueue(_Queue):
    ring_full: int
    @property
    def max_packet_len(self) -> int: ...
    def reclaim(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    def tx_burst(self, packets: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32]) -> int: ...
    def tx_burst_zc(self, ids: npt.NDArray[np.uint32], lengths: npt.NDArray[np.uint32]) -> int: ...
