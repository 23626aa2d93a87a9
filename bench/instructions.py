"""Instructions per packet of the loopback, counted by callgrind (or perf).

Cycles cannot be counted here (this VM exposes no hardware counters: ``perf
stat -e instructions,cycles true`` says "not supported"), so this counts
instructions with ``valgrind --tool=callgrind``, which works anywhere. To leave
out start-up (interpreter, imports, set-up) it runs the workload twice, with
0 and with N timed rounds after the same warm-up, and divides the difference
by the packets of the N rounds. The same difference per function says where
the instructions go.

    python bench/instructions.py                      # pmd 64 B zero-copy, burst 32
    python bench/instructions.py --kind pmd-copy --size 1500
    python bench/instructions.py --kind python-zc     # the pure-Python reference
    python bench/instructions.py --kind empty-rx-zc   # one rx_burst_zc on an empty ring ("per packet" = per call)
    python bench/instructions.py --in-order on        # both sides with VIRTIO_F_IN_ORDER (--ring packed too)

If ``perf stat -e instructions:u`` works on the machine it is used as well
(native, not simulated), as a cross-check. The last line is
``insn_driver=<x> insn_device=<y> insn_python=<z> insn_total=<t>`` (per packet or call).
"""

from __future__ import annotations

import argparse
from itertools import repeat   # as timeit: no int object made per round
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("pmd-zc", "pmd-copy", "python-zc", "python-copy", "empty-rx-zc", "empty-tx-zc")
WARMUP = 100


def child(kind: str, size: int, burst: int, rounds: int, packed: bool = False, in_order: bool = False) -> None:
    """The workload: WARMUP rounds, then ``rounds`` more (what is counted)."""
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    if kind.startswith("python"):
        _child_python(kind, size, burst, WARMUP + rounds)
    else:
        _child_pmd(kind, size, burst, WARMUP + rounds, packed, in_order)


def _child_python(kind: str, size: int, burst: int, rounds: int) -> None:
    from pure_python import PyLoopback

    ref = PyLoopback(256)
    tx, rx, step = ref.driver_tx, ref.driver_rx, ref.step
    if kind == "python-zc":
        ids, lens = ref.pool.alloc(burst), [size] * burst
        for _ in repeat(None, rounds):
            tx.tx_burst_zc(ids, lens)
            step(burst)
            rx.rx_burst_zc(ids, lens)
    else:
        pkts = [bytes(size)] * burst
        rows, out_lens = [bytearray(rx.max_packet_len) for _ in range(burst)], [0] * burst
        for _ in repeat(None, rounds):
            tx.tx_burst(pkts)
            step(burst)
            rx.rx_burst(rows, out_lens)
    assert rx.packets == tx.packets == rounds * burst


def _child_pmd(kind: str, size: int, burst: int, rounds: int, packed: bool, in_order: bool) -> None:
    import numpy as np

    from pmd.loopback import Loopback
    from pmd.sim._tx import tx_to_rx

    lb = Loopback(queue_size=256, packed=packed, in_order=in_order)
    tx, rx, pool = lb.driver_tx, lb.driver_rx, lb.pool
    dtx, drx, hdr_len, mrg = lb.device_tx, lb.device_rx, lb.hdr_len, lb.mergeable
    # The device is moved by tx_to_rx itself, what lb.step does, without the
    # method's Python frame: the interpreter's part is then the bursts' per-call
    # path and the loop, not Loopback's method.
    move = tx_to_rx
    expected = rounds * burst
    u32 = np.uint32
    if kind == "pmd-zc":
        ids, lens = pool.alloc(burst), np.full(burst, size, dtype=u32)
        tx_zc, rx_zc = tx.tx_burst_zc, rx.rx_burst_zc
        for _ in repeat(None, rounds):
            tx_zc(ids, lens)
            move(dtx, drx, burst, hdr_len, mrg)
            rx_zc(ids, lens)
    elif kind == "pmd-copy":
        pkts, plens = np.zeros((burst, size), dtype=np.uint8), np.full(burst, size, dtype=u32)
        out, olens = np.zeros((burst, rx.max_packet_len), dtype=np.uint8), np.zeros(burst, dtype=u32)
        tx_c, rx_c = tx.tx_burst, rx.rx_burst
        for _ in repeat(None, rounds):
            tx_c(pkts, plens)
            move(dtx, drx, burst, hdr_len, mrg)
            rx_c(out, olens)
    elif kind == "empty-rx-zc":
        no_ids, no_lens = np.zeros(burst, dtype=u32), np.zeros(burst, dtype=u32)
        f = rx.rx_burst_zc
        for _ in repeat(None, rounds):
            f(no_ids, no_lens)
        expected = 0
    elif kind == "empty-tx-zc":
        none = np.zeros(0, dtype=u32)
        g = tx.tx_burst_zc
        for _ in repeat(None, rounds):
            g(none, none)
        expected = 0
    assert rx.packets == tx.packets == expected
    lb.close()


_LAYOUT: list[str] = []    # --ring / --in-order as given, for the children


def _child_cmd(kind: str, size: int, burst: int, rounds: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind,
            "--size", str(size), "--burst", str(burst), "--rounds", str(rounds)] + _LAYOUT


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = "1"  # numpy's BLAS threads would spin and be counted
    env["PYTHONHASHSEED"] = "0"        # same dict layouts in both runs
    return env


def callgrind(kind: str, size: int, burst: int, rounds: int, outdir: str) -> tuple[int, dict]:
    """Total instructions and self instructions per function of one run."""
    out = os.path.join(outdir, f"cg.{kind}.{rounds}")
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
                   + _child_cmd(kind, size, burst, rounds),
                   env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    text = subprocess.run(["callgrind_annotate", "--auto=no", "--inclusive=no", "--threshold=100", out],
                          check=True, capture_output=True, text=True).stdout
    total = 0
    funcs: dict[tuple[str, str], int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)", line)
        if not m:
            continue
        count, name = int(m.group(1).replace(",", "")), m.group(2)
        if "PROGRAM TOTALS" in name:
            total = count
            continue
        fn, _, obj = name.partition(" [")
        key = (fn.rsplit(":", 1)[-1], obj.rstrip("]").rsplit("/", 1)[-1])
        funcs[key] = funcs.get(key, 0) + count
    return total, funcs


def perf_instructions(kind: str, size: int, burst: int, rounds: int) -> int | None:
    """User-space instructions of one run with perf, or None if perf cannot count them."""
    if shutil.which("perf") is None:
        return None
    r = subprocess.run(["perf", "stat", "-x", ",", "-e", "instructions:u"] + _child_cmd(kind, size, burst, rounds),
                       env=_env(), capture_output=True, text=True)
    for line in r.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("instructions"):
            return int(fields[0]) if fields[0].isdigit() else None
    return None


_DEVICE_SIDE = "pmd device side (pmd/sim: _tx, _rx, _virtqueue)"
_DRIVER_SIDE = "pmd driver side (pmd/driver: _rx, _tx, inlined _virtqueue/_pool)"


def module_of(fn: str, obj: str) -> str:
    # Cython names carry the module: __pyx_..._3pmd_3sim_3_tx_... is pmd.sim._tx.
    if "3pmd_3sim_" in fn or "/sim/_" in obj:
        return _DEVICE_SIDE
    if "3pmd_6driver_" in fn or "/driver/_" in obj or obj.startswith(("_rx.", "_tx.", "_queue.", "_pool.")):
        return _DRIVER_SIDE
    if obj.startswith("libpython") or obj.startswith("python"):
        return "Python interpreter (incl. GIL release/take)"
    if obj.startswith("_struct."):
        return "struct module (pack_into / unpack_from)"
    if obj.startswith("libc"):
        return "libc (memcpy, memset, mutexes of the GIL)"
    if "__pyx" in fn and "device" in fn:
        return _DEVICE_SIDE
    if "__pyx" in fn:
        return _DRIVER_SIDE
    if not obj:  # callgrind_annotate sometimes omits the object: go by the name
        if fn.startswith(("__mem", "mem", "pthread", "__pthread")):
            return "libc (memcpy, memset, mutexes of the GIL)"
        if not fn.startswith("?"):
            return "Python interpreter (incl. GIL release/take)"
    return "other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=KINDS, default="pmd-zc")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None,
                    help="counted rounds (default 5000 for pmd, 300 for the Python reference)")
    ap.add_argument("--top", type=int, default=12, help="functions to list")
    ap.add_argument("--ring", choices=("split", "packed"), default="split", help="ring layout of the pmd kinds")
    ap.add_argument("--in-order", choices=("on", "off"), default="off",
                    help="VIRTIO_F_IN_ORDER on both sides of the pmd kinds (docs/rings.md)")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.size, args.burst, args.rounds or 0, args.ring == "packed", args.in_order == "on")
        return 0
    _LAYOUT[:] = ["--ring", args.ring, "--in-order", args.in_order]
    kind = args.kind
    rounds = args.rounds or (300 if kind.startswith("python") else 5000)
    empty = kind.startswith("empty")
    units = rounds if empty else rounds * args.burst
    unit = "call" if empty else "packet"
    what = f"{kind}, {args.size} B, burst {args.burst}" if not empty else f"{kind} (burst array {args.burst})"
    if not kind.startswith("python"):
        what += f", {args.ring}, in-order {args.in_order}"

    p0 = perf_instructions(kind, args.size, args.burst, 0)
    if p0 is not None:
        p1 = perf_instructions(kind, args.size, args.burst, rounds)
        if p1 is not None:
            print(f"perf: {(p1 - p0) / units:.0f} user-space instructions per {unit} ({what})")
    else:
        print("perf cannot count instructions here; using callgrind")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    with tempfile.TemporaryDirectory(prefix="pmd-cg-") as tmp:
        t0, f0 = callgrind(kind, args.size, args.burst, 0, tmp)
        t1, f1 = callgrind(kind, args.size, args.burst, rounds, tmp)
    per = (t1 - t0) / units
    print(f"callgrind: {per:.0f} instructions per {unit} ({what}; {rounds} rounds counted, "
          f"start-up and {WARMUP} warm-up rounds subtracted)")
    diffs = {k: (f1.get(k, 0) - f0.get(k, 0)) / units for k in set(f0) | set(f1)}
    groups: dict[str, float] = {}
    for (fn, obj), v in diffs.items():
        g = module_of(fn, obj)
        groups[g] = groups.get(g, 0.0) + v
    print(f"by part (instructions per {unit}):")
    for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        if abs(v) >= 0.5:
            print(f"  {v:8.1f}  {g}")
    print(f"top functions (self instructions per {unit}):")
    merged: dict[str, float] = {}
    for (fn, obj), v in diffs.items():
        merged[fn] = merged.get(fn, 0.0) + v
    for fn, v in sorted(merged.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {v:8.1f}  {fn}")
    # one line for scripts and notes (issue 14's three figures, and the whole)
    python = groups.get("Python interpreter (incl. GIL release/take)", 0.0)
    print(f"insn_driver={groups.get(_DRIVER_SIDE, 0.0):.0f} insn_device={groups.get(_DEVICE_SIDE, 0.0):.0f} "
          f"insn_python={python:.0f} insn_total={per:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
