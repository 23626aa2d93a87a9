"""Nothing leaks: fds, mappings, threads and child processes are the same after
hundreds of port lifetimes on the built-in device as before them.

Three kinds of cycle, each counted against a baseline taken after one warm-up
cycle of its kind (imports, the interrupt thread, numpy's first allocations):

- open, start, a few bursts each way, close: 500 over vfio-user to one device
  process (the driver's whole lifetime, about 20 ms each), and some with
  ``open_port("sim")``, which spawns and stops a device process each time
  (about 0.5 s each; 500 of those are the ``slow`` test);
- the device process killed (SIGKILL) in the middle of traffic: the port
  reports it, then closes;
- ``start()`` failing half-way: more queue pairs than the device has, a ring
  larger than it allows (both after interrupts are set up), and a control
  command refused after DRIVER_OK (memory mapped, queues live, rings filled).

The device's own view is checked too: no DMA mapping is left on it.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import pmd
from pmd.errors import DeviceError, PmdError
from pmd.sim.process import SimProcess, spawn_device

pytest.importorskip("pmd.driver.access.vfio_user")

CYCLES = 500                 # the figure, over vfio-user to one device process
SPAWN_CYCLES = 25            # open_port("sim"): a process per cycle
KILL_CYCLES = 10
FAIL_CYCLES = 20             # of each kind of failed start


def children() -> list[int]:
    """Child processes of this one, zombies included (an unreaped child is a leak too)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            found.append(int(entry.name))
    return sorted(found)


def snapshot() -> dict[str, Any]:
    gc.collect()
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "memfd_mappings": sum("/memfd:" in line for line in maps),
        "mappings": len(maps),
        "threads": sorted(t.name for t in threading.enumerate()),
        "tasks": len(os.listdir("/proc/self/task")),
        "children": children(),
    }


def settle(before: dict[str, Any], seconds: float = 5.0) -> dict[str, Any]:
    """The snapshot once the counts are back (a stopped device's watcher thread
    and process take a moment to go), or the last one after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        now = snapshot()
        if same(before, now) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # Total mappings are reported, not compared: CPython's and numpy's
    # allocators map and unmap arenas as they please. pmd's memory is memfd.
    return all(a[k] == b[k] for k in ("fds", "memfd_mappings", "threads", "tasks", "children"))


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: (b[k] - a[k]) if isinstance(a[k], int) else sorted(set(b[k]) ^ set(a[k])) for k in a}


def traffic(port: pmd.Port, frames: int = 32) -> int:
    """A few bursts each way through the loopback wire; returns what came back."""
    rxq, txq = port.rx_queue(0), port.tx_queue(0)
    batch = np.zeros((8, 64), np.uint8)
    batch[:, :6] = 0xFF
    lens = np.full(8, 60, np.uint32)
    out = np.zeros((32, rxq.max_packet_len), np.uint8)
    out_lens = np.zeros(32, np.uint32)
    sent = got = 0
    deadline = time.monotonic() + 10
    while got < frames and time.monotonic() < deadline:
        if sent < frames:
            sent += txq.tx_burst(batch, lens)
        got += rxq.rx_burst(out, out_lens)
    return got


def run_cycles(n: int, cycle: Callable[[], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    cycle()                                          # warm-up
    before = snapshot()
    for _ in range(n):
        cycle()
    return before, settle(before)


def check(name: str, n: int, before: dict[str, Any], after: dict[str, Any]) -> None:
    print(f"{name}: {n} cycles, delta {delta(before, after)}")
    assert same(before, after), f"{name}: leaked over {n} cycles: {delta(before, after)}"


@pytest.fixture(scope="module")
def device():
    with spawn_device(wire="loopback") as sim:
        yield sim


def no_dma_left(sim: SimProcess) -> None:
    deadline = time.monotonic() + 5
    while sim.stats()[0]["dma_mappings"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.stats()[0]["dma_mappings"] == 0


def test_open_start_burst_close_500_times_leaks_nothing(device):
    def cycle() -> None:
        with pmd.open_port("vfio-user:" + device.socket_path) as port:
            port.start(rx_interrupts=True)
            assert traffic(port) == 32

    before, after = run_cycles(CYCLES, cycle)
    check("open/start/burst/close over vfio-user", CYCLES, before, after)
    no_dma_left(device)
    assert device.stats()[0]["bad_descriptors"] == 0


def _spawn_cycle() -> None:
    with pmd.open_port("sim") as port:
        port.start()
        assert traffic(port) == 32


def test_open_port_sim_spawns_and_stops_a_device_each_time_and_leaks_nothing():
    before, after = run_cycles(SPAWN_CYCLES, _spawn_cycle)
    check('open_port("sim")/start/burst/close', SPAWN_CYCLES, before, after)


@pytest.mark.slow
def test_open_port_sim_500_times_leaks_nothing():
    before, after = run_cycles(CYCLES, _spawn_cycle)
    check('open_port("sim")/start/burst/close', CYCLES, before, after)


def test_a_device_killed_in_the_middle_of_traffic_leaks_nothing():
    def cycle() -> None:
        port = pmd.open_port("sim", wire="generator")
        try:
            port.start(rx_interrupts=True)
            rxq = port.rx_queue(0)
            ids = np.zeros(32, np.uint32)
            lens = np.zeros(32, np.uint32)
            got = 0
            while got < 256:                         # traffic is flowing
                n = rxq.rx_burst_zc(ids, lens)
                rxq.pool.free(ids[:n])
                got += n
            port.sim.proc.kill()                     # its PID is ours
            with pytest.raises(DeviceError, match="the device is gone"):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    n = rxq.rx_burst_zc(ids, lens)
                    rxq.pool.free(ids[:n])
        finally:
            port.close()

    before, after = run_cycles(KILL_CYCLES, cycle)
    check("device killed mid-traffic", KILL_CYCLES, before, after)


@pytest.fixture(scope="module")
def device_without_ctrl_rx():
    with spawn_device(wire="loopback", features_off="CTRL_RX", queue_pairs=2) as sim:
        yield sim


@pytest.mark.parametrize("how", ["too many queue pairs", "ring too large", "refused after DRIVER_OK"])
def test_a_start_that_fails_half_way_leaks_nothing(device, device_without_ctrl_rx, how):
    sim = device_without_ctrl_rx if how == "refused after DRIVER_OK" else device
    start: dict[str, Any] = {
        "too many queue pairs": {"queue_pairs": 8, "rx_interrupts": True},
        "ring too large": {"queue_size": 4096, "rx_interrupts": True},
        "refused after DRIVER_OK": {"queue_pairs": 2, "rx_interrupts": True, "promiscuous": False},
    }[how]
    error = {"too many queue pairs": (ValueError, "queue pairs asked"),
             "ring too large": (ValueError, "larger than the device allows"),
             "refused after DRIVER_OK": (PmdError, "CTRL_RX")}[how]

    def cycle() -> None:
        with pmd.open_port("vfio-user:" + sim.socket_path) as port:
            with pytest.raises(error[0], match=error[1]):
                port.start(**start)
            assert not port.started and port.transport.get_status() == 0
            port.start()                             # and the port still works
            assert traffic(port) == 32

    before, after = run_cycles(FAIL_CYCLES, cycle)
    check(f"start() failing half-way ({how})", FAIL_CYCLES, before, after)
    no_dma_left(sim)
