"""``mmap``/``munmap`` as the C library has them, for mappings of a peer's file.

Python's ``mmap`` objects cannot map at a fixed address and refuse to close
while a view of them exists; a BAR window or a DMA window must stay at one
address until pmd unmaps it, exactly when the peer says so. So these mappings
are made with the C library's own calls (ctypes) and their addresses are plain
integers; the callers keep the code that touches them from outliving them.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MAP_FIXED", "PROT_NONE", "mmap_raw", "munmap_raw"]

MAP_FIXED = 0x10  # Linux, all architectures pmd runs on
PROT_NONE = 0     # not exported by Python's mmap module

_libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded into this process
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def mmap_raw(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """mmap(2); the address of the mapping, or ``OSError`` with the errno."""
    result = _libc.mmap(addr or None, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def munmap_raw(addr: int, length: int) -> None:
    """munmap(2), ``OSError`` with the errno when it fails."""
    if _libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
