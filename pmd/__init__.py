"""pmd: a user-space virtio-net poll-mode driver for Python.

Two sides over one vocabulary (docs/architecture.md):

- :mod:`pmd.abi`, :mod:`pmd.memory`, :mod:`pmd.errors`: what both sides share
  (the virtio, virtio-net, PCI, VFIO, vfio-user and vhost-user vocabulary; DMA memory);
- :mod:`pmd.driver`: the driver (device access, interrupts, the Cython data
  path, the virtio transports, virtio-net, :class:`Port`);
- :mod:`pmd.sim`: the built-in device (its model, engine, wires, vfio-user server);
- :mod:`pmd.backends` (:func:`open_port`), :mod:`pmd.loopback`, :mod:`pmd.fwd`,
  :mod:`pmd.cli`: what stands above both.

The names below are loaded on first use, so that ``import pmd.abi.pci`` does
not pull in numpy or the compiled core. The import paths before issue 9
(``pmd.vfio``, ``pmd._burst``, ...) still work, deprecated (:mod:`pmd._compat`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _compat
from .errors import (
    ConfigSpaceError,
    DeviceError,
    PmdError,
    PoolError,
    QueueStateError,
    VfioError,
)

if TYPE_CHECKING:
    from .backends import open_port
    from .driver._mmio import Mmio
    from .driver._pool import PacketPool
    from .driver._rx import RxQueue
    from .driver._tx import TxQueue
    from .driver._virtqueue import Virtqueue
    from .driver.port import Port
    from .driver.virtio.net import Link
    from .loopback import Loopback
    from .memory._dma import DmaMemory
    from .sim._virtqueue import DeviceQueue

__version__ = "0.1.0"

_LAZY = {
    "Mmio": "pmd.driver._mmio",
    "DmaMemory": "pmd.memory._dma",
    "PacketPool": "pmd.driver._pool",
    "Virtqueue": "pmd.driver._virtqueue",
    "DeviceQueue": "pmd.sim._virtqueue",
    "RxQueue": "pmd.driver._rx",
    "TxQueue": "pmd.driver._tx",
    "Loopback": "pmd.loopback",
    "Port": "pmd.driver.port",
    "open_port": "pmd.backends",
    "Link": "pmd.driver.virtio.net",
}

__all__ = [
    "ConfigSpaceError",
    "DeviceError",
    "PmdError",
    "PoolError",
    "QueueStateError",
    "VfioError",
    "Mmio",
    "DmaMemory",
    "PacketPool",
    "Virtqueue",
    "DeviceQueue",
    "RxQueue",
    "TxQueue",
    "Loopback",
    "Port",
    "open_port",
    "Link",
]

_compat.install()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pmd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
