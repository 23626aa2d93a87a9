"""The architecture, as a test (docs/architecture.md): it reads every import of
the package (ast for .py, the import lines of .pyx/.pxd) and fails on an edge
the design forbids.

- **shared** (the vocabulary at the bottom: ``pmd.abi``, ``pmd.includes``,
  ``pmd.memory``, ``pmd.sockets``, ``pmd.errors``, and ``pmd.parse``, the header parser
  either side may use, with ``pmd.arrow``, its columns as Arrow record batches) imports only shared modules, and the
  vocabulary (``pmd.abi``) only itself, ``pmd.errors`` and ``pmd.includes``;
- **driver** (``pmd.driver``) imports shared and driver modules, never the
  built-in device;
- **device** (``pmd.sim``) imports shared and device modules, never the driver;
- only the **top** (``pmd`` itself, ``pmd.backends``, ``pmd.loopback``,
  ``pmd.fwd``, ``pmd.capture``, ``pmd.cli``) stands above both.

Inside the driver the layers of DESIGN.md hold too (device access, interrupts
and the data path below the virtio transports, the transports below the Port),
and the code above the transport interface (virtio-net, the Port) assumes no
PCI: a vhost-user transport has no DeviceAccess. No module imports another in
a cycle, and nothing (the package, its tests, its benchmarks) imports a path of
before the restructuring: those are deprecated aliases (``pmd._compat``), which
only ``import pmd`` installs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pmd"

SHARED = ("pmd.errors", "pmd.abi", "pmd.includes", "pmd.memory", "pmd.sockets", "pmd.parse", "pmd.arrow")
DRIVER = ("pmd.driver",)
DEVICE = ("pmd.sim",)
TOP = ("pmd", "pmd.__main__", "pmd._compat", "pmd.backends", "pmd.loopback", "pmd.fwd", "pmd.capture", "pmd.cli")

# Driver layers, bottom up: a module may import its own layer and the ones below.
DRIVER_LAYERS = [
    ("pmd.driver.sysfs", "pmd.driver.access", "pmd.driver._mmio",
     "pmd.driver.vhost_user", "pmd.driver.session"),  # reaching a device
    ("pmd.driver.interrupts",),                                                # eventfds, the epoll thread
    ("pmd.driver._pool", "pmd.driver._virtqueue", "pmd.driver._queue",
     "pmd.driver._rx", "pmd.driver._tx", "pmd.driver._fwd"),                   # the data path
    ("pmd.driver.virtio",),                                                    # transports, virtio-net
    ("pmd.driver.port", "pmd.driver"),                                         # the Port
]

# Above the transport interface nothing may assume PCI (issue: vhost-user has no DeviceAccess).
PCI_FREE = ("pmd.driver.port", "pmd.driver.virtio.transport", "pmd.driver.virtio.net", "pmd.driver.virtio.vhost_user")
PCI_ONLY = ("pmd.driver.access", "pmd.driver.sysfs", "pmd.driver._mmio", "pmd.abi.pci", "pmd.abi.vfio",
            "pmd.abi.vfio_user", "pmd.abi.virtio_pci", "pmd.driver.virtio.modern", "pmd.driver.virtio.legacy",
            "pmd.driver.virtio.pci", "pmd.driver.virtio.pci_common")
# The vocabulary is the bottom of the bottom: numbers, layouts, codecs.
ABI_MAY_IMPORT = ("pmd.abi", "pmd.errors", "pmd.includes")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name.startswith("__init__.")


def _resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


_CY_IMPORT = re.compile(r"^\s*(?:from\s+(\.*[\w.]*)\s+c?import\s+(.+)|c?import\s+([\w.]+))")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from X import y`` gives X and X.y)."""
    module, pkg = _module_name(path), _is_package(path)
    found: set[str] = set()
    if path.suffix == ".py" or path.suffix == ".pyi":
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, pkg, node.level, node.module)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    else:  # Cython: import lines are simple enough to read as text
        for line in path.read_text().splitlines():
            m = _CY_IMPORT.match(line.split("#", 1)[0])
            if not m:
                continue
            if m.group(3):
                found.add(m.group(3))
                continue
            src = m.group(1)
            level = len(src) - len(src.lstrip("."))
            base = _resolve(module, pkg, level, src.lstrip(".") or None)
            found.add(base)
            for name in m.group(2).strip("() \\").split(","):
                name = name.strip().split(" as ")[0].strip("() ")
                if name:
                    found.add(f"{base}.{name}")
    return {f for f in found if f == "pmd" or f.startswith("pmd.")}


def _sources(root: Path | None = None) -> list[Path]:
    return sorted(p for ext in ("*.py", "*.pyx", "*.pxd") for p in (root or PKG).rglob(ext))


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _side(name: str) -> str | None:
    for side, prefixes in (("shared", SHARED), ("driver", DRIVER), ("device", DEVICE)):
        if _within(name, prefixes):
            return side
    if name in TOP or any(name.startswith(t + ".") for t in TOP if t != "pmd"):
        return "top"
    return None


def _existing(name: str, modules: set[str]) -> str | None:
    """The module that ``name`` (a module or a module.attribute) refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module_name(p) for p in _sources()}
    edges: dict[str, set[str]] = {}
    for path in _sources():
        src = _module_name(path)
        targets = {_existing(t, modules) for t in _imports(path)}
        edges.setdefault(src, set()).update(t for t in targets if t and t != src)
    return edges


def test_every_module_belongs_to_a_side(graph: dict[str, set[str]]) -> None:
    homeless = sorted(m for m in graph if _side(m) is None)
    assert not homeless, f"modules outside shared/driver/device/top (add them to a side): {homeless}"


def test_the_shared_vocabulary_imports_only_itself(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if _side(m) == "shared"
                 for t in ts if _side(t) != "shared")
    assert not bad, "shared modules must not import a side:\n" + "\n".join(bad)


def test_the_driver_never_imports_the_built_in_device(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if _side(m) == "driver"
                 for t in ts if _side(t) not in ("shared", "driver"))
    assert not bad, "driver modules import the device side or the top:\n" + "\n".join(bad)


def test_the_device_never_imports_the_driver(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if _side(m) == "device"
                 for t in ts if _side(t) not in ("shared", "device"))
    assert not bad, "device modules import the driver side or the top:\n" + "\n".join(bad)


def test_the_vocabulary_imports_nothing_but_vocabulary(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if _within(m, ("pmd.abi",))
                 for t in ts if not _within(t, ABI_MAY_IMPORT))
    assert not bad, "pmd.abi must stay vocabulary (spec, errors, C declarations):\n" + "\n".join(bad)


def test_driver_layers_import_only_downwards(graph: dict[str, set[str]]) -> None:
    def layer(name: str) -> int | None:
        best: tuple[int, int] | None = None
        for i, prefixes in enumerate(DRIVER_LAYERS):
            for p in prefixes:
                if _within(name, (p,)) and (best is None or len(p) > best[1]):
                    best = (i, len(p))
        return None if best is None else best[0]

    bad = []
    for m, ts in graph.items():
        lm = layer(m)
        if lm is None:
            continue
        for t in ts:
            lt = layer(t)
            if lt is not None and lt > lm:
                bad.append(f"{m} (layer {lm}) -> {t} (layer {lt})")
    assert not bad, "a driver layer imports one above it:\n" + "\n".join(sorted(bad))


def test_above_the_transport_interface_nothing_assumes_pci(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if _within(m, PCI_FREE)
                 for t in ts if _within(t, PCI_ONLY))
    assert not bad, "the Port and virtio-net must reach the device through the transport only:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules(graph: dict[str, set[str]]) -> None:
    # Package __init__ files re-export their children: leave the parent -> child edges out.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_import_pmd_installs_the_old_paths(graph: dict[str, set[str]]) -> None:
    users = sorted(m for m, ts in graph.items() if "pmd._compat" in ts and m != "pmd")
    assert not users, f"modules that import pmd._compat (only pmd/__init__.py may): {users}"


def _old_paths() -> set[str]:
    from pmd import _compat

    return set(_compat.MOVED) | set(_compat.SPLIT)


def test_nothing_imports_a_path_of_before_the_restructuring() -> None:
    # The package, its tests and benchmarks use the new paths; the aliases are
    # for programs written against the old ones (tests/test_compat.py checks them).
    old = _old_paths()
    bad = []
    for root in (PKG, ROOT / "tests", ROOT / "bench"):
        for path in _sources(root):
            if path.name in ("test_compat.py", "test_layers.py"):
                continue
            found = _imports(path) if root == PKG else _imports_outside(path)
            bad += [f"{path.relative_to(ROOT)} -> {t}" for t in sorted(found) if t in old]
    assert not bad, "imports of deprecated paths (use the new ones):\n" + "\n".join(bad)


def _imports_outside(path: Path) -> set[str]:
    """The pmd imports of a test or benchmark (absolute ones only: they are not in the package)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
              ("importorskip", "import_module") and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return {f for f in found if f.startswith("pmd.")}


def test_the_reader_sees_forbidden_edges(tmp_path: Path) -> None:
    # The reader itself: a relative cimport and a function-level import are both seen.
    src = tmp_path / "pmd" / "sim" / "x.pyx"
    src.parent.mkdir(parents=True)
    src.write_text("from ..driver._virtqueue cimport Virtqueue\n"
                   "def f():\n    from pmd.driver.port import Port\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = _imports(src)
    finally:
        ROOT = saved
    assert "pmd.driver._virtqueue" in found and "pmd.driver.port" in found
