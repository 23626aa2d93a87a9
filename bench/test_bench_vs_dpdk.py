"""bench/vs_dpdk.py's pmd sample as a check, not a timing: each direction runs for about a
second at 64 B against DPDK's vhost back-end; packets must move and nothing may be left
behind (the testpmd, its socket directory, this process's CPU affinity).

    python -m pytest bench/test_bench_vs_dpdk.py -q

Needs dpdk-testpmd and, for its huge pages, root; with PMD_REQUIRE_DPDK=1 (CI) a missing
testpmd fails instead of skipping.
"""

from __future__ import annotations

import glob
import os

import pytest

import dpdk
import vs_dpdk

_ok, _why = dpdk.available()
if os.environ.get("PMD_REQUIRE_DPDK", "") in ("", "0"):
    pytestmark = pytest.mark.skipif(not _ok, reason=f"DPDK cannot run here: {_why}")


@pytest.mark.parametrize("ring, in_order", [("split", False), ("packed", False), ("split", True)],
                         ids=["split", "packed", "split-in-order"])
@pytest.mark.parametrize("direction", vs_dpdk.DIRECTIONS)
def test_packets_move_and_nothing_is_left(direction: str, ring: str, in_order: bool) -> None:
    if not _ok:
        pytest.fail(f"PMD_REQUIRE_DPDK=1, but DPDK cannot run here: {_why}")
    affinity = os.sched_getaffinity(0)
    before = set(glob.glob("/tmp/pmd-vs-*"))
    mpps, rates, _other = vs_dpdk.measure_pmd(direction, 64, seconds=1.0, warmup=0.3, ring=ring,
                                              in_order=in_order)
    assert mpps > 0 and len(rates) == 1
    assert os.sched_getaffinity(0) == affinity
    assert set(glob.glob("/tmp/pmd-vs-*")) == before, "the back-end's socket directory was left"
    assert not any(f"pmdh{os.getpid()}x" in line for line in os.popen("ps -eo args").read().splitlines()), \
        "a testpmd was left running"
