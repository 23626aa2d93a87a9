"""How the pytest-benchmark suites run, and the packet rate they report.

    python -m pytest bench -q                    # every test once, as a check: timing off
    python -m pytest bench --benchmark-only      # only the benchmarks, timed
    python -m pytest bench --benchmark-enable    # everything, the benchmarks timed

Timing is off unless asked for (``--benchmark-only``, ``--benchmark-enable``, or an option
that saves timings), so the plain run stays quick. It is decided here rather than with
``--benchmark-disable`` in pyproject.toml's addopts, which pytest-benchmark refuses to
combine with ``--benchmark-only``.

A benchmark that says how many packets one round moves
(``benchmark.extra_info["packets_per_round"]``) gets ``extra_info["pps"]``, packets per
second over the mean round, in ``--benchmark-json`` and in a line of the terminal summary.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

# Options that ask for timings; without one of them the benchmarks run once, untimed.
_TIMING_OPTIONS = ("benchmark_only", "benchmark_enable", "benchmark_json", "benchmark_save",
                   "benchmark_autosave", "benchmark_compare")

_rates: list[tuple[str, float]] = []


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Before pytest-benchmark's own pytest_configure (trylast), which reads the option.
    if not hasattr(config.option, "benchmark_disable"):
        return                                    # pytest-benchmark is not installed
    if not any(config.getoption(name, None) for name in _TIMING_OPTIONS):
        config.option.benchmark_disable = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield
    benchmark: Any = getattr(item, "funcargs", {}).get("benchmark")
    if benchmark is None or benchmark.stats is None:
        return                                    # not a benchmark, or not timed
    per_round = benchmark.extra_info.get("packets_per_round")
    mean = benchmark.stats.stats.mean
    if per_round and mean > 0:
        pps = per_round / mean
        benchmark.extra_info["pps"] = round(pps)
        _rates.append((item.nodeid, pps))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _rates:
        return
    terminalreporter.section("packets per second (packets_per_round / mean round)")
    for nodeid, pps in _rates:
        terminalreporter.write_line(f"pps {pps / 1e6:9.3f} Mpps  {nodeid}")
