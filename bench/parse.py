"""Header parsing rate (pmd.parse) next to the receive rate it has to keep up with.

Three measurements per packet mix, interleaved (A B C, A B C, ...) on one core and
one thread, because this machine is a shared, noisy VM; the table gives medians
over the rounds:

  rx        the in-process loopback in copy mode, nothing done with the packets:
            ``tx_burst`` + device step + ``rx_burst`` into numpy rows, burst 32
            (what an analytics loop receives with);
  rx+parse  the same round, then ``HeaderParser.parse_into`` on the burst received;
  parse     ``parse_into`` alone, on one received burst, again and again.

Two mixes: 64 B (Ethernet + IPv4 + UDP, the smallest frames) and mixed sizes
(7:4:1 of 64, 576 and 1500 B, "simple IMIX", half TCP with options, a quarter UDP,
a quarter IPv6/TCP, some with a VLAN tag). Each sample checks that every packet
arrived and that the parse found the header it was built with.

    python bench/parse.py            # about 15 s
    python bench/parse.py --quick    # about a second

The last line is ``parse_mpps_64=<x> rx_mpps_64=<y> parse_vs_rx_64=<x/y>
rx_parse_vs_rx_64=<rx+parse / rx> parse_mpps_mixed=... parse_vs_rx_mixed=...``.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # measure the checkout this script is in

import numpy as np  # noqa: E402

from pmd.loopback import Loopback  # noqa: E402
from pmd.parse import HeaderParser  # noqa: E402

BURST = 32
QUEUE_SIZE = 256
MAC = bytes.fromhex("02000000000102000000000208")


def frame(size: int, kind: str, vlan: bool) -> bytes:
    """A frame of ``size`` bytes, or just the headers if they are longer (then zeros)."""
    l2 = MAC[:12] + (struct.pack("!HH", 0x8100, 42) if vlan else b"")
    if kind == "udp4":
        l3l4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 1, 0, 64, 17, 0, b"\x0a\0\0\1", b"\x0a\0\0\2")
        l4 = struct.pack("!HHHH", 1000, 2000, 0, 0)
        eth = 0x0800
    elif kind == "tcp4":
        l3l4 = struct.pack("!BBHHHBBH4s4s", 0x46, 0, 0, 1, 0, 64, 6, 0, b"\x0a\0\0\1", b"\x0a\0\0\2") + bytes(4)
        l4 = struct.pack("!HHIIBBHHH", 40000, 443, 1, 2, 8 << 4, 0x18, 1000, 0, 0) + bytes(12)
        eth = 0x0800
    else:  # tcp6
        l3l4 = struct.pack("!IHBB16s16s", 6 << 28, 0, 6, 64, bytes(16), bytes(15) + b"\1")
        l4 = struct.pack("!HHIIBBHHH", 40000, 443, 1, 2, 5 << 4, 0x10, 1000, 0, 0)
        eth = 0x86DD
    hdr = l2 + struct.pack("!H", eth)
    ip = bytearray(l3l4 + l4)
    size = max(size, len(hdr) + len(ip))     # IPv6/TCP does not fit 64 B (74, 78 with a tag)
    ip_len = size - len(hdr)
    if eth == 0x0800:
        struct.pack_into("!H", ip, 2, ip_len)
        if kind == "udp4":
            struct.pack_into("!H", ip, 24, ip_len - 20)
    else:
        struct.pack_into("!H", ip, 4, ip_len - 40)
    out = hdr + bytes(ip)
    return out + bytes(size - len(out))


def burst_of(mix: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if mix == "64":
        frames = [frame(64, "udp4", False) for _ in range(BURST)]
    else:
        sizes = rng.choice([64, 576, 1500], BURST, p=[7 / 12, 4 / 12, 1 / 12])
        kinds = rng.choice(["tcp4", "tcp4", "udp4", "tcp6"], BURST)
        frames = [frame(int(s), str(k), bool(rng.integers(0, 4) == 0)) for s, k in zip(sizes, kinds)]
    lens = np.array([len(f) for f in frames], np.uint32)
    pkts = np.zeros((BURST, 1514), np.uint8)
    for i, f in enumerate(frames):
        pkts[i, :len(f)] = np.frombuffer(f, np.uint8)
    return pkts, lens


class Case:
    def __init__(self, mix: str) -> None:
        self.mix = mix
        self.lb = Loopback(queue_size=QUEUE_SIZE)
        self.pkts, self.plens = burst_of(mix, np.random.default_rng(7))
        self.out = np.zeros((BURST, self.lb.driver_rx.max_packet_len), np.uint8)
        self.olens = np.zeros(BURST, np.uint32)
        self.parser = HeaderParser(BURST)
        self.rx_round(1)           # one burst in out, for the parse-only case

    def rx_round(self, rounds: int) -> int:
        tx, rx, step = self.lb.driver_tx.tx_burst, self.lb.driver_rx.rx_burst, self.lb.step
        pkts, plens, out, olens = self.pkts, self.plens, self.out, self.olens
        moved = 0
        for _ in range(rounds):
            tx(pkts, plens)
            step(BURST)
            moved += rx(out, olens)
        return moved

    def rx_parse_round(self, rounds: int) -> int:
        tx, rx, step = self.lb.driver_tx.tx_burst, self.lb.driver_rx.rx_burst, self.lb.step
        parse_into = self.parser.parse_into
        pkts, plens, out, olens = self.pkts, self.plens, self.out, self.olens
        moved = 0
        for _ in range(rounds):
            tx(pkts, plens)
            step(BURST)
            n = rx(out, olens)
            moved += parse_into(out, olens, n)
        return moved

    def parse_round(self, rounds: int) -> int:
        parse_into, out, olens = self.parser.parse_into, self.out, self.olens
        moved = 0
        for _ in range(rounds):
            moved += parse_into(out, olens, BURST)
        return moved

    def check(self) -> None:
        c = self.parser.columns
        assert np.array_equal(self.olens, self.plens), "packets differ in length"
        assert (c["flags"][:BURST] == 0).all(), "a packet of the mix parsed as truncated or malformed"
        assert np.isin(c["ethertype"][:BURST], [0x0800, 0x86DD]).all()
        assert (c["dst_port"][:BURST] > 0).all()
        s = self.lb.stats()
        assert s["driver_rx"]["dropped"] == 0 and s["driver_rx"]["packets"] == s["driver_tx"]["packets"]

    def close(self) -> None:
        self.lb.close()


def mpps(fn, rounds: int) -> float:
    t = time.perf_counter()
    moved = fn(rounds)
    dt = time.perf_counter() - t
    if moved != rounds * BURST:
        raise AssertionError(f"{moved} of {rounds * BURST} packets")
    return moved / dt / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter samples")
    args = ap.parse_args(argv)
    samples, rounds = (5, 500) if args.quick else (41, 5000)
    summary: dict[str, float] = {}
    print(f"burst {BURST}, one core; medians of {samples} interleaved samples of {rounds} rounds")
    print(f"{'mix':>6} {'rx Mpps':>9} {'rx+parse':>9} {'parse':>9} {'parse/rx':>9} {'(rx+parse)/rx':>14}")
    for mix in ("64", "mixed"):
        case = Case(mix)
        case.rx_round(200)
        case.parse_round(200)
        rx_s, both_s, parse_s = [], [], []
        for _ in range(samples):
            rx_s.append(mpps(case.rx_round, rounds))
            both_s.append(mpps(case.rx_parse_round, rounds))
            parse_s.append(mpps(case.parse_round, rounds))
            case.check()
        case.close()
        rx, both, parse = (statistics.median(s) for s in (rx_s, both_s, parse_s))
        print(f"{mix:>6} {rx:9.2f} {both:9.2f} {parse:9.2f} {parse / rx:9.2f} {both / rx:14.2f}")
        summary[f"parse_mpps_{mix}"] = parse
        summary[f"rx_mpps_{mix}"] = rx
        summary[f"parse_vs_rx_{mix}"] = parse / rx
        summary[f"rx_parse_vs_rx_{mix}"] = both / rx
    print(" ".join(f"{k}={v:.2f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
