import numpy as np
import numpy.typing as npt

from ._virtqueue import DeviceQueue

def generator_turns(tx: DeviceQueue, rx: DeviceQueue, frame: npt.NDArray[np.uint8], payload: int, first_seq: int,
                    max_seen: int, budget: int, limit: int, hdr_len: int = 12, mergeable: bool = False,
                    row_width: int = 2048, idle_rounds: int = 64,
                    max_ns: int = 1000000) -> tuple[int, int, int, int, int, int, int]: ...
