"""rx/tx bursts between numpy arrays and the rings, both modes."""

import subprocess
import sys

import numpy as np
import pytest

import pmd
from pmd.errors import DeviceError, PoolError, QueueStateError
from pmd.loopback import Loopback

from .conftest import ring_view
from .isolated import check_isolated

RNG = np.random.default_rng(1234)


@pytest.fixture
def lb():
    lb = Loopback(queue_size=64)
    yield lb
    lb.close()


def random_packets(n, lo=60, hi=1514, width=1514):
    lengths = RNG.integers(lo, hi + 1, n).astype(np.uint32)
    data = RNG.integers(0, 256, (n, width), dtype=np.uint8)
    return data, lengths


def rx_all(lb, n, width=None):
    width = width or lb.driver_rx.max_packet_len
    out = np.zeros((n, width), np.uint8)
    lens = np.zeros(n, np.uint32)
    got = lb.driver_rx.rx_burst(out, lens)
    return out[:got], lens[:got]


# ---- copy mode ----

def test_copy_mode_round_trip_is_byte_exact(lb):
    data, lengths = random_packets(32)
    assert lb.driver_tx.tx_burst(data, lengths) == 32
    assert lb.step() == 32
    out, lens = rx_all(lb, 32)
    assert (lens == lengths).all()
    for i in range(32):
        assert (out[i, :lens[i]] == data[i, :lengths[i]]).all()


def test_tx_header_is_written_zeroed(lb):
    ids = lb.pool.alloc(1)
    lb.pool.array[ids[0], :] = 0xEE     # dirty headroom
    lb.driver_tx.tx_burst_zc(ids, np.array([60], np.uint32))
    head = lb.driver_tx.vq.next_avail_idx - 1
    d = ring_view(lb.driver_tx.vq)["desc"][ring_view(lb.driver_tx.vq)["avail_ring"][head]]
    assert d["len"] == 12 + 60
    assert d["addr"] == lb.pool.iova_of(int(ids[0])) + 64 - 12
    assert not lb.pool.array[ids[0], 52:64].any()      # the 12-byte header
    assert (lb.pool.array[ids[0], 64:124] == 0xEE).all()  # the data untouched


def test_rx_strips_the_header(lb):
    data = np.full((1, 100), 0xAB, np.uint8)
    lb.driver_tx.tx_burst(data, np.array([100], np.uint32))
    lb.step()
    out, lens = rx_all(lb, 4)
    assert lens.tolist() == [100] and (out[0, :100] == 0xAB).all() and not out[0, 100:].any()


def test_rx_descriptor_covers_header_and_data_room(lb):
    vq = lb.driver_rx.vq
    r = ring_view(vq)
    d = r["desc"][r["avail_ring"][0]]
    assert d["flags"] == 2 and d["len"] == 2048 - 64 + 12
    assert lb.driver_rx.max_packet_len == 2048 - 64


def test_long_packet_is_sent_as_a_descriptor_chain(lb):
    n = 5000                                    # > 1984-byte data room: 3 buffers
    data = RNG.integers(0, 256, (1, n), dtype=np.uint8)
    before = lb.driver_tx.vq.free_descriptors
    assert lb.driver_tx.tx_burst(data, np.array([n], np.uint32)) == 1
    assert before - lb.driver_tx.vq.free_descriptors == 3
    h, readable, _ = lb.device_tx.pop_chain()
    assert len(readable) == 12 + n
    assert readable[:12] == bytes(12) and readable[12:] == data[0].tobytes()


def test_packet_larger_than_rx_buffer_is_dropped_by_device_and_counted(lb):
    data = np.zeros((1, 3000), np.uint8)
    lb.driver_tx.tx_burst(data, np.array([3000], np.uint32))
    assert lb.step() == 0
    assert lb.device_tx.stats()["dropped"] == 1
    assert lb.driver_tx.reclaim() == 2          # its two buffers came back


def test_rx_truncate_keeps_real_length(lb):
    data, _ = random_packets(2)
    lengths = np.array([1000, 50], np.uint32)
    lb.driver_tx.tx_burst(data, lengths)
    lb.step()
    out = np.zeros((2, 128), np.uint8)
    lens = np.zeros(2, np.uint32)
    assert lb.driver_rx.rx_burst(out, lens, truncate=True) == 2
    assert lens.tolist() == [1000, 50]
    assert (out[0] == data[0, :128]).all()
    assert lb.driver_rx.stats()["truncated"] == 1


def test_burst_returns_fewer_when_ring_is_full(lb):
    data, lengths = random_packets(100)
    assert lb.driver_tx.tx_burst(data, lengths) == 64
    assert lb.driver_tx.stats()["ring_full"] == 1


def test_tx_reclaims_completed_buffers(lb):
    data, lengths = random_packets(64)
    avail = lb.pool.available
    lb.driver_tx.tx_burst(data, lengths)
    assert lb.pool.available == avail - 64
    lb.step()
    rx_all(lb, 64)
    assert lb.driver_tx.reclaim() == 64
    assert lb.pool.available == avail


def test_rx_burst_bounded_by_out_rows(lb):
    data, lengths = random_packets(10)
    lb.driver_tx.tx_burst(data, lengths)
    lb.step()
    out, lens = rx_all(lb, 4)
    assert len(lens) == 4
    out, lens = rx_all(lb, 10)
    assert len(lens) == 6


# ---- zero-copy ----

def test_zero_copy_rx_gives_pool_buffers_to_the_application(lb):
    data, lengths = random_packets(8)
    lb.driver_tx.tx_burst(data, lengths)
    lb.step()
    ids = np.zeros(8, np.uint32)
    lens = np.zeros(8, np.uint32)
    assert lb.driver_rx.rx_burst_zc(ids, lens) == 8
    for i in range(8):
        assert lb.pool.state_of(int(ids[i])) == "app"
        assert (lb.pool.data[ids[i], :lens[i]] == data[i, :lengths[i]]).all()
    lb.pool.free(ids)


def test_zero_copy_forwarding_sends_the_same_buffers(lb):
    data, lengths = random_packets(8)
    lb.driver_tx.tx_burst(data, lengths)
    lb.step()
    ids = np.zeros(8, np.uint32)
    lens = np.zeros(8, np.uint32)
    n = lb.driver_rx.rx_burst_zc(ids, lens)
    assert lb.driver_tx.tx_burst_zc(ids[:n], lens[:n]) == n
    assert all(lb.pool.state_of(int(i)) == "queue" for i in ids)
    lb.step()
    out, olens = rx_all(lb, 8)
    assert (olens == lengths).all()
    for i in range(8):
        assert (out[i, :olens[i]] == data[i, :lengths[i]]).all()


def test_zero_copy_tx_refuses_buffers_not_owned(lb):
    ids = lb.pool.alloc(2)
    lens = np.array([60, 60], np.uint32)
    lb.pool.free(ids[1:])
    with pytest.raises(PoolError, match="not owned"):
        lb.driver_tx.tx_burst_zc(ids, lens)
    assert lb.pool.state_of(int(ids[0])) == "app"     # nothing was taken


def test_zero_copy_tx_refuses_an_id_twice(lb):
    ids = lb.pool.alloc(1)
    with pytest.raises(PoolError, match="already queued"):
        lb.driver_tx.tx_burst_zc(np.array([ids[0], ids[0]], np.uint32), np.array([60, 60], np.uint32))
    assert lb.pool.state_of(int(ids[0])) == "app"


def test_zero_copy_tx_refuses_foreign_id_and_long_length(lb):
    with pytest.raises(PoolError, match="does not belong"):
        lb.driver_tx.tx_burst_zc(np.array([10**6], np.uint32), np.array([60], np.uint32))
    ids = lb.pool.alloc(1)
    with pytest.raises(ValueError, match="data room"):
        lb.driver_tx.tx_burst_zc(ids, np.array([2000], np.uint32))


def test_zero_copy_tx_leaves_unsent_buffers_with_the_application(lb):
    ids = lb.pool.alloc(70)
    lens = np.full(70, 60, np.uint32)
    assert lb.driver_tx.tx_burst_zc(ids, lens) == 64
    assert all(lb.pool.state_of(int(i)) == "app" for i in ids[64:])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bad_at, bad, match", [
    (5, "twice", "already queued"),          # ids[5] repeats ids[0]
    (5, "foreign", "does not belong"),
    (5, "length", "data room"),
    (60, "twice", "already queued"),         # past the ring's room (54): checked, not sent
])
def test_zero_copy_tx_refusing_one_entry_sends_nothing_and_undoes_every_claim(packed, bad_at, bad, match):
    """tx_burst_zc checks, claims and writes each entry in one pass; an entry it refuses,
    wherever it is (also past what the ring has room for), raises naming it, and the
    entries before it are the application's again: no descriptor used, none visible."""
    with Loopback(queue_size=64, packed=packed) as lb:
        tx = lb.driver_tx
        first = lb.pool.alloc(10)
        assert tx.tx_burst_zc(first, np.full(10, 60, np.uint32)) == 10    # 54 descriptors left
        ids = lb.pool.alloc(64)
        lens = np.full(64, 60, np.uint32)
        if bad == "twice":
            ids[bad_at] = ids[0]
        elif bad == "foreign":
            ids[bad_at] = lb.pool.n_buffers + 3
        else:
            lens[bad_at] = 0
        state, free, packets = tx.vq.avail_state, tx.vq.free_descriptors, tx.packets
        with pytest.raises((PoolError, ValueError), match=rf"\[{bad_at}\].*{match}"):
            tx.tx_burst_zc(ids, lens)
        assert (tx.vq.avail_state, tx.vq.free_descriptors, tx.packets) == (state, free, packets)
        assert all(lb.pool.state_of(int(i)) == "app" for i in ids if i < lb.pool.n_buffers)
        lens[:] = 60
        good = np.unique(ids[ids < lb.pool.n_buffers])[:8]
        assert tx.tx_burst_zc(good, lens[:len(good)]) == len(good)   # the ring is as it was
        lb.step()
        assert lb.driver_rx.rx_discard(64) == 10 + len(good)


def test_application_cannot_free_buffers_the_queue_owns(lb):
    ids = lb.pool.alloc(1)
    lb.driver_tx.tx_burst_zc(ids, np.array([60], np.uint32))
    with pytest.raises(PoolError, match="owned by a queue"):
        lb.pool.free(ids)


# ---- argument errors are clear and happen before any work ----

@pytest.mark.parametrize(
    "out, lens, exc, match",
    [
        (np.zeros((4, 2048), np.int8), np.zeros(4, np.uint32), TypeError, "dtype uint8"),
        (np.zeros(2048, np.uint8), np.zeros(4, np.uint32), ValueError, "2-D"),
        (np.zeros((4, 2048), np.uint8)[:, ::2], np.zeros(4, np.uint32), ValueError, "C-contiguous"),
        (np.zeros((4, 2048), np.uint8), np.zeros(4, np.int64), TypeError, "dtype uint32"),
        (np.zeros((4, 2048), np.uint8), np.zeros(3, np.uint32), ValueError, "lengths has 3"),
        (np.zeros((4, 100), np.uint8), np.zeros(4, np.uint32), ValueError, "at least 1984 columns"),
        ([[0] * 2048], np.zeros(1, np.uint32), TypeError, "numpy array"),
        (np.zeros((4, 2048), np.uint8), np.zeros((4, 1), np.uint32), ValueError, "1-D"),
    ],
)
def test_rx_burst_argument_errors(lb, out, lens, exc, match):
    with pytest.raises(exc, match=match):
        lb.driver_rx.rx_burst(out, lens)


def test_rx_burst_refuses_read_only_output(lb):
    out = np.zeros((4, 2048), np.uint8)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        lb.driver_rx.rx_burst(out, np.zeros(4, np.uint32))


@pytest.mark.parametrize("length, match", [(0, "1 to"), (1515, "1 to 1514"), (10**6, "1 to")])
def test_tx_burst_length_errors_name_the_packet(lb, length, match):
    pk = np.zeros((2, 1514), np.uint8)
    lens = np.array([60, length], np.uint32)
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        lb.driver_tx.tx_burst(pk, lens)
    assert lb.driver_tx.vq.in_flight == 0     # nothing half-sent


def test_zc_argument_errors(lb):
    with pytest.raises(TypeError, match="uint32"):
        lb.driver_rx.rx_burst_zc(np.zeros(4, np.int32), np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match="lengths has 2"):
        lb.driver_rx.rx_burst_zc(np.zeros(4, np.uint32), np.zeros(2, np.uint32))


# ---- receive timestamps (docs/analytics.md) ----

def test_rx_timestamps_one_clock_reading_per_burst_for_the_packets_received(lb):
    import time
    data, lengths = random_packets(5)
    lb.driver_tx.tx_burst(data, lengths)
    lb.step()
    out = np.zeros((8, lb.driver_rx.max_packet_len), np.uint8)
    lens = np.zeros(8, np.uint32)
    ts = np.full(8, 7, np.uint64)
    before = time.time_ns()
    assert lb.driver_rx.rx_burst(out, lens, timestamps=ts) == 5
    after = time.time_ns()
    assert before <= ts[0] <= after and (ts[:5] == ts[0]).all()
    assert (ts[5:] == 7).all()              # rows with no packet are left alone
    assert lb.driver_rx.rx_burst(out, lens, timestamps=ts) == 0 and (ts[5:] == 7).all()


def test_rx_zc_timestamps_and_a_later_burst_gets_a_later_time(lb):
    ids, lens = np.zeros(4, np.uint32), np.zeros(4, np.uint32)
    stamps = []
    for _ in range(2):
        data, lengths = random_packets(3)
        lb.driver_tx.tx_burst(data, lengths)
        lb.step()
        ts = np.zeros(4, np.uint64)
        assert lb.driver_rx.rx_burst_zc(ids, lens, timestamps=ts) == 3
        lb.pool.free(ids[:3])
        assert (ts[:3] == ts[0]).all() and ts[3] == 0
        stamps.append(int(ts[0]))
    assert stamps[0] <= stamps[1]


@pytest.mark.parametrize("ts, exc, match", [
    (np.zeros(4, np.uint32), TypeError, "dtype uint64"),
    (np.zeros(3, np.uint64), ValueError, "timestamps has 3 entries"),
    (np.zeros((4, 1), np.uint64), ValueError, "1-D"),
    (np.zeros(8, np.uint64)[::2], ValueError, "contiguous"),
    ([0, 0, 0, 0], TypeError, "numpy array"),
])
def test_rx_timestamps_argument_errors(lb, ts, exc, match):
    with pytest.raises(exc, match=match):
        lb.driver_rx.rx_burst(np.zeros((4, 2048), np.uint8), np.zeros(4, np.uint32), timestamps=ts)
    with pytest.raises(exc, match=match):
        lb.driver_rx.rx_burst_zc(np.zeros(4, np.uint32), np.zeros(4, np.uint32), timestamps=ts)
    ro = np.zeros(4, np.uint64)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        lb.driver_rx.rx_burst_zc(np.zeros(4, np.uint32), np.zeros(4, np.uint32), timestamps=ro)


def test_closed_queue_raises(lb):
    lb.driver_rx.close()
    with pytest.raises(QueueStateError, match="closed"):
        rx_all(lb, 4)
    lb.driver_tx.close()
    with pytest.raises(QueueStateError, match="closed"):
        lb.driver_tx.tx_burst(np.zeros((1, 60), np.uint8), np.array([60], np.uint32))


def test_failed_queue_raises_the_reason_on_every_burst(lb):
    data, lengths = random_packets(4)
    lb.driver_tx.tx_burst(data, lengths)
    lb.step()
    lb.driver_rx.vq.fail("the device is gone (test)")
    lb.driver_tx.vq.fail("the device is gone (test)")
    assert lb.driver_rx.vq.broken and lb.driver_rx.vq.fail_reason == "the device is gone (test)"
    for _ in range(2):
        with pytest.raises(DeviceError, match="virtqueue 0: the device is gone"):
            rx_all(lb, 4)
        with pytest.raises(DeviceError, match="the device is gone"):
            lb.driver_tx.tx_burst(data, lengths)
    lb.driver_rx.close()                                  # closing still works, buffers come back
    lb.driver_tx.close()
    assert lb.pool.available == lb.pool.n_buffers


def test_rx_discard_counts_and_returns_every_buffer(lb):
    data, lengths = random_packets(40)
    sent = lb.driver_tx.tx_burst(data, lengths)
    lb.step()
    free_before = lb.pool.available
    got = 0
    for _ in range(10):
        got += lb.driver_rx.rx_discard(16)              # at most 16 a call
        lb.step()
    assert got == sent
    st = lb.driver_rx.stats()
    assert st["packets"] == sent and st["bytes"] == int(lengths[:sent].sum())
    assert lb.driver_rx.rx_discard() == 0
    assert lb.pool.available >= free_before             # nothing kept back
    with pytest.raises(ValueError, match="max_packets"):
        lb.driver_rx.rx_discard(0)
    with pytest.raises(ValueError, match="max_packets"):
        lb.driver_rx.rx_discard(257)
    lb.driver_rx.close()
    with pytest.raises(QueueStateError, match="closed"):
        lb.driver_rx.rx_discard()


def test_close_returns_in_flight_buffers_to_the_pool(lb):
    data, lengths = random_packets(10)
    lb.driver_tx.tx_burst(data, lengths)
    lb.driver_tx.close()
    lb.driver_rx.close()
    assert lb.pool.available == lb.pool.n_buffers


def test_burst_on_closed_memory_raises(lb):
    lb.memory.close()
    with pytest.raises(QueueStateError, match="closed"):
        lb.driver_tx.reclaim()


def test_header_length_must_be_12_or_10(memory):
    pool = pmd.PacketPool(memory, 16)
    with pytest.raises(ValueError, match="hdr_len"):
        pmd.RxQueue(pmd.Virtqueue(memory, 8), pool, hdr_len=11)


def test_legacy_10_byte_header(memory):
    with Loopback(queue_size=16, hdr_len=10) as lb:
        data, lengths = random_packets(4)
        lb.driver_tx.tx_burst(data, lengths)
        lb.step()
        out, lens = rx_all(lb, 4)
        assert (lens == lengths).all() and (out[0, :lens[0]] == data[0, :lengths[0]]).all()


# ---- device errors seen through bursts ----

def test_bad_used_entries_are_counted_logged_and_skipped(lb, caplog):
    dq = lb.device_rx
    dq.push_raw(1000, 60)           # id out of range
    dq.publish_used()
    lens = np.zeros(4, np.uint32)
    assert lb.driver_rx.rx_burst(np.zeros((4, 2048), np.uint8), lens) == 0
    assert lb.driver_rx.stats()["bad_used_id"] == 1
    assert "bad used entr" in caplog.text


def test_strict_queue_raises_on_bad_used_entry(lb):
    lb.driver_rx.strict = True
    head, _, _ = lb.device_rx.pop_chain()
    lb.device_rx.push_raw(head, 5000)   # longer than the buffer
    lb.device_rx.publish_used()
    with pytest.raises(DeviceError, match="length too large 1"):
        rx_all(lb, 4)
    assert lb.driver_rx.stats()["dropped"] == 1


def test_used_len_shorter_than_header_is_a_bad_entry(lb):
    head, _, _ = lb.device_rx.pop_chain()
    lb.device_rx.push_raw(head, 5)
    lb.device_rx.publish_used()
    out, lens = rx_all(lb, 4)
    assert len(lens) == 0
    assert lb.driver_rx.stats()["bad_used_len"] == 1


def test_buffers_reach_the_device_at_their_iova_not_their_address():
    # The device sees IOVAs offset from virtual addresses, as through an IOMMU.
    off = 0x5000_0000_0000
    with Loopback(queue_size=16, iova_translator=lambda va: va + off) as lb:
        assert lb.pool.iova_of(0) == lb.memory.address + lb.pool.offset + off
        data, lengths = random_packets(16)
        lb.driver_tx.tx_burst(data, lengths)
        assert lb.step() == 16
        out, lens = rx_all(lb, 16)
        assert (lens == lengths).all()


@pytest.mark.parametrize("method", ["fill", "rx_burst", "rx_burst_zc", "rx_discard", "reclaim", "tx_burst",
                                    "tx_burst_zc"])
def test_each_burst_runs_its_packet_loop_without_the_gil(method):
    # Thread switching would hide a held GIL from a behavioural test, so check
    # the source: each public burst method enters a `with nogil:` block, or
    # releases the GIL with pmd_gil_release (csrc/pmd_gil.h) when another thread
    # could take it.
    import pathlib

    driver = pathlib.Path(pmd.__file__).parent / "driver"
    src = (driver / "_rx.pyx").read_text() + (driver / "_tx.pyx").read_text()
    start = src.index(f"    def {method}(self")
    end = src.find("\n    def ", start + 1)
    body = src[start:end if end > 0 else None]
    assert "with nogil:" in body or ("= pmd_gil_release()" in body and "pmd_gil_take(ts)" in body)


def test_between_gil_release_and_take_the_generated_c_touches_no_python_object():
    # Cython checks a `with nogil:` block but not code between pmd_gil_release and
    # pmd_gil_take: the generated C there must call no Python API and change no
    # reference count (pmd/includes/gil.pxd).
    import pathlib
    import re

    root = pathlib.Path(pmd.__file__).parent
    sources = [c for c in root.glob("*/*.c") if "pmd_gil_release" in c.read_text()]
    if not sources:
        pytest.skip("no generated C next to the package (an installed wheel): build in place to check it")
    spans = 0
    for c in sources:
        text = re.sub(r"/\*.*?\*/", "", c.read_text(), flags=re.S)   # Cython quotes the .pyx in comments
        for m in re.finditer(r"= pmd_gil_release\(\);(.*?)pmd_gil_take\(", text, re.S):
            # (__Pyx_TraceLine: only in the debug build, which keeps the GIL: pmd_gil.h)
            bad = [line.strip() for line in m.group(1).splitlines()
                   if re.search(r"\bPy|__Pyx_", line) and "__Pyx_TraceLine(" not in line]
            assert not bad, f"{c.name}: Python C API while the GIL may be released: {bad}"
            spans += 1
    assert spans >= 7     # rx_burst, rx_burst_zc, rx_discard, tx_burst, tx_burst_zc, reclaim, tx_to_rx


def test_bursts_keep_the_gil_only_while_their_thread_is_the_only_one():
    # In a fresh interpreter (pytest's may have threads of its own): alone, then
    # with a second thread, then alone again; a loopback moves packets each time.
    code = """
import threading
import numpy as np
from pmd.driver._queue import bursts_release_gil
from pmd.loopback import Loopback
seen = []
with Loopback(queue_size=64) as lb:
    def burst():
        ids = lb.pool.alloc(8)
        assert lb.driver_tx.tx_burst_zc(ids, np.full(8, 60, np.uint32)) == 8
        assert lb.step() == 8
        got, lens = np.zeros(8, np.uint32), np.zeros(8, np.uint32)
        assert lb.driver_rx.rx_burst_zc(got, lens) == 8 and (lens == 60).all()
        lb.pool.free(got)
        seen.append(bursts_release_gil())
    burst()
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()
    burst()
    ev.set()
    t.join()
    burst()
print(seen)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from pmd.driver._queue import GIL_ALWAYS_KEPT
    # (the debug build traces lines, which needs the GIL: it never releases it)
    assert r.stdout.strip() == ("[False, False, False]" if GIL_ALWAYS_KEPT else "[False, True, False]")


# ---- mergeable rx buffers (VIRTIO_NET_F_MRG_RXBUF, 5.1.6.4.2) ----

def test_mergeable_jumbo_frames_arrive_whole():
    with Loopback(queue_size=64, mergeable=True, max_packet_len=9018) as lb:
        lengths = np.array([9018, 60, 4000, 1985, 1984], np.uint32)
        data = RNG.integers(0, 256, (5, 9018), dtype=np.uint8)
        assert lb.driver_tx.tx_burst(data, lengths) == 5
        assert lb.step() == 5
        out = np.zeros((5, 9018), np.uint8)
        lens = np.zeros(5, np.uint32)
        assert lb.driver_rx.rx_burst(out, lens) == 5
        assert (lens == lengths).all()
        for i in range(5):
            assert (out[i, :lens[i]] == data[i, :lengths[i]]).all()
        # 9018 + 12 bytes over 1996-byte buffers: 5 used entries for the first packet
        assert lb.driver_rx.stats()["bad_num_buffers"] == 0


def test_mergeable_rows_must_hold_max_packet_len():
    with Loopback(queue_size=16, mergeable=True, max_packet_len=9018) as lb:
        with pytest.raises(ValueError, match="9018"):
            lb.driver_rx.rx_burst(np.zeros((4, 2048), np.uint8), np.zeros(4, np.uint32))


def test_mergeable_packet_waits_until_all_its_buffers_are_published():
    with Loopback(queue_size=16, mergeable=True) as lb:
        data = np.zeros((1, 5000), np.uint8)
        lb.driver_tx.tx_burst(data, np.array([5000], np.uint32))
        lb.step()
        r = ring_view(lb.driver_rx.vq)
        r["used_idx"][0] -= 1          # hide the packet's last buffer
        out = np.zeros((1, 9216), np.uint8)
        lens = np.zeros(1, np.uint32)
        assert lb.driver_rx.rx_burst(out, lens) == 0
        r["used_idx"][0] += 1
        assert lb.driver_rx.rx_burst(out, lens) == 1 and lens[0] == 5000


def test_mergeable_zero_copy_drops_multi_buffer_packets_and_counts_them():
    with Loopback(queue_size=16, mergeable=True) as lb:
        data = np.zeros((2, 5000), np.uint8)
        lb.driver_tx.tx_burst(data, np.array([5000, 100], np.uint32))
        lb.step()
        ids = np.zeros(4, np.uint32)
        lens = np.zeros(4, np.uint32)
        assert lb.driver_rx.rx_burst_zc(ids, lens) == 1 and lens[0] == 100
        s = lb.driver_rx.stats()
        assert s["zc_multi_dropped"] == 1 and s["dropped"] == 1
        lb.pool.free(ids[:1])


def test_mergeable_bad_num_buffers_is_counted():
    with Loopback(queue_size=16, mergeable=True) as lb:
        head, _, _ = lb.device_rx.pop_chain()
        hdr = bytes(10) + (0).to_bytes(2, "little")       # num_buffers = 0
        lb.device_rx.complete(head, hdr + bytes(60))
        lb.device_rx.publish_used()
        out = np.zeros((4, 9216), np.uint8)
        lens = np.zeros(4, np.uint32)
        assert lb.driver_rx.rx_burst(out, lens) == 0
        s = lb.driver_rx.stats()
        assert s["bad_num_buffers"] == 1 and s["dropped"] == 1
        assert lb.pool.available == lb.pool.n_buffers - lb.driver_rx.vq.in_flight


def test_mergeable_needs_the_12_byte_header(memory):
    pool = pmd.PacketPool(memory, 16)
    with pytest.raises(ValueError, match="12-byte"):
        pmd.RxQueue(pmd.Virtqueue(memory, 8), pool, hdr_len=10, mergeable=True)


# ---- cookies: a queue frees only buffers it holds (issue 8, defect 4) ----

def test_raw_virtqueue_methods_are_refused_once_a_queue_owns_it():
    # Before: the chain went in, the device completed it, and reclaim() freed
    # "buffer" 10**9 (heap overflow in PacketPool.put): in a child, so it shows.
    check_isolated("""
import pytest, pmd
from pmd.errors import QueueStateError
lb = pmd.Loopback(16)
vq = lb.driver_tx.vq
with pytest.raises(QueueStateError, match="belongs to an RxQueue/TxQueue"):
    vq.add([(lb.pool.iova_of(0), 60)], cookie=10**9)
for call in (vq.kick, vq.get_used, lb.driver_rx.vq.get_used):
    with pytest.raises(QueueStateError, match="belongs to an RxQueue/TxQueue"):
        call()
assert vq.in_flight == 0
lb.step(); lb.driver_tx.reclaim(); lb.close()
""")


def test_a_virtqueue_belongs_to_one_queue(memory):
    pool = pmd.PacketPool(memory, 16)
    vq = pmd.Virtqueue(memory, 8)
    pmd.TxQueue(vq, pool)
    with pytest.raises(QueueStateError, match="already belongs to a queue"):
        pmd.RxQueue(vq, pool)


CHAINS_NOT_BUILT_BY_THE_QUEUE = """
import numpy as np, pmd
from pmd.sim._dma import DmaWindows
from pmd.sim._virtqueue import DeviceQueue
mergeable = bool(int(sys.argv[1]))
packed = bool(int(sys.argv[2]))
m = pmd.DmaMemory(4 << 20, lock=False)
pool = pmd.PacketPool(m, 256)
rvq, tvq = pmd.Virtqueue(m, 64, 0, packed=packed), pmd.Virtqueue(m, 64, 1, packed=packed)
w = DmaWindows(); w.add_memory(m)
drx = DeviceQueue(w, 64, rvq.desc_iova, rvq.avail_iova, rvq.used_iova, packed=packed)
dtx = DeviceQueue(w, 64, tvq.desc_iova, tvq.avail_iova, tvq.used_iova, packed=packed)
# Before the queues exist, chains go in through the raw API: their cookies are
# no buffers of theirs (one far outside the pool, one the rx ring will hold).
held = 5
buf = pool.iova_of(200)
tvq.add([(buf, 60)], cookie=10**9)
tvq.add([(buf, 60)], cookie=held)
tvq.add([(buf, 8)] * 40, cookie=7)                      # longer than any chain a burst builds
tvq.kick()
rvq.add([], [(buf, 2048)], cookie=10**9)
rvq.add([], [(buf, 2048)], cookie=held)
rvq.kick()
rxq = pmd.RxQueue(rvq, pool, mergeable=mergeable)
txq = pmd.TxQueue(tvq, pool)
rxq.fill()
assert pool.state_of(held) == "queue" and rvq.in_flight == 64
for _ in range(3):
    head, _, _ = dtx.pop_chain(); dtx.complete(head)
dtx.publish_used()
hdr = bytes(10) + (1).to_bytes(2, "little")             # num_buffers = 1
for _ in range(2):
    head, _, _ = drx.pop_chain(); drx.complete(head, hdr + bytes(60))
drx.publish_used()
assert txq.reclaim() == 0
out = np.zeros((8, rxq.max_packet_len), np.uint8); lens = np.zeros(8, np.uint32)
assert rxq.rx_burst(out, lens) == 0
assert txq.stats()["foreign_chains"] == 3 and rxq.stats()["foreign_chains"] == 2
assert pool.state_of(held) == "queue" and rvq.in_flight == 64          # refilled: ring full again
assert tvq.in_flight == 0                                                 # descriptors reclaimed
# The used counter moved past every chain taken, foreign ones included: by used
# entries on a split ring (3 and 2), by descriptors on a packed one (1 + 1 + 40 and 2;
# a foreign chain's detach writes num_free in the middle of the walk).
assert tvq.next_used_idx == (42 if packed else 3) and rvq.next_used_idx == 2, (tvq.next_used_idx, rvq.next_used_idx)
assert pool.available + rvq.in_flight == pool.n_buffers                    # each buffer once
# The queues go on: a packet through both rings, byte-exact.
pk = np.arange(100, dtype=np.uint8).reshape(1, 100)
assert txq.tx_burst(pk, np.array([100], np.uint32)) == 1
from pmd.sim._tx import tx_to_rx
assert tx_to_rx(dtx, drx, mergeable=mergeable) == 1
assert rxq.rx_burst(out, lens) == 1 and lens[0] == 100 and (out[0, :100] == pk[0]).all()
for q in (drx, dtx, rxq, txq):
    q.close()
assert pool.available == pool.n_buffers
print("ok")
"""


@pytest.mark.parametrize("packed", [0, 1], ids=["split", "packed"])
@pytest.mark.parametrize("mergeable", [0, 1], ids=["plain", "mergeable"])
def test_chains_a_queue_did_not_build_are_counted_and_never_freed(mergeable, packed):
    check_isolated("import sys\n" + CHAINS_NOT_BUILT_BY_THE_QUEUE, str(mergeable), str(packed))


# ---- every input array is read once (issue 8, defect 5) ----

READ_ONCE = """
import ctypes, mmap, os, sys, numpy as np, pmd
from pmd.errors import PoolError
iters = int(sys.argv[1])
lb = pmd.Loopback(64)
page = mmap.PAGESIZE
shm = mmap.mmap(-1, 3 * page, flags=mmap.MAP_SHARED)
raw = np.frombuffer(shm, np.uint8)
libc = ctypes.CDLL(None, use_errno=True)
# The last page is a guard: a read past the packet row below faults.
assert libc.mprotect(ctypes.c_void_p(raw.ctypes.data + 2 * page), page, 0) == 0
words = raw[:page].view(np.uint32)
ids, lens, clens, stop = words[0:1], words[1:2], words[2:3], words[3:4]
packets = raw[2 * page - 64:2 * page].reshape(1, 64)     # one row, ending at the guard page
g = lb.pool.alloc()
ids[0], lens[0], clens[0] = g, 60, 60
parent = os.getpid()
pid = os.fork()
if pid == 0:
    # Another process sharing the arrays: it changes them between the check and the use.
    while stop[0] == 0 and os.getppid() == parent:
        for _ in range(1000):
            ids[0] = 0x7FFFFFF0; clens[0] = 1900
            ids[0] = g; clens[0] = 60
    os._exit(0)
refused = sent = 0
try:
    for it in range(iters):
        try:
            sent += lb.driver_tx.tx_burst(packets, clens)
        except ValueError:
            refused += 1
        try:
            zc = lb.driver_tx.tx_burst_zc(ids, lens)
        except PoolError:
            refused += 1
            zc = 0
        sent += zc
        lb.step()
        lb.driver_rx.rx_discard(64)
        lb.driver_tx.reclaim()
        if zc:
            assert lb.pool.alloc() == g                   # the zero-copy buffer came back last
finally:
    stop[0] = 1
    os.waitpid(pid, 0)
s = lb.driver_rx.stats()
assert s["bad_used_len"] == s["runt"] == 0 and lb.device_tx.stats()["bad_descriptors"] == 0
print(sent, refused)
"""


def test_tx_bursts_read_ids_and_lengths_once():
    # Before: a changed id made the burst write outside the pool state array
    # (SIGSEGV), a changed length read past the packet row into the guard page.
    out = check_isolated(READ_ONCE, "5000")
    sent, refused = map(int, out.split())
    if refused == 0:
        pytest.skip("the other process never changed the arrays during a check (no CPU for it): "
                    "nothing was raced")
    assert sent > 0


# ---- runts (issue 8, defect 6) ----

def net_hdr(num_buffers):
    return bytes(10) + num_buffers.to_bytes(2, "little")


def deliver(lb, data):
    """Complete the next rx chain with ``data`` (header included), as the device."""
    head, _, _ = lb.device_rx.pop_chain()
    lb.device_rx.complete(head, data)
    lb.device_rx.publish_used()


@pytest.mark.parametrize("mergeable", [False, True], ids=["plain", "mergeable"])
@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zc"])
@pytest.mark.parametrize("pkt", [0, 1, 13])
def test_frames_shorter_than_an_ethernet_header_are_dropped_and_counted_as_runts(pkt, zero_copy, mergeable):
    with Loopback(queue_size=16, mergeable=mergeable) as lb:
        hdr = net_hdr(1)
        deliver(lb, hdr + bytes(pkt))
        deliver(lb, hdr + bytes(range(14)))                # 14 bytes: the shortest frame
        lens = np.zeros(4, np.uint32)
        if zero_copy:
            ids = np.zeros(4, np.uint32)
            n = lb.driver_rx.rx_burst_zc(ids, lens)
            data = lb.pool.data[ids[0], :14].tobytes()
            lb.pool.free(ids[:n])
        else:
            out = np.zeros((4, lb.driver_rx.max_packet_len), np.uint8)
            n = lb.driver_rx.rx_burst(out, lens)
            data = out[0, :14].tobytes()
        assert n == 1 and lens[0] == 14 and data == bytes(range(14))
        s = lb.driver_rx.stats()
        assert s["runt"] == 1 and s["dropped"] == 1 and s["packets"] == 1 and s["bad_used_len"] == 0
        assert lb.pool.available == lb.pool.n_buffers - lb.driver_rx.vq.in_flight   # the runt's buffer is back


# ---- found by tests/test_fuzz_rings.py ----

def test_mergeable_entry_with_a_bad_length_is_not_read_as_a_header():
    # Its buffer holds stale bytes: a num_buffers read from them would swallow
    # the good packets after it as "continuation" buffers.
    with Loopback(queue_size=16, mergeable=True) as lb:
        lb.pool.array[:, 64 - 12:64] = np.frombuffer(net_hdr(5), np.uint8)   # stale: 5 buffers
        head, _, cap = lb.device_rx.pop_chain()
        lb.device_rx.push_raw(head, cap + 1)                    # too long: not a packet at all
        for k in range(3):
            deliver(lb, net_hdr(1) + bytes([k]) * 60)
        out = np.zeros((8, lb.driver_rx.max_packet_len), np.uint8)
        lens = np.zeros(8, np.uint32)
        assert lb.driver_rx.rx_burst(out, lens) == 3
        assert [out[i, 0] for i in range(3)] == [0, 1, 2] and lens[:3].tolist() == [60] * 3
        s = lb.driver_rx.stats()
        assert s["bad_used_len"] == 1 and s["bad_num_buffers"] == 0


def test_rx_discard_counts_multi_buffer_packets_as_received():
    with Loopback(queue_size=16, mergeable=True) as lb:
        lb.driver_tx.tx_burst(np.zeros((2, 5000), np.uint8), np.array([5000, 100], np.uint32))
        lb.step()
        assert lb.driver_rx.rx_discard(8) == 2
        s = lb.driver_rx.stats()
        assert s["packets"] == 2 and s["bytes"] == 5100 and s["dropped"] == s["zc_multi_dropped"] == 0
        assert lb.pool.available == lb.pool.n_buffers - lb.driver_rx.vq.in_flight - lb.driver_tx.vq.in_flight


# ---- a descriptor made available again in the burst that took it (harvest_split) ----
def _device_uses(view, entries):
    """Play the device: write used entries (head, len) after the ones already there."""
    idx = int(view["used_idx"][0])
    for head, length in entries:
        view["used_ring"][idx % len(view["used_ring"])] = (head, length)
        idx += 1
    view["used_idx"][0] = idx & 0xFFFF


@pytest.mark.parametrize("zero_copy", [False, True])
def test_a_used_id_named_twice_in_one_burst_is_not_in_flight_the_second_time(zero_copy):
    """harvest_split puts a good packet's descriptor back in the avail ring at once, but
    the device cannot see it before the burst publishes the index (2.7.13.3): a second
    used entry for it in the same burst names no buffer in flight, is counted and gives
    no packet. After the burst the descriptor is the device's again, and a used entry
    for it is a packet."""
    lb = Loopback(queue_size=16)
    try:
        rx, hdr = lb.driver_rx, lb.hdr_len
        view = ring_view(rx.vq)
        published = int(view["avail_idx"][0])
        h0 = int(view["avail_ring"][0])
        _device_uses(view, [(h0, hdr + 60), (h0, hdr + 60)])
        ids, lens = np.zeros(4, np.uint32), np.zeros(4, np.uint32)
        out = np.zeros((4, rx.max_packet_len), np.uint8)
        got = rx.rx_burst_zc(ids, lens) if zero_copy else rx.rx_burst(out, lens)
        assert got == 1 and lens[0] == 60
        s = rx.stats()
        assert s["used_not_in_flight"] == 1 and s["packets"] == 1
        assert int(view["avail_idx"][0]) == (published + 1) & 0xFFFF   # h0 is available again
        assert int(view["avail_ring"][published % 16]) == h0
        if zero_copy:
            assert lb.pool.state_of(int(ids[0])) == "app"
            lb.pool.free(ids[:1])
        _device_uses(view, [(h0, hdr + 70)])
        got = rx.rx_burst_zc(ids, lens) if zero_copy else rx.rx_burst(out, lens)
        assert got == 1 and lens[0] == 70
        assert rx.stats()["used_not_in_flight"] == 1
        if zero_copy:
            lb.pool.free(ids[:1])
    finally:
        lb.close()


def test_a_head_reposted_a_full_mark_cycle_ago_is_still_in_flight():
    """harvest_split tells a head reposted in this burst by its mark (DescExtra.mark), a
    16-bit count of bursts that wraps after 65535: a head left in flight for a whole
    cycle must not look reposted when the count comes back to its mark. Burst 1 reposts
    h0 (mark 1); 65534 bursts on h1 bring the count round, so burst 65536 has mark 1
    again unless the wrap cleared h0's; its used entry for h0 is a packet."""
    with Loopback(queue_size=16) as lb:
        rx, hdr = lb.driver_rx, lb.hdr_len
        view = ring_view(rx.vq)
        h0, h1 = int(view["avail_ring"][0]), int(view["avail_ring"][1])
        out, lens = np.zeros((1, rx.max_packet_len), np.uint8), np.zeros(1, np.uint32)
        burst = rx.rx_burst
        _device_uses(view, [(h0, hdr + 60)])
        assert burst(out, lens) == 1
        for _ in range(65534):
            _device_uses(view, [(h1, hdr + 60)])
            burst(out, lens)
        assert rx.packets == 65535 and rx.stats()["used_not_in_flight"] == 0
        _device_uses(view, [(h0, hdr + 70)])
        assert burst(out, lens) == 1 and lens[0] == 70
        assert rx.stats()["used_not_in_flight"] == 0


def test_zero_copy_rx_with_the_pool_running_dry_mid_burst_keeps_every_packet_and_refills_later():
    """In zero-copy each buffer handed to the application is replaced by the pool's next
    one; when the pool runs out mid-burst the rest of the descriptors are freed, the
    refill counts no_buffer, and once the application gives buffers back the next
    burst fills the ring again: no packet lost, none duplicated."""
    lb = Loopback(queue_size=16, n_buffers=40)
    try:
        tx, rx, pool = lb.driver_tx, lb.driver_rx, lb.pool
        data, lengths = random_packets(16, width=200, hi=200)
        assert tx.tx_burst(data, lengths) == 16      # 16 in the rx ring, 16 in tx: 8 left
        lb.step()
        ids, lens = np.zeros(16, np.uint32), np.zeros(16, np.uint32)
        assert rx.rx_burst_zc(ids, lens) == 16
        assert len(set(ids.tolist())) == 16
        for i in range(16):
            assert lens[i] == lengths[i]
            assert (pool.data[ids[i], :lens[i]] == data[i, :lengths[i]]).all()
        assert rx.stats()["no_buffer"] >= 1        # 8 replaced, 8 descriptors left empty
        pool.free(ids)
        tx.reclaim()
        empty = np.zeros(16, np.uint32)
        assert rx.rx_burst_zc(empty, lens) == 0      # refills the ring from the buffers back
        data2, lengths2 = random_packets(16, width=200, hi=200)
        assert tx.tx_burst(data2, lengths2) == 16
        lb.step()
        out, olens = rx_all(lb, 16)
        assert len(out) == 16 and (olens == lengths2).all()   # the ring held 16 buffers again
        for i in range(16):
            assert (out[i, :olens[i]] == data2[i, :lengths2[i]]).all()
        s = rx.stats()
        assert s["used_not_in_flight"] == s["bad_used_id"] == s["dropped"] == 0
    finally:
        lb.close()


# ---- the device's tx_to_rx: one loop for the common pair, the general path for the rest ----
@pytest.mark.parametrize("mergeable", [False, True])
def test_tx_to_rx_hands_the_general_path_a_burst_from_its_first_unusual_chain(mergeable):
    """tx_to_rx moves one-descriptor packets in one loop over both split rings and stops at
    the first chain that is anything else (here a long packet: a tx chain of several
    descriptors, and without MRG_RXBUF one no rx buffer holds); the general path takes
    the burst from there: every packet in order and intact, the one too long for the
    driver's buffers dropped and counted, nothing else lost."""
    lb = Loopback(queue_size=64, mergeable=mergeable)
    try:
        sizes = [60, 61, 5000, 62, 3000, 63, 64, 65]
        data = RNG.integers(0, 256, (len(sizes), 5000), dtype=np.uint8)
        assert lb.driver_tx.tx_burst(data, np.array(sizes, np.uint32)) == len(sizes)
        expected = [i for i, n in enumerate(sizes) if mergeable or n <= lb.driver_rx.max_packet_len]
        assert lb.step() == len(expected)
        width = lb.driver_rx.max_packet_len
        out = np.zeros((len(sizes), width), np.uint8)
        lens = np.zeros(len(sizes), np.uint32)
        got = lb.driver_rx.rx_burst(out, lens)
        assert got == len(expected)
        for row, i in enumerate(expected):
            assert lens[row] == sizes[i]
            assert (out[row, :sizes[i]] == data[i, :sizes[i]]).all()
        assert lb.device_tx.stats()["dropped"] == len(sizes) - len(expected)
        assert lb.device_tx.stats()["bad_descriptors"] == lb.device_rx.stats()["bad_descriptors"] == 0
        assert lb.driver_tx.reclaim() >= len(sizes)
    finally:
        lb.close()


def test_tx_to_rx_reads_the_rx_avail_index_only_when_a_tx_chain_needs_a_buffer():
    """As pop() does, the device reads the driver's rx avail index when a packet needs a
    buffer and it has caught up with what it read before, not earlier: a step with
    nothing to transmit reads nothing, so an index the driver moves back afterwards (here
    to "no buffers", a driver's error) is what the next packet sees, and the packet stays
    in the tx ring. An index more than a ring ahead is counted and stops the rx queue
    (2.7.13.3) when it is read."""
    lb = Loopback(queue_size=16)
    try:
        view = ring_view(lb.driver_rx.vq)
        published = int(view["avail_idx"][0])
        assert published == 16
        assert lb.step() == 0                        # no tx chain: the rx index is not read
        view["avail_idx"][0] = 0                     # moved back to where the device is
        data, lengths = random_packets(1, width=200, hi=200)
        assert lb.driver_tx.tx_burst(data, lengths) == 1
        assert lb.step() == 0                        # read now: no rx buffer
        assert lb.driver_tx.reclaim() == 0           # not taken: still the device's
        view["avail_idx"][0] = (published + 100) & 0xFFFF
        assert lb.step() == 0
        s = lb.device_rx.stats()
        assert s["broken"] and s["bad_descriptors"] == 1
        assert lb.driver_tx.reclaim() == 0
    finally:
        lb.close()


@pytest.mark.parametrize("call", ["rx_burst", "rx_burst_zc", "tx_burst", "tx_burst_zc"])
def test_a_uint32_array_in_the_other_byte_order_is_refused_with_the_remedy(lb, call):
    """uint32 in the other byte order has numpy's uint32 type number but not its values:
    read in place, its ids and lengths would be byte-swapped. It is refused by name."""
    swapped = np.full(4, 60, np.uint32).astype(">u4" if np.little_endian else "<u4")
    if call == "rx_burst":
        args = (np.zeros((4, lb.driver_rx.max_packet_len), np.uint8), swapped)
    elif call == "rx_burst_zc":
        args = (np.zeros(4, np.uint32), swapped)
    elif call == "tx_burst":
        args = (np.zeros((4, 60), np.uint8), swapped)
    else:
        args = (lb.pool.alloc(4), swapped)
    q = lb.driver_rx if call.startswith("rx") else lb.driver_tx
    with pytest.raises(ValueError, match=r"lengths is uint32 in the other byte order .*astype\(np.uint32\)"):
        getattr(q, call)(*args)
    assert q.packets == 0
