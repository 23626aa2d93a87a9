"""pytest-benchmark: one loopback round, tx burst + device step + rx burst, burst 32.

    python -m pytest bench -q                     # each round once, as a check (timing off)
    python -m pytest bench --benchmark-only       # timed

One benchmark round moves 32 packets, so packets per second = 32 x the
"OPS" column (``extra_info["packets_per_round"]``; bench/conftest.py reports it
as ``extra_info["pps"]`` and a ``pps`` line at the end). Every benchmark checks
afterwards that the packets arrived, intact: correctness, not timing.
``bench/loopback.py`` gives the full table and the ratio to pure Python.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from pmd.loopback import Loopback
from pure_python import PyLoopback

BURST = 32
QUEUE_SIZE = 256


@pytest.fixture
def lb():
    loop = Loopback(queue_size=QUEUE_SIZE)
    yield loop
    loop.close()


def payload(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, (BURST, size), dtype=np.uint8)


def assert_nothing_lost(lb: Loopback) -> None:
    s = lb.stats()
    assert s["driver_rx"]["packets"] == s["driver_tx"]["packets"] >= BURST
    assert s["driver_rx"]["dropped"] == 0 and s["device_tx"]["dropped"] == 0
    assert s["device_tx"]["bad_descriptors"] == 0 and s["device_rx"]["bad_descriptors"] == 0


@pytest.mark.parametrize("size", [64, 1500])
def test_pmd_zero_copy_round(benchmark, lb, size):
    """rx_burst_zc ids forwarded by tx_burst_zc: the device's copy is the only one."""
    tx, rx, pool = lb.driver_tx, lb.driver_rx, lb.pool
    data = payload(size)
    ids = pool.alloc(BURST)
    pool.data[ids, :size] = data
    lens = np.full(BURST, size, dtype=np.uint32)

    def one_round() -> int:
        tx.tx_burst_zc(ids, lens)
        lb.step(BURST)
        return rx.rx_burst_zc(ids, lens)

    benchmark.group = f"loopback {size} B, burst {BURST}"
    benchmark.extra_info["packets_per_round"] = BURST
    assert benchmark(one_round) == BURST
    assert np.array_equal(pool.data[ids, :size], data)
    assert np.all(lens == size)
    assert_nothing_lost(lb)


@pytest.mark.parametrize("size", [64, 1500])
def test_pmd_copy_round(benchmark, lb, size):
    """tx_burst from numpy rows, rx_burst into numpy rows."""
    tx, rx = lb.driver_tx, lb.driver_rx
    packets = payload(size)
    lens = np.full(BURST, size, dtype=np.uint32)
    out = np.zeros((BURST, rx.max_packet_len), dtype=np.uint8)
    out_lens = np.zeros(BURST, dtype=np.uint32)

    def one_round() -> int:
        tx.tx_burst(packets, lens)
        lb.step(BURST)
        return rx.rx_burst(out, out_lens)

    benchmark.group = f"loopback {size} B, burst {BURST}"
    benchmark.extra_info["packets_per_round"] = BURST
    assert benchmark(one_round) == BURST
    assert np.array_equal(out[:, :size], packets)
    assert np.all(out_lens == size)
    assert_nothing_lost(lb)


@pytest.mark.parametrize("mode", ["zc", "copy"])
def test_pure_python_round(benchmark, mode):
    """The pure-Python reference (struct.pack_into rings, per-packet loops) at 64 B."""
    size = 64
    ref = PyLoopback(queue_size=QUEUE_SIZE)
    tx, rx, pool = ref.driver_tx, ref.driver_rx, ref.pool
    data = [bytes(row) for row in payload(size)]
    if mode == "zc":
        ids = pool.alloc(BURST)
        for b, p in zip(ids, data):
            pool.write(b, p)
        lens = [size] * BURST

        def one_round() -> int:
            tx.tx_burst_zc(ids, lens)
            ref.step(BURST)
            return rx.rx_burst_zc(ids, lens)
    else:
        rows = [bytearray(rx.max_packet_len) for _ in range(BURST)]
        lens = [0] * BURST

        def one_round() -> int:
            tx.tx_burst(data)
            ref.step(BURST)
            return rx.rx_burst(rows, lens)

    benchmark.group = f"loopback {size} B, burst {BURST}"
    benchmark.extra_info["packets_per_round"] = BURST
    assert benchmark(one_round) == BURST
    got = [bytes(pool.data(b, size)) for b in ids] if mode == "zc" else [bytes(r[:size]) for r in rows]
    assert got == data
    assert lens == [size] * BURST
    assert rx.packets == tx.packets >= BURST and rx.dropped == 0


def test_pure_python_reference_moves_random_packets_intact():
    """The reference is a real loopback: random lengths and bytes, every byte compared."""
    rng = random.Random(2)
    ref = PyLoopback(queue_size=64)
    rows = [bytearray(ref.driver_rx.max_packet_len) for _ in range(16)]
    lens = [0] * 16
    for _ in range(40):
        n = rng.randint(1, 16)
        pkts = [rng.randbytes(rng.randint(60, 1514)) for _ in range(n)]
        assert ref.driver_tx.tx_burst(pkts) == n
        assert ref.step(64) == n
        assert ref.driver_rx.rx_burst(rows, lens) == n
        for p, row, ln in zip(pkts, rows, lens):
            assert ln == len(p) and bytes(row[:ln]) == p
    assert ref.driver_rx.vq.n_bad_id == ref.driver_rx.vq.n_bad_len == 0
    assert ref.device_tx.n_bad_desc == ref.device_rx.n_bad_desc == 0
