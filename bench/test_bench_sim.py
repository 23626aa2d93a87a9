"""bench/sim.py as a check, not a timing: each mode runs for about a second at 64 B against
the built-in device in another process; packets must move and nothing may be left behind
(device process, its socket directory, this process's CPU affinity). No DPDK needed.

    python -m pytest bench/test_bench_sim.py -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pmd.fwd
import sim

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def assert_nothing_left(m: sim.PmdMeasurement, children_before: list[int], affinity: set[int]) -> None:
    assert m.device_pid not in sim.child_pids()
    assert sorted(sim.child_pids()) == sorted(children_before), "a child process was left running"
    assert m.socket_path and not Path(m.socket_path).exists()
    assert not Path(m.socket_path).parent.exists(), "the device's temporary directory was left"
    assert os.sched_getaffinity(0) == affinity


@pytest.mark.parametrize("mode", sim.MODES)
def test_packets_move_and_nothing_is_left(mode: str) -> None:
    before, affinity = sim.child_pids(), os.sched_getaffinity(0)
    m = sim.measure_pmd(mode, 64, seconds=1.0, warmup=0.3)
    assert m.mode == mode and m.size == 64
    assert m.mpps > 0 and m.packets > 0, m
    assert len(m.intervals) == 1 and m.seconds > 0.5
    assert m.errors == 0
    if mode == "io":
        assert m.drops == 0          # the one burst keeps circulating
    assert_nothing_left(m, before, affinity)


@pytest.mark.parametrize("mode", sim.MODES)
def test_packets_move_on_packed_rings(mode: str) -> None:
    m = sim.measure_pmd(mode, 64, seconds=1.0, warmup=0.3, ring="packed")
    assert m.mpps > 0 and m.packets > 0 and m.errors == 0, m
    if mode == "io":
        assert m.drops == 0


def test_a_failure_cleans_up_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # The forwarding loop dies: measure_pmd raises, and still stops the device process.
    before, affinity = sim.child_pids(), os.sched_getaffinity(0)
    seen: list[int] = []

    def broken_run(port: object, mode: str, **kwargs: object) -> None:
        seen.append(port.sim.pid)  # type: ignore[attr-defined]
        raise OSError("forwarding broke")

    monkeypatch.setattr(pmd.fwd, "run", broken_run)
    with pytest.raises(RuntimeError, match="forwarding broke"):
        sim.measure_pmd("rx", 64, seconds=0.2, warmup=0.1)
    assert seen and seen[0] not in sim.child_pids()
    assert sorted(sim.child_pids()) == sorted(before)
    assert os.sched_getaffinity(0) == affinity


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_command_line_summary(capsys: pytest.CaptureFixture[str], ring: str) -> None:
    before = sim.child_pids()
    rc = sim.main(["--quick", "--no-dpdk", "--modes", "rx", "--seconds", "0.5", "--warmup", "0.2", "--ring", ring])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"\n{ring} ring, burst 32" in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("sim_mpps rx64=") and " rt_ns=" in last, last
    assert float(last.split()[1].split("=")[1]) > 0
    assert sorted(sim.child_pids()) == sorted(before)
