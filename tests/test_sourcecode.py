"""Typing is part of the test suite: the whole package, its compiled modules' stubs
and its Python modules alike, matches what runs (mypy.stubtest), and passes mypy
--strict (as uvloop's tests/test_sourcecode.py does)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Every Cython module, as setup.py builds them: pmd/driver/_rx.pyx is pmd.driver._rx.
COMPILED = sorted(str(p.relative_to(ROOT).with_suffix("")).replace("/", ".") for p in (ROOT / "pmd").rglob("*.pyx"))

needs_mypy = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed (pip install -e '.[test]')")


@needs_mypy
def test_stubs_match_the_compiled_modules():
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", *COMPILED],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_mypy
def test_the_whole_package_matches_what_the_type_checker_sees():
    # Every module, Python and compiled: the top-level names behind the lazy
    # __getattr__ (pmd.open_port is typed, not Any), the ctypes structures' fields, ...
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "pmd",
                        "--allowlist", str(ROOT / "tests" / "stubtest_allowlist.txt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_mypy
def test_package_passes_mypy_strict():
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "pmd"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_compiled_module_has_a_stub_and_py_typed_ships():
    for name in COMPILED:
        assert (ROOT / (name.replace(".", "/") + ".pyi")).exists(), name
    assert (ROOT / "pmd" / "py.typed").exists()


def test_volatile_and_asm_only_in_csrc():
    # House rule: volatile accesses and barriers live only in the csrc/ helpers;
    # Cython code calls them (comments may mention the word).
    import re

    volatile_type = re.compile(r"\bvolatile\s+(u?int|char|void)|<\s*volatile")
    for path in (ROOT / "pmd").rglob("*.p[yx]*"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not volatile_type.search(code), f"{path}:{n}: volatile access outside csrc/"
            assert "__asm__" not in code and "asm(" not in code, f"{path}:{n}: assembly outside csrc/"
