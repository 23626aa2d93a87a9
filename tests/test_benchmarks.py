"""The pytest-benchmark suites as their users run them (bench/conftest.py).

``python -m pytest bench --benchmark-only`` times the benchmarks and reports packets per
second; a plain ``python -m pytest bench`` runs every test once with timing off.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Short rounds: the point is that the run works and reports a rate, not the figure.
QUICK = ["--benchmark-max-time", "0.2", "--benchmark-min-rounds", "5", "--benchmark-warmup", "off"]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_benchmark_only_times_a_benchmark_on_the_built_in_device_and_reports_pps(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = run_bench("--benchmark-only", "-k", "test_sim_rx_round", "--benchmark-json", str(out), *QUICK)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout, r.stdout
    (bench,) = json.loads(out.read_text())["benchmarks"]
    assert bench["name"] == "test_sim_rx_round[generator]"
    assert bench["stats"]["rounds"] >= 5
    assert bench["extra_info"]["packets_per_round"] == 32 and bench["extra_info"]["pps"] > 0
    line = next(x for x in r.stdout.splitlines() if x.startswith("pps "))
    assert float(line.split()[1]) > 0 and "test_sim_rx_round" in line


def test_a_plain_run_of_the_benchmarks_is_untimed() -> None:
    r = run_bench("-k", "test_pmd_zero_copy_round")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout and "Mean" not in r.stdout and "pps " not in r.stdout, r.stdout


def test_the_capture_benchmark_quick_run_reports_every_ratio_to_rx_only() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "capture.py"), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    values = dict(kv.split("=") for kv in r.stdout.splitlines()[-1].split())
    keys = ["rx_mpps", "parse_ratio", "capture_pcap_ratio", "capture_pcapng_ratio"]
    import importlib.util

    if importlib.util.find_spec("pyarrow") is not None:
        keys += ["arrow_ratio", "capture_parquet_ratio"]
    for key in keys:
        assert key in values and float(values[key]) > 0, (key, r.stdout)
    assert "rx drops 0" in r.stdout, r.stdout
