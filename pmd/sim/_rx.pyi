import numpy as np
import numpy.typing as npt

from ._virtqueue import DeviceQueue

def device_rx_generate(rx: DeviceQueue, frame: npt.NDArray[np.uint8], n: int, seq_offset: int, first_seq: int,
                       hdr_len: int = 12, mergeable: bool = False) -> int: ...
def device_rx_burst(rx: DeviceQueue, packets: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32],
                    n: int = -1, hdr_len: int = 12, mergeable: bool = False) -> int: ...
def device_rx_steered(rx: DeviceQueue, packets: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32],
                      queues: npt.NDArray[np.uint16], hashes: npt.NDArray[np.uint32],
                      reports: npt.NDArray[np.uint16], done: npt.NDArray[np.uint8], start: int, n: int,
                      queue: int, hdr_len: int = 12, mergeable: bool = False) -> int: ...
