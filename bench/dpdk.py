"""DPDK's own virtio-net figure on this machine, measured on demand.

The reference pmd is compared with (see ``../shared/BASELINE.md``): two
``dpdk-testpmd`` processes on one machine, each forwarding on its own core,

  backend   net_vhost (vhost-user server)       --lcores 0@1,1@0 --main-lcore 0
  frontend  net_virtio_user (DPDK's virtio PMD)  --lcores 0@0,1@1 --main-lcore 0

connected by a vhost-user socket in a temporary directory, with a unique
``--file-prefix`` per process and run, ``--single-file-segments``, ``--no-pci``
(no PCI device is ever touched) and ``--stats-period 1``. Directions:

  tx   virtio-user txonly -> vhost rxonly     (DPDK's driver transmitting)
  rx   vhost txonly -> virtio-user rxonly     (DPDK's driver receiving)
  io   both sides macswap, one burst circulating (the frontend sends it with
       --tx-first); a round trip per burst, so far lower than tx/rx

The figure is the receiving side's Rx-pps (the frontend's in ``io``), parsed
from testpmd's periodic statistics: the first non-zero second is discarded
(partial), the median of the next ``seconds`` one-second samples is returned
in Mpps. Both processes are stopped by PID (SIGINT, then SIGKILL), and their
hugepage files, runtime directory and the socket are removed.

The machine is bimodal for anything crossing cores (BASELINE.md): the round
trip of a cache line between the two vCPUs jumps between "fast" and "slow"
from run to run, and cross-core Mpps follows it. ``core_round_trip_ns()``
measures it (a tiny C program compiled at run time into a temporary
directory: two threads pinned to the two cores bounce a value in one cache
line); record it with every sample.

    python bench/dpdk.py            # 64 and 1500 B, rx and tx, io at 64 B; 5 s each
    python bench/dpdk.py --quick    # 2 s each
    python bench/dpdk.py --runs 3   # the whole table three times, interleaved

From another script (importing has no side effects)::

    from dpdk import available, measure, core_round_trip_ns
    ok, why = available()
    if ok:
        rt = core_round_trip_ns()
        mpps = measure("tx", size=64)

Needs ``dpdk-testpmd`` (Debian package ``dpdk-dev``) and about 400 free 2 MiB
huge pages; as root, ``measure()`` reserves them (``/proc/sys/vm/nr_hugepages``)
and mounts hugetlbfs at ``/dev/hugepages`` if needed. Standard library only.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import platform
import queue
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "available",
    "measure",
    "measure_detailed",
    "Measurement",
    "core_round_trip_ns",
    "round_trip_mode",
    "ensure_hugepages",
    "machine_load",
    "DIRECTIONS",
    "FAST_ROUND_TRIP_NS",
]

TESTPMD = "dpdk-testpmd"
DIRECTIONS = ("rx", "tx", "io")
CPUS = (0, 1)  # the two vCPUs; each process forwards on one, its main lcore sleeps on the other
# Free 2 MiB pages needed: each testpmd takes ~185 (its default mbuf pool, 155456 x 2176 B, plus
# rings and heap); a margin on top.
HUGEPAGES_NEEDED = 420
HUGEPAGES_RESERVE = 1024  # what BASELINE.md reserves
HUGEPAGE_MOUNT = "/dev/hugepages"
# Round trips below this are "fast" (BASELINE.md: ~110 ns fast, ~500 ns slow; the C helper here
# reads ~55 ns in fast mode).
FAST_ROUND_TRIP_NS = 250.0

IDLE_LOAD = 0.25  # CPUs busy elsewhere above which a sample is flagged "busy"
START_TIMEOUT = 30.0  # backend socket up / first traffic seen
STOP_TIMEOUT = 10.0  # SIGINT -> exit, before SIGKILL

_PPS = re.compile(r"\b(Rx|Tx)-pps:\s+(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # testpmd clears the screen before each statistics block


# --------------------------------------------------------------------------- availability


def _testpmd() -> str | None:
    return shutil.which(TESTPMD) or (f"/usr/bin/{TESTPMD}" if os.access(f"/usr/bin/{TESTPMD}", os.X_OK) else None)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = int(v.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _hugetlbfs_mounts() -> list[str]:
    mounts = []
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "hugetlbfs":
                    mounts.append(parts[1].replace("\\040", " "))
    except OSError:
        pass
    return mounts


def available() -> tuple[bool, str]:
    """(True, description) if ``measure()`` can run here, else (False, why not).

    Needs Linux, ``dpdk-testpmd``, and either enough free huge pages on a
    hugetlbfs mount or root (``measure()`` then reserves and mounts them).
    Changes nothing.
    """
    if platform.system() != "Linux":
        return False, "not Linux"
    exe = _testpmd()
    if exe is None:
        return False, f"{TESTPMD} not found (Debian: apt-get install --no-install-recommends dpdk-dev)"
    mi = _meminfo()
    free = mi.get("HugePages_Free", 0)
    size_kb = mi.get("Hugepagesize", 0)
    root = os.geteuid() == 0
    if size_kb != 2048:
        return False, f"default huge page size is {size_kb} kB, expected 2048"
    mounts = _hugetlbfs_mounts()
    if not mounts and not root:
        return False, "no hugetlbfs mounted and not root to mount one"
    if free < HUGEPAGES_NEEDED and not root:
        return False, f"{free} free huge pages, need {HUGEPAGES_NEEDED} (and not root to reserve them)"
    how = f"{free} free huge pages" if free >= HUGEPAGES_NEEDED else "huge pages reservable (root)"
    return True, f"{exe}, {how}"


def ensure_hugepages(needed: int = HUGEPAGES_NEEDED) -> None:
    """Make sure ``needed`` 2 MiB pages are free on a mounted hugetlbfs.

    As root, raises ``vm.nr_hugepages`` (never lowers it) to at least
    ``HUGEPAGES_RESERVE`` or total + shortfall, and mounts hugetlbfs at
    ``/dev/hugepages`` if none is mounted. Raises RuntimeError otherwise.
    """
    mi = _meminfo()
    free, total = mi.get("HugePages_Free", 0), mi.get("HugePages_Total", 0)
    if free < needed:
        if os.geteuid() != 0:
            raise RuntimeError(f"{free} free huge pages, need {needed}: echo 1024 > /proc/sys/vm/nr_hugepages")
        want = max(HUGEPAGES_RESERVE, total + needed - free)
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(want))
        free = _meminfo().get("HugePages_Free", 0)
        if free < needed:
            raise RuntimeError(f"asked for {want} huge pages, only {free} free (memory fragmented or short)")
    if not _hugetlbfs_mounts():
        if os.geteuid() != 0:
            raise RuntimeError("no hugetlbfs mounted: mount -t hugetlbfs nodev /dev/hugepages")
        os.makedirs(HUGEPAGE_MOUNT, exist_ok=True)
        subprocess.run(["mount", "-t", "hugetlbfs", "nodev", HUGEPAGE_MOUNT], check=True, timeout=10,
                       capture_output=True)


# --------------------------------------------------------------------------- testpmd processes


@dataclass
class Measurement:
    """One ``measure_detailed()`` run. Rates in Mpps, one entry per steady-state second."""

    direction: str
    size: int
    burst: int
    mpps: float  # median of ``samples``: what ``measure()`` returns
    samples: list[float]  # receiving side's Rx-pps, Mpps
    sender: list[float]  # sending side's Tx-pps over the same seconds, Mpps
    other_cpu: float  # CPUs used by processes other than the two testpmds during the samples (0..2)
    steal: float  # CPUs' worth of time stolen by the hypervisor during the samples
    commands: list[list[str]] = field(default_factory=list)

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.samples), max(self.samples)) if self.samples else (math.nan, math.nan)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the thread that started it dies.

    So a testpmd never outlives a measurement killed from outside (its busy-polling
    lcores would otherwise hold both cores). testpmd exits cleanly on SIGTERM.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Testpmd:
    """One dpdk-testpmd process; a thread parses its periodic statistics."""

    def __init__(self, name: str, cmd: list[str], prefix: str) -> None:
        self.name = name
        self.cmd = cmd
        self.prefix = prefix
        self.samples: queue.Queue[tuple[float, float]] = queue.Queue()
        self.tail: list[str] = []  # last lines, for error messages
        # testpmd's stdout is block-buffered into a pipe; stdbuf makes it line-buffered so each
        # statistics block arrives when printed (without it the parsing is the same, only later).
        stdbuf = shutil.which("stdbuf")
        argv = ([stdbuf, "-oL"] if stdbuf else []) + cmd
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"testpmd-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        rx: float | None = None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(_ANSI.sub("", line).rstrip())
            del self.tail[:-40]
            for m in _PPS.finditer(line):
                if m.group(1) == "Rx":
                    rx = int(m.group(2)) / 1e6
                elif rx is not None:  # Tx-pps follows Rx-pps in each block (one port)
                    self.samples.put((rx, int(m.group(2)) / 1e6))
                    rx = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_ticks(self) -> int:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime, all threads
        except (OSError, IndexError, ValueError):
            return 0

    def interrupt(self) -> None:
        """SIGINT: testpmd stops forwarding, closes its port and exits."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """``interrupt()``, wait for the exit, SIGKILL if it hangs."""
        self.interrupt()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def error(self, what: str) -> RuntimeError:
        rc = self.proc.poll()
        state = f"exited with {rc}" if rc is not None else "running"
        return RuntimeError(f"testpmd {self.name} ({state}): {what}\n  " + "\n  ".join(self.tail[-15:]))


def _runtime_dirs(prefix: str) -> list[str]:
    if os.geteuid() == 0:
        bases = ["/var/run/dpdk", "/run/dpdk"]
    else:
        bases = [os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/tmp"), "dpdk")]
    return [os.path.join(b, prefix) for b in bases]


def _cleanup_files(prefix: str) -> None:
    """Remove what an EAL with ``--file-prefix prefix`` leaves: hugepage files, runtime dir."""
    for mnt in set(_hugetlbfs_mounts() + [HUGEPAGE_MOUNT]):
        for path in glob.glob(os.path.join(glob.escape(mnt), glob.escape(prefix) + "map_*")):
            try:
                os.unlink(path)
            except OSError:
                pass
    for d in _runtime_dirs(prefix):
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)


_PREFIX = re.compile(r"pmdb(\d+)x[0-9a-f]{6}[uv]")


def _sweep_stale() -> None:
    """Remove the files of earlier runs whose Python process died without cleaning up (SIGKILL).

    Only names this module makes (``pmdb<pid>x<hex>[uv]``) whose <pid> is gone; their
    hugepage files would otherwise keep ~185 huge pages each reserved.
    """
    names: set[str] = set()
    for mnt in set(_hugetlbfs_mounts() + [HUGEPAGE_MOUNT]):
        for path in glob.glob(os.path.join(glob.escape(mnt), "pmdb*map_*")):
            names.add(os.path.basename(path).split("map_")[0])
    for base in {os.path.dirname(d) for d in _runtime_dirs("x")}:
        names.update(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(base), "pmdb*")))
    for name in names:
        m = _PREFIX.fullmatch(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _cleanup_files(name)


def _cpu_times() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    return user + nice + system + irq + softirq, steal


def machine_load(interval: float = 0.5) -> float:
    """CPUs' worth of busy time on the whole machine over the next ``interval`` seconds.

    The caller sleeps meanwhile, so this is everyone else's load: 0 on an idle
    machine, up to the number of CPUs. Cross-core figures are worthless while it
    is high (the testpmds share the two cores with it).
    """
    busy0, _ = _cpu_times()
    t0 = time.monotonic()
    time.sleep(interval)
    busy1, _ = _cpu_times()
    return (busy1 - busy0) / os.sysconf("SC_CLK_TCK") / max(time.monotonic() - t0, 1e-3)


def _commands(testpmd: str, direction: str, size: int, burst: int, sock: str, prefix: str,
              mrg_rxbuf: bool, in_order: bool, packed_vq: bool, cpus: tuple[int, int]
              ) -> tuple[list[str], list[str]]:
    a, b = cpus
    modes = {"tx": ("rxonly", "txonly"), "rx": ("txonly", "rxonly"), "io": ("macswap", "macswap")}
    back_mode, front_mode = modes[direction]
    common = [f"--txpkts={size}", f"--burst={burst}", "--nb-cores=1", "--rxq=1", "--txq=1",
              "--stats-period", "1"]
    backend = [testpmd, "--lcores", f"0@{b},1@{a}", "--main-lcore", "0", "--no-pci",
               "--file-prefix", prefix + "v", "--single-file-segments",
               "--vdev", f"net_vhost0,iface={sock},queues=1",
               "--", f"--forward-mode={back_mode}"] + common
    devargs = (f"net_virtio_user0,path={sock},queues=1,mrg_rxbuf={int(mrg_rxbuf)},"
               f"in_order={int(in_order)}" + (",packed_vq=1" if packed_vq else ""))
    frontend = [testpmd, "--lcores", f"0@{a},1@{b}", "--main-lcore", "0", "--no-pci",
                "--file-prefix", prefix + "u", "--single-file-segments",
                "--vdev", devargs,
                "--", f"--forward-mode={front_mode}"] + common
    if direction == "io":
        frontend.append("--tx-first")  # the one burst that circulates
    return backend, frontend


def measure_detailed(direction: str, size: int = 64, burst: int = 32, seconds: float = 5.0,
                     mrg_rxbuf: bool = True, in_order: bool = True, packed_vq: bool = False,
                     cpus: tuple[int, int] = CPUS) -> Measurement:
    """Run the two testpmds once; see ``measure()``. Returns every sample and the load."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if not 42 <= size <= 1518:  # txonly builds Ether/IPv4/UDP headers (42 B); one 2048 B mbuf
        raise ValueError(f"size {size} out of range 42..1518")
    if not 1 <= burst <= 512:
        raise ValueError(f"burst {burst} out of range 1..512")
    n = max(1, math.ceil(seconds))
    exe = _testpmd()
    if exe is None:
        raise RuntimeError(available()[1])
    _sweep_stale()
    ensure_hugepages()

    prefix = f"pmdb{os.getpid()}x{secrets.token_hex(3)}"
    tmp = tempfile.mkdtemp(prefix="pmd-dpdk-")
    sock = os.path.join(tmp, "vhost.sock")
    backend_cmd, frontend_cmd = _commands(exe, direction, size, burst, sock, prefix, mrg_rxbuf,
                                          in_order, packed_vq, cpus)
    procs: list[_Testpmd] = []
    try:
        backend = _Testpmd("vhost backend", backend_cmd, prefix + "v")
        procs.append(backend)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(sock):  # the vhost-user server socket: bound, listening next
            if not backend.alive():
                raise backend.error("exited before creating the vhost-user socket")
            if time.monotonic() > deadline:
                raise backend.error(f"no vhost-user socket after {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        time.sleep(0.2)  # bind() then listen(): let it reach listen
        frontend = _Testpmd("virtio-user frontend", frontend_cmd, prefix + "u")
        procs.append(frontend)
        receiver, sender = (backend, frontend) if direction == "tx" else (frontend, backend)

        def next_sample(until: float, what: str) -> tuple[float, float]:
            while True:
                for p in procs:
                    if not p.alive():
                        raise p.error("exited during the measurement")
                left = until - time.monotonic()
                if left <= 0:
                    raise receiver.error(what)
                try:
                    return receiver.samples.get(timeout=min(left, 0.5))
                except queue.Empty:
                    pass

        # Wait for traffic; the first non-zero second is partial: discard it.
        deadline = time.monotonic() + START_TIMEOUT
        while next_sample(deadline, f"no packets received after {START_TIMEOUT:.0f} s")[0] == 0.0:
            pass
        # Start the load accounting at the beginning of the first full second.
        while not sender.samples.empty():
            sender.samples.get_nowait()
        t0, (busy0, steal0) = time.monotonic(), _cpu_times()
        ours0 = sum(p.cpu_ticks() for p in procs)
        samples: list[float] = []
        deadline = time.monotonic() + n + 10.0
        while len(samples) < n:
            samples.append(next_sample(deadline, "statistics stopped coming")[0])
        t1, (busy1, steal1) = time.monotonic(), _cpu_times()
        ours1 = sum(p.cpu_ticks() for p in procs)
        sent: list[float] = []
        while not sender.samples.empty():
            sent.append(sender.samples.get_nowait()[1])
        hz = os.sysconf("SC_CLK_TCK")
        elapsed = max(t1 - t0, 1e-3)
        other = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / hz / elapsed)
        steal = (steal1 - steal0) / hz / elapsed
        return Measurement(direction, size, burst, statistics.median(samples), samples, sent,
                           other, steal, [backend_cmd, frontend_cmd])
    finally:
        for p in reversed(procs):  # both at once (frontend first), then wait for each
            p.interrupt()
        for p in reversed(procs):
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass
        for p in procs:
            _cleanup_files(p.prefix)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(direction: str, size: int = 64, burst: int = 32, seconds: float = 5.0,
            mrg_rxbuf: bool = True, in_order: bool = True, packed_vq: bool = False) -> float:
    """DPDK's received Mpps for one configuration, as BASELINE.md measures it.

    ``direction``: "tx" (virtio-user txonly -> vhost rxonly: DPDK's driver
    transmitting), "rx" (vhost txonly -> virtio-user rxonly: DPDK's driver
    receiving) or "io" (both macswap, one burst circulating). ``size`` is the
    frame size in bytes (testpmd --txpkts), ``burst`` the burst on both sides;
    ``mrg_rxbuf``, ``in_order``, ``packed_vq`` are virtio-user devargs.
    Returns the median of ``ceil(seconds)`` one-second Rx-pps samples of the
    receiving side after the first (partial) second of traffic. About
    ``seconds`` + 3 s of wall time; raises RuntimeError on any failure
    (with testpmd's last lines), always after stopping both processes.
    """
    return measure_detailed(direction, size, burst, seconds, mrg_rxbuf, in_order, packed_vq).mpps


# --------------------------------------------------------------------------- core-to-core round trip

_PINGPONG_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Alignas(128) _Atomic long flag;
static long rounds, batch;
static int cpu_a, cpu_b;

static int pin(int cpu) {
    cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s);
    return pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}
static double now_ns(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}
static void *pong(void *arg) {
    (void)arg;
    if (pin(cpu_b)) { perror("pin"); exit(2); }
    for (long i = 0; i < rounds; i++) {
        long want = 2 * i + 1;
        while (atomic_load_explicit(&flag, memory_order_acquire) != want) ;
        atomic_store_explicit(&flag, want + 1, memory_order_release);
    }
    return NULL;
}
int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s CPU_A CPU_B ROUNDS BATCH\n", argv[0]); return 2; }
    cpu_a = atoi(argv[1]); cpu_b = atoi(argv[2]);
    rounds = atol(argv[3]); batch = atol(argv[4]);
    if (rounds < 1 || batch < 1) return 2;
    if (pin(cpu_a)) { perror("pin"); return 2; }
    pthread_t t;
    if (pthread_create(&t, NULL, pong, NULL)) { perror("pthread_create"); return 2; }
    double t0 = now_ns();
    for (long i = 0; i < rounds; i++) {
        long v = 2 * i + 1;
        atomic_store_explicit(&flag, v, memory_order_release);
        while (atomic_load_explicit(&flag, memory_order_acquire) != v + 1) ;
        if ((i + 1) % batch == 0) {          /* ns per round trip over the last batch */
            double t1 = now_ns();
            printf("%.2f\n", (t1 - t0) / batch);
            t0 = t1;
        }
    }
    pthread_join(t, NULL);
    return 0;
}
"""


def core_round_trip_ns(samples: int = 200_000, cpus: tuple[int, int] = CPUS, timeout: float = 30.0) -> float:
    """Round trip of one cache line between two cores, in ns (median over batches of 1000).

    Two threads of a C helper (compiled with gcc into a temporary directory,
    removed afterwards) pinned to ``cpus`` bounce a counter in one cache line
    ``samples`` times; each batch of 1000 round trips is timed and the median
    batch returned (batches where a thread was descheduled are outliers).
    About 0.1 s ("fast", ~55 ns) to 0.5 s; raises RuntimeError if gcc is
    missing or the helper fails.
    """
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) to build the round-trip helper")
    batch = 1000
    samples = max(samples, batch)
    with tempfile.TemporaryDirectory(prefix="pmd-pingpong-") as tmp:
        src, exe = os.path.join(tmp, "pingpong.c"), os.path.join(tmp, "pingpong")
        Path(src).write_text(_PINGPONG_C)
        r = subprocess.run([cc, "-O2", "-pthread", "-o", exe, src], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the round-trip helper failed:\n{r.stderr}")
        r = subprocess.run([exe, str(cpus[0]), str(cpus[1]), str(samples), str(batch)],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"round-trip helper failed ({r.returncode}): {r.stderr.strip()}")
        values = [float(x) for x in r.stdout.split()]
    if not values:
        raise RuntimeError("round-trip helper printed nothing")
    return statistics.median(values)


def round_trip_mode(rt_ns: float) -> str:
    """"fast" or "slow", the machine's two modes for cross-core traffic (BASELINE.md)."""
    if math.isnan(rt_ns):
        return "?"
    return "fast" if rt_ns < FAST_ROUND_TRIP_NS else "slow"


# --------------------------------------------------------------------------- command line


def _environment() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def _testpmd_version(exe: str) -> str:
    # The Debian package path holds the ABI version; testpmd itself has no --version.
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"], capture_output=True,
                           text=True, timeout=10)
        if r.returncode == 0 and r.stdout:
            return f"DPDK {r.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return exe


def _rt_or_nan(samples: int) -> float:
    try:
        return core_round_trip_ns(samples)
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s per configuration instead of 5")
    ap.add_argument("--seconds", type=float, help="steady-state seconds per configuration")
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole table (interleaved), default 1")
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--no-io", action="store_true", help="skip the io (macswap) row")
    ap.add_argument("--wait-idle", type=float, default=30.0, metavar="S",
                    help=f"before each sample wait up to S seconds for the rest of the machine to use "
                         f"less than {IDLE_LOAD} CPUs (default 30; 0: don't wait)")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)

    ok, why = available()
    if not ok:
        print(f"dpdk: not available: {why}")
        return 2
    exe = _testpmd() or TESTPMD
    configs: list[tuple[str, int]] = [("tx", 64), ("rx", 64), ("tx", 1500), ("rx", 1500)]
    if not args.no_io:
        configs.append(("io", 64))

    print(f"DPDK virtio-user <-> vhost-user, two testpmd processes, one forwarding core each "
          f"({_testpmd_version(exe)}; {_environment()})")
    print(f"burst {args.burst}, split ring, mrg_rxbuf=1 in_order=1, {math.ceil(seconds)} s per sample, "
          f"median of the one-second Rx-pps of the receiving side")
    print("  tx = DPDK's driver transmitting (virtio-user txonly -> vhost rxonly); "
          "rx = DPDK's driver receiving (vhost txonly -> virtio-user rxonly);")
    print("  io = both macswap, one burst circulating; rt = core-to-core cache-line round trip "
          f"before / after (fast < {FAST_ROUND_TRIP_NS:.0f} ns);")
    print("  other = CPUs used by other processes meanwhile (\"busy\" from "
          f"{IDLE_LOAD}), steal = CPUs stolen by the hypervisor")
    print()
    hdr = (f"{'run':>3} {'dir':<3} {'size':>5} | {'Mpps':>7} {'min':>7} {'max':>7} | "
           f"{'rt ns':>11} {'mode':<5} | {'other':>5} {'steal':>5}")
    print(hdr)
    print("-" * len(hdr))
    results: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    quiet: dict[tuple[str, int], list[float]] = {c: [] for c in configs}  # samples not "busy"
    rts: list[float] = []
    t_start = time.monotonic()
    failed = 0
    for run in range(1, args.runs + 1):
        for direction, size in configs:
            deadline = time.monotonic() + args.wait_idle
            while time.monotonic() < deadline and machine_load(0.5) >= IDLE_LOAD:
                pass
            rt0 = _rt_or_nan(100_000)
            try:
                m = measure_detailed(direction, size, args.burst, seconds)
            except RuntimeError as e:
                failed += 1
                print(f"{run:>3} {direction:<3} {size:>5} | failed: {e}", flush=True)
                continue
            rt1 = _rt_or_nan(100_000)
            rts += [rt0, rt1]
            lo, hi = m.spread
            mode = round_trip_mode(rt0) if round_trip_mode(rt0) == round_trip_mode(rt1) else "mixed"
            results[(direction, size)].append(m.mpps)
            if m.other_cpu < IDLE_LOAD:
                quiet[(direction, size)].append(m.mpps)
            busy = "  busy" if m.other_cpu >= IDLE_LOAD else ""
            print(f"{run:>3} {direction:<3} {size:>5} | {m.mpps:>7.2f} {lo:>7.2f} {hi:>7.2f} | "
                  f"{rt0:>5.0f}/{rt1:<5.0f} {mode:<5} | {m.other_cpu:>5.2f} {m.steal:>5.2f}{busy}",
                  flush=True)
    print()
    good = [r for r in rts if not math.isnan(r)]
    rt_med = statistics.median(good) if good else math.nan
    # Medians over the samples not flagged busy (all samples if every one was).
    summary = " ".join(f"{d}{s}={statistics.median(quiet[(d, s)] or v):.2f}"
                       for (d, s), v in results.items() if v)
    print(f"dpdk_mpps {summary} rt_ns={rt_med:.0f} mode={round_trip_mode(rt_med)}")
    print(f"(took {time.monotonic() - t_start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
