
import numpy as np
import numpy.typing as npt

PCAP_RECORD: int
EPB_OVERHEAD: int

_Ts = int | npt.NDArray[np.uint64] | None

def record_bound(n: int, width: int, snaplen: int) -> int: ...
def pcap_records(out: npt.NDArray[np.uint8], pos: int, data: npt.NDArray[np.uint8],
                 lengths: npt.NDArray[np.uint32], n: int | None = None, *, ids: npt.NDArray[np.uint32] | None = None,
                 ts_ns: _Ts = None, snaplen: int = 65535, nanosecond: bool = False) -> int: ...
def pcapng_blocks(out: npt.NDArray[np.uint8], pos: int, data: npt.NDArray[np.uint8],
                  lengths: npt.NDArray[np.uint32], n: int | None = None, *, ids: npt.NDArray[np.uint32] | None = None,
                  ts_ns: _Ts = None, snaplen: int = 65535, interface: int = 0) -> int: ...
def binary_column(data: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int | None = None, *,
                  ids: npt.NDArray[np.uint32] | None = None,
                  snaplen: int = 65535) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8]]: ...
def captured_lengths(data: npt.NDArray[np.uint8], lengths: npt.NDArray[np.uint32], n: int | None = None, *,
                     ids: npt.NDArray[np.uint32] | None = None, snaplen: int = 65535) -> npt.NDArray[np.uint32]: ...
