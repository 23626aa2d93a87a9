"""The device side of pmd: the built-in virtio-net device, a software PCI device served over vfio-user.

It never imports the driver side (:mod:`pmd.driver`); both build on the shared
vocabulary (:mod:`pmd.abi`) and memory (:mod:`pmd.memory`).

- :mod:`pmd.sim.model`: :class:`VirtioNetModel`, the device model (regions,
  IRQs, DMA, reset, the engine's lifecycle), made of
  :mod:`pmd.sim.virtio_pci` (BAR0's registers: common configuration, status,
  queues, ISR, notifications, MSI-X) and :mod:`pmd.sim.net` (features, device
  configuration, control queue);
- :mod:`pmd.sim.pci_config`: its PCI configuration space (capabilities, BAR, MSI-X);
- :mod:`pmd.sim.engine`: the data path thread over the Cython device-side rings
  (:mod:`pmd.sim._virtqueue`, :mod:`pmd.sim._rx`, :mod:`pmd.sim._tx`, DMA
  windows in :mod:`pmd.sim._dma` and :mod:`pmd.sim.dma`);
- :mod:`pmd.sim.wires`: what is behind it (loopback, pair, pcap, generator, tap, null);
- :mod:`pmd.sim.server`: the vfio-user server and what a device model implements;
- :mod:`pmd.sim.process`: a device in its own process (``python -m pmd.sim``,
  :func:`spawn_device`).

pmd's driver on a model in the same process (no socket) is
:class:`pmd.backends.local.LocalAccess`. See docs/sim.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine, RxFilter
    from .model import SimOptions, VirtioNetModel
    from .pci_config import PciConfig
    from .process import SimProcess, spawn_device
    from .wires import GeneratorWire, LoopbackWire, NullWire, PcapWire, TapWire, make_wire, pair_wires

_LAZY = {
    "PciConfig": "pmd.sim.pci_config",
    "VirtioNetModel": "pmd.sim.model",
    "SimOptions": "pmd.sim.model",
    "Engine": "pmd.sim.engine",
    "RxFilter": "pmd.sim.engine",
    "LoopbackWire": "pmd.sim.wires",
    "PcapWire": "pmd.sim.wires",
    "GeneratorWire": "pmd.sim.wires",
    "TapWire": "pmd.sim.wires",
    "NullWire": "pmd.sim.wires",
    "pair_wires": "pmd.sim.wires",
    "make_wire": "pmd.sim.wires",
    "SimProcess": "pmd.sim.process",
    "spawn_device": "pmd.sim.process",
}

__all__ = ["PciConfig", "VirtioNetModel", "SimOptions", "Engine", "RxFilter", "LoopbackWire", "PcapWire",
           "GeneratorWire", "TapWire", "NullWire", "pair_wires", "make_wire", "SimProcess", "spawn_device"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pmd.sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
