"""pmd installs as a package: the sdist holds every source a wheel is built from,
the wheel built from that sdist holds every module, and an installed wheel runs
the README's main job from a folder outside the checkout, in a clean virtual
environment (no editable install, no checkout on sys.path)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "setup.py").exists() or not (ROOT / "pmd").is_dir(),
                       reason="not a pmd checkout (setup.py and pmd/ are needed to build packages)"),
    pytest.mark.skipif(importlib.util.find_spec("build") is None,
                       reason="the 'build' package is missing: pip install -e '.[test]'"),
]


def _packages() -> list[str]:
    """Every Python package of the checkout, as a folder under pmd/."""
    return sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "pmd").rglob("__init__.py"))


def _sources() -> list[str]:
    """What a wheel is built from: Cython sources, their declarations, C headers."""
    found = [p for ext in ("*.pyx", "*.pxd", "*.pyi") for p in (ROOT / "pmd").rglob(ext)]
    found += list((ROOT / "csrc").glob("*.h"))
    return sorted(str(p.relative_to(ROOT)) for p in found)


def _run(argv: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{argv} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)], cwd=ROOT)
    (path,) = out.glob("pmd-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    (src,) = work.glob("pmd-*/")
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(work), str(src)], cwd=work)
    (path,) = work.glob("pmd-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(env_dir)], cwd=env_dir)
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], cwd=env_dir)
    return env_dir


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PMD_"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_sdist_holds_every_source_a_wheel_is_built_from(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = ["LICENSE", "README.md", "setup.py", "pyproject.toml", "pmd/py.typed",
              *(f"{p}/__init__.py" for p in _packages()), *_sources()]
    missing = [n for n in needed if n not in names]
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if n.endswith((".so", ".c")) and n.startswith("pmd/")], \
        "generated files (.so, Cython's .c) must not be shipped"


def test_wheel_built_from_the_sdist_holds_every_module_stub_and_the_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    modules = [f"{p}/__init__.py" for p in _packages()]
    modules += [str(p.relative_to(ROOT)) for p in (ROOT / "pmd").rglob("*.py")]
    typing = ["pmd/py.typed", *(s for s in _sources() if s.endswith((".pyi", ".pxd")))]
    missing = [n for n in modules + typing if n not in names]
    assert not missing, f"the wheel lacks {missing}"
    compiled = {Path(s).stem for s in _sources() if s.endswith(".pyx")}
    built = {Path(n).name.split(".")[0] for n in names if n.endswith(".so")}
    assert compiled <= built, f"extensions missing from the wheel: {compiled - built}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_wheel_runs_the_main_job_from_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    pmd_cmd = str(venv / "bin" / "pmd")
    out = _run([pmd_cmd, "fwd", "--duration", "1"], cwd=tmp_path, env=_clean_env(), timeout=120)
    assert "summary: mode=io" in out and "mpps=" in out, out


def test_installed_wheel_reads_a_config_space_file(venv: Path, tmp_path: Path) -> None:
    config = ROOT / "tests" / "data" / "pci-config" / "0000_00_03_0_1af4_1041.bin"
    out = _run([str(venv / "bin" / "pmd"), "info", "--config", str(config)], cwd=tmp_path,
               env=_clean_env(), timeout=60)
    assert "virtio" in out.lower(), out


def test_installed_wheel_opens_a_port_on_the_built_in_device(venv: Path, tmp_path: Path) -> None:
    code = ("import pmd, numpy as np\n"
            "assert 'site-packages' in pmd.__file__, pmd.__file__\n"
            "with pmd.open_port('sim') as port:\n"
            "    port.start()\n"
            "    n = port.tx_queue(0).tx_burst(np.zeros((4, 64), np.uint8), np.full(4, 64, np.uint32))\n"
            "    print('sent', n)\n")
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=_clean_env(), timeout=120)
    assert "sent 4" in out, out


def test_installed_wheel_says_its_version(venv: Path, tmp_path: Path) -> None:
    # pmd --version (pmd.__version__) and the installed distribution's metadata agree.
    out = _run([str(venv / "bin" / "pmd"), "--version"], cwd=tmp_path, env=_clean_env(), timeout=60)
    meta = _run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('pmd'))"],
                cwd=tmp_path, env=_clean_env(), timeout=60)
    assert out == f"pmd {meta.strip()}\n", (out, meta)
