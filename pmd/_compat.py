"""The import paths of pmd before issue 9, as deprecated aliases of the new ones.

pmd's modules moved into the shared vocabulary (:mod:`pmd.abi`, :mod:`pmd.memory`),
the driver side (:mod:`pmd.driver`), the device side (:mod:`pmd.sim`) and the
factory above both (:mod:`pmd.backends`). A program written against the old
paths keeps working: ``import pmd.vfio`` or ``from pmd._burst import RxQueue``
go through the finder below, which warns ``DeprecationWarning`` once per old
name and hands out the new objects (the same classes: ``isinstance`` holds).

- an old module that moved whole is the new module itself (``pmd._memory`` is
  ``pmd.memory._dma``);
- an old module that was split is an alias module that finds each old public name
  in the modules its contents went to, in order; a renamed one
  (``VfioDevice`` -> ``VfioAccess``) warns on its own when used.

Installed by ``import pmd`` (:func:`install`). New code imports the new paths;
tests/test_layers.py keeps this module out of the package's own imports.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MOVED", "SPLIT", "install"]

#: old module -> the new module that is all of it
MOVED: dict[str, str] = {
    "pmd._memory": "pmd.memory._dma",
    "pmd._mmio": "pmd.driver._mmio",
    "pmd._pool": "pmd.driver._pool",
    "pmd.interrupts": "pmd.driver.interrupts",
    "pmd.pcap": "pmd.abi.pcap",
    "pmd.shm": "pmd.memory.seals",
    "pmd.vfio_user.protocol": "pmd.abi.vfio_user",
    "pmd.vfio_user.server": "pmd.sim.server",
    "pmd.vfio_user.model": "pmd.sim.server",
    "pmd.sim.config": "pmd.sim.pci_config",
    "pmd.sim.local": "pmd.backends.local",
}

_VFIO_USER_ACCESS = ("pmd.driver.access.vfio_user", "VfioUserAccess")
_LEGACY_REGISTERS = ("HOST_FEATURES", "GUEST_FEATURES", "QUEUE_PFN", "QUEUE_NUM", "QUEUE_SEL", "QUEUE_NOTIFY",
                     "STATUS", "ISR", "MSI_CONFIG_VECTOR", "MSI_QUEUE_VECTOR", "CONFIG_NO_MSIX", "CONFIG_MSIX",
                     "PFN_SHIFT")
_FEATURE_RENAMES = {"names": ("pmd.abi.virtio_net", "feature_names"),
                    "parse": ("pmd.abi.virtio_net", "parse_features"),
                    "NAMES": ("pmd.abi.virtio_net", "FEATURE_NAMES"),
                    "BY_NAME": ("pmd.abi.virtio_net", "FEATURES_BY_NAME")}

#: old module -> (the new modules its names went to, in search order; renamed names: old -> (module, new),
#: where a new name "" is the module itself)
SPLIT: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, str]]]] = {
    "pmd._burst": (("pmd.driver._rx", "pmd.driver._tx", "pmd.driver._queue"), {}),
    "pmd._device": (("pmd.sim._virtqueue", "pmd.sim._dma", "pmd.sim._rx", "pmd.sim._tx"),
                    {"loopback": ("pmd.sim._tx", "tx_to_rx")}),
    "pmd._virtqueue": (("pmd.driver._virtqueue", "pmd.abi._layout"), {}),
    "pmd.access": (("pmd.driver.access", "pmd.driver.access.iova", "pmd.abi.vfio", "pmd.abi.pci",
                    "pmd.errors"), {}),
    "pmd.vfio": (("pmd.driver.access.vfio", "pmd.abi.vfio", "pmd.driver.access.pagemap", "pmd.driver.sysfs"),
                 {"VfioDevice": ("pmd.driver.access.vfio", "VfioAccess"),
                  "SYSFS_PCI_DEVICES": ("pmd.driver.sysfs", "DEFAULT_SYSFS_PCI_DEVICES")}),
    "pmd.pci": (("pmd.abi.pci", "pmd.driver.sysfs", "pmd.abi.virtio_pci", "pmd.cli.text"), {}),
    "pmd.port": (("pmd.driver.port", "pmd.backends", "pmd.driver.virtio.net"), {}),
    "pmd.virtio": (("pmd.driver.virtio.pci", "pmd.driver.virtio.transport", "pmd.driver.virtio.modern",
                    "pmd.driver.virtio.legacy", "pmd.abi.virtio"), {}),
    "pmd.virtio.features": (("pmd.abi.virtio", "pmd.abi.virtio_net"), _FEATURE_RENAMES),
    "pmd.virtio.transport": (("pmd.driver.virtio.transport", "pmd.abi.virtio"),
                             {"F": ("pmd.virtio.features", "")}),
    "pmd.virtio.modern": (("pmd.driver.virtio.modern", "pmd.abi.virtio_pci"), {}),
    "pmd.virtio.legacy": (("pmd.driver.virtio.legacy", "pmd.abi.virtio"),
                          {name: ("pmd.abi.virtio_pci", f"LEGACY_{name}") for name in _LEGACY_REGISTERS}),
    "pmd.virtio.net": (("pmd.driver.virtio.net", "pmd.abi.virtio_net", "pmd.abi.ethernet", "pmd.errors"), {}),
    "pmd.vfio_user": (("pmd.sim.server",), {"VfioUserDevice": _VFIO_USER_ACCESS}),
    "pmd.vfio_user.client": (("pmd.driver.access.vfio_user",), {"VfioUserDevice": _VFIO_USER_ACCESS}),
    "pmd.sim.device": (("pmd.sim.model", "pmd.sim.net", "pmd.sim.virtio_pci", "pmd.abi.virtio"), {}),
}

#: old packages: their submodules (pmd.virtio.net) are old names too
_PACKAGES = {"pmd.virtio", "pmd.vfio_user"}


def _common_fields() -> dict[int, tuple[int, str]]:
    from .abi.virtio_pci import COMMON_CFG

    return {f.offset: (f.width, f.name) for f in COMMON_CFG}


def _normalize_pci_address(address: str) -> str:
    from .errors import vfio_error
    from .abi.pci import PciAddress

    try:
        return str(PciAddress.parse(address))
    except ValueError as exc:
        raise vfio_error(f"{address!r} is not a PCI address: {exc}", 22) from None


def _sysfs_pci_root() -> str:
    from .driver.sysfs import sysfs_pci_devices

    return str(sysfs_pci_devices())


#: old names that no longer exist as such: old module -> name -> what computes the value
_SHIMS: dict[str, dict[str, Callable[[], Any]]] = {
    "pmd.sim.device": {"COMMON_FIELDS": _common_fields},
    "pmd.vfio": {"normalize_pci_address": lambda: _normalize_pci_address,
                 "sysfs_pci_root": lambda: _sysfs_pci_root},
}

_warned: set[str] = set()


def _stacklevel() -> int:
    """The frame of the code that asked for the old name: past this module's frames
    (``warnings.warn`` skips the import machinery's by itself)."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None:
        frame = frame.f_back
        if frame.f_code.co_filename != __file__ and not frame.f_code.co_filename.startswith("<frozen importlib"):
            return level + 1
        if frame.f_code.co_filename == __file__:
            level += 1
    return level


def _warn(old: str, instead: str) -> None:
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{old} is deprecated: pmd's modules moved (docs/architecture.md); use {instead}",
                  DeprecationWarning,
                  stacklevel=_stacklevel())


class _SplitModule(types.ModuleType):
    """An old module whose names now live in several modules."""

    _sources: Sequence[str]
    _renames: dict[str, tuple[str, str]]

    def __getattr__(self, name: str) -> Any:
        old = self.__name__
        if name == "__all__":
            names = set(self._renames) | set(_SHIMS.get(old, {}))
            for source in self._sources:
                names.update(getattr(importlib.import_module(source), "__all__", ()))
            return sorted(names)
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._renames:
            module, new = self._renames[name]
            _warn(f"{old}.{name}", f"{module}.{new}" if new else module)
            found = importlib.import_module(module)
            return getattr(found, new) if new else found
        shim = _SHIMS.get(old, {}).get(name)
        if shim is not None:
            return shim()
        for source in self._sources:
            module_obj = importlib.import_module(source)
            if hasattr(module_obj, name):
                return getattr(module_obj, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it was split into "
                             f"{', '.join(self._sources)})")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.__getattr__("__all__")))


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        if spec.name in SPLIT:
            module = _SplitModule(spec.name)
            module._sources, module._renames = SPLIT[spec.name]
            return module
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        if name in SPLIT:
            _warn(name, " or ".join(SPLIT[name][0]))
            return
        new = MOVED[name]
        _warn(name, new)
        # The import system hands out what sys.modules holds once this returns: the new module.
        sys.modules[name] = importlib.import_module(new)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED and fullname not in SPLIT:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader(), is_package=fullname in _PACKAGES)


_finder = _Finder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent): an old path never reaches a stale file."""
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
