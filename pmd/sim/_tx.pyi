import numpy as np
import numpy.typing as npt

from ._virtqueue import DeviceQueue

def tx_to_rx(tx: DeviceQueue, rx: DeviceQueue, budget: int = 256, hdr_len: int = 12,
             mergeable: bool = False) -> int: ...
def device_tx_burst(tx: DeviceQueue, out: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32],
                    hdr_len: int = 12) -> int: ...
