"""The data path end to end: a million random packets, every byte checked."""

import numpy as np
import pytest

from pmd.loopback import Loopback

MAX_LEN = 1514


def run_loopback(total, *, queue_size=256, event_idx=False, seed=0, translator=None, packed=False):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(60, MAX_LEN + 1, total).astype(np.uint32)
    # Packet i is bytes [off[i], off[i]+lengths[i]) of a random stream: random
    # content that the checker can regenerate without keeping every packet.
    stream = rng.integers(0, 256, 1 << 22, dtype=np.uint8)
    offsets = rng.integers(0, stream.size - MAX_LEN, total)
    cols = np.arange(MAX_LEN)
    sent = recv = 0
    with Loopback(queue_size=queue_size, event_idx=event_idx, iova_translator=translator, packed=packed) as lb:
        tx, rx, pool = lb.driver_tx, lb.driver_rx, lb.pool
        out = np.zeros((256, rx.max_packet_len), np.uint8)
        got_lens = np.zeros(256, np.uint32)
        ids = np.zeros(256, np.uint32)
        while recv < total:
            burst = int(rng.integers(1, 257))
            if sent < total:
                hi = min(sent + burst, total)
                pk = stream[offsets[sent:hi, None] + cols]
                sent += tx.tx_burst(pk, lengths[sent:hi])
            lb.step(int(rng.integers(1, 257)))
            want = int(rng.integers(1, 257))
            if rng.integers(2):
                g = rx.rx_burst(out[:want], got_lens[:want])
                data = out[:g, :MAX_LEN]
            else:
                g = rx.rx_burst_zc(ids[:want], got_lens[:want])
                data = pool.data[ids[:g], :MAX_LEN].copy()
                pool.free(ids[:g])
            expect_len = lengths[recv:recv + g]
            assert (got_lens[:g] == expect_len).all(), f"lengths differ near packet {recv}"
            expect = stream[offsets[recv:recv + g, None] + cols]
            mask = cols[None, :] < expect_len[:, None]
            assert ((data == expect) | ~mask).all(), f"bytes differ near packet {recv}"
            recv += g
        stats = lb.stats()
    return stats, sent, recv


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["split", "packed"])
def test_million_random_packets_arrive_whole_in_order(layout):
    stats, sent, recv = run_loopback(1_000_000, packed=layout == "packed")
    assert sent == recv == 1_000_000
    assert stats["driver_rx"]["packets"] == 1_000_000
    assert stats["driver_tx"]["packets"] == 1_000_000
    for side in ("driver_rx", "driver_tx"):
        s = stats[side]
        assert s["dropped"] == s["bad_used_id"] == s["used_not_in_flight"] == s["bad_used_len"] == 0
    for side in ("device_rx", "device_tx"):
        assert stats[side]["bad_descriptors"] == 0 and stats[side]["dropped"] == 0


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_loopback_with_event_idx_and_translated_iovas(layout):
    stats, sent, recv = run_loopback(50_000, queue_size=64, event_idx=True, seed=7,
                                     translator=lambda va: va + 0x3000_0000_0000, packed=layout == "packed")
    assert sent == recv == 50_000
    assert stats["device_rx"]["bad_descriptors"] == 0
