"""bench/scaling.py runs and ends with its summary line (figures: docs/performance.md)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scaling  # noqa: E402


@pytest.mark.parametrize("threads", [1, 2])
def test_loopback_threads_move_packets_and_leave_nothing(threads: int) -> None:
    import threading

    before = threading.active_count()
    assert scaling.measure_loopback(threads, seconds=0.3, warmup=0.1) > 0
    assert threading.active_count() == before


def test_command_line_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert scaling.main(["--runs", "1", "--seconds", "0.3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"scaling_2q=([0-9.]+) sim_scaling_2q=([0-9.]+)", last)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, last
