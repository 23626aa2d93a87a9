"""Teardown under load and use after close: nothing may kill the process.

A burst runs without the GIL on raw pointers into DMA memory, so closing a
queue, a port or its memory while another thread is inside a burst must wait
for that burst (the queue's fence), and the memory stays mapped while any
object holding such pointers is alive (its pins). Each scenario runs in a child
interpreter, so a segfault shows as a failed test with its signal.
"""

import numpy as np
import pytest

import pmd
from pmd.errors import QueueStateError

from .isolated import check_isolated

# A thread that bursts on one queue until told to stop; a QueueStateError
# "closed" is the clean end of it, anything else is recorded as a failure.
BURSTER = """
import threading, time, sys
import numpy as np
import pmd
from pmd.errors import QueueStateError

def burster(q, stop, ends):
    out = np.zeros((32, 2048), np.uint8); lens = np.zeros(32, np.uint32)
    pk = np.zeros((32, 1500), np.uint8); pl = np.full(32, 60, np.uint32)
    ids = np.zeros(32, np.uint32)
    k = 0
    try:
        while not stop.is_set():
            k += 1
            if isinstance(q, pmd.TxQueue):
                q.tx_burst(pk, pl) if k % 2 else q.reclaim()
            elif k % 3 == 0:
                q.rx_burst(out, lens)
            elif k % 3 == 1:
                q.rx_discard(32)
            else:
                q.fill()
        ends.append("stopped")
    except QueueStateError as e:
        ends.append("closed" if "closed" in str(e) else repr(e))
    except BaseException as e:
        ends.append(repr(e))

def run_threads(queues):
    stop = threading.Event(); ends = []
    threads = [threading.Thread(target=burster, args=(q, stop, ends)) for q in queues]
    for t in threads:
        t.start()
    return stop, ends, threads

def finish(stop, ends, threads):
    stop.set()
    for t in threads:
        t.join()
    bad = [e for e in ends if e not in ("closed", "stopped")]
    assert not bad, bad
    return ends.count("closed")
"""


def test_closing_a_loopback_while_threads_burst_waits_for_them():
    out = check_isolated(BURSTER + """
closed = 0
for it in range(int(sys.argv[1])):
    lb = pmd.Loopback(64)
    stop, ends, threads = run_threads([lb.driver_rx, lb.driver_tx])
    time.sleep(0.001 * (it % 4))
    lb.close()
    closed += finish(stop, ends, threads)
    assert lb.pool.available == lb.pool.n_buffers                          # every buffer came back
    assert lb.memory.closed and lb.memory.pins == 0 and lb.memory.fd == -1   # and it is unmapped
print("closed-under-burst", closed)
""", "150")
    assert int(out.split()[-1]) > 0       # some threads really were inside a burst


def test_stopping_and_closing_a_sim_port_while_threads_burst_waits_for_them():
    out = check_isolated(BURSTER + """
closed = 0
port = pmd.open_port("sim")
for it in range(int(sys.argv[1])):
    port.start(queue_size=64)
    stop, ends, threads = run_threads([port.rx_queue(0), port.tx_queue(0)])
    time.sleep(0.002 * (it % 4))
    port.stop()
    closed += finish(stop, ends, threads)
port.start(queue_size=64)
stop, ends, threads = run_threads([port.rx_queue(0), port.tx_queue(0)])
time.sleep(0.005)
port.close()
closed += finish(stop, ends, threads)
print("closed-under-burst", closed)
""", "20")
    assert int(out.split()[-1]) > 0


@pytest.mark.parametrize("device", ["sim", "loopback"])
def test_daemon_threads_bursting_at_interpreter_exit_end_cleanly(device):
    # The exit handler closes the port (and here the loopback) while daemon
    # threads are inside bursts; they then get QueueStateError or are frozen.
    for _ in range(3):
        check_isolated(BURSTER + """
import atexit
if sys.argv[1] == "sim":
    port = pmd.open_port("sim"); port.start(queue_size=64)
    queues = [port.rx_queue(0), port.tx_queue(0)]
else:
    lb = pmd.Loopback(64); atexit.register(lb.close)
    queues = [lb.driver_rx, lb.driver_tx]
stop = threading.Event(); ends = []
for q in queues:
    threading.Thread(target=burster, args=(q, stop, ends), daemon=True).start()
time.sleep(0.02)
""", device)


def test_a_burst_after_fence_raises_closed_and_close_still_returns_every_buffer():
    with pmd.Loopback(16) as lb:
        lb.driver_tx.tx_burst(np.zeros((4, 60), np.uint8), np.full(4, 60, np.uint32))
        lb.driver_rx.fence()
        lb.driver_tx.fence()
        with pytest.raises(QueueStateError, match="closed"):
            lb.driver_rx.rx_burst(np.zeros((4, 2048), np.uint8), np.zeros(4, np.uint32))
        with pytest.raises(QueueStateError, match="closed"):
            lb.driver_tx.reclaim()
        assert lb.driver_tx.in_flight == 4       # fenced, not released: the device may still own them
        lb.driver_rx.close()
        lb.driver_tx.close()
        assert lb.pool.available == lb.pool.n_buffers


# ---- use after close: objects with raw pointers keep the mapping or refuse ----

def test_loopback_step_after_close_raises():
    check_isolated("""
import pytest, pmd
from pmd.errors import QueueStateError
lb = pmd.Loopback(16)
lb.close()
with pytest.raises(QueueStateError, match="closed"):
    lb.step()
with pytest.raises(QueueStateError, match="closed"):
    lb.device_tx.pop_chain()
""")


def test_device_queue_after_its_memory_is_closed_raises():
    check_isolated("""
import numpy as np, pytest, pmd
from pmd.sim._dma import DmaWindows
from pmd.sim._rx import device_rx_burst
from pmd.sim._tx import device_tx_burst, tx_to_rx
from pmd.sim._virtqueue import DeviceQueue
from pmd.errors import QueueStateError
m = pmd.DmaMemory(1 << 20, lock=False)
vq = pmd.Virtqueue(m, 8)
w = DmaWindows(); w.add_memory(m)
dq = DeviceQueue(w, 8, vq.desc_iova, vq.avail_iova, vq.used_iova)
m.close()
assert m.closed and m.pins > 0        # still mapped: the queue and windows use it
calls = [dq.pop_chain, dq.publish_used, dq.disable_notify, dq.enable_notify,
         lambda: dq.complete(0), lambda: dq.push_raw(0, 0), lambda: dq.set_used_idx(1),
         lambda: dq.avail_pending, lambda: tx_to_rx(dq, dq),
         lambda: device_tx_burst(dq, np.zeros((1, 64), np.uint8), np.zeros(1, np.uint32)),
         lambda: device_rx_burst(dq, np.zeros((1, 64), np.uint8), np.zeros(1, np.uint32))]
for call in calls:
    with pytest.raises(QueueStateError, match="closed"):
        call()
for p in (lambda: vq.desc_iova, lambda: vq.avail_iova, lambda: vq.used_iova, vq.enable_interrupts):
    with pytest.raises(QueueStateError, match="closed"):
        p()
dq.close(); vq.close(); w.clear()
assert m.pins == 0 and m.fd == -1     # the last pin went: unmapped
""")


def test_memory_closed_under_live_queues_stays_mapped_until_they_close():
    m = pmd.DmaMemory(1 << 20, lock=False)
    pool = pmd.PacketPool(m, 64)
    rxq = pmd.RxQueue(pmd.Virtqueue(m, 16), pool)
    rxq.fill()
    m.close()
    assert m.closed and m.fd >= 0 and m.pins == 2      # the queue: its ring's memory and its pool's
    with pytest.raises(QueueStateError, match="closed"):
        rxq.rx_burst(np.zeros((4, 2048), np.uint8), np.zeros(4, np.uint32))
    with pytest.raises(QueueStateError, match="closed"):
        rxq.vq.enable_interrupts()
    rxq.vq.disable_interrupts()                         # nothing to disable: no error
    rxq.close()
    assert m.pins == 0 and m.fd == -1                   # unmapped, though pool and queue live on
    with pytest.raises(QueueStateError, match="closed"):
        pool.alloc()


def test_dropped_objects_give_their_pins_back():
    m = pmd.DmaMemory(1 << 20, lock=False)
    pool = pmd.PacketPool(m, 64)
    txq = pmd.TxQueue(pmd.Virtqueue(m, 16), pool)
    assert m.pins == 2
    del txq
    assert m.pins == 0
    m.close()
    assert m.fd == -1
