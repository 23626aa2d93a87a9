import numpy as np
import numpy.typing as npt

from ._virtqueue import DeviceQueue

def generator_turns(txs: list[DeviceQueue], rxs: list[DeviceQueue], frames: npt.NDArray[np.uint8], payload: int,
                    next_seq: npt.NDArray[np.int64], max_seen: npt.NDArray[np.int64],
                    queue_flows: npt.NDArray[np.uint32], queue_start: npt.NDArray[np.uint32],
                    cursor: npt.NDArray[np.uint32], budget: int, limit: int, hdr_len: int = 12,
                    mergeable: bool = False, row_width: int = 2048, hashes: npt.NDArray[np.uint32] | None = None,
                    reports: npt.NDArray[np.uint16] | None = None, idle_rounds: int = 64,
                    max_ns: int = 1000000) -> tuple[int, int, int, int, int, int]: ...
