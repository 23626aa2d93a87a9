"""PacketPool: fixed buffers in DMA memory, O(1) free stack, ownership checks."""

import numpy as np
import pytest

import pmd
from pmd.errors import PoolError


@pytest.fixture
def pool(memory):
    return pmd.PacketPool(memory, 16, 2048)


def test_pool_is_one_2d_view_of_dma_memory(pool, memory):
    arr = pool.array
    assert arr.shape == (16, 2048) and arr.dtype == np.uint8
    arr[3, 100] = 77
    raw = np.frombuffer(memory, dtype=np.uint8)
    assert raw[pool.offset + 3 * 2048 + 100] == 77  # same bytes, no copy
    assert pool.data.shape == (16, 2048 - 64)
    assert pool.data[3, 36] == 77


def test_buffer_iova_is_its_address_translated(pool, memory):
    assert pool.iova_of(5) == memory.iova(pool.offset + 5 * 2048)


def test_alloc_and_free_round_trip(pool):
    ids = pool.alloc(16)
    assert sorted(ids.tolist()) == list(range(16))
    assert pool.available == 0
    pool.free(ids)
    assert pool.available == 16


def test_exhaustion_is_a_clear_error_and_takes_nothing(pool):
    pool.alloc(10)
    with pytest.raises(PoolError, match="exhausted"):
        pool.alloc(7)
    assert pool.available == 6


def test_double_free_is_refused(pool):
    b = pool.alloc()
    pool.free(b)
    with pytest.raises(PoolError, match="double free"):
        pool.free(b)


def test_foreign_id_is_refused(pool):
    with pytest.raises(PoolError, match="does not belong"):
        pool.free(16)
    with pytest.raises(PoolError, match="does not belong"):
        pool.free(-1)


def test_an_id_listed_twice_in_one_free_is_named_as_such_and_nothing_freed(pool):
    ids = pool.alloc(3)
    with pytest.raises(PoolError, match=r"listed twice in this call \(ids\[0\] and ids\[2\]\)"):
        pool.free([ids[0], ids[1], ids[0]])
    assert pool.available == 13
    assert all(pool.state_of(int(i)) == "app" for i in ids)
    i = pool.alloc()
    with pytest.raises(PoolError, match="listed twice") as e:
        pool.free([i, i])
    assert "already free" not in str(e.value)


def test_an_id_freed_in_an_earlier_call_is_a_double_free(pool):
    i = pool.alloc()
    pool.free(i)
    with pytest.raises(PoolError, match="double free: buffer .* is already free"):
        pool.free([i, i])


def test_free_of_a_count_gives_back_the_first_n_ids_only(pool):
    ids = pool.alloc(4)
    pool.free(ids, 3)
    assert [pool.state_of(int(i)) for i in ids] == ["free", "free", "free", "app"]
    pool.free(ids[3:], 0)                        # nothing
    assert pool.state_of(int(ids[3])) == "app"
    with pytest.raises(ValueError, match="n=2 but only 1 ids"):
        pool.free(ids[3:], 2)
    pool.free(ids[3:])
    assert pool.available == 16


def _misaligned(ids: np.ndarray) -> np.ndarray:
    raw = bytearray(4 * len(ids) + 1)
    out = np.frombuffer(raw, np.uint32, len(ids), offset=1)   # one byte past an aligned start
    assert not out.flags.aligned
    out[:] = ids
    return out


@pytest.mark.parametrize("layout", ["uint32", "strided", "big-endian", "misaligned", "int64", "list"])
def test_a_refused_free_frees_nothing_whatever_the_ids_array(pool, layout):
    held = pool.alloc(6)
    ids = np.array([held[0], held[1], held[2], held[1]], np.uint32)   # held[1] twice
    given = {"uint32": ids, "strided": np.repeat(ids, 2)[::2], "big-endian": ids.astype(">u4"),
             "misaligned": _misaligned(ids), "int64": ids.astype(np.int64),
             "list": [int(i) for i in ids]}[layout]
    with pytest.raises(PoolError, match=r"listed twice in this call \(ids\[1\] and ids\[3\]\)"):
        pool.free(given)
    assert pool.available == 10
    assert all(pool.state_of(int(i)) == "app" for i in held)
    pool.free(given[:3])                         # the same layout, good ids: freed
    assert [pool.state_of(int(i)) for i in held[:3]] == ["free"] * 3
    assert pool.available == 13


def test_an_id_out_of_range_is_named_as_given_in_any_integer_type(pool):
    ids = pool.alloc(2)
    for bad, shown in [(np.array([ids[0], 2**32 + 1], np.int64), 2**32 + 1), (np.array([ids[0], -3]), -3),
                       (np.array([ids[0], 16], np.uint32), 16), (np.array([ids[0], 70000], np.uint64), 70000)]:
        with pytest.raises(PoolError, match=f"buffer id {shown} does not belong"):
            pool.free(bad)
        assert pool.state_of(int(ids[0])) == "app"
    pool.free(ids)


def test_free_needs_integer_ids(pool):
    with pytest.raises(TypeError, match="integers"):
        pool.free(np.array([1.5]))


@pytest.mark.parametrize("size", [0, 100, 1000])
def test_buffer_size_must_be_multiple_of_64(memory, size):
    with pytest.raises(ValueError, match="multiple of 64"):
        pmd.PacketPool(memory, 4, size)


def test_headroom_must_hold_the_header(memory):
    with pytest.raises(ValueError, match="headroom"):
        pmd.PacketPool(memory, 4, 2048, headroom=8)


def test_pool_larger_than_memory_is_a_clear_error(memory):
    with pytest.raises(MemoryError, match="larger region"):
        pmd.PacketPool(memory, 100000, 2048)


def test_buffers_never_straddle_non_contiguous_pages():
    with pmd.DmaMemory(64 * 4096, hugepages=False, lock=False) as m:
        base = m.address
        m.set_iova_translator(lambda va: 0x40_0000_0000 + (63 - (va - base) // 4096) * 4096)
        p = pmd.PacketPool(m, 32, 2048)
        for i in range(32):
            iova = p.iova_of(i)
            assert iova % 4096 + 2048 <= 4096
        with pytest.raises(ValueError, match="not contiguous"):
            pmd.PacketPool(m, 4, 4096 + 1024)


def test_swap_macs_swaps_the_first_twelve_bytes_of_each_packet_and_nothing_else(pool):
    ids = pool.alloc(3)
    frames = np.arange(3 * 20, dtype=np.uint8).reshape(3, 20)
    pool.data[ids, :20] = frames
    pool.swap_macs(ids, 2)                       # only the first two
    for k in range(2):
        assert list(pool.data[ids[k], :20]) == list(frames[k, 6:12]) + list(frames[k, 0:6]) + list(frames[k, 12:])
    assert list(pool.data[ids[2], :20]) == list(frames[2])
    pool.free(ids)


def test_swap_macs_refuses_buffers_the_application_does_not_hold(pool):
    ids = pool.alloc(2)
    pool.free(ids[1:])
    with pytest.raises(PoolError, match=r"ids\[1\]\) is not one the application holds \(free\)"):
        pool.swap_macs(ids)
    with pytest.raises(PoolError, match="not in this pool"):
        pool.swap_macs(np.array([pool.n_buffers], np.uint32))
    pool.free(ids[:1])


def test_alloc_into_fills_the_array_given_or_takes_nothing(pool):
    out = np.zeros(4, np.uint32)
    before = pool.available
    pool.alloc_into(out)
    assert pool.available == before - 4 and len(set(out.tolist())) == 4
    assert all(pool.state_of(int(b)) == "app" for b in out)
    big = np.zeros(pool.available + 1, np.uint32)
    with pytest.raises(PoolError, match="pool exhausted"):
        pool.alloc_into(big)
    assert pool.available == before - 4          # nothing taken by the refused call
    pool.free(out)
    assert pool.available == before


@pytest.mark.parametrize("make", [lambda: np.zeros(4, np.int64), lambda: np.zeros(8, np.uint32)[::2],
                                  lambda: np.zeros(4, ">u4"), lambda: np.zeros((2, 2), np.uint32)],
                         ids=["int64", "strided", "big-endian", "2-D"])
def test_alloc_into_refuses_an_array_it_cannot_fill_in_place_and_takes_nothing(pool, make):
    before = pool.available
    with pytest.raises(ValueError):
        pool.alloc_into(make())
    ro = np.zeros(4, np.uint32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pool.alloc_into(ro)
    assert pool.available == before
