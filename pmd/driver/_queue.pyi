from typing import Any

from typing_extensions import disjoint_base

from ._pool import PacketPool
from ._virtqueue import Virtqueue

DEF_HDR_LEN: int

def bursts_release_gil() -> bool: ...
def gil_handoffs() -> dict[str, int]: ...

GIL_ALWAYS_KEPT: bool

@disjoint_base
class _Queue:
    vq: Virtqueue
    pool: PacketPool
    hdr_len: int
    strict: bool
    packets: int
    bytes: int
    dropped: int
    foreign_chains: int
    def __init__(self, vq: Virtqueue, pool: PacketPool, *, hdr_len: int = 12, strict: bool = False) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def fence(self) -> None: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> _Queue: ...
    def __exit__(self, *exc: object) -> None: ...
