"""The built-in virtio-net device: a software PCI device served over vfio-user.

- :mod:`pmd.sim.config`: its PCI configuration space (capabilities, BAR, MSI-X);
- :mod:`pmd.sim.device`: :class:`VirtioNetModel`, the vfio-user device model
  (registers, status and features, queues, control queue, interrupts, DMA);
- :mod:`pmd.sim.engine`: the data path thread over the Cython device-side rings;
- :mod:`pmd.sim.wires`: what is behind it (loopback, pair, pcap, generator, tap, null);
- :mod:`pmd.sim.local`: pmd's driver on a model in the same process (no socket);
- :mod:`pmd.sim.process`: a device in its own process (``python -m pmd.sim``,
  :func:`spawn_device`).

See docs/sim.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PciConfig": "pmd.sim.config",
    "VirtioNetModel": "pmd.sim.device",
    "SimOptions": "pmd.sim.device",
    "Engine": "pmd.sim.engine",
    "RxFilter": "pmd.sim.engine",
    "LoopbackWire": "pmd.sim.wires",
    "PcapWire": "pmd.sim.wires",
    "GeneratorWire": "pmd.sim.wires",
    "TapWire": "pmd.sim.wires",
    "NullWire": "pmd.sim.wires",
    "pair_wires": "pmd.sim.wires",
    "make_wire": "pmd.sim.wires",
    "LocalAccess": "pmd.sim.local",
    "open_local_port": "pmd.sim.local",
    "SimProcess": "pmd.sim.process",
    "spawn_device": "pmd.sim.process",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pmd.sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
