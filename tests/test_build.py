"""The build: PMD_DEBUG=1 turns on line tracing and bounds checks, and the
result still runs the data path."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_debug_build_traces_lines_checks_bounds_and_runs(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "pmd", src / "pmd", ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copy(ROOT / "setup.py", src)
    env = dict(os.environ, PMD_DEBUG="1")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=src, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    c = (src / "pmd" / "sim" / "_virtqueue.c").read_text()
    assert "__Pyx_TraceLine(" in c                      # linetrace on
    release = (ROOT / "pmd" / "sim" / "_virtqueue.c")
    if release.exists():
        assert "__Pyx_TraceLine(" not in release.read_text()   # and off in the normal build
    run = ("import numpy as np; from pmd.loopback import Loopback; lb = Loopback(16); "
           "lb.driver_tx.tx_burst(np.zeros((4, 100), np.uint8), np.full(4, 100, np.uint32)); lb.step(); "
           "print(lb.driver_rx.rx_burst(np.zeros((4, 2048), np.uint8), np.zeros(4, np.uint32)))")
    r = subprocess.run([sys.executable, "-c", run], cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr[-3000:]
