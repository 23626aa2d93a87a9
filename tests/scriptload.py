"""Load a script that is not a package module (scripts/, bench/, tests/vm/) by its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(name: str, path: Path) -> ModuleType:
    """The file at ``path`` as module ``name``, registered in ``sys.modules`` (dataclasses
    and pickling look a module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader, f"{path}: not a Python file"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
