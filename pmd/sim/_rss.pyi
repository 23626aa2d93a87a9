from typing import Iterable

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer, disjoint_base

TABLE_MAX: int
KEY_MAX: int

@disjoint_base
class RssState:
    active: bool
    redirect: bool
    hash_types: int
    unclassified_queue: int
    table_len: int
    key_len: int
    def __init__(self) -> None: ...
    def reset(self) -> None: ...
    def configure(self, hash_types: int, key: bytes, table: Iterable[int] | None = None,
                  unclassified_queue: int = 0) -> None: ...
    @property
    def key(self) -> bytes: ...
    @property
    def table(self) -> list[int]: ...
    def hash(self, frame: Buffer, source: int = 0) -> tuple[int, int, int]: ...
    def classify_burst(self, rows: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], start: int, n: int,
                       source: int, queues: npt.NDArray[np.uint16], hashes: npt.NDArray[np.uint32],
                       reports: npt.NDArray[np.uint16]) -> None: ...
