"""pmd.arrow: bursts as pyarrow record batches, a port as a RecordBatchReader (docs/analytics.md).

Every column of a batch is checked against the packets that were sent, parsed by dpkt
(an independent parser); the stream is read from a live port (the built-in device
playing a capture file) by pyarrow, DuckDB and pandas; and ``import pmd`` stays free
of pyarrow.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import dpkt
import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install -e '.[test]' brings it)")

from pmd.abi.pcap import PcapWriter  # noqa: E402
from pmd.arrow import burst_to_record_batch, record_batch_reader, record_batches, schema  # noqa: E402
from pmd.parse import COLUMNS, SNAPPED, HeaderParser  # noqa: E402

from .test_pcap import _mixed_frames, _rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _mac(b: bytes) -> int:
    return int.from_bytes(b, "big")


def check_against_dpkt(batch: Any, frames: list[bytes], *, snaplen: int = 65535) -> None:
    """Every row of ``batch`` holds what dpkt reads in the frame sent."""
    cols = batch.to_pydict()
    assert cols["length"] == [len(f) for f in frames]
    assert cols["data"] == [f[:snaplen] for f in frames]
    for i, f in enumerate(frames):
        e = dpkt.ethernet.Ethernet(f)
        ip, l4 = e.data, e.data.data
        assert (cols["dst_mac"][i], cols["src_mac"][i], cols["ethertype"][i]) == (_mac(e.dst), _mac(e.src), e.type)
        if isinstance(ip, dpkt.ip.IP):
            assert (cols["ip_version"][i], cols["ip_src"][i], cols["ip_dst"][i], cols["ttl"][i]) == (
                4, _mac(ip.src), _mac(ip.dst), ip.ttl)
            assert cols["ip6_src"][i] == bytes(16) and cols["protocol"][i] == ip.p
        else:
            assert (cols["ip_version"][i], cols["ip6_src"][i], cols["ip6_dst"][i], cols["ttl"][i]) == (
                6, ip.src, ip.dst, ip.hlim)
            assert cols["ip_src"][i] == 0 and cols["protocol"][i] == ip.nxt
        assert (cols["src_port"][i], cols["dst_port"][i]) == (l4.sport, l4.dport)
        assert cols["tcp_flags"][i] == (l4.flags if isinstance(l4, dpkt.tcp.TCP) else 0)
        assert cols["payload_length"][i] == len(l4.data) and cols["flags"][i] == 0
        assert bytes(f[cols["payload_offset"][i]:]) == bytes(l4.data)


def test_schema_is_timestamp_length_the_parser_columns_and_data() -> None:
    s = schema()
    assert s.names == ["timestamp", "length", *(name for name, _d, _w in COLUMNS), "data"]
    assert s.field("timestamp").type == pa.timestamp("ns", tz="UTC")
    assert s.field("ip6_src").type == pa.binary(16) and s.field("dst_mac").type == pa.uint64()
    assert s.field("data").type == pa.binary() and not any(f.nullable for f in s)


def test_a_burst_as_a_record_batch_field_by_field_against_dpkt() -> None:
    frames = _mixed_frames()
    rows, lengths = _rows(frames, 1514)
    ts = np.arange(len(frames), dtype=np.uint64) + 1_700_000_000_000_000_000
    batch = burst_to_record_batch(rows, lengths, timestamps=ts)
    assert batch.num_rows == len(frames) and batch.schema == schema()
    check_against_dpkt(batch, frames)
    assert batch.column("timestamp").cast(pa.int64()).to_pylist() == ts.tolist()


def test_the_batch_owns_its_memory_the_next_burst_does_not_change_it() -> None:
    frames = _mixed_frames()
    rows, lengths = _rows(frames, 1514)
    ts = np.full(len(frames), 5, np.uint64)
    batch = burst_to_record_batch(rows, lengths, timestamps=ts)
    rows[:] = 0xEE                             # the caller's arrays take the next burst
    lengths[:] = 61
    ts[:] = 6
    check_against_dpkt(batch, frames)
    assert set(batch.column("timestamp").cast(pa.int64()).to_pylist()) == {5}


def test_numeric_columns_are_the_parser_arrays_not_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[HeaderParser] = []
    import pmd.arrow as arrow

    class Keep(HeaderParser):
        def __init__(self, capacity: int = 256) -> None:
            super().__init__(capacity)
            made.append(self)

    monkeypatch.setattr(arrow, "HeaderParser", Keep)
    rows, lengths = _rows(_mixed_frames(), 1514)
    batch = burst_to_record_batch(rows, lengths)
    (parser,) = made
    for name in ("dst_port", "ip_src", "dst_mac", "ip6_dst", "flags"):
        assert batch.column(name).buffers()[1].address == parser.columns[name].ctypes.data, name


def test_the_zero_copy_shape_by_ids_and_a_snaplen() -> None:
    frames = _mixed_frames()
    data, lengths = _rows(frames, 2048)
    ids = np.array([11, 0, 4, 4], np.uint32)
    batch = burst_to_record_batch(data, lengths[ids], ids=ids, timestamps=9, snaplen=40)
    check_against_dpkt(batch, [frames[i] for i in ids], snaplen=40)


def test_to_pandas_keeps_the_types() -> None:
    frames = _mixed_frames()
    rows, lengths = _rows(frames, 1514)
    df = burst_to_record_batch(rows, lengths, timestamps=1_700_000_000_000_000_000).to_pandas()
    assert str(df["timestamp"].dtype) == "datetime64[ns, UTC]" and str(df["dst_port"].dtype) == "uint16"
    assert df["timestamp"].iloc[0].year == 2023
    assert list(df["length"]) == [len(f) for f in frames] and list(df["data"]) == frames


def test_bad_arguments_say_what_to_pass() -> None:
    rows, lengths = _rows(_mixed_frames(), 1514)
    with pytest.raises(TypeError, match="uint32"):
        burst_to_record_batch(rows, lengths.astype(np.int32))
    with pytest.raises(ValueError, match="n must be 0 to 12"):
        burst_to_record_batch(rows, lengths, 20)
    with pytest.raises(ValueError, match="one per packet"):
        burst_to_record_batch(rows, lengths, timestamps=np.zeros(2, np.uint64))
    with pytest.raises(TypeError, match="uint64 array"):
        burst_to_record_batch(rows, lengths, timestamps=np.zeros(12, np.int64))

    class Q:
        max_packet_len = 1514

    for kw, match in (({"batch": 0}, "batch must be positive"), ({"timeout": -1}, "timeout must be positive"),
                      ({"max_packets": 1.5}, "max_packets must be an int"), ({"snaplen": 0}, "snaplen")):
        with pytest.raises((ValueError, TypeError), match=match):
            record_batches(Q(), **kw)              # at once, not at the first batch


def test_an_empty_burst_is_an_empty_batch() -> None:
    rows, lengths = _rows(_mixed_frames(), 1514)
    assert burst_to_record_batch(rows, lengths, 0).num_rows == 0


@pytest.fixture
def pcap_port(tmp_path: Path) -> Any:
    """The built-in device playing the mixed frames, 40 times over, once: what a reader must see."""
    import pmd

    frames = _mixed_frames() * 40
    with PcapWriter(tmp_path / "in.pcap") as w:
        for f in frames:
            w.write(f)
    with pmd.open_port("sim", wire="pcap", pcap_in=str(tmp_path / "in.pcap"), pcap_out=None, rate=0.0) as port:
        port.start()
        yield port, frames


def test_a_reader_over_a_live_port_sees_every_packet_sent_in_order(pcap_port: Any) -> None:
    port, frames = pcap_port
    reader = record_batch_reader(port, batch=100, max_packets=len(frames), timeout=20)
    assert reader.schema == schema()
    table = reader.read_all()
    assert table.num_rows == len(frames)
    assert all(b.num_rows <= 100 for b in table.to_batches())
    check_against_dpkt(pa.RecordBatch.from_pylist(table.to_pylist(), schema=schema()), frames)
    s = port.stats()
    assert s["rx_packets"] == len(frames) and s["rx_dropped"] == 0


def test_duckdb_queries_the_stream_of_a_live_port(pcap_port: Any) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb is not installed (pip install -e '.[test]' brings it)")
    port, frames = pcap_port
    reader = record_batch_reader(port, max_packets=len(frames), timeout=20)
    got = duckdb.sql("SELECT dst_port, count(*) AS n, sum(length) AS bytes FROM reader "
                     "GROUP BY dst_port ORDER BY dst_port").fetchall()
    want: dict[int, list[int]] = {}
    for f in frames:
        port_no = dpkt.ethernet.Ethernet(f).data.data.dport
        want.setdefault(port_no, [0, 0])
        want[port_no][0] += 1
        want[port_no][1] += len(f)
    assert got == [(p, n, b) for p, (n, b) in sorted(want.items())]


def test_a_reader_ends_at_its_timeout_with_what_arrived(pcap_port: Any) -> None:
    port, frames = pcap_port
    table = record_batch_reader(port, timeout=1.0, linger=0.05).read_all()   # more asked than will come
    assert table.num_rows == len(frames)
    assert [socket.inet_ntop(socket.AF_INET6, b) for b in table.column("ip6_dst").to_pylist()[2:3]] == ["fe80::1"]


def test_a_reader_over_the_generator_stops_at_max_packets() -> None:
    import pmd

    with pmd.open_port("sim", wire="generator", rate=0.0, size=128, flows=4) as port:
        port.start()
        table = record_batch_reader(port, batch=1000, max_packets=5000, snaplen=64).read_all()
    assert table.num_rows == 5000
    assert set(table.column("length").to_pylist()) == {128}
    assert {len(d) for d in table.column("data").to_pylist()} == {64}        # the snaplen
    assert set(table.column("flags").to_pylist()) == {SNAPPED}               # cut by the snaplen
    assert 0 not in table.column("dst_port").to_pylist()                     # the headers fit in 64 bytes


def test_import_pmd_needs_no_pyarrow() -> None:
    code = ("import sys; import pmd, pmd.fwd, pmd.cli, pmd.parse, pmd.abi.pcap; "
            "assert 'pyarrow' not in sys.modules, 'pyarrow imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
