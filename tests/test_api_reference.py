"""docs/api.md is what scripts/api_reference.py writes from the docstrings, and every
public class, function, method and property it lists has a docstring."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .scriptload import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "api_reference.py"
PAGE = ROOT / "docs" / "api.md"


@pytest.fixture(scope="module")
def api() -> ModuleType:
    return load_script("api_reference", SCRIPT)


def test_docs_api_md_is_what_the_script_writes(api: ModuleType) -> None:
    assert PAGE.read_text() == api.render(), "docs/api.md is stale: run python scripts/api_reference.py"


def test_every_public_name_has_a_docstring(api: ModuleType) -> None:
    assert api.undocumented() == []


def test_the_page_lists_every_public_name(api: ModuleType) -> None:
    text = PAGE.read_text()
    import pmd

    assert set(pmd.__all__) <= set(api.public_names(pmd))
    for modname in api.MODULES:
        module = importlib.import_module(modname)
        names = api.public_names(module)
        assert names, modname
        for name in names:
            assert f"`{modname}.{name}" in text, f"{modname}.{name} is not in docs/api.md"
    for cls, method in [("Port", "start"), ("RxQueue", "rx_burst"), ("TxQueue", "tx_burst_zc"),
                        ("PacketPool", "free"), ("HeaderParser", "parse_into")]:
        assert f"#### `{cls}.{method}(" in text, (cls, method)


def test_check_fails_on_a_stale_page_and_passes_on_a_fresh_one(api: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "api.md"
    assert api.main(["-o", str(out)]) == 0 and api.main(["--check", "-o", str(out)]) == 0
    out.write_text(out.read_text().replace("rx_burst", "rx_bust", 1))
    assert api.main(["--check", "-o", str(out)]) == 1


def test_a_name_without_a_docstring_is_reported(api: ModuleType, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "undocumented_mod.py").write_text(
        '__all__ = ["f", "C"]\n'
        "def f(x): return x\n"
        "class C:\n"
        '    """A class."""\n'
        "    def m(self): pass\n"
        "    @property\n"
        "    def p(self): return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(api, "MODULES", ("undocumented_mod",))
    try:
        assert api.undocumented() == ["undocumented_mod.f", "undocumented_mod.C.m", "undocumented_mod.C.p"]
    finally:
        sys.modules.pop("undocumented_mod", None)
