"""Memory both sides share: DMA memory, the seals that make sharing it safe, raw mappings.

- :class:`DmaMemory` (:mod:`pmd.memory._dma`, Cython): one locked memfd region the
  driver carves rings and buffers from and hands to a device by fd;
- :mod:`pmd.memory.seals`: memfds a peer cannot shrink (a truncated shared file
  would kill the process that touches it with SIGBUS);
- :mod:`pmd.memory.raw`: ``mmap``/``munmap`` at addresses that stay valid until
  unmapped, for mappings of a peer's file (BAR windows, DMA windows).

``DmaMemory`` is loaded on first use, so ``pmd.memory.seals`` costs no compiled module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._dma import DmaMemory

__all__ = ["DmaMemory"]


def __getattr__(name: str) -> Any:
    if name != "DmaMemory":
        raise AttributeError(f"module 'pmd.memory' has no attribute {name!r}")
    value = importlib.import_module("pmd.memory._dma").DmaMemory
    globals()[name] = value
    return value
