"""Shared fixtures: small DMA regions and raw views of ring memory.

The ring views let tests read and write exactly what a device would see,
independently of the code under test.
"""

from __future__ import annotations

import os

import numpy as np
import pytest


def ring_view(vq):
    """numpy views of a Virtqueue's three areas, straight from DMA memory."""
    from pmd.driver._virtqueue import ring_layout

    lay = ring_layout(vq.size, vq.align)
    mem = np.frombuffer(vq.memory, dtype=np.uint8)
    base = vq.offset
    n = vq.size
    desc_dt = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
    d_off, _ = lay["desc"]
    a_off, _ = lay["avail"]
    u_off, _ = lay["used"]
    avail = mem[base + a_off: base + a_off + 6 + 2 * n].view("<u2")
    used_hdr = mem[base + u_off: base + u_off + 4].view("<u2")
    used_ring = mem[base + u_off + 4: base + u_off + 4 + 8 * n].view("<u4").reshape(n, 2)
    avail_event = mem[base + u_off + 4 + 8 * n: base + u_off + 6 + 8 * n].view("<u2")
    return {
        "desc": mem[base + d_off: base + d_off + 16 * n].view(desc_dt),
        "avail_flags": avail[0:1],
        "avail_idx": avail[1:2],
        "avail_ring": avail[2:2 + n],
        "used_event": avail[2 + n:3 + n],
        "used_flags": used_hdr[0:1],
        "used_idx": used_hdr[1:2],
        "used_ring": used_ring,
        "avail_event": avail_event,
    }


@pytest.fixture
def memory():
    import pmd

    m = pmd.DmaMemory(8 << 20, lock=False, name="pmd-test")
    yield m
    m.close()


@pytest.fixture
def ring_pair(memory):
    """A driver Virtqueue of 8 entries and the device's view of it."""
    return make_pair(memory, 8)


def make_pair(memory, size, *, event_idx=False):
    import pmd
    from pmd.sim._dma import DmaWindows
    from pmd.sim._virtqueue import DeviceQueue

    vq = pmd.Virtqueue(memory, size, 0, event_idx=event_idx)
    w = DmaWindows()
    w.add_memory(memory)
    dq = DeviceQueue(w, size, vq.desc_iova, vq.avail_iova, vq.used_iova, event_idx=event_idx)
    return vq, dq


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def plant_symlink_after_bind(monkeypatch, path: str, target) -> None:
    """From now on, a socket bound at ``path`` has its new file swapped for a symlink to
    ``target`` right after ``bind``: the race a chmod by path loses (symlink(7))."""
    import socket

    real_socket = socket.socket

    class PlantingSocket(real_socket):  # type: ignore[misc, valid-type]
        def bind(self, address):
            super().bind(address)
            if address == path:
                os.unlink(path)
                os.symlink(target, path)

    monkeypatch.setattr(socket, "socket", PlantingSocket)



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where the QEMU guest must run (the test script sets PMD_REQUIRE_QEMU=1),
    a ``qemu`` test that skips fails instead: a skip there is a missing check."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and item.get_closest_marker("qemu")
            and os.environ.get("PMD_REQUIRE_QEMU", "") not in ("", "0")
            and not os.environ.get("PMD_IN_GUEST")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"PMD_REQUIRE_QEMU=1, but this QEMU test skipped: {reason}"
