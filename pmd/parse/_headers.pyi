from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

TRUNCATED: int
MALFORMED: int
SNAPPED: int
FRAGMENT: int
COLUMNS: tuple[tuple[str, str, int], ...]

_Columns = dict[str, npt.NDArray[Any]]

@disjoint_base
class HeaderParser:
    @property
    def capacity(self) -> int: ...
    @property
    def columns(self) -> _Columns: ...
    def __init__(self, capacity: int = 256) -> None: ...
    def parse_into(self, data: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32],
                   n: int | None = None) -> int: ...
    def parse_ids_into(self, data: npt.NDArray[np.uint8], ids: npt.NDArray[np.uint32],
                       lengths: npt.NDArray[np.uint32], n: int | None = None) -> int: ...
    def view(self, n: int) -> _Columns: ...
    def parse(self, data: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32],
              n: int | None = None) -> _Columns: ...
    def parse_ids(self, data: npt.NDArray[np.uint8], ids: npt.NDArray[np.uint32],
                  lengths: npt.NDArray[np.uint32], n: int | None = None) -> _Columns: ...

def parse(data: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int | None = None) -> _Columns: ...
