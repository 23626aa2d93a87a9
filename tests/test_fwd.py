"""pmd fwd's engine and the pcap writer, on the in-process loopback with its
device side running in a thread of its own (as a real device runs beside the driver)."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from pmd import fwd
from pmd.loopback import Loopback
from pmd.abi.pcap import PcapWriter, read_packets, read_pcap


class ThreadedLoopback:
    """A Loopback shaped like a Port, its device stepping in another thread."""

    mac = bytes.fromhex("020000000002")

    def __init__(self) -> None:
        self.lb = Loopback(queue_size=256)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._device, daemon=True)
        self.thread.start()

    def _device(self) -> None:
        while not self.stop.is_set():
            self.lb.step(64)

    def rx_queue(self, q: int = 0):
        assert q == 0
        return self.lb.driver_rx

    def tx_queue(self, q: int = 0):
        assert q == 0
        return self.lb.driver_tx

    def stats(self):
        rx, tx = self.lb.driver_rx.stats(), self.lb.driver_tx.stats()
        return {"rx_packets": rx["packets"], "tx_packets": tx["packets"], "rx_bytes": rx["bytes"],
                "tx_bytes": tx["bytes"], "rx_dropped": rx["dropped"], "tx_ring_full": tx["ring_full"],
                "device_errors": sum(q[k] for q in (rx, tx) for k in ("bad_used_id", "bad_used_len",
                                                                        "used_not_in_flight"))}

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.lb.close()


@pytest.fixture
def port():
    p = ThreadedLoopback()
    yield p
    p.close()


def test_udp_frame_is_well_formed():
    f = fwd.udp_frame(64, bytes.fromhex("020000000001"))
    assert len(f) == 64 and f[12:14] == b"\x08\x00" and f[23] == 17
    ihl = f[14:34]
    s = sum(struct.unpack("!10H", ihl))
    assert (s & 0xFFFF) + (s >> 16) == 0xFFFF            # IPv4 header checksum verifies
    with pytest.raises(ValueError):
        fwd.udp_frame(59, b"\0" * 6)


def test_txonly_then_rxonly_count_what_moved(port):
    lines: list[str] = []
    s = fwd.run(port, "txonly", duration=0.5, report=lines.append, interval=0.2)
    assert s.tx_packets > 0 and "mpps=" in lines[-1]
    r = fwd.run(port, "rxonly", duration=0.5, report=lines.append, interval=0.2)
    assert r.rx_packets > 0 and r.errors == 0


def test_io_circulates_a_burst(port):
    frame = np.frombuffer(fwd.udp_frame(128, port.mac), np.uint8)
    port.tx_queue().tx_burst(np.tile(frame, (32, 1)), np.full(32, 128, np.uint32))
    s = fwd.run(port, "io", duration=0.5, report=lambda _: None)
    assert s.rx_packets > 100 and s.tx_packets > 100 and s.errors == 0


def test_macswap_swaps(port, tmp_path):
    frame = bytearray(fwd.udp_frame(64, bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")))
    port.tx_queue().tx_burst(np.frombuffer(bytes(frame), np.uint8).reshape(1, 64), np.array([64], np.uint32))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    fwd.run(port, "macswap", stop=stop, report=lambda _: None, pcap=str(tmp_path / "m.pcap"))
    recs = list(read_pcap(tmp_path / "m.pcap"))
    assert len(recs) >= 2
    # Each pass swaps: captures alternate between the two orders.
    assert recs[0][1][:12] == bytes.fromhex("02000000000b02000000000a")
    assert recs[1][1][:12] == bytes.fromhex("02000000000a02000000000b")


@pytest.mark.parametrize("name", ["rx.pcap", "rx.pcapng"])
def test_rxonly_writes_what_it_receives_to_pcap(port, tmp_path, name):
    # .pcapng: pcapng with nanosecond timestamps (read_packets reads both formats)
    rng = np.random.default_rng(9)
    lengths = rng.integers(60, 1515, 50).astype(np.uint32)
    data = rng.integers(0, 256, (50, 1514), dtype=np.uint8)
    assert port.tx_queue().tx_burst(data, lengths) == 50
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.time_ns()
    fwd.run(port, "rxonly", stop=stop, pcap=str(tmp_path / name), report=lambda _: None)
    assert (tmp_path / name).read_bytes()[:4] == (b"\x0a\x0d\x0d\x0a" if name.endswith("ng") else
                                                  struct.pack("=I", 0xA1B2C3D4))
    recs = list(read_packets(tmp_path / name))
    assert all(t0 - 1000 <= r[0] <= time.time_ns() for r in recs)
    assert [len(r[1]) for r in recs] == lengths.tolist()
    assert all(r[1] == data[i, :lengths[i]].tobytes() and r[2] == lengths[i] for i, r in enumerate(recs))


def test_txonly_writes_what_it_sends_to_pcap(port, tmp_path):
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    s = fwd.run(port, "txonly", size=100, stop=stop, pcap=str(tmp_path / "tx.pcap"), report=lambda _: None)
    recs = list(read_pcap(tmp_path / "tx.pcap"))
    assert s.tx_packets > 0 and len(recs) == s.tx_packets
    assert all(r[1] == fwd.udp_frame(100, port.mac) for r in recs)


def test_tx_first_sends_one_burst_before_forwarding(port):
    # Nothing is in flight: io alone moves nothing; with tx_first one burst circulates.
    assert fwd.run(port, "io", duration=0.2, report=lambda _: None).rx_packets == 0
    s = fwd.run(port, "io", duration=0.3, burst=16, tx_first=True, report=lambda _: None)
    assert s.rx_packets > 100 and s.errors == 0


def test_each_period_goes_to_on_period_as_data(port):
    periods: list[dict] = []
    lines: list[str] = []
    s = fwd.run(port, "txonly", duration=0.5, interval=0.2, report=lines.append, on_period=periods.append)
    assert 1 <= len(periods) <= 3 and len(lines) == len(periods) + 1  # 0.2, 0.4, 0.5 s; the summary
    assert [p["seconds"] for p in periods] == sorted(p["seconds"] for p in periods)
    assert set(periods[0]) == {"seconds", "rx_pps", "tx_pps", "rx_bps", "tx_bps", "rx_packets",
                               "tx_packets", "drops", "errors"}
    assert periods[0]["tx_pps"] > 0 and 0 < periods[-1]["tx_packets"] <= s.tx_packets
    assert s.as_dict()["tx_packets"] == s.tx_packets and s.as_dict()["mpps"] == round(s.mpps, 6)


def test_without_an_interval_only_the_summary_is_reported(port):
    lines: list[str] = []
    periods: list[dict] = []
    s = fwd.run(port, "txonly", duration=0.3, interval=None, report=lines.append, on_period=periods.append)
    assert lines == [s.line()] and periods == [] and s.tx_packets > 0


def test_bad_mode_is_refused(port):
    with pytest.raises(ValueError, match="rxonly, txonly, io, macswap"):
        fwd.run(port, "bounce")


def test_pcap_reader_rejects_other_files(tmp_path):
    (tmp_path / "x").write_bytes(b"not a capture at all....")
    with pytest.raises(ValueError, match="not a pcap"):
        list(read_pcap(tmp_path / "x"))
    w = PcapWriter(tmp_path / "t.pcap")
    w.write(b"\x01" * 60)
    w.close()
    raw = (tmp_path / "t.pcap").read_bytes()
    (tmp_path / "cut.pcap").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        list(read_pcap(tmp_path / "cut.pcap"))


def test_pcap_is_readable_by_the_standard_format(tmp_path):
    # Independent check of the bytes: global header fields and one record.
    w = PcapWriter(tmp_path / "s.pcap", snaplen=100)
    w.write(bytes(range(150)), ts=1000.5)
    w.close()
    raw = (tmp_path / "s.pcap").read_bytes()
    magic, vmaj, vmin, _, _, snap, link = struct.unpack("=IHHiIII", raw[:24])
    assert (magic, vmaj, vmin, snap, link) == (0xA1B2C3D4, 2, 4, 100, 1)
    sec, usec, cap, orig = struct.unpack("=IIII", raw[24:40])
    assert (sec, usec, cap, orig) == (1000, 500000, 100, 150) and raw[40:] == bytes(range(100))


def test_pcap_is_read_by_tcpdump(tmp_path):
    import shutil
    import subprocess

    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed (scripts/test.sh installs it)")
    w = PcapWriter(tmp_path / "d.pcap")
    w.write(fwd.udp_frame(64, bytes.fromhex("020000000001")), ts=1700000000.0)
    w.write(fwd.udp_frame(1514, bytes.fromhex("020000000001")), ts=1700000000.25)
    w.close()
    out = subprocess.run(["tcpdump", "-nn", "-r", str(tmp_path / "d.pcap")], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and "198.18.0.1.9 > 198.18.0.2.9: UDP" in lines[0]


def test_pmd_fwd_on_sigterm_prints_the_summary_stops_the_device_and_exits_0():
    # SIGTERM (what kill, systemd and container runtimes send) ends pmd fwd as
    # Ctrl-C does: the summary, the built-in device stopped, status 0.
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pmd.sim.process import _child_env

    proc = subprocess.Popen([sys.executable, "-m", "pmd", "fwd", "--mode", "io"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_child_env())
    children: list[int] = []
    try:
        first = proc.stdout.readline()
        assert first.startswith("pmd fwd: sim"), first
        children += [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                     and _ppid(p) == proc.pid]
        assert children, "no device process"
        # a statistics line: forwarding (fwd.run has SIGTERM; the banner's lines come before it)
        while "Mpps" not in (line := proc.stdout.readline()):
            assert line, "pmd fwd ended before its first statistics line"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert any(line.startswith("summary: mode=io") for line in out.splitlines()), out
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(_ppid(Path(f"/proc/{c}")) is None for c in children):
        time.sleep(0.05)
    left = [c for c in children if _ppid(Path(f"/proc/{c}")) is not None]
    for c in left:
        os.kill(c, signal.SIGKILL)                        # the test's own orphan, by its PID
    assert not left, "the device outlived pmd fwd"


def _ppid(proc_dir) -> int | None:
    try:
        stat = (proc_dir / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[1])


def test_with_several_queues_each_period_has_a_line_per_queue():
    import re

    import pmd

    with pmd.open_port("sim", wire="generator", rate=0, queue_pairs=2) as p:
        p.start(queue_pairs=2)
        lines: list[str] = []
        s = fwd.run(p, "rxonly", queues=2, duration=0.7, interval=0.3, report=lines.append)
    assert s.rx_packets > 0
    per_queue = [line for line in lines if re.match(r"^\s+q[01]  rx +[0-9.]+ Mpps", line)]
    assert len(per_queue) >= 2 and {line.split()[0] for line in per_queue} == {"q0", "q1"}, lines
    # the port line comes first in each period, then q0, q1
    i = next(k for k, line in enumerate(lines) if "s  rx" in line)
    assert lines[i + 1].split()[0] == "q0" and lines[i + 2].split()[0] == "q1", lines


# ---- placement (testpmd's --lcores): forwarding threads and the built-in device on CPUs

CPUS = sorted(__import__("os").sched_getaffinity(0))


def _thread_cpus(pid: int) -> dict[str, set[int]]:
    """name -> CPUs of every thread of process ``pid``."""
    import os
    from pathlib import Path

    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[f"{(task / 'comm').read_text().strip()}/{task.name}"] = os.sched_getaffinity(int(task.name))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def test_forwarding_threads_run_on_the_cpus_given(port):
    import os

    cpu = CPUS[-1]
    seen: dict[str, set[int]] = {}
    stop = threading.Event()

    def look() -> None:
        for t in threading.enumerate():
            if t.name.startswith("pmd-fwd-") and t.native_id:
                seen[t.name] = os.sched_getaffinity(t.native_id)
        stop.set()

    threading.Timer(0.3, look).start()
    fwd.run(port, "rxonly", stop=stop, report=lambda _: None, cpus=[cpu])
    assert seen == {"pmd-fwd-0": {cpu}}
    assert os.sched_getaffinity(0) == set(CPUS)          # the caller's thread is not moved


def test_cpus_this_process_may_not_use_are_refused(port):
    with pytest.raises(ValueError, match="forwarding threads run on CPUs this process may use"):
        fwd.run(port, "rxonly", duration=0.1, report=lambda _: None, cpus=[max(CPUS) + 1000])
    with pytest.raises(ValueError, match="none given"):
        fwd.run(port, "rxonly", duration=0.1, report=lambda _: None, cpus=[])


def test_the_built_in_device_runs_on_the_cpu_given():
    import pmd

    cpu = CPUS[-1]
    with pmd.open_port("sim", cpu=cpu) as p:
        p.start()
        threads = _thread_cpus(p.sim.pid)
        assert len(threads) >= 2 and all(c == {cpu} for c in threads.values()), threads
    with pytest.raises(ValueError, match="give a CPU number"):
        pmd.open_port("sim", cpu=-1)


def test_default_placement_puts_the_device_apart_from_the_forwarding_threads():
    device, cpus = fwd.default_placement(True)
    if len(CPUS) < 2:
        assert (device, cpus) == (None, None)
    else:
        assert device == CPUS[-1] and cpus == CPUS[:-1] and device not in cpus
    assert fwd.default_placement(False) == (None, None)      # another device: its own placement


@pytest.mark.parametrize("extra, want", [
    ([], "device on CPU {last}; forwarding q0 on CPU {first}"),
    (["--no-pin"], "device not pinned; forwarding threads not pinned (--cpus, --device-cpu to pin)"),
    (["--cpus", "{last}", "--device-cpu", "{first}"], "device on CPU {first}; forwarding q0 on CPU {last}"),
])
def test_pmd_fwd_prints_where_it_runs_things(extra, want):
    import subprocess
    import sys

    from pmd.sim.process import _child_env

    if len(CPUS) < 2 and not extra:
        want = "device not pinned; forwarding threads not pinned (--cpus, --device-cpu to pin)"
    fmt = {"first": CPUS[0], "last": CPUS[-1]}
    argv = [a.format(**fmt) for a in extra]
    r = subprocess.run([sys.executable, "-m", "pmd", "fwd", "--mode", "rxonly", "--duration", "0.5", *argv],
                       capture_output=True, text=True, timeout=120, env=_child_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"  placement: {want.format(**fmt)}\n" in r.stdout, r.stdout


def test_pmd_fwd_refuses_a_cpu_list_it_cannot_read():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pmd", "fwd", "--cpus", "zero"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "--cpus 'zero': give CPU numbers" in r.stderr, r.stderr
