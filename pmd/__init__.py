"""pmd: a user-space virtio-net poll-mode driver for Python.

The data path (``DmaMemory``, ``PacketPool``, ``Virtqueue``, ``RxQueue``,
``TxQueue``) is Cython; the control path (``pmd.pci``, ``pmd.vfio``,
``pmd.interrupts``) is Python. Names are loaded on first use so that
``import pmd.pci`` does not pull in numpy or the compiled core.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    ConfigSpaceError,
    DeviceError,
    PmdError,
    PoolError,
    QueueStateError,
    VfioError,
)

__version__ = "0.1.0"

_LAZY = {
    "Mmio": "pmd._mmio",
    "DmaMemory": "pmd._memory",
    "PacketPool": "pmd._pool",
    "Virtqueue": "pmd._virtqueue",
    "DeviceQueue": "pmd._device",
    "RxQueue": "pmd._burst",
    "TxQueue": "pmd._burst",
    "Loopback": "pmd.loopback",
    "Port": "pmd.port",
    "open_port": "pmd.port",
    "Link": "pmd.virtio.net",
}

__all__ = [
    "ConfigSpaceError",
    "DeviceError",
    "PmdError",
    "PoolError",
    "QueueStateError",
    "VfioError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pmd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
