"""The built-in device in a process of its own, and a helper to start one.

``python -m pmd.sim --socket PATH [options]`` serves a :class:`VirtioNetModel`
over vfio-user at ``PATH`` (a UNIX socket, mode 0600) with a wire behind it,
until SIGTERM, SIGINT or a ``shutdown`` request; the socket files are removed
on the way out. When the driver disconnects the device cleans up (its DMA
mappings and interrupt fds go) and waits for the next one.

A control socket at ``PATH + ".ctl"`` takes one JSON object per line and
answers each with one line of JSON::

    {"op": "set_link", "up": false}         -> {"ok": true}
    {"op": "set_link", "up": true, "device": 1}   (the second device of a pair)
    {"op": "stats"}                         -> {"ok": true, "devices": [{...}, ...]}
    {"op": "ping"}                          -> {"ok": true, "pid": ...}
    {"op": "shutdown"}                      -> {"ok": true}, then the process exits
    anything else                           -> {"ok": false, "error": "..."}

:func:`spawn_device` starts such a process and waits until it serves (it
reports readiness on a pipe), and returns a :class:`SimProcess`:
``socket_path``, ``control(op, **args)``, ``stop()`` (SIGTERM, then SIGKILL of
its own PID after a timeout), a context manager; nothing is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

from ..errors import PmdError
from ..sockets import bind_socket, remove_socket
from .wires import WIRES, Wire, make_wire, pair_wires

log = logging.getLogger("pmd.sim.process")

CONTROL_SUFFIX = ".ctl"
PEER_SUFFIX = ".peer"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class SimError(PmdError, RuntimeError):
    """The built-in device process failed to start, answer or stop."""


# ------------------------------------------------------------------ the process side

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The device's options, the same for ``python -m pmd.sim`` and the ``sim`` subcommand of ``pmd``."""
    parser.add_argument("--socket", required=True, help="vfio-user socket path to serve on")
    parser.add_argument("--wire", choices=WIRES, default="loopback", help="what is behind the device")
    parser.add_argument("--mac", default=None, help="device MAC (default 02:50:4d:44:00:01)")
    parser.add_argument("--queue-pairs", type=int, default=1, help="max_virtqueue_pairs (MQ)")
    parser.add_argument("--queue-size", type=int, default=1024, help="largest ring per queue")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--msix-vectors", type=int, default=None, help="default: 2 * queue pairs + 2")
    parser.add_argument("--features-off", default="", help="offered features to turn off, e.g. MQ,EVENT_IDX")
    parser.add_argument("--link-down", action="store_true", help="start with the link down")
    parser.add_argument("--pcap-in", default=None, help="pcap wire: frames the driver receives")
    parser.add_argument("--pcap-out", default=None, help="pcap wire: where what the driver sends goes")
    parser.add_argument("--loop", type=int, default=1, help="pcap wire: play pcap-in this many times")
    parser.add_argument("--rate", type=float, default=0, help="generator/pcap: packets per second (0: max)")
    parser.add_argument("--size", type=int, default=64, help="generator: frame size in bytes (60-9014)")
    parser.add_argument("--flows", type=int, default=1, help="generator: number of UDP flows")
    parser.add_argument("--count", type=int, default=0, help="generator: packets in all (0: no end)")
    parser.add_argument("--tap", default="pmdtap0", help="tap wire: interface name")
    parser.add_argument("--netns", default=None, help="tap wire: create the interface in this namespace")
    parser.add_argument("--peer-socket", default=None, help="pair wire: socket of the second device "
                        f"(default PATH{PEER_SUFFIX})")
    parser.add_argument("--dgram-local", default=None, help="dgram wire: our datagram socket path")
    parser.add_argument("--dgram-remote", default=None, help="dgram wire: the peer's datagram socket path")
    parser.add_argument("--mode", default="600", help="socket permissions, octal (default 600)")
    parser.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    # Set by spawn_device: the PID of the process that started this one (exit when
    # it is gone) and the temporary folder it made for us (removed then).
    parser.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--owned-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--cpu", type=int, default=None, metavar="N",
                        help="run the device's threads on CPU N only (placement, as testpmd's --lcores)")


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    from ..abi.ethernet import parse_mac

    opts: dict[str, Any] = {"queue_pairs": args.queue_pairs, "queue_size": args.queue_size, "mtu": args.mtu,
                            "msix_vectors": args.msix_vectors, "features_off": args.features_off,
                            "link_up": not args.link_down}
    if args.mac:
        opts["mac"] = parse_mac(args.mac)
    return opts


def _wires(args: argparse.Namespace) -> list[Wire]:
    if args.wire == "pair":
        return list(pair_wires())
    return [make_wire(args.wire, pcap_in=args.pcap_in, pcap_out=args.pcap_out, rate=args.rate, size=args.size,
                      flows=args.flows, count=args.count, loop=args.loop, tap=args.tap, netns=args.netns,
                      dgram_local=args.dgram_local, dgram_remote=args.dgram_remote)]


class _Control:
    """The JSON-lines control socket."""

    def __init__(self, path: str, devices: list[Any], stop: threading.Event) -> None:
        self.path = path
        self.devices = devices
        self.stop = stop
        with contextlib.suppress(FileNotFoundError):
            if Path(path).is_socket():
                os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # 0600, never through a symlink planted after bind (pmd.sockets).
            self.identity = bind_socket(self.sock, path, 0o600, "control socket")
        except BaseException:
            self.sock.close()
            raise
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, name="pmd-sim-control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        buf = b""
        while not self.stop.is_set():
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                reply = self.handle(line)
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    return
                if reply.get("shutdown"):
                    self.stop.set()
                    return
            if len(buf) > 1 << 20:
                return

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            op = req.get("op")
            index = int(req.get("device", 0))
            if not 0 <= index < len(self.devices):
                raise ValueError(f"device {index} does not exist (this process has {len(self.devices)})")
            if op == "ping":
                return {"ok": True, "pid": os.getpid()}
            if op == "set_link":
                up = req.get("up")
                if not isinstance(up, bool):
                    raise ValueError('set_link needs "up": true or false')
                self.devices[index].set_link(up)
                return {"ok": True}
            if op == "stats":
                return {"ok": True, "devices": [d.stats() for d in self.devices]}
            if op == "shutdown":
                return {"ok": True, "shutdown": True}
            raise ValueError(f"unknown op {op!r}; one of ping, set_link, stats, shutdown")
        except Exception as e:
            return {"ok": False, "error": str(e)}

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(2.0)
        remove_socket(self.path, self.identity)


PR_SET_PDEATHSIG = 1     # linux/prctl.h
# The parent-death signal. Not SIGTERM: prctl(2) sends it when the *thread* that
# forked this process exits, which a live parent also does (open_port() from a
# worker thread), so the handler must check whether the parent process is gone,
# and a deliberate SIGTERM from a live parent must still stop the device.
PARENT_DEATH_SIGNAL = signal.SIGHUP


def _ask_for_parent_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG): be signalled when the parent goes. False when refused."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0:
            return True
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s; polling for the parent instead",
                    os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warning("no prctl (%s); polling for the parent instead", e)
    return False


class _Parent:
    """The process that started this device (``--parent-pid``), watched two ways:
    the parent-death signal, and a look at ``getppid()`` each time the main loop
    wakes (for the parent that died before prctl, or a missed signal)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.gone = False

    def check(self) -> bool:
        if self.pid and not self.gone and os.getppid() != self.pid:
            self.gone = True     # reparented: the process that started us has exited
        return self.gone


def _remove_owned_dir(path: str | None) -> None:
    # Only the folder spawn_device made for this device (its name says so).
    if path and Path(path).name.startswith("pmd-sim-"):
        shutil.rmtree(path, ignore_errors=True)


def serve(args: argparse.Namespace) -> int:
    """Run the device(s) until told to stop. Returns the exit status."""
    stop = threading.Event()
    parent = _Parent(int(getattr(args, "parent_pid", 0) or 0))

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    def on_parent_death(signum: int, frame: object) -> None:
        if parent.check():
            stop.set()

    # Handlers first, then ask for the signal, then look: a parent that dies at
    # any point is seen.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if parent.pid:
        signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
        _ask_for_parent_death_signal()
    try:
        if parent.check():
            return 0
        return _serve(args, stop, parent)
    finally:
        if parent.gone:
            log.warning("the process that started this device (PID %d) is gone: stopping", parent.pid)
            _remove_owned_dir(getattr(args, "owned_dir", None))


def _serve(args: argparse.Namespace, stop: threading.Event, parent: _Parent) -> int:
    from .model import VirtioNetModel
    from .server import VfioUserServer

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="pmd-sim[%(process)d] %(levelname)s %(name)s: %(message)s")
    mode = int(str(args.mode), 8)
    cpu = getattr(args, "cpu", None)
    if cpu is not None:
        pin_to_cpu(cpu)          # before any thread: the engine and server threads inherit it
    models: list[VirtioNetModel] = []
    servers: list[VfioUserServer] = []
    control: _Control | None = None
    try:
        opts = _model_options(args)
        paths = [args.socket]
        wires = _wires(args)
        if args.wire == "pair":
            paths.append(args.peer_socket or args.socket + PEER_SUFFIX)
        for k, wire in enumerate(wires):
            o = dict(opts)
            if k and "mac" in o:
                o["mac"] = o["mac"][:5] + bytes([(o["mac"][5] + k) & 0xFF])
            elif k:
                from .net import DEFAULT_MAC
                o["mac"] = DEFAULT_MAC[:5] + bytes([DEFAULT_MAC[5] + k])
            models.append(VirtioNetModel(wire=wire, name=f"pmd-sim{k}", **o))
        for model, path in zip(models, paths):
            server = VfioUserServer(model, path, mode=mode)
            servers.append(server)
            server.serve_in_thread()
        control = _Control(args.socket + CONTROL_SUFFIX, models, stop)
        ready = {"ready": True, "pid": os.getpid(), "sockets": paths, "control": control.path}
        if parent.check() or stop.is_set():
            return 0
        if args.ready_fd >= 0:
            os.write(args.ready_fd, json.dumps(ready).encode() + b"\n")
            os.close(args.ready_fd)
        else:
            print(f"pmd sim: serving a virtio-net device ({args.wire} wire) on {', '.join(paths)}; "
                  f"control socket {control.path}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if parent.check():
                break
        return 0
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.close()
        if control is not None:
            control.close()
        for model in models:
            with contextlib.suppress(Exception):
                model.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pmd.sim",
                                     description="pmd's built-in virtio-net device, served over vfio-user")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except (PmdError, OSError, ValueError) as e:
        print(f"pmd sim: {e}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------ the parent side

_OPTION_FLAGS = {
    "wire": "--wire", "mac": "--mac", "queue_pairs": "--queue-pairs", "queue_size": "--queue-size",
    "mtu": "--mtu", "msix_vectors": "--msix-vectors", "features_off": "--features-off",
    "pcap_in": "--pcap-in", "pcap_out": "--pcap-out", "loop": "--loop", "rate": "--rate", "size": "--size",
    "flows": "--flows", "count": "--count", "tap": "--tap", "peer_socket": "--peer-socket", "mode": "--mode",
    "log_level": "--log-level", "dgram_local": "--dgram-local", "dgram_remote": "--dgram-remote",
    "cpu": "--cpu",
}


def pin_to_cpu(cpu: int) -> None:
    """Run every thread of this process on ``cpu`` only, the ones there already (numpy's
    BLAS makes some at import) and, through the calling thread, those made from now on;
    a CPU this process may not use is a clear error."""
    try:
        os.sched_setaffinity(0, {cpu})
    except (OSError, OverflowError, ValueError) as e:
        raise ValueError(f"cannot run on CPU {cpu} ({e}): choose one of the CPUs this machine lets "
                         f"this process use ({usable_cpus_text()})") from None
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):   # a thread that just ended
            os.sched_setaffinity(int(tid), {cpu})


def usable_cpus_text() -> str:
    return ", ".join(map(str, sorted(os.sched_getaffinity(0))))


def _option_args(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        if key == "link_up":
            if not value:
                argv.append("--link-down")
            continue
        if key == "tap_netns":
            argv += ["--netns", str(value)]
            continue
        flag = _OPTION_FLAGS.get(key)
        if flag is None:
            raise TypeError(f"unknown built-in device option {key!r}; known: "
                            f"{', '.join(sorted([*_OPTION_FLAGS, 'link_up', 'tap_netns']))}")
        if key == "features_off" and not isinstance(value, str):
            value = ",".join(value) if isinstance(value, (list, tuple)) else str(value)
        if key == "mac" and isinstance(value, bytes):
            value = value.hex(":")
        if key == "mode" and isinstance(value, int):
            value = f"{value:o}"
        argv += [flag, str(value)]
    return argv


def _cleanup(proc: subprocess.Popen[bytes], paths: list[str], tmpdir: str | None, timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pmd sim process %d did not stop within %.1f s: killing it", proc.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    for path in paths:                   # left behind only if it was killed
        with contextlib.suppress(FileNotFoundError):
            if Path(path).is_socket():
                os.unlink(path)
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


class SimProcess:
    """A built-in device running in a child process (made by :func:`spawn_device`)."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: str, sockets: list[str], control_path: str,
                 log_path: str, tmpdir: str | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.socket_path = socket_path
        self.sockets = sockets
        self.peer_socket_path = sockets[1] if len(sockets) > 1 else None
        self.control_path = control_path
        self.log_path = log_path
        self._tmpdir = tmpdir
        self._finalizer = weakref.finalize(self, _cleanup, proc, [*sockets, control_path], tmpdir, STOP_TIMEOUT)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def control(self, op: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
        """Send one control request; returns the reply, raises :class:`SimError` when it failed."""
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            try:
                s.connect(self.control_path)
                s.sendall(request)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except OSError as e:
                raise SimError(f"pmd sim process {self.pid}: control request {op!r} failed: {e}") from e
        if not buf:
            raise SimError(f"pmd sim process {self.pid}: no answer to {op!r}")
        reply: dict[str, Any] = json.loads(buf)
        if not reply.get("ok"):
            raise SimError(f"pmd sim process {self.pid}: {op!r} refused: {reply.get('error')}")
        return reply

    def set_link(self, up: bool, device: int = 0) -> None:
        self.control("set_link", up=up, device=device)

    def stats(self) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self.control("stats")["devices"]
        return devices

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL (this PID only); remove what is left. Idempotent."""
        if self._finalizer.alive:
            self._finalizer.detach()
            _cleanup(self.proc, [*self.sockets, self.control_path], self._tmpdir, timeout)
        return self.proc.returncode

    def __enter__(self) -> "SimProcess":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SimProcess pid {self.pid} {self.socket_path} {'running' if self.running else 'stopped'}>"


def _child_env() -> dict[str, str]:
    """The environment of the device process: this one, with the pmd package that
    is running here first on its path, so the device runs the same pmd as the
    driver that started it (not whichever one its working directory or an
    editable install would find). The device never calls BLAS: numpy's OpenBLAS
    gets one thread, not a pool of idle ones competing with the engine's core."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env.setdefault(var, "1")
    here = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return env


# ``python -m pmd.sim`` would put the working directory ahead of PYTHONPATH on the
# child's sys.path, so a checkout there would shadow the pmd running here: the
# child's first path entry is set to this pmd's root instead.
_CHILD_MAIN = ("import sys; sys.path[0] = {root!r}; from pmd.sim.process import main; "
               "sys.argv[0] = 'python -m pmd.sim'; sys.exit(main(sys.argv[1:]))"
               .format(root=str(Path(__file__).resolve().parent.parent.parent)))


def spawn_device(tmpdir: str | os.PathLike[str] | None = None, *, socket_path: str | None = None,
                 timeout: float = READY_TIMEOUT, netns: str | None = None, python: str | None = None,
                 **options: Any) -> SimProcess:
    """Start ``python -m pmd.sim`` and return once it serves.

    ``tmpdir``: where the socket (``dev.sock``), control socket and log go (a new
    temporary directory, removed on stop, when None). ``netns``: run the process
    inside that network namespace (``ip netns exec``). ``options``: the device's
    (``wire``, ``mac``, ``queue_pairs``, ``queue_size``, ``mtu``, ``msix_vectors``,
    ``features_off``, ``link_up``, ``pcap_in``, ``pcap_out``, ``loop``, ``rate``,
    ``size``, ``flows``, ``count``, ``tap``, ``tap_netns``, ``peer_socket``, ``mode``,
    ``log_level``, ``cpu``: the CPU its threads run on). Raises :class:`SimError` with the process's log when it
    does not come up within ``timeout`` seconds (and kills it).
    """
    option_argv = _option_args(options)           # a bad option fails before anything exists
    cpu = options.get("cpu")
    if cpu is not None and (not isinstance(cpu, int) or isinstance(cpu, bool) or not 0 <= cpu < (os.cpu_count() or 1)):
        raise ValueError(f"cpu={cpu!r}: give a CPU number from 0 to {(os.cpu_count() or 1) - 1}")
    own_dir = None
    if tmpdir is None:
        own_dir = tempfile.mkdtemp(prefix="pmd-sim-")
        tmpdir = own_dir
    directory = Path(tmpdir)
    path = socket_path or str(directory / "dev.sock")
    log_path = str(directory / f"sim-{Path(path).name}.log")
    argv = [python or sys.executable, "-c", _CHILD_MAIN, "--socket", path, *option_argv,
            "--parent-pid", str(os.getpid())]
    if own_dir is not None:
        argv += ["--owned-dir", own_dir]     # removed by the device if this process dies first
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    r, w = os.pipe2(os.O_CLOEXEC)
    logf = open(log_path, "ab")
    try:
        argv += ["--ready-fd", str(w)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                                start_new_session=True, env=_child_env())
    except BaseException:
        os.close(r)
        os.close(w)
        logf.close()
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
        raise
    os.close(w)
    logf.close()
    ready: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while ready is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            rl, _, _ = select.select([r], [], [], left)
            if not rl:
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break                      # the process exited (or closed the pipe) without being ready
            buf += chunk
            if b"\n" in buf:
                ready = json.loads(buf.split(b"\n", 1)[0])
    finally:
        os.close(r)
    if ready is None:
        _cleanup(proc, [path, path + CONTROL_SUFFIX], None, 1.0)
        try:
            text = Path(log_path).read_text(errors="replace").strip()
        except OSError:
            text = ""
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
        why = (f"exited with status {proc.returncode}" if proc.returncode not in (None, -signal.SIGKILL,
                                                                                   -signal.SIGTERM)
               else f"was not ready within {timeout} s")
        raise SimError(f"the built-in device process ({' '.join(argv)}) {why}" + (f":\n{text}" if text else ""))
    return SimProcess(proc, path, list(ready["sockets"]), str(ready["control"]), log_path, own_dir)


__all__ = ["spawn_device", "SimProcess", "SimError", "main", "serve", "add_arguments"]
