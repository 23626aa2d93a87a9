"""``pmd capture`` and pmd.capture: what a port receives, in pcap, pcapng and Parquet files.

The built-in device plays a capture file of known packets (its pcap wire); pmd captures
them, and independent readers (dpkt, tshark, pyarrow, DuckDB, pandas) read pmd's
files back, field by field against the packets sent. Then rotation (-C, -G), the
live statistics, usage errors, Ctrl-C and SIGTERM (the file complete, the device gone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dpkt
import pytest

from pmd import capture
from pmd.abi.pcap import PcapWriter, read_packets

from .test_pcap import _expected_fields, _mixed_frames, _tshark, needs_tshark

ROOT = Path(__file__).resolve().parent.parent
FRAMES = _mixed_frames() * 25          # 300 packets of several kinds and sizes


def pmd_capture(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pmd", "capture", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def summary_of(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines and lines[-1]["type"] == "summary", r.stdout
    return lines[-1]


@pytest.fixture
def pcap_in(tmp_path: Path) -> Path:
    path = tmp_path / "in.pcap"
    with PcapWriter(path) as w:
        for f in FRAMES:
            w.write(f)
    return path


def capture_frames(pcap_in: Path, out: Path, *extra: str) -> dict[str, Any]:
    s = summary_of(pmd_capture("--wire", "pcap", "--pcap-in", str(pcap_in), "-w", str(out), "-c", str(len(FRAMES)),
                               "--json", *extra))
    assert (s["captured"], s["received"], s["dropped"]) == (len(FRAMES), len(FRAMES), 0), s
    assert s["files"] == [str(out)] and s["bytes"] == out.stat().st_size
    return s


@pytest.mark.parametrize("name", ["cap.pcap", "cap.pcapng"])
def test_capture_to_pcap_and_pcapng_read_back_by_dpkt(pcap_in: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    capture_frames(pcap_in, out)
    with open(out, "rb") as fh:
        reader = dpkt.pcapng.Reader(fh) if name.endswith("ng") else dpkt.pcap.Reader(fh)
        got = [(ts, bytes(buf)) for ts, buf in reader]
    assert [b for _t, b in got] == FRAMES
    now = time.time()
    assert all(now - 120 < t <= now + 1 for t, _b in got)                 # received just now
    assert [t for t, _d, _o in read_packets(out)] == sorted(t for t, _d, _o in read_packets(out))
    if name.endswith(".pcap"):
        assert out.read_bytes()[:4] == (0xA1B23C4D).to_bytes(4, sys.byteorder)   # nanosecond magic


@needs_tshark
@pytest.mark.parametrize("name", ["cap.pcap", "cap.pcapng"])
def test_capture_read_back_by_tshark_field_by_field(pcap_in: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    capture_frames(pcap_in, out, "-s", "100")
    stamps = [t for t, _d, _o in read_packets(out)]
    got = _tshark(out, "frame.len", "frame.cap_len", "frame.time_epoch", "ip.src", "ipv6.dst", "tcp.srcport",
                  "udp.dstport")
    assert got == _expected_fields(FRAMES, stamps, 100)


def test_capture_to_parquet_read_back_by_pyarrow_duckdb_and_pandas(pcap_in: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install -e '.[test]')")
    from pmd.arrow import schema

    from .test_arrow import check_against_dpkt

    out = tmp_path / "cap.parquet"
    capture_frames(pcap_in, out)
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == schema().remove_metadata()
    check_against_dpkt(table.combine_chunks().to_batches()[0], FRAMES)
    duckdb = pytest.importorskip("duckdb", reason="duckdb is not installed (pip install -e '.[test]')")
    got = duckdb.sql(f"SELECT protocol, count(*), sum(length) FROM read_parquet('{out}') GROUP BY 1 ORDER BY 1"
                     ).fetchall()
    want: dict[int, list[int]] = {}
    for f in FRAMES:
        ip = dpkt.ethernet.Ethernet(f).data
        proto = ip.p if isinstance(ip, dpkt.ip.IP) else ip.nxt
        want.setdefault(proto, [0, 0])
        want[proto][0] += 1
        want[proto][1] += len(f)
    assert got == [(p, n, b) for p, (n, b) in sorted(want.items())]
    df = pq.read_table(out, columns=["timestamp", "src_port", "data"]).to_pandas()
    assert list(df["data"]) == FRAMES and df["timestamp"].is_monotonic_increasing


def test_size_rotation_names_the_files_with_an_index_before_the_extension(tmp_path: Path) -> None:
    s = summary_of(pmd_capture("-w", str(tmp_path / "r.pcap"), "-c", "100000", "-C", "1", "--json"))
    names = [Path(f).name for f in s["files"]]
    assert names == ["r.pcap"] + [f"r{i}.pcap" for i in range(1, len(names))] and len(names) >= 6, names
    counts = [sum(1 for _ in read_packets(f)) for f in s["files"]]
    assert sum(counts) == s["captured"] == 100000
    sizes = [Path(f).stat().st_size for f in s["files"]]
    # each but the last passed 1 MB by less than one chunk of 256 packets of 80 bytes
    assert all(1_000_000 <= z < 1_000_000 + 256 * 80 for z in sizes[:-1]), sizes
    assert sum(sizes) == s["bytes"]


def test_time_rotation_starts_a_new_file_every_G_seconds(tmp_path: Path) -> None:
    s = summary_of(pmd_capture("-w", str(tmp_path / "t.pcapng"), "-G", "0.4", "--duration", "1.3", "--rate", "20000",
                               "--json"))
    assert len(s["files"]) in (3, 4), s["files"]
    per_file = [[t for t, _d, _o in read_packets(f)] for f in s["files"]]
    assert sum(map(len, per_file)) == s["captured"] > 0
    assert all(a[-1] <= b[0] for a, b in zip(per_file, per_file[1:]) if a and b)     # in time order


def test_live_statistics_as_json_each_period(tmp_path: Path) -> None:
    r = pmd_capture("-w", str(tmp_path / "s.pcap"), "--duration", "1", "--stats-period", "0.25", "--json")
    assert r.returncode == 0, r.stderr
    *periods, summary = [json.loads(line) for line in r.stdout.splitlines()]
    assert 2 <= len(periods) <= 5 and all(p["type"] == "stats" and p["pps"] > 0 for p in periods), periods
    assert all(p["dropped"] == 0 and p["files"] == 1 for p in periods)
    assert periods[-1]["captured"] <= summary["captured"] == summary["received"]
    assert r.stderr.startswith("pmd capture: sim")


def test_text_output_shows_rate_and_summary(tmp_path: Path) -> None:
    r = pmd_capture("-w", str(tmp_path / "s.pcap"), "--duration", "0.7", "--stats-period", "0.2")
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stdout.splitlines() if " Mpps " in line and "dropped" in line]) >= 2, r.stdout
    last = r.stdout.splitlines()[-1]
    assert last.startswith("summary: captured=") and " received=" in last and " dropped=0 " in last


@pytest.mark.parametrize("args,message", [
    (("-w", "x.txt"), ".pcap (classic, nanosecond timestamps), .pcapng or .parquet"),
    ((), "-w FILE is needed"),
    (("-w", "x.pcap", "-c", "-1"), "-c -1: give a positive number"),
    (("-w", "x.pcap", "-c", "0"), "-c 0: give a positive number"),
    (("-w", "x.pcap", "-s", "-5"), "-s -5: give 1 to 262144"),
    (("-w", "x.pcap", "-C", "0"), "-C 0.0: give a positive number"),
    (("-w", "x.pcap", "-G", "-1"), "-G -1.0: give a positive number"),
    (("-w", "x.pcap", "--burst", "5000"), "--burst must be 1 to 1024"),
    (("-w", "x.pcap", "--wire", "pcap"), "--pcap-in FILE"),
    (("0000:00:03.0", "-w", "x.pcap", "--rate", "5"), "apply to the built-in device only"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pmd", "capture", *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("pmd capture: ") and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not list(tmp_path.iterdir())                                   # no file was made


def test_a_directory_that_does_not_exist_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = pmd_capture("-w", str(tmp_path / "no" / "such.pcap"), "-c", "10")
    assert r.returncode == 1 and "No such file or directory" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_capture_with_a_complete_file_and_the_device_gone(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "sig.pcapng"
    p = subprocess.Popen([sys.executable, "-m", "pmd", "capture", "-w", str(out), "--json", "--rate", "50000"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.stat().st_size > 1000) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.poll() is None
        children = _children(p.pid)
        assert children, "the built-in device runs in a child process"
        p.send_signal(signum)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, stderr
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["captured"] == sum(1 for _ in read_packets(out)) > 0       # every packet, a whole file
    assert not any(Path(f"/proc/{c}").exists() and _state(c) != "Z" for c in children), "the device outlived pmd"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_run_refuses_bad_arguments_before_any_file_is_made(tmp_path: Path) -> None:
    class NoPort:
        def rx_queue(self, queue: int = 0) -> Any:
            raise AssertionError("the port must not be touched")

    for kw, match in (({"count": 0}, "count must be a positive"), ({"snaplen": 0}, "snaplen must be 1"),
                      ({"burst": 0}, "burst must be 1 to"), ({"duration": -1.0}, "duration must be positive"),
                      ({"file_size": 0}, "file_size must be positive")):
        with pytest.raises(ValueError, match=match):
            capture.run(NoPort(), tmp_path / "x.pcap", **kw)
    with pytest.raises(ValueError, match=r"\.pcap \(classic"):
        capture.run(NoPort(), tmp_path / "x.cap")
    assert not list(tmp_path.iterdir())


def test_file_names_of_a_rotation() -> None:
    assert [capture.file_name("d/cap.pcap", i).as_posix() for i in range(3)] == ["d/cap.pcap", "d/cap1.pcap",
                                                                                  "d/cap2.pcap"]
    assert capture.file_name("x.parquet", 12).name == "x12.parquet"
