"""DmaMemory: memfd-backed, shared, zeroed, with an IOVA translation hook."""

import mmap
import os

import numpy as np
import pytest

import pmd
from pmd.errors import PmdError, QueueStateError

from .conftest import open_fds


def test_size_is_rounded_up_to_the_page_size():
    with pmd.DmaMemory(5000, hugepages=False, lock=False) as m:
        assert m.size == 8192 and m.page_size == 4096


def test_zero_size_is_refused():
    with pytest.raises(ValueError, match="positive"):
        pmd.DmaMemory(0)


def test_memory_is_a_memfd_whose_fd_is_kept():
    with pmd.DmaMemory(1 << 20, lock=False, name="pmd-fdtest") as m:
        target = os.readlink(f"/proc/self/fd/{m.fd}")
        assert target.startswith("/memfd:pmd-fdtest")


def test_memory_is_shared_through_its_fd():
    # Another mapping of the fd (what a vfio-user device process does) sees our writes.
    with pmd.DmaMemory(1 << 20, lock=False) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        view[4096:4100] = [1, 2, 3, 4]
        other = mmap.mmap(m.fd, m.size, mmap.MAP_SHARED)
        try:
            assert other[4096:4100] == bytes([1, 2, 3, 4])
            other[10] = 99
            assert view[10] == 99
        finally:
            other.close()
        del view


def test_memory_starts_zeroed():
    with pmd.DmaMemory(1 << 20, lock=False) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        assert not view.any()
        del view


@pytest.mark.skipif(os.geteuid() != 0, reason="locking 16 MiB needs root or a large RLIMIT_MEMLOCK")
def test_memory_is_locked_when_asked():
    with pmd.DmaMemory(16 << 20, hugepages=False, lock=True) as m:
        assert m.locked
        with open("/proc/self/status") as f:
            locked_kb = int(next(line for line in f if line.startswith("VmLck")).split()[1])
        assert locked_kb >= 16 << 10


def _free_hugepages() -> int:
    try:
        with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
            return int(f.read())
    except OSError:
        return 0


def test_hugepages_required_but_missing_is_a_clear_error():
    # One page more than are free, whatever this machine has reserved.
    with pytest.raises(PmdError, match="nr_hugepages"):
        pmd.DmaMemory((_free_hugepages() + 1) * (2 << 20), hugepages=True, lock=False)


@pytest.fixture
def two_free_hugepages():
    """Two free 2 MiB huge pages: reserved for the test (as root) when the machine has none."""
    path = "/proc/sys/vm/nr_hugepages"
    if _free_hugepages() >= 2:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no free 2 MiB huge pages, and only root may reserve them (echo 2 > /proc/sys/vm/nr_hugepages)")
    with open(path) as f:
        before = int(f.read())
    with open(path, "w") as f:
        f.write(str(before + 2))
    try:
        if _free_hugepages() < 2:
            pytest.skip("the kernel could not reserve 2 huge pages (memory too fragmented)")
        yield
    finally:
        with open(path, "w") as f:
            f.write(str(before))


def test_hugepages_are_taken_by_default_when_enough_are_free(two_free_hugepages):
    with pmd.DmaMemory(5000, lock=False) as m:
        assert m.hugepages and m.page_size == 2 << 20 and m.size == 2 << 20
        assert os.readlink(f"/proc/self/fd/{m.fd}").startswith("/memfd:pmd-dma")
        view = np.frombuffer(m, dtype=np.uint8)
        assert not view.any()
        del view
    with pmd.DmaMemory(5000, hugepages=False, lock=False) as m:
        assert not m.hugepages and m.page_size == 4096


def test_alloc_honours_alignment_and_never_overlaps():
    with pmd.DmaMemory(1 << 20, lock=False) as m:
        a = m.alloc(100, 64)
        b = m.alloc(10, 4096)
        c = m.alloc(1, 16)
        assert a % 64 == 0 and b % 4096 == 0 and c % 16 == 0
        assert a + 100 <= b and b + 10 <= c


def test_alloc_past_the_end_is_a_clear_error():
    with pmd.DmaMemory(8192, hugepages=False, lock=False) as m:
        m.alloc(8000)
        with pytest.raises(MemoryError, match="larger region"):
            m.alloc(1000)


def test_alloc_alignment_must_be_power_of_two():
    with pmd.DmaMemory(8192, lock=False) as m, pytest.raises(ValueError, match="power of two"):
        m.alloc(10, 48)


def test_iova_is_identity_by_default():
    with pmd.DmaMemory(1 << 20, lock=False) as m:
        assert m.iova(0) == m.address
        assert m.iova(12345) == m.address + 12345
        assert m.iova_contiguous


def test_iova_translator_is_applied_per_page():
    # Reverse the page order: every page's IOVA is known, none contiguous.
    with pmd.DmaMemory(4 * 4096, hugepages=False, lock=False) as m:
        base = m.address
        m.set_iova_translator(lambda va: 0x10_0000_0000 + (3 - (va - base) // 4096) * 4096)
        assert m.iova(0) == 0x10_0000_3000
        assert m.iova(4096 + 5) == 0x10_0000_2005
        assert not m.iova_contiguous


def test_iova_translator_must_return_page_aligned_addresses():
    with pmd.DmaMemory(8192, lock=False) as m, pytest.raises(ValueError, match="not aligned"):
        m.set_iova_translator(lambda va: va + 1)


def test_closed_memory_refuses_work():
    m = pmd.DmaMemory(8192, lock=False)
    m.close()
    m.close()  # idempotent
    assert m.closed
    with pytest.raises(QueueStateError, match="closed"):
        m.alloc(10)
    with pytest.raises(QueueStateError):
        m.address


def test_close_with_live_numpy_view_keeps_pages_until_view_dies():
    m = pmd.DmaMemory(8192, lock=False)
    view = np.frombuffer(m, dtype=np.uint8)
    m.close()
    assert m.closed
    view[0] = 7          # still mapped: no crash
    assert view[0] == 7
    fd_target = f"/proc/self/fd/{m.fd}"
    assert os.path.exists(fd_target)
    del view             # last export gone: unmapped and fd closed
    assert m.fd == -1


def test_no_fd_leak_over_many_regions():
    before = open_fds()
    for _ in range(50):
        with pmd.DmaMemory(1 << 16, lock=False):
            pass
    assert open_fds() == before


# --- sealing (memfd_create(2), fcntl(2) "File Sealing"): a peer cannot shrink shared memory ---


def test_dma_memory_is_sealed_against_shrinking():
    import fcntl

    with pmd.DmaMemory(1 << 20, hugepages=False, lock=False) as m:
        assert m.sealed
        seals = fcntl.fcntl(m.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        # what a peer holding the fd would try: shrink, grow, take the seals further
        for size in (0, m.size - 4096, m.size + 4096):
            with pytest.raises(PermissionError):
                os.ftruncate(m.fd, size)
        with pytest.raises(PermissionError):
            fcntl.fcntl(m.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert os.fstat(m.fd).st_size == m.size
        m.view()[m.size - 1] = 1  # the last page is still there


def test_dma_memory_is_sealed_before_its_fd_can_be_shared():
    # The seals are there when the constructor returns, in another process's view of the fd too.
    import fcntl

    with pmd.DmaMemory(1 << 16, hugepages=False, lock=False) as m:
        other = os.open(f"/proc/self/fd/{m.fd}", os.O_RDWR)  # as a peer would hold it
        try:
            assert fcntl.fcntl(other, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            with pytest.raises(PermissionError):
                os.ftruncate(other, 0)
        finally:
            os.close(other)


def test_hugetlb_memfds_take_the_same_seals():
    # Sealing hugetlbfs memfds needs Linux 4.16; creating and sizing one takes no huge page.
    from pmd.memory._dma import MFD_HUGE_2MB
    from pmd.memory.seals import SEALS, create_sealed_memfd, seals_of

    try:
        fd = create_sealed_memfd("pmd-test-huge", 2 << 20, os.MFD_HUGETLB | MFD_HUGE_2MB)
    except OSError as e:
        pytest.skip(f"no sealable hugetlb memfd here: {e}")
    try:
        assert seals_of(fd) & SEALS == SEALS
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@pytest.mark.skipif(_free_hugepages() < 1, reason="no free 2 MiB huge page (this test does not reserve one)")
def test_hugepage_dma_memory_is_sealed_too():
    with pmd.DmaMemory(2 << 20, hugepages=True, lock=False) as m:
        assert m.hugepages and m.sealed
        with pytest.raises(PermissionError):
            os.ftruncate(m.fd, 0)


def test_shared_memory_that_cannot_be_checked_is_refused():
    # require_sealed (pmd.shm) on what a peer may send instead of a sealed memfd
    import errno as errno_

    from pmd.errors import VfioError
    from pmd.memory.seals import create_sealed_memfd, require_sealed

    sealed = create_sealed_memfd("pmd-test", 8192)
    r, w = os.pipe()
    opath = os.open(f"/proc/self/fd/{sealed}", os.O_PATH)
    directory = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    try:
        require_sealed(sealed, 8192, "sealed")  # fine
        for fd, err in ((r, errno_.EINVAL), (directory, errno_.EINVAL), (opath, errno_.EBADF),
                        (sealed + 1000, errno_.EBADF)):
            with pytest.raises(VfioError) as e:
                require_sealed(fd, 4096, "the peer's file")
            assert e.value.errno == err and "the peer's file" in str(e.value)
        with pytest.raises(VfioError) as e:
            require_sealed(sealed, 8193, "the peer's file")
        assert e.value.errno == errno_.EINVAL and "SIGBUS" in str(e.value)
    finally:
        for fd in (sealed, r, w, opath, directory):
            os.close(fd)
