from typing import overload

import numpy as np
import numpy.typing as npt

from ..memory._dma import DmaMemory
from typing_extensions import disjoint_base

DEFAULT_BUFFER_SIZE: int
DEFAULT_HEADROOM: int
MAX_HDR_LEN: int

@disjoint_base
class PacketPool:
    memory: DmaMemory
    n_buffers: int
    buffer_size: int
    headroom: int
    offset: int
    def __init__(self, memory: DmaMemory, n_buffers: int, buffer_size: int = 2048,
                 headroom: int = 64) -> None: ...
    @property
    def data_room(self) -> int: ...
    @property
    def available(self) -> int: ...
    @property
    def array(self) -> npt.NDArray[np.uint8]: ...
    @property
    def data(self) -> npt.NDArray[np.uint8]: ...
    def iova_of(self, buffer_id: int) -> int: ...
    def state_of(self, buffer_id: int) -> str: ...
    @overload
    def alloc(self, n: None = None) -> int: ...
    @overload
    def alloc(self, n: int) -> npt.NDArray[np.uint32]: ...
    def free(self, ids: int | npt.ArrayLike) -> None: ...
    def close(self) -> None: ...
