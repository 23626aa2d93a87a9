"""bench/plots.py: result files in, PNGs out (bench/README.md).

Small result files in the formats the bench scripts write are plotted and the PNGs
checked (signature, IHDR, a size); the parsers are checked against the numbers in the
file; every file committed under bench/results/ must still be one the script reads;
without matplotlib the script says how to install it and exits 2.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest

from .scriptload import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "plots.py"

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install matplotlib)")

# The summary table bench/vs_dpdk.py ends with (two conditions of it).
VS_DPDK = """\
pmd vs DPDK's virtio-user on one vhost-user back-end (dpdk-testpmd net_vhost)

dir  size | pmd Mpps DPDK Mpps | pmd/DPDK    min    max | pairs
tx     64 |   22.583    30.213 |    0.738  0.712  0.798 | 3
rx   1500 |    9.664     9.146 |    1.045  1.032  1.227 | 3
round trip: median 123 ns, 36 of 36 samples fast; took 295.2 s
"""


@pytest.fixture(scope="module")
def plots() -> ModuleType:
    return load_script("bench_plots", SCRIPT)


def check_png(path: Path) -> tuple[int, int]:
    """Width and height of a PNG whose signature and IHDR chunk (with its CRC) are valid."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + 13]
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(b"IHDR" + body)
    assert data.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", body[:8])
    assert width > 100 and height > 100
    return width, height


def test_the_vs_dpdk_summary_is_read_as_written(plots: ModuleType) -> None:
    ((label, rows),) = plots.parse_vs_dpdk(VS_DPDK)
    assert label == "" and rows == [("tx 64", 22.583, 30.213, 0.738), ("rx 1500", 9.664, 9.146, 1.045)]


def test_benchmark_json_rates_come_from_extra_info_pps(plots: ModuleType) -> None:
    data = {"benchmarks": [{"name": "a", "extra_info": {"pps": 2_500_000}, "stats": {"mean": 1e-5}},
                           {"name": "b", "extra_info": {}, "stats": {"mean": 0.5}}]}
    assert plots.parse_benchmark_json(data) == [("a", 2.5, "Mpps"), ("b", 2.0, "rounds/s")]


@needs_matplotlib
def test_a_small_vs_dpdk_file_and_a_benchmark_json_become_pngs(plots: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "vs_dpdk-small.txt").write_text(VS_DPDK)
    (tmp_path / "bench.json").write_text(json.dumps(
        {"benchmarks": [{"name": "test_sim_rx_round[generator]", "extra_info": {"pps": 9_000_000},
                         "stats": {"mean": 3.5e-6}}]}))
    out = tmp_path / "png"
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "vs_dpdk-small.txt"), str(tmp_path / "bench.json"),
                        "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bench.png", "vs_dpdk-small.png"]
    for png in out.iterdir():
        check_png(png)


@needs_matplotlib
def test_a_file_of_no_known_kind_is_skipped_and_nothing_written_fails(plots: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing to plot here\n")
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "notes.txt"), "-o", str(tmp_path / "png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "skipped" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "png").exists()


@needs_matplotlib
def test_every_committed_result_file_is_one_the_script_plots(plots: ModuleType, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = ROOT / "bench" / "results"
    if not results.is_dir():
        pytest.skip("no bench/results/ here (an installed copy of the tests)")
    files = sorted(p for p in results.iterdir() if p.is_file())
    assert files
    for path in files:
        out = plots.plot_file(path, tmp_path, plt)
        assert out is not None, f"{path.name}: bench/plots.py does not read it"
        check_png(out)


def test_without_matplotlib_it_says_how_to_install_it_and_exits_2(tmp_path: Path) -> None:
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed.
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['plots.py', '-o', {str(tmp_path)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install matplotlib" in r.stderr
    assert not any(tmp_path.iterdir())
