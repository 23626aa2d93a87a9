"""Instructions per packet of the driver process, pmd and DPDK's virtio-user side by side.

The set-up of ``bench/vs_dpdk.py``: one native ``dpdk-testpmd`` with a ``net_vhost``
port is the device (its forwarding lcore on CPU 0); the driver, on CPU 1, runs under
``valgrind --tool=callgrind`` (this VM has no hardware counters):

  pmd    ``pmd.open_port("vhost-user:SOCK")`` and ``pmd.fwd.run`` (what ``pmd fwd``
         runs): txonly, or macswap with one burst of 32 circulating;
  DPDK   ``dpdk-testpmd`` with ``net_virtio_user`` (mrg_rxbuf=1, in_order=1), txonly or
         macswap ``--tx-first``, ``--no-huge`` (valgrind and huge pages do not mix).

Burst 32, queue size 256, 64 B. Each driver runs three times against a fresh back-end:
forwarding for ``--short`` and for ``--long`` seconds after the same start-up, and (io)
once more with IO_BURSTS bursts circulating instead of one. The instructions I of each
run are fitted as I = S + c P + e E: S the start-up, warm-up and shutdown, c the cost of
one packet, e the cost of one turn of the forwarding loop that moved nothing (a poll that
found nothing, a tx burst on a full ring), E the number of such turns (turns counted from
callgrind's call graph, less P / 32). Packets P are those the driver sent (tx) or received
(io; each is also sent back), from pmd's port statistics and testpmd's final forward
statistics.

Under callgrind the driver is some 50 times slower than natively, so the native back-end
is normally ahead; how often it is not (its CPU is shared), and how many empty polls fit
in an io round trip, depends on valgrind's pace and the machine's load, not on the driver:
that is what the fit takes out. The back-end runs at nice -20 so it falls behind less.
Callgrind counts instructions, not cycles: cache misses and the cross-core round trip are
not in these figures.

Debian's DPDK libraries carry no symbols: their functions are named by object and
address, with the number of calls per packet (from callgrind's call graph) and,
for the ones that matter, what they are (worked out from the call graph; see
``DPDK_ROLES``).

    python bench/insn_vs_dpdk.py                   # tx and io, pmd and DPDK: about 8 minutes
    python bench/insn_vs_dpdk.py --modes tx --who pmd --short 4 --long 12
    python bench/insn_vs_dpdk.py --ring packed     # both on packed rings

The last line is ``insn_pmd_tx=<x> insn_dpdk_tx=<y> insn_pmd_io=<x> insn_dpdk_io=<y>``.
Needs valgrind, ``dpdk-testpmd`` and (for the back-end) huge pages or root. Every
testpmd is stopped by PID and its runtime files removed, as ``bench/dpdk.py`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import dpdk  # noqa: E402

MODES = ("tx", "io")
BURST = 32
QUEUE_SIZE = 256
RING = "split"                        # --ring: both drivers' layout (DPDK: packed_vq=1)
SIZE = 64
CPUS = dpdk.CPUS                     # (back-end's forwarding CPU, driver's CPU)
_FWD = {"tx": "txonly", "io": "macswap"}
VALGRIND_TIMEOUT = 600.0
# io: bursts in flight. With one (vs_dpdk.py's io), the count would depend on how many
# empty polls fit in one round trip under valgrind (DPDK: about 18 per burst); with a few,
# every poll finds a full burst, as every tx burst is full in txonly.
IO_BURSTS = 4
DPDK_POLL = ("dpdk-testpmd", "0x000000000007cd00")   # testpmd's macswap, called once per poll
DPDK_TX_POLL = ("dpdk-testpmd", "0x000000000008f120")  # testpmd's txonly, called once per burst

# What the hot functions of Debian's DPDK 22.11 (22.11.11-0+deb12u1) are, found from
# the call graph of a txonly and an io run (who calls whom, how often per packet)
# and from the shape of testpmd and the virtio PMD; the libraries have no symbols.
# Another build has other addresses: then only the address and calls per packet show.
DPDK_ROLES = {
    ("dpdk-testpmd", "0x84cb0"): "testpmd: forwarding lcore loop (run_pkt_fwd_on_lcore)",
    ("dpdk-testpmd", "0x8f120"): "testpmd txonly: one burst (pkt_burst_transmit)",
    ("dpdk-testpmd", "0x8e5f0"): "testpmd txonly: headers into one mbuf (pkt_burst_prepare)",
    ("dpdk-testpmd", "0x8ee80"): "testpmd: free an mbuf the ring did not take (rte_pktmbuf_free)",
    ("dpdk-testpmd", "0x7cd00"): "testpmd macswap: one poll, rx + swap + tx (pkt_burst_mac_swap)",
    ("librte_net_virtio.so.23.0", "0x15830"): "virtio: tx burst, in-order (virtio_xmit_pkts_inorder)",
    ("librte_net_virtio.so.23.0", "0x116e0"): "virtio: a tx burst's descriptors, in-order (virtqueue_enqueue_xmit_inorder)",
    ("librte_net_virtio.so.23.0", "0x10da0"): "mbuf free into the lcore's mempool cache (rte_pktmbuf_free)",
    ("librte_net_virtio.so.23.0", "0x11640"): "virtio: per-packet statistics, rx and tx (virtio_update_packet_stats)",
    ("librte_net_virtio.so.23.0", "0x12520"): "virtio: rx burst, mergeable in-order (virtio_recv_mergeable_pkts_inorder)",
    ("librte_net_virtio.so.23.0", "0x10810"): "mbufs for the rx refill, from the mempool cache (rte_pktmbuf_alloc_bulk)",
    ("librte_net_virtio.so.23.0", "0x11400"): "virtio: rx refill, in-order (virtqueue_enqueue_refill_inorder)",
}


# --------------------------------------------------------------------------- callgrind output


@dataclass
class Profile:
    """One callgrind run: self instructions and calls received, per (object, function)."""

    total: int = 0
    self_ir: dict[tuple[str, str], int] = field(default_factory=dict)
    calls: dict[tuple[str, str], int] = field(default_factory=dict)
    callers: dict[tuple[tuple[str, str], tuple[str, str]], int] = field(default_factory=dict)


_NAMED = re.compile(r"\((\d+)\)(?:\s(.*))?")


def parse_callgrind(path: str) -> Profile:
    """Read a callgrind out file (name compression, line positions, event Ir).

    A cost line right after ``calls=`` is the call's inclusive cost: it belongs to
    the callee, not to the function containing the call, so it is not added there.
    """
    prof = Profile()
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    ob = fn = ""
    cob = cfn = ""
    after_calls = False

    def name(kind: str, value: str) -> str:
        m = _NAMED.fullmatch(value.strip())
        if not m:
            return value.strip()
        key, text = m.group(1), m.group(2)
        table = names["ob" if kind == "ob" else "fn"]
        if text is not None:
            table[key] = text
        return table.get(key, key)

    with open(path, errors="replace") as f:
        for line in f:
            if not line or line[0] == "#":
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if after_calls:
                    after_calls = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    ir = int(parts[1])
                    key = (os.path.basename(ob), fn)
                    prof.self_ir[key] = prof.self_ir.get(key, 0) + ir
                    prof.total += ir
                continue
            k, _, v = line.rstrip("\n").partition("=")
            if k == "ob":
                ob = name("ob", v)
                cob = ""
            elif k == "fn":
                fn = name("fn", v)
                cob = ""
            elif k == "cob":
                cob = name("ob", v)
            elif k == "cfn":
                cfn = name("fn", v)
            elif k == "calls":
                n = int(v.split()[0])
                callee = (os.path.basename(cob or ob), cfn)
                prof.calls[callee] = prof.calls.get(callee, 0) + n
                pair = ((os.path.basename(ob), fn), callee)
                prof.callers[pair] = prof.callers.get(pair, 0) + n
                cob = ""
                after_calls = True
    return prof


def _short_fn(fn: str) -> str:
    """0x000000000008f120 -> 0x8f120; Cython's mangled names shortened to module.function."""
    if fn.startswith("0x"):
        return hex(int(fn, 16))
    m = re.match(r"__pyx_(?:pw|pf|f)_3pmd_6driver_\d+(_\w+?)_\d+(\w+)", fn)
    if m:
        return f"{m.group(1)}.{re.sub(r'^[0-9]+', '', m.group(2))}"
    return fn


# --------------------------------------------------------------------------- grouping


def pmd_part(obj: str, fn: str) -> str:
    for mod in ("_tx", "_rx", "_virtqueue", "_pool", "_queue"):
        if obj.startswith(mod + "."):
            return f"pmd driver, Cython: pmd/driver/{mod} (with what it inlines)"
    if obj.startswith(("libpython", "python")):
        return "Python interpreter (calls, attributes, GIL release/take)"
    if obj.startswith("_multiarray_umath"):
        return "numpy"
    if obj.startswith("libc.so"):
        return "libc (write() of the kick, mutexes of the GIL, memset)"
    if obj.startswith("ld-linux"):
        return "ld.so"
    return "other: " + obj


def dpdk_part(obj: str, fn: str) -> str:
    if obj == "dpdk-testpmd":
        return "testpmd: forwarding engine, with inlined mbuf alloc (mempool cache)"
    if obj.startswith("librte_net_virtio"):
        return "librte_net_virtio: the driver, with inlined mbuf free"
    if obj.startswith("librte_mempool_ring") or obj.startswith("librte_ring"):
        return "librte_mempool_ring: refill/flush of the mempool cache"
    if obj.startswith("librte_"):
        return obj.split(".so")[0]
    if obj.startswith("ld-linux"):
        return "ld.so: __tls_get_addr (per-lcore variables read from a shared library)"
    if obj.startswith("libc.so"):
        return "libc"
    return "other: " + obj


# --------------------------------------------------------------------------- the runs


def _backend(direction: str, sock: str, prefix: str) -> dpdk._Testpmd:
    exe = dpdk._testpmd()
    if exe is None:
        raise RuntimeError(dpdk.available()[1])
    back_dir = {"tx": "tx", "io": "io"}[direction]
    cmd, _ = dpdk._commands(exe, back_dir, SIZE, BURST, sock, prefix, True, True, False, CPUS)
    # The back-end must never fall behind the driver (then a driver spins on a full
    # ring and counts instructions for no packet): on a shared machine a busy CPU 0
    # would take whole time slices from it. Highest priority of the normal class,
    # not real-time: the other processes on CPU 0 still run, on CPU 1 mostly.
    backend = dpdk._Testpmd("vhost backend", ["nice", "-n", "-20"] + cmd, prefix + "v")
    deadline = time.monotonic() + dpdk.START_TIMEOUT
    while not os.path.exists(sock):
        if not backend.alive():
            raise backend.error("exited before creating the vhost-user socket")
        if time.monotonic() > deadline:
            raise backend.error("no vhost-user socket")
        time.sleep(0.05)
    time.sleep(0.2)                   # bind() then listen()
    return backend


def _pin_driver() -> None:
    os.sched_setaffinity(0, {CPUS[1]})
    os.setsid()


PMD_ROOT = ROOT                      # the checkout whose pmd is measured (--root)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONPATH"] = str(PMD_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _valgrind(out: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def _wait(proc: subprocess.Popen, what: str, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # its own session (_pin_driver): only what we started
        proc.wait(10)
        raise RuntimeError(f"{what} did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited with {proc.returncode}")


def run_pmd(direction: str, seconds: float, tmp: str, bursts: int = 1) -> tuple[Profile, int, dict]:
    """pmd under callgrind against a fresh native back-end: (profile, packets, info)."""
    prefix = f"pmdb{os.getpid()}x{secrets.token_hex(3)}"
    sock = os.path.join(tmp, f"vhost-{prefix}.sock")
    out = os.path.join(tmp, f"cg.pmd.{direction}.{seconds:g}.{bursts}.{secrets.token_hex(2)}")
    result = out + ".json"
    log = out + ".log"
    backend = _backend(direction, sock, prefix)
    try:
        cmd = _valgrind(out) + [sys.executable, str(Path(__file__).resolve()), "--child-pmd", direction,
                                "--seconds", str(seconds), "--sock", sock, "--result", result,
                                "--bursts", str(bursts), "--ring", RING]
        with open(log, "w") as lf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                                    env=_env(), preexec_fn=_pin_driver)
            try:
                _wait(proc, f"pmd under callgrind (log {log})", VALGRIND_TIMEOUT)
            except RuntimeError:
                print(Path(log).read_text()[-3000:], file=sys.stderr)
                raise
        if not backend.alive():
            raise backend.error("exited during the run")
    finally:
        backend.stop()
        dpdk._cleanup_files(backend.prefix)
    info = json.loads(Path(result).read_text())
    packets = info["tx_packets"] if direction == "tx" else info["rx_packets"]
    return parse_callgrind(out), packets, info


_FWD_STATS = re.compile(r"Accumulated forward statistics.*?RX-packets:\s+(\d+)\s+RX-dropped:\s+(\d+).*?"
                        r"TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)", re.S)
_NIC = re.compile(r"(RX|TX)-packets:\s+(\d+)")


def run_dpdk(direction: str, seconds: float, tmp: str, bursts: int = 1) -> tuple[Profile, int, dict]:
    """DPDK's virtio-user testpmd under callgrind against a fresh native back-end."""
    prefix = f"pmdb{os.getpid()}x{secrets.token_hex(3)}"
    sock = os.path.join(tmp, f"vhost-{prefix}.sock")
    out = os.path.join(tmp, f"cg.dpdk.{direction}.{seconds:g}.{bursts}.{secrets.token_hex(2)}")
    log = out + ".log"
    exe = dpdk._testpmd() or "dpdk-testpmd"
    _, front = dpdk._commands(exe, direction, SIZE, BURST, sock, prefix, True, True, RING == "packed", CPUS)
    # Both lcores on the driver's CPU (valgrind runs one thread at a time anyway);
    # no huge pages: valgrind cannot follow DPDK's huge-page mappings.
    i = front.index("--lcores")
    front[i + 1] = f"0@{CPUS[1]},1@{CPUS[1]}"
    j = front.index("--single-file-segments")
    front[j:j + 1] = ["--no-huge", "-m", "1024"]
    if direction == "io":
        # Interactive, to start with IO_BURSTS bursts in flight ("start tx_first N");
        # --tx-first would send one.
        front.remove("--tx-first")
        k = front.index("--stats-period")
        del front[k:k + 2]
        front.append("-i")
    backend = _backend(direction, sock, prefix)
    proc = None
    try:
        with open(log, "w") as lf:
            proc = subprocess.Popen(_valgrind(out) + front, stdin=subprocess.PIPE, stdout=lf,
                                    stderr=subprocess.STDOUT, preexec_fn=_pin_driver, text=True)
            assert proc.stdin is not None
            deadline = time.monotonic() + VALGRIND_TIMEOUT

            def wait_for(pred, what: str) -> None:
                while not pred(Path(log).read_text(errors="replace")):
                    if proc.poll() is not None:
                        raise RuntimeError(f"DPDK under callgrind exited with {proc.returncode}:\n"
                                           + Path(log).read_text()[-3000:])
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"DPDK under callgrind: {what}")
                    time.sleep(0.2)

            if direction == "io":
                wait_for(lambda t: "testpmd> " in t, "no prompt")
                # The burst sent first is lost if the back-end has not set up its rings yet.
                ready = time.monotonic() + 10.0
                while (not any("ready for processing" in line for line in backend.tail)
                       and time.monotonic() < ready):
                    time.sleep(0.1)
                time.sleep(1.0)
                proc.stdin.write(f"start tx_first {bursts}\n")
                proc.stdin.flush()
                wait_for(lambda t: "io packet forwarding" in t or "mac_swap packet forwarding" in t
                         or "macswap packet forwarding" in t, "forwarding did not start")
                time.sleep(seconds)
                proc.stdin.write("stop\nquit\n")
                proc.stdin.flush()
            else:                      # forwarding has begun: the first non-zero count
                wait_for(lambda t: any(k == "TX" and int(v) > 0 for k, v in _NIC.findall(t)), "no packets")
                time.sleep(seconds)
                proc.send_signal(signal.SIGINT)    # testpmd: stop, print the statistics, exit
            _wait(proc, f"DPDK under callgrind (log {log})", VALGRIND_TIMEOUT)
            proc = None
        if not backend.alive():
            raise backend.error("exited during the run")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        backend.stop()
        dpdk._cleanup_files(backend.prefix)
        dpdk._cleanup_files(prefix + "u")
    text = Path(log).read_text(errors="replace")
    m = _FWD_STATS.search(text)
    if not m:
        raise RuntimeError(f"no final forward statistics in {log}")
    rx, rx_drop, tx, tx_drop = (int(x) for x in m.groups())
    info = {"rx_packets": rx, "rx_dropped": rx_drop, "tx_packets": tx, "tx_dropped": tx_drop}
    return parse_callgrind(out), (tx if direction == "tx" else rx), info


# --------------------------------------------------------------------------- pmd's side (the child)


def child_pmd(direction: str, seconds: float, sock: str, result: str, bursts: int) -> None:
    sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)).split(os.pathsep)[0])
    import numpy as np

    from pmd import fwd
    from pmd.backends import open_port
    from pmd.driver.virtio.net import layout_options

    port = open_port("vhost-user:" + sock, timeout=60.0, wait=60.0, **layout_options(RING))
    try:
        port.start(queue_pairs=1, queue_size=QUEUE_SIZE)
        if direction == "io":
            frame = np.frombuffer(fwd.udp_frame(SIZE, port.mac), np.uint8)
            for _ in range(bursts):
                if port.tx_queue(0).tx_burst(np.tile(frame, (BURST, 1)), np.full(BURST, SIZE, np.uint32)) != BURST:
                    raise RuntimeError("could not send the circulating bursts")
        base = port.stats()
        summary = fwd.run(port, _FWD[direction], burst=BURST, size=SIZE, duration=seconds,
                          report=lambda line: None, interval=3600.0, tx_retry=0)
        s = port.stats()
        Path(result).write_text(json.dumps({
            "rx_packets": s["rx_packets"] - base["rx_packets"], "tx_packets": s["tx_packets"] - base["tx_packets"],
            "drops": summary.drops, "notifications": s["notifications"] - base["notifications"],
            "tx_ring_full": s["tx_ring_full"] - base["tx_ring_full"]}))
    finally:
        port.close()


# --------------------------------------------------------------------------- report


def polls(who: str, direction: str, prof: Profile) -> int:
    """Turns of the forwarding loop: tx bursts tried (txonly) or receive polls (io).

    pmd's Python loop makes one ``tx_burst_zc`` / ``rx_burst_zc`` call per turn; its C
    loop (pmd.driver._fwd) one ``send_pool`` / ``harvest``; testpmd one call of its
    forwarding function."""
    if who == "dpdk":
        return prof.calls.get(DPDK_TX_POLL if direction == "tx" else DPDK_POLL, 0)
    want = (("_tx.", "tx_burst_zc", "_7TxQueue_send_pool") if direction == "tx"
            else ("_rx.", "rx_burst_zc", "_7RxQueue_harvest"))
    wrapper = sum(n for (obj, fn), n in prof.calls.items()
                  if obj.startswith(want[0]) and fn.startswith("__pyx_pw_") and fn.endswith(want[1]))
    native = sum(n for (obj, fn), n in prof.calls.items() if obj.startswith(want[0]) and fn.endswith(want[2]))
    return max(wrapper, native)


@dataclass
class PerPacket:
    who: str
    direction: str
    per_packet: float                   # instructions per packet (io: at full bursts, without empty polls)
    per_empty_poll: float | None        # io: instructions per poll that finds nothing
    empty_per_burst: float | None       # io, one burst circulating: empty polls per round trip
    packets: int
    info: dict
    parts: dict[str, float]
    funcs: list[tuple[str, str, float, float]]      # object, function, self insn/packet, calls/packet


def per_packet(who: str, direction: str, runs: list[tuple[Profile, int, dict]]) -> PerPacket:
    """Instructions I of each run fitted as I = S + c P + e E: start-up S, c per packet,
    e per empty turn of the loop, E = turns - P / BURST (a turn that moved nothing: a
    poll that found nothing, a tx burst on a full ring; a partial one counts in part).
    E is how often the driver found the device behind, which under callgrind depends on
    valgrind's pace and on what else runs on the back-end's CPU, not on the driver.
    When the runs' E do not vary apart from P (or are all about 0), e is left out:
    c = (I1 - I0) / (P1 - P0) of the first two runs."""
    import numpy as np

    part_of = pmd_part if who == "pmd" else dpdk_part
    keys = set().union(*(set(p.self_ir) for p, _, _ in runs))
    P = np.array([n for _, n, _ in runs], float)
    E = np.array([polls(who, direction, p) for p, _, _ in runs], float) - P / BURST
    A = np.column_stack([np.ones(len(runs)), P, E])
    scaled = A / np.maximum(np.abs(A).max(axis=0), 1.0)
    fit_e = len(runs) >= 3 and E.max() > 1e-3 * P.max() and np.linalg.cond(scaled) < 1e3
    if not fit_e:
        A = np.column_stack([np.ones(2), P[:2]])

    def solve(y: list[float]) -> tuple[float, float]:
        x = np.linalg.lstsq(A, np.array(y[:len(A)], float), rcond=None)[0]
        return float(x[1]), float(x[2]) if fit_e else 0.0

    coef = {k: solve([p.self_ir.get(k, 0) for p, _, _ in runs]) for k in keys}
    calls = {k: solve([p.calls.get(k, 0) for p, _, _ in runs])[0] for k in keys}
    total, e = solve([p.total for p, _, _ in runs])
    if P[1] <= P[0]:
        raise RuntimeError(f"{who} {direction}: the long run moved no more packets than the short one")
    empty = (E[1] - E[0]) / ((P[1] - P[0]) / BURST)
    parts: dict[str, float] = {}
    for k, (c, _) in coef.items():
        g = part_of(*k)
        parts[g] = parts.get(g, 0.0) + c
    funcs = sorted(((k[0], k[1], c, calls[k]) for k, (c, _) in coef.items()), key=lambda f: -f[2])
    return PerPacket(who, direction, total, e if fit_e else None, float(empty), int(P[1] - P[0]),
                     runs[1][2], parts, funcs)


def print_result(r: PerPacket, top: int) -> None:
    name = "pmd (pmd.fwd over vhost-user)" if r.who == "pmd" else "DPDK (testpmd, net_virtio_user)"
    mode = "txonly" if r.direction == "tx" else "macswap"
    print(f"{name}, {mode}: {r.per_packet:.0f} instructions per packet "
          f"({r.packets} packets between the one-burst runs; last run {r.info})")
    turn = "poll that found nothing" if r.direction == "io" else "tx burst on a full ring"
    if r.per_empty_poll is not None:
        print(f"  and {r.per_empty_poll:.0f} per {turn}, not counted above "
              f"(between the first two runs, {r.empty_per_burst:.2f} of them per {BURST} packets)")
    else:
        print(f"  ({r.empty_per_burst:.2f} of every {BURST}-packet turn were a {turn}, counted above: too few or "
              f"too even to fit apart)")
    for g, v in sorted(r.parts.items(), key=lambda kv: -kv[1]):
        if abs(v) >= 0.5:
            print(f"  {v:7.1f}  {g}")
    print(f"  top functions (self instructions per packet, calls per packet):")
    for obj, fn, v, calls in r.funcs[:top]:
        if abs(v) < 0.5:
            break
        label = _short_fn(fn)
        role = DPDK_ROLES.get((obj, label)) if r.who == "dpdk" else None
        print(f"  {v:7.1f}  {calls:6.3f}  {label} [{obj}]" + (f"  {role}" if role else ""))
    print()


def print_side_by_side(results: dict[tuple[str, str], PerPacket]) -> None:
    print("instructions per packet, driver process only (callgrind), 64 B, burst 32, queue 256")
    print(f"{'':<10} {'pmd':>8} {'DPDK':>8} {'pmd/DPDK':>9}")
    for d in MODES:
        p, q = results.get(("pmd", d)), results.get(("dpdk", d))
        if p is None and q is None:
            continue
        ps = f"{p.per_packet:8.0f}" if p else f"{'-':>8}"
        qs = f"{q.per_packet:8.0f}" if q else f"{'-':>8}"
        ratio = f"{p.per_packet / q.per_packet:9.2f}" if p and q else f"{'-':>9}"
        print(f"{d:<10} {ps} {qs} {ratio}")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--modes", default="tx,io", help="comma-separated, among tx,io")
    ap.add_argument("--who", default="pmd,dpdk", help="comma-separated, among pmd,dpdk")
    ap.add_argument("--short", type=float, default=5.0, help="seconds of forwarding in the short run")
    ap.add_argument("--long", type=float, default=15.0, help="seconds of forwarding in the long run")
    ap.add_argument("--top", type=int, default=12, help="functions to list per driver and mode")
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind files in DIR")
    ap.add_argument("--root", metavar="CHECKOUT", help="measure the pmd of another checkout (built in place)")
    ap.add_argument("--ring", choices=("split", "packed"), default="split",
                    help="ring layout of both drivers (DPDK: packed_vq=1); default split")
    ap.add_argument("--child-pmd", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--sock", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--bursts", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global RING
    RING = args.ring
    if args.child_pmd:
        child_pmd(args.child_pmd, args.seconds, args.sock, args.result, args.bursts)
        return 0
    global PMD_ROOT
    if args.root:
        PMD_ROOT = Path(args.root).resolve()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    who = [w.strip() for w in args.who.split(",") if w.strip()]
    if any(m not in MODES for m in modes) or any(w not in ("pmd", "dpdk") for w in who):
        ap.error("modes among tx,io; who among pmd,dpdk")
    if not 0 < args.short < args.long:
        ap.error("need 0 < --short < --long")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return 2
    ok, why = dpdk.available()
    if not ok:
        print(f"insn_vs_dpdk: DPDK is not available: {why}")
        return 2
    dpdk._sweep_stale()
    dpdk.ensure_hugepages()
    print(f"instructions per packet of the driver process (valgrind --tool=callgrind), "
          f"{time.strftime('%Y-%m-%d')}, {dpdk._testpmd_version(dpdk._testpmd() or '')}; runs of "
          f"{args.short:g} and {args.long:g} s of forwarding; {RING} ring; pmd from {PMD_ROOT}")
    print()
    tmp = args.keep or tempfile.mkdtemp(prefix="pmd-insn-")
    os.makedirs(tmp, exist_ok=True)
    old = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: dict[tuple[str, str], PerPacket] = {}
    try:
        for d in modes:
            for w in who:
                run = run_pmd if w == "pmd" else run_dpdk
                runs = [run(d, args.short, tmp), run(d, args.long, tmp),
                        run(d, args.long, tmp, IO_BURSTS if d == "io" else 1)]
                results[(w, d)] = r = per_packet(w, d, runs)
                print_result(r, args.top)
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGTERM, old)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_side_by_side(results)
    print(" ".join(f"insn_{w}_{d}={results[(w, d)].per_packet:.0f}" if (w, d) in results else f"insn_{w}_{d}=nan"
                   for d in ("tx", "io") for w in ("pmd", "dpdk")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
