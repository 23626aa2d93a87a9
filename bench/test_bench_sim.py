"""bench/sim.py as a check, not a timing: each mode runs for about a second at 64 B against
the built-in device in another process; packets must move and nothing may be left behind
(device process, its socket directory, this process's CPU affinity). No DPDK needed.
And two pytest-benchmark rounds against the built-in device (``open_port("sim")``): 32
packets received from its generator, and 32 out to its loopback wire and back.

    python -m pytest bench/test_bench_sim.py -q                       # all once, as a check
    python -m pytest bench/test_bench_sim.py --benchmark-only         # the rounds, timed (pps)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import pmd
import pmd.fwd
from pmd.abi.ethernet import udp_frame
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


# ---------------------------------------------------------------------------- pytest-benchmark

BURST = 32


@pytest.fixture
def sim_port(request: pytest.FixtureRequest):
    """A started port on the built-in device (``open_port("sim")``) with the wire the test names."""
    port = pmd.open_port("sim", wire=request.param)
    try:
        port.start(queue_pairs=1, queue_size=256)
        yield port
    finally:
        port.close()


@pytest.mark.parametrize("sim_port", ["generator"], indirect=True)
def test_sim_rx_round(benchmark, sim_port) -> None:
    """Receive 32 packets from the built-in device's generator (another process, vfio-user)."""
    rxq = sim_port.rx_queue(0)

    def one_round() -> int:
        got = 0
        while got < BURST:
            got += rxq.rx_discard(BURST - got)
        return got

    benchmark.group = f"built-in device 64 B, burst {BURST}"
    benchmark.extra_info["packets_per_round"] = BURST
    assert benchmark(one_round) == BURST
    s = sim_port.stats()
    assert s["rx_packets"] >= BURST and s["device_errors"] == 0


@pytest.mark.parametrize("sim_port", ["loopback"], indirect=True)
def test_sim_io_round_trip(benchmark, sim_port) -> None:
    """32 packets out to the built-in device's loopback wire and back in, by buffer id."""
    rxq, txq = sim_port.rx_queue(0), sim_port.tx_queue(0)
    pool = rxq.pool
    frame = np.frombuffer(udp_frame(64, sim_port.mac), np.uint8)
    ids = pool.alloc(BURST)
    pool.data[ids, :64] = frame
    lens = np.full(BURST, 64, np.uint32)

    def one_round() -> int:
        sent = 0
        while sent < BURST:
            sent += txq.tx_burst_zc(ids[sent:], lens[sent:])
        got = 0
        while got < BURST:
            got += rxq.rx_burst_zc(ids[got:], lens[got:])
        return got

    benchmark.group = f"built-in device 64 B, burst {BURST}"
    benchmark.extra_info["packets_per_round"] = BURST
    assert benchmark(one_round) == BURST
    assert np.all(lens == 64) and np.array_equal(pool.data[ids, :64], np.tile(frame, (BURST, 1)))
    pool.free(ids)
