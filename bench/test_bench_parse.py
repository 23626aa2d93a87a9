"""pytest-benchmark: header parsing of one burst (pmd.parse), and a loopback round
that parses what it received, burst 32.

    python -m pytest bench -q                     # each once, as a check (benchmarks disabled)
    python -m pytest bench --benchmark-enable     # timed

One round parses 32 packets, so packets per second = 32 x the "OPS" column
(``extra_info["packets_per_round"]``). Every benchmark checks afterwards that the
columns hold the headers the packets were built with. ``bench/parse.py`` gives the
rates side by side with the receive rate, and their ratio.
"""

from __future__ import annotations

import numpy as np
import pytest

from parse import BURST, burst_of
from pmd.loopback import Loopback
from pmd.parse import HeaderParser


@pytest.fixture
def lb():
    loop = Loopback(queue_size=256)
    yield loop
    loop.close()


def assert_parsed(parser: HeaderParser, lengths: np.ndarray) -> None:
    c = parser.columns
    assert (c["flags"][:BURST] == 0).all()
    assert np.isin(c["ip_version"][:BURST], [4, 6]).all() and (c["dst_port"][:BURST] > 0).all()
    assert (c["payload_offset"][:BURST] + c["payload_length"][:BURST] == lengths).all()


@pytest.mark.parametrize("mix", ["64", "mixed"])
def test_parse_burst(benchmark, mix):
    """parse_into on one burst of rows (the shape rx_burst fills)."""
    pkts, lens = burst_of(mix, np.random.default_rng(7))
    parser = HeaderParser(BURST)
    benchmark.group = f"parse, burst {BURST}"
    benchmark.extra_info["packets_per_round"] = BURST
    assert benchmark(parser.parse_into, pkts, lens, BURST) == BURST
    assert_parsed(parser, lens)


@pytest.mark.parametrize("mix", ["64", "mixed"])
def test_loopback_round_with_parse(benchmark, lb, mix):
    """tx_burst + device step + rx_burst (with timestamps) + parse_into of what arrived."""
    tx, rx = lb.driver_tx, lb.driver_rx
    pkts, lens = burst_of(mix, np.random.default_rng(7))
    out = np.zeros((BURST, rx.max_packet_len), np.uint8)
    out_lens = np.zeros(BURST, np.uint32)
    stamps = np.zeros(BURST, np.uint64)
    parser = HeaderParser(BURST)

    def one_round() -> int:
        tx.tx_burst(pkts, lens)
        lb.step(BURST)
        n = rx.rx_burst(out, out_lens, timestamps=stamps)
        return parser.parse_into(out, out_lens, n)

    benchmark.group = f"loopback + parse, burst {BURST}"
    benchmark.extra_info["packets_per_round"] = BURST
    assert benchmark(one_round) == BURST
    assert np.array_equal(out_lens, lens) and (stamps > 0).all()
    assert_parsed(parser, lens)
