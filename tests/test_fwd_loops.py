"""The forwarding loops in C (pmd.driver._fwd) that pmd fwd runs, one call at a time on
the in-process loopback (its device side stepped by hand, so every count is exact)."""

from __future__ import annotations

import numpy as np
import pytest

from pmd import fwd
from pmd.driver import _fwd
from pmd.errors import DeviceError
from pmd.loopback import Loopback

A = bytes.fromhex("02000000000a")
B = bytes.fromhex("02000000000b")


@pytest.fixture
def lb():
    lb = Loopback(queue_size=256)
    yield lb
    lb.close()


def _receive_all(lb: Loopback) -> list[bytes]:
    out = np.zeros((256, lb.driver_rx.max_packet_len), np.uint8)
    lens = np.zeros(256, np.uint32)
    n = lb.driver_rx.rx_burst(out, lens)
    return [out[i, :lens[i]].tobytes() for i in range(n)]


def _send(lb: Loopback, frames: list[bytes]) -> None:
    width = max(len(f) for f in frames)
    rows = np.zeros((len(frames), width), np.uint8)
    for i, f in enumerate(frames):
        rows[i, :len(f)] = np.frombuffer(f, np.uint8)
    assert lb.driver_tx.tx_burst(rows, np.array([len(f) for f in frames], np.uint32)) == len(frames)


def test_txonly_sends_what_the_pool_buffers_hold_until_the_ring_is_full(lb):
    pool, txq = lb.pool, lb.driver_tx
    frame = fwd.udp_frame(64, A, B)
    free = pool.alloc(pool.available)
    pool.data[free, :64] = np.frombuffer(frame, np.uint8)
    pool.free(free)
    before = txq.ring_full
    assert _fwd.txonly(txq, 64, 32, 100) == 256          # the ring's size, then it is full
    assert txq.ring_full > before and txq.stats()["packets"] == 256
    lb.step()
    got = _receive_all(lb)
    assert len(got) == 256 and all(g == frame for g in got)
    assert _fwd.txonly(txq, 64, 32, 1) == 32              # the device gave the ring back


def test_txonly_refuses_a_length_beyond_the_data_room(lb):
    with pytest.raises(ValueError, match="data room"):
        _fwd.txonly(lb.driver_tx, lb.pool.data_room + 1, 32, 1)
    with pytest.raises(ValueError, match="data room"):
        _fwd.txonly(lb.driver_tx, 0, 32, 1)


def test_macswap_sends_each_packet_back_with_its_addresses_swapped(lb):
    frames = [fwd.udp_frame(64 + i, A, B) for i in range(5)]
    _send(lb, frames)
    lb.step()
    assert _fwd.forward(lb.driver_rx, lb.driver_tx, 32, True, 1, 0) == (5, 0)
    lb.step()
    assert _receive_all(lb) == [f[6:12] + f[:6] + f[12:] for f in frames]


def test_io_forwards_unchanged_and_an_empty_poll_reclaims_the_tx_ring(lb):
    frames = [fwd.udp_frame(100, A, B)] * 3
    _send(lb, frames)
    lb.step()
    assert _fwd.forward(lb.driver_rx, lb.driver_tx, 32, False, 1, 0) == (3, 0)
    assert lb.driver_tx.in_flight == 3
    lb.step()                                             # the device takes them, hands them to rx
    assert _fwd.forward(lb.driver_rx, lb.driver_tx, 2, False, 1, 0) == (2, 0)   # burst 2: two of three
    assert _fwd.forward(lb.driver_rx, lb.driver_tx, 32, False, 1, 0) == (1, 0)
    lb.step()
    assert _receive_all(lb) == frames


def test_what_the_full_tx_ring_cannot_take_is_freed_and_counted_as_dropped(lb):
    pool = lb.pool
    _send(lb, [fwd.udp_frame(64, A, B)] * 10)
    lb.step()                                             # 10 received, waiting in the rx ring
    assert _fwd.txonly(lb.driver_tx, 64, 32, 100) == 256  # and the tx ring full behind them
    available = pool.available
    assert _fwd.forward(lb.driver_rx, lb.driver_tx, 32, False, 1, 3) == (0, 10)
    # The ten came back to the pool; the rx ring took ten fresh ones in their place.
    assert pool.available == available
    assert lb.driver_rx.vq.in_flight == 256


def test_a_broken_queue_stops_the_loop_and_the_next_call_raises(lb):
    _send(lb, [fwd.udp_frame(64, A, B)])
    lb.step()
    lb.driver_rx.vq.fail("the device is gone")
    with pytest.raises(DeviceError, match="gone"):
        _fwd.forward(lb.driver_rx, lb.driver_tx, 32, False, 10, 0)
    lb.driver_tx.vq.fail("the device is gone")
    with pytest.raises(DeviceError, match="gone"):
        _fwd.txonly(lb.driver_tx, 64, 32, 1)


def test_forwarding_without_a_copy_needs_one_pool():
    with Loopback(queue_size=64) as a, Loopback(queue_size=64) as b:
        with pytest.raises(ValueError, match="one pool"):
            _fwd.forward(a.driver_rx, b.driver_tx, 32, False, 1, 0)


def test_a_closed_queue_refuses_the_loops(lb):
    lb.driver_tx.close()
    with pytest.raises(Exception, match="closed"):
        _fwd.txonly(lb.driver_tx, 64, 32, 1)
    with pytest.raises(Exception, match="closed"):
        _fwd.forward(lb.driver_rx, lb.driver_tx, 32, False, 1, 0)
