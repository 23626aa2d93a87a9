"""Mmio: width-exact volatile access with offset and alignment checks."""

import mmap

import numpy as np
import pytest

import pmd
from pmd.driver._mmio import BARRIER_ARCH
from pmd.errors import QueueStateError


@pytest.fixture
def region():
    buf = bytearray(64)
    m = pmd.Mmio(buf)
    yield m, buf
    m.close()


@pytest.mark.parametrize("width, value", [(8, 0xAB), (16, 0xBEEF), (32, 0xDEADBEEF), (64, 0x0123456789ABCDEF)])
def test_write_then_read_each_width_little_endian(region, width, value):
    m, buf = region
    getattr(m, f"write{width}")(8, value)
    assert getattr(m, f"read{width}")(8) == value
    assert getattr(m, f"read{width}_relaxed")(8) == value
    assert int.from_bytes(buf[8:8 + width // 8], "little") == value


def test_access_touches_only_its_own_bytes(region):
    m, buf = region
    m.write16(2, 0xFFFF)
    assert buf[:2] == b"\0\0" and buf[2:4] == b"\xff\xff" and buf[4:8] == b"\0" * 4


@pytest.mark.parametrize("width, offset", [(16, 1), (32, 2), (64, 4)])
def test_misaligned_access_is_refused(region, width, offset):
    m, _ = region
    with pytest.raises(ValueError, match="not aligned"):
        getattr(m, f"read{width}")(offset)


@pytest.mark.parametrize("width, offset", [(8, 64), (16, 63), (32, 62), (64, 60), (64, 2**63)])
def test_access_outside_the_window_is_refused(region, width, offset):
    m, _ = region
    with pytest.raises(ValueError, match="outside"):
        getattr(m, f"read{width}")(offset)


def test_value_too_wide_for_register_is_refused(region):
    m, _ = region
    with pytest.raises(OverflowError):
        m.write16(0, 0x10000)


def test_window_is_a_checked_subrange(region):
    m, buf = region
    w = m.window(16, 16)
    w.write32(12, 0x11223344)
    assert buf[28:32] == (0x11223344).to_bytes(4, "little")
    with pytest.raises(ValueError, match="outside"):
        w.read32(16)
    with pytest.raises(ValueError, match="does not fit"):
        m.window(60, 8)


def test_closed_window_refuses_access(region):
    m, _ = region
    m.close()
    with pytest.raises(QueueStateError, match="closed"):
        m.read8(0)


def test_read_only_buffer_is_refused():
    with pytest.raises(BufferError):
        pmd.Mmio(bytes(16))


def test_mmap_can_be_closed_after_the_window_is():
    mm = mmap.mmap(-1, 4096)
    m = pmd.Mmio(mm)
    m.write32(0, 5)
    m.close()
    mm.close()  # the buffer export was released


def test_over_dma_memory():
    with pmd.DmaMemory(8192, lock=False) as mem:
        m = pmd.Mmio(mem)
        m.write64(4096, 42)
        assert np.frombuffer(mem, dtype="<u8")[512] == 42
        m.close()


def test_barrier_architecture_is_reported():
    assert "x86-64" in BARRIER_ARCH or "arm64" in BARRIER_ARCH
