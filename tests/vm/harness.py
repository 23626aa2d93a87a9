#!/usr/bin/env python3
"""Run a command inside a QEMU guest where QEMU's virtio-net is bound to vfio-pci.

The host kernel of these machines has no VFIO, so real VFIO is reached inside a
QEMU guest under TCG (see ``docs/qemu.md`` and ``shared/QEMU-VFIO.md``):

* the guest kernel is a Debian ``/boot/vmlinuz-*`` that has ``/lib/modules``;
* the initramfs (built here, cached in ``tests/vm/.cache/``) is busybox-static
  plus the needed modules and ``tests/vm/init.sh`` as ``/init``;
* the guest's root is the host's own ``/`` (9p, read-only) under an overlay with
  a tmpfs upper layer, so the host's Python and this checkout work unchanged;
* QEMU's ``virtio-net-pci`` sits at ``0000:00:03.0`` behind an emulated Intel
  IOMMU and is bound to ``vfio-pci`` before the command runs
  (``PMD_VFIO_DEVICE``); optionally a transitional device with the legacy
  interface at ``0000:00:04.0`` (``PMD_VFIO_LEGACY_DEVICE``) and a NIC driven by
  the guest kernel at ``0000:00:05.0`` (``PMD_VM_KNIC``, for checking the wire),
  and a modern device without MSI-X (``vectors=0``: it interrupts on INTx) at
  ``0000:00:06.0`` (``PMD_VFIO_INTX_DEVICE``), and one with RSS and hash report on
  a multi-queue tap that sends the guest's frames back at ``0000:00:0b.0``
  (``PMD_VFIO_RSS_DEVICE``; QEMU then runs in a network namespace of its own);
* a host-side agent in this process answers requests that the guest sends over
  a virtio-serial port (``tests/vm/guest.py``): ``set_link`` and any QMP
  command, and frames sent or received on the devices' ``-netdev dgram`` wires.

Python API::

    from harness import run_in_guest, available
    ok, why = available()
    r = run_in_guest(["python", "-m", "pytest", "-m", "vfio", "-q"], timeout=600)
    r.returncode, r.output

Command line (prints the guest's output as it comes, exits with its status)::

    python tests/vm/harness.py -- python -m pytest -m vfio -q

Only the standard library is used, so this file runs with any Python >= 3.9.
"""
from __future__ import annotations

import argparse
import base64
import collections
import ctypes
import dataclasses
import hashlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, TextIO, Union

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
SETUP_SH = HERE / "setup.sh"
INIT_SH = HERE / "init.sh"
CACHE_DIR = Path(os.environ.get("PMD_VM_CACHE", str(HERE / ".cache")))
QEMU = os.environ.get("PMD_VM_QEMU", "qemu-system-x86_64")
BUSYBOX = os.environ.get("PMD_VM_BUSYBOX", "/bin/busybox")

#: Modules the guest needs (their dependencies are added from ``modinfo``).
MODULES = (
    "virtio_pci", "9pnet_virtio", "9p", "overlay",
    "vfio", "vfio_iommu_type1", "vfio_pci",
    "virtio_console",            # the host request channel (virtio-serial)
    "virtio_net",                # only loaded when the kernel NIC is present
)

#: The fixed PCI layout of the guest.
MODERN_BDF = "0000:00:03.0"      # virtio-net-pci, modern only, iommu_platform=on
LEGACY_BDF = "0000:00:04.0"      # transitional virtio-net-pci (legacy I/O BAR0)
KNIC_BDF = "0000:00:05.0"        # virtio-net-pci driven by the guest kernel
INTX_BDF = "0000:00:06.0"        # virtio-net-pci without MSI-X (vectors=0): INTx only
NOIOMMU_BDF = "0000:00:07.0"     # virtio-net-pci in a guest without vIOMMU (no-IOMMU mode)
RSS_BDF = "0000:00:0b.0"         # virtio-net-pci with RSS and hash report on a multi-queue tap

#: The RSS device's tap: RSS_QUEUES queues, in a network namespace of QEMU's own
#: (see _rss_netns), where tc sends every frame the guest transmits back to it.
RSS_TAP, RSS_QUEUES, RSS_MAC = "pmdrss0", 2, "52:54:00:12:34:56"

#: Where no-IOMMU mode's vfio.ko is built from (Debian's linux-source-6.1 and the
#: guest kernel's headers, both installed by setup.sh).
KERNEL_SOURCE = Path(os.environ.get("PMD_VM_KERNEL_SOURCE", "/usr/src/linux-source-6.1.tar.xz"))
HOSTROOT_ADDR, RESULTS_ADDR, SERIAL_ADDR = "08.0", "09.0", "0a.0"

#: The guest's networks: name -> (QEMU device id, netdev id, host socket, guest socket, MAC)
NETS = {
    "modern": ("pmd0", "n0", "host.sock", "guest.sock", "52:54:00:12:34:51"),
    "legacy": ("pmd1", "n1", "host-legacy.sock", "guest-legacy.sock", "52:54:00:12:34:52"),
    "knic": ("knic0", "nk", "host-knic.sock", "guest-knic.sock", "52:54:00:12:34:53"),
    "intx": ("pmd2", "n2", "host-intx.sock", "guest-intx.sock", "52:54:00:12:34:54"),
    "noiommu": ("pmd3", "n3", "host-noiommu.sock", "guest-noiommu.sock", "52:54:00:12:34:55"),
}

PORT_NAME = "pmd.host"           # /dev/virtio-ports/pmd.host in the guest

#: Host environment variables passed into the guest (plus PMD_*, HYPOTHESIS_*).
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "PYTHONPATH", "PYTHONHASHSEED",
            "VIRTUAL_ENV", "CI", "PYTEST_ADDOPTS")

#: Exit status reported when the hard timeout killed the guest (as timeout(1)).
TIMEOUT_STATUS = 124


class HarnessError(RuntimeError):
    """The guest could not be run (missing QEMU or kernel, QEMU failed, no status)."""


@dataclasses.dataclass
class GuestResult:
    """What came back from the guest."""

    returncode: int                 #: the command's exit status (124 on timeout)
    output: str                     #: its stdout and stderr, interleaved
    timed_out: bool = False         #: the hard timeout killed QEMU
    console: str = ""               #: the guest's serial console (kernel log, init)
    #: seconds: ``boot`` (QEMU start to the command starting), ``command``, ``total``
    timings: dict = dataclasses.field(default_factory=dict)
    #: requests the guest made to the host agent: (op, ok) pairs
    requests: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# --------------------------------------------------------------------------- checks

def find_kernel() -> tuple[str, Path]:
    """The guest kernel: ``(version, /boot/vmlinuz-VERSION)``, the newest that has modules.

    ``PMD_VM_KERNEL=/boot/vmlinuz-X`` chooses one.  The host's running kernel is
    irrelevant (here a Firecracker build without modules).
    """
    forced = os.environ.get("PMD_VM_KERNEL")
    candidates = [Path(forced)] if forced else sorted(Path("/boot").glob("vmlinuz-*"))
    found = []
    for k in candidates:
        ver = k.name[len("vmlinuz-"):]
        if k.is_file() and (Path("/lib/modules") / ver / "kernel").is_dir():
            found.append((_version_key(ver), ver, k))
    if not found:
        raise HarnessError(
            "no guest kernel: need /boot/vmlinuz-V with /lib/modules/V "
            "(run `sh tests/vm/setup.sh`, which installs linux-image-amd64)")
    _, ver, k = max(found)
    return ver, k


def _version_key(ver: str):
    parts = []
    for p in ver.replace("-", ".").split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return parts


def _which_qemu() -> Optional[str]:
    return shutil.which(QEMU) if os.sep not in QEMU else (QEMU if os.access(QEMU, os.X_OK) else None)


def available() -> tuple[bool, str]:
    """Whether a guest can be run here, and if not, why (for ``pytest.skip``)."""
    if os.environ.get("PMD_IN_GUEST"):
        return False, "already inside the QEMU guest (no nested guest under TCG)"
    if sys.platform != "linux":
        return False, "the QEMU guest harness needs Linux"
    if _which_qemu() is None:
        return False, f"{QEMU} not found (run `sh tests/vm/setup.sh` to install qemu-system-x86)"
    try:
        find_kernel()
    except HarnessError as e:
        return False, str(e)
    if not os.access(BUSYBOX, os.X_OK):
        return False, f"{BUSYBOX} not found (run `sh tests/vm/setup.sh` to install busybox-static)"
    if shutil.which("modinfo") is None:
        return False, "modinfo not found (run `sh tests/vm/setup.sh` to install kmod)"
    if not hasattr(socket, "AF_UNIX"):
        return False, "no UNIX sockets"
    return True, "QEMU, a guest kernel with modules and busybox are present"


def ensure_installed(quiet: bool = False) -> None:
    """Run ``tests/vm/setup.sh`` (installs the Debian packages when missing)."""
    env = dict(os.environ)
    if quiet:
        env["PMD_VM_SETUP_QUIET"] = "1"
    r = subprocess.run(["sh", str(SETUP_SH)], env=env)
    if r.returncode != 0:
        raise HarnessError(f"{SETUP_SH} failed with status {r.returncode}")


# --------------------------------------------------------------------------- initramfs

def resolve_modules(kver: str, names: Iterable[str] = MODULES) -> list[Path]:
    """Module files for ``names`` and their dependencies, dependencies first."""
    order: list[Path] = []
    seen: set[str] = set()

    def info(name: str, field: str) -> str:
        r = subprocess.run(["modinfo", "-k", kver, "-F", field, name],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise HarnessError(f"modinfo -k {kver} {name}: {r.stderr.strip() or 'failed'}")
        return r.stdout.strip()

    def visit(name: str, chain: tuple) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        if key in chain:
            raise HarnessError(f"module dependency loop: {' -> '.join(chain + (key,))}")
        filename = info(name, "filename")
        if filename in ("", "(builtin)") or not filename.startswith("/"):
            seen.add(key)
            return
        for dep in filter(None, info(name, "depends").split(",")):
            visit(dep.strip(), chain + (key,))
        seen.add(key)
        order.append(Path(filename))

    for n in names:
        visit(n, ())
    return order


def _cpio_newc(entries) -> bytes:
    """A ``newc`` cpio archive from (name, mode, data, rdev_major, rdev_minor) entries."""
    out = bytearray()

    def pad4():
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rmaj, rmin) in enumerate(list(entries) + [("TRAILER!!!", 0, b"", 0, 0)], 1):
        namez = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(namez), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + namez
        pad4()
        out += data
        pad4()
    return bytes(out)


def _kernel_headers(kver: str) -> Path:
    return Path(f"/usr/src/linux-headers-{kver}")


def noiommu_available(kver: Optional[str] = None) -> tuple[bool, str]:
    """Whether no-IOMMU mode's vfio.ko can be built here, and if not, why."""
    try:
        kver = kver or find_kernel()[0]
    except HarnessError as e:
        return False, str(e)
    if not KERNEL_SOURCE.is_file():
        return False, (f"{KERNEL_SOURCE} not found: no-IOMMU mode needs vfio.ko rebuilt with "
                       "CONFIG_VFIO_NOIOMMU (run `sh tests/vm/setup.sh`, which installs linux-source-6.1)")
    if not (_kernel_headers(kver) / "Makefile").is_file():
        return False, (f"{_kernel_headers(kver)} not found: the guest kernel's headers build the "
                       "no-IOMMU vfio.ko (run `sh tests/vm/setup.sh`, which installs linux-headers-amd64)")
    for tool in ("make", "tar"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found: needed to build the no-IOMMU vfio.ko"
    return True, "linux-source-6.1 and the guest kernel's headers are present"


def build_noiommu_vfio(kver: Optional[str] = None) -> Path:
    """``vfio.ko`` of the guest kernel rebuilt with ``CONFIG_VFIO_NOIOMMU`` (Debian's stock
    kernel compiles no-IOMMU mode out), cached in the cache directory.

    Only ``drivers/vfio``'s core (vfio_main, container, iova_bitmap) is taken out of the
    kernel source and built as an external module against the guest kernel's headers,
    so the symbol versions match the stock vfio_pci and vfio_iommu_type1: about 15 s
    the first time, nothing afterwards.
    """
    kver = kver or find_kernel()[0]
    ok, why = noiommu_available(kver)
    if not ok:
        raise HarnessError(why)
    headers = _kernel_headers(kver)
    st = KERNEL_SOURCE.stat()
    h = hashlib.sha256(f"{kver}:{st.st_size}:{st.st_mtime_ns}:{(headers / 'Module.symvers').stat().st_mtime_ns}"
                       .encode() + _NOIOMMU_KBUILD.encode())
    out = CACHE_DIR / f"noiommu-{kver}-{h.hexdigest()[:16]}" / "vfio.ko"
    if out.is_file():
        return out
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="noiommu-build-", dir=CACHE_DIR))
    try:
        top = "linux-source-6.1"
        files = [f"{top}/drivers/vfio/{n}" for n in ("vfio_main.c", "container.c", "iova_bitmap.c", "vfio.h")]
        r = subprocess.run(["tar", "-xJf", str(KERNEL_SOURCE), "-C", str(work), *files],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise HarnessError(f"extracting drivers/vfio from {KERNEL_SOURCE} failed: {r.stderr.strip()}")
        src = work / top / "drivers" / "vfio"
        (src / "Kbuild").write_text(_NOIOMMU_KBUILD)
        r = subprocess.run(["make", "-s", "-C", str(headers), f"M={src}", "modules"],
                           capture_output=True, text=True)
        if r.returncode != 0 or not (src / "vfio.ko").is_file():
            raise HarnessError(f"building the no-IOMMU vfio.ko failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        subprocess.run(["strip", "--strip-debug", str(src / "vfio.ko")], capture_output=True)
        info = subprocess.run(["modinfo", "-F", "vermagic", str(src / "vfio.ko")], capture_output=True, text=True)
        if not info.stdout.startswith(kver + " "):
            raise HarnessError(f"the no-IOMMU vfio.ko is for {info.stdout.strip()!r}, not the guest kernel "
                               f"{kver}: linux-source-6.1 and the kernel image are different versions")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(src / "vfio.ko", tmp)
        os.replace(tmp, out)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# CONFIG_VFIO_NOIOMMU is off in the kernel's autoconf.h: defined for this module only
# (the code tests it with #ifdef and IS_ENABLED; the other vfio modules do not).
_NOIOMMU_KBUILD = ("obj-m := vfio.o\nvfio-y := vfio_main.o iova_bitmap.o container.o\n"
                   "ccflags-y := -DCONFIG_VFIO_NOIOMMU=1\n")


def build_initramfs(kver: Optional[str] = None, *, force: bool = False,
                    replace: Optional[dict] = None) -> Path:
    """Build (or reuse from the cache) the guest's initramfs; returns its path.

    ``replace``: module name -> a file to pack instead of the kernel's own (no-IOMMU
    mode's vfio.ko)."""
    if kver is None:
        kver = find_kernel()[0]
    if not os.access(BUSYBOX, os.X_OK):
        raise HarnessError(f"{BUSYBOX} not found (run `sh tests/vm/setup.sh`)")
    mods = resolve_modules(kver)
    for name, path in (replace or {}).items():
        hits = [i for i, m in enumerate(mods) if m.name.split(".")[0].replace("-", "_") == name]
        if not hits:
            raise HarnessError(f"module {name} is not in the guest's module list")
        mods[hits[0]] = Path(path)
    init = INIT_SH.read_bytes()
    busybox = Path(BUSYBOX).read_bytes()
    h = hashlib.sha256(init + busybox)
    for m in mods:
        st = m.stat()
        h.update(f"{m}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(_cpio_newc.__code__.co_code)
    path = CACHE_DIR / f"initramfs-{kver}-{h.hexdigest()[:16]}.cpio"
    if path.exists() and not force:
        return path
    names = []
    entries = []
    for d in ("bin", "dev", "proc", "sys", "lower", "rw", "newroot", "share", "modules"):
        entries.append((d, 0o040755, b"", 0, 0))
    entries.append(("dev/console", 0o020600, b"", 5, 1))
    entries.append(("bin/busybox", 0o100755, busybox, 0, 0))
    entries.append(("bin/sh", 0o120777, b"busybox", 0, 0))
    entries.append(("init", 0o100755, init, 0, 0))
    for m in mods:
        name = m.name.replace("-", "_")
        names.append(name)
        entries.append((f"modules/{name}", 0o100644, m.read_bytes(), 0, 0))
    entries.append(("modules/order", 0o100644, "".join(n + "\n" for n in names).encode(), 0, 0))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for old in CACHE_DIR.glob("initramfs-*.cpio"):       # stale builds (not one in use now)
        try:
            if old != path and time.time() - old.stat().st_mtime > 3600:
                old.unlink()
        except OSError:
            pass
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(_cpio_newc(entries))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- host agent

class _QMP:
    """A minimal synchronous QMP client on QEMU's monitor socket."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events: list = []
        self._read()                                    # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HarnessError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: Optional[dict] = None) -> dict:
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            return r

    def close(self):
        self.sock.close()


class _Agent:
    """Answers the guest's requests (one JSON object per line on the virtio-serial port).

    Request: ``{"id": N, "op": OP, ...}``; reply ``{"id": N, "ok": true, "result": ...}``
    or ``{"id": N, "ok": false, "error": "..."}``.  Ops: ``ping``, ``set_link``
    (``name``, ``up``), ``qmp`` (``execute``, ``arguments``), ``send`` (``net``,
    ``frames`` as base64), ``recv`` (``net``, ``max``, ``count``, ``wait`` seconds),
    ``clear`` (``net``), ``nets``; and for traffic tests that must not ship every
    frame over the serial port: ``traffic`` (``net``, ``count``, ``seed``,
    ``min_len``, ``max_len``, ``dst``, ``src``: the host generates the frames and
    sends them from a thread, waiting whenever QEMU's socket queue is full),
    ``traffic_check`` (``net``, ``mode`` io|macswap, ``wait``: compares what came
    back with what was sent, in order) and ``wire_digest`` (``net``, ``quiet``:
    how many frames the device sent and the SHA-256 of them in order).
    """

    def __init__(self, run: Path, nets: dict):
        self.run = run
        self.nets = nets                                  # name -> NETS entry
        self.sel = selectors.DefaultSelector()
        self.traffic: dict[str, list] = {}                # net -> frames the host sent
        self.checks: list = []                            # pending traffic_check / wire_digest
        self.wire: dict[str, socket.socket] = {}
        self.rx: dict[str, collections.deque] = {}
        self.port: Optional[socket.socket] = None
        self.port_buf = b""
        self.qmp: Optional[_QMP] = None
        self.pending: list = []                           # deferred recv requests
        self.log: list = []
        for name, (_dev, _nd, host, _guest, _mac) in nets.items():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(str(run / host))                       # before QEMU starts
            s.setblocking(False)
            self.wire[name] = s
            self.rx[name] = collections.deque(maxlen=65536)
            self.sel.register(s, selectors.EVENT_READ, ("wire", name))

    # -- connections made once QEMU has created its sockets
    def try_connect(self) -> None:
        if self.qmp is None and (self.run / "qmp.sock").exists():
            try:
                self.qmp = _QMP(str(self.run / "qmp.sock"))
            except (OSError, HarnessError):
                self.qmp = None
        if self.port is None and (self.run / "agent.sock").exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.run / "agent.sock"))
            except OSError:
                s.close()
                return
            s.setblocking(False)
            self.port = s
            self.sel.register(s, selectors.EVENT_READ, ("port", None))

    def close(self) -> None:
        for s in list(self.wire.values()) + ([self.port] if self.port else []):
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        if self.qmp:
            self.qmp.close()
        self.sel.close()

    # -- event loop step
    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            kind, name = key.data
            if kind == "wire":
                s = self.wire[name]
                while True:
                    try:
                        self.rx[name].append(s.recv(65536))
                    except BlockingIOError:
                        break
                    except OSError:
                        break
            elif kind == "port":
                try:
                    chunk = self.port.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:                             # QEMU went away
                    self.sel.unregister(self.port)
                    self.port.close()
                    self.port = None
                    continue
                self.port_buf += chunk
                while b"\n" in self.port_buf:
                    line, self.port_buf = self.port_buf.split(b"\n", 1)
                    if line.strip():
                        self._handle(line)
        self._service_pending()

    def _reply(self, msg: dict) -> None:
        if self.port is None:
            return
        data = json.dumps(msg).encode() + b"\n"
        self.port.setblocking(True)
        self.port.settimeout(10)
        try:
            self.port.sendall(data)
        except OSError:
            pass
        finally:
            self.port.setblocking(False)

    def _net(self, req: dict) -> str:
        name = req.get("net", "modern")
        for n, entry in self.nets.items():
            if name in (n, entry[0], entry[1]):
                return n
        raise ValueError(f"no network {name!r} in this guest (have {sorted(self.nets)})")

    def _handle(self, line: bytes) -> None:
        rid = None
        op = "?"
        try:
            req = json.loads(line)
            rid = req.get("id")
            op = req.get("op")
            if op == "ping":
                result = {"pong": True, "time": time.time()}
            elif op == "nets":
                result = {n: {"device": e[0], "netdev": e[1], "mac": e[4]} for n, e in self.nets.items()}
            elif op == "set_link":
                name = req.get("name", "modern")
                if name in self.nets:
                    name = self.nets[name][0]
                result = self._qmp("set_link", {"name": name, "up": bool(req["up"])})
            elif op == "qmp":
                result = self._qmp(req["execute"], req.get("arguments"))
            elif op == "send":
                net = self._net(req)
                dest = str(self.run / self.nets[net][3])
                n = 0
                for f in req.get("frames", []):
                    self.wire[net].sendto(base64.b64decode(f), dest)
                    n += 1
                result = {"sent": n}
            elif op == "recv":
                net = self._net(req)
                deadline = time.monotonic() + min(float(req.get("wait", 1.0)), 300.0)
                self.pending.append((rid, net, int(req.get("max", 64)),
                                     int(req.get("count", 1)), deadline))
                self.log.append((op, True))
                self._service_pending()
                return
            elif op == "traffic":
                net = self._net(req)
                frames = make_frames(int(req["count"]), int(req.get("seed", 0)),
                                     int(req.get("min_len", 60)), int(req.get("max_len", 1514)),
                                     bytes.fromhex(req.get("dst", "ffffffffffff")),
                                     bytes.fromhex(req.get("src", "020000000001")))
                self.traffic[net] = frames
                dest = str(self.run / self.nets[net][3])
                threading.Thread(target=_send_all, args=(self.wire[net], dest, frames),
                                 daemon=True, name=f"traffic-{net}").start()
                result = {"started": len(frames)}
            elif op in ("traffic_check", "wire_digest"):
                net = self._net(req)
                wait = min(float(req.get("wait", req.get("quiet", 1.0))), 600.0)
                self.checks.append((rid, op, net, req, time.monotonic() + wait, time.monotonic()))
                self.log.append((op, True))
                self._service_pending()
                return
            elif op == "clear":
                net = self._net(req)
                dropped = len(self.rx[net])
                self.rx[net].clear()
                result = {"dropped": dropped}
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:                            # reported to the guest
            self.log.append((op, False))
            self._reply({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        self.log.append((op, True))
        self._reply({"id": rid, "ok": True, "result": result})

    def _qmp(self, command: str, arguments: Optional[dict]):
        if self.qmp is None:
            self.try_connect()
        if self.qmp is None:
            raise RuntimeError("QMP monitor not connected")
        r = self.qmp.execute(command, arguments)
        if "error" in r:
            raise RuntimeError(f"QMP {command}: {r['error'].get('class')}: {r['error'].get('desc')}")
        return r.get("return")

    def _service_checks(self) -> None:
        now = time.monotonic()
        keep = []
        for rid, op, net, req, deadline, last in self.checks:
            q = self.rx[net]
            if op == "traffic_check":
                sent = self.traffic.get(net, [])
                if len(q) < len(sent) and now < deadline:
                    keep.append((rid, op, net, req, deadline, last))
                    continue
                got = [q.popleft() for _ in range(min(len(q), len(sent)))]
                result = compare_frames(sent, got, req.get("mode", "io"))
            else:
                quiet = float(req.get("quiet", 1.0))
                # done when nothing new arrived for `quiet` seconds (or the overall limit)
                size = len(q)
                if size != req.get("_seen"):
                    req["_seen"] = size
                    req["_since"] = now
                if now - req.get("_since", now) < quiet and now < deadline + 600:
                    keep.append((rid, op, net, req, deadline, last))
                    continue
                digest = hashlib.sha256()
                count = 0
                while q:
                    digest.update(q.popleft())
                    count += 1
                result = {"count": count, "sha256": digest.hexdigest()}
            self._reply({"id": rid, "ok": True, "result": result})
        self.checks = keep

    def _service_pending(self) -> None:
        self._service_checks()
        now = time.monotonic()
        keep = []
        for rid, net, mx, count, deadline in self.pending:
            q = self.rx[net]
            if len(q) >= count or now >= deadline:
                frames = [base64.b64encode(q.popleft()).decode() for _ in range(min(mx, len(q)))]
                self._reply({"id": rid, "ok": True, "result": {"frames": frames}})
            else:
                keep.append((rid, net, mx, count, deadline))
        self.pending = keep


def make_frames(count: int, seed: int, min_len: int, max_len: int, dst: bytes, src: bytes) -> list:
    """Deterministic random Ethernet frames: dst, src, ethertype 0x88b5 (local
    experimental), a 4-byte sequence number, random bytes."""
    import random

    rng = random.Random(seed)
    frames = []
    for i in range(count):
        n = rng.randint(min_len, max_len)
        body = i.to_bytes(4, "big") + rng.randbytes(max(0, n - 18))
        frames.append(dst + src + b"\x88\xb5" + body[: n - 14])
    return frames


def compare_frames(sent: list, got: list, mode: str) -> dict:
    """What came back against what was sent, in order. ``macswap``: the two MACs swapped."""
    mismatched = []
    for i, (a, b) in enumerate(zip(sent, got)):
        want = a[6:12] + a[0:6] + a[12:] if mode == "macswap" else a
        if want != b:
            mismatched.append(i)
    return {"sent": len(sent), "received": len(got), "matched": len(got) - len(mismatched),
            "mismatched": mismatched[:20], "n_mismatched": len(mismatched)}


def _send_all(sock: socket.socket, dest: str, frames: list) -> None:
    """Send every frame; when QEMU's queue is full, wait until it drains (nothing dropped here)."""
    import select

    for f in frames:
        while True:
            try:
                sock.sendto(f, dest)
                break
            except BlockingIOError:
                select.select([], [sock], [], 0.05)
            except OSError:
                return


# --------------------------------------------------------------------------- running

def _pdeathsig():                                          # runs in the child
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)                      # PR_SET_PDEATHSIG
    except Exception:
        pass


def _guest_env(env: Optional[dict], nets: dict) -> dict:
    out = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    for k, v in os.environ.items():
        if (k.startswith("PMD_") and not k.startswith(("PMD_VFIO_", "PMD_VM_"))) \
                or k.startswith("HYPOTHESIS_"):
            out[k] = v
    out.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
    out.setdefault("HOME", "/root")
    out.update({
        "PMD_IN_GUEST": "1",
        "PMD_VFIO_DEVICE": MODERN_BDF,
        "PMD_VM_PORT": f"/dev/virtio-ports/{PORT_NAME}",
        "PMD_VM_NETS": ",".join(nets),
        "PYTHONUNBUFFERED": "1",
    })
    if "legacy" in nets:
        out["PMD_VFIO_LEGACY_DEVICE"] = LEGACY_BDF
    if "knic" in nets:
        out["PMD_VM_KNIC"] = KNIC_BDF
    if "intx" in nets:
        out["PMD_VFIO_INTX_DEVICE"] = INTX_BDF
    if "noiommu" in nets:
        out["PMD_VFIO_NOIOMMU_DEVICE"] = NOIOMMU_BDF
    if "modern" not in nets:
        del out["PMD_VFIO_DEVICE"]
    if env:
        out.update({k: str(v) for k, v in env.items()})
    return out


def _rss_netns(argv: list[str]) -> list[str]:
    """``argv`` run in a new network namespace holding the RSS device's tap.

    QEMU's RSS (``rss=on``) runs on what its tap netdev receives, so the frames must
    come from outside the guest with known 5-tuples. The tap is multi-queue (one
    queue per pair, ``queues=``), up, with IPv6 off (no kernel chatter), and its
    ingress is redirected to its egress (tc ``mirred``): each frame the guest sends
    on any queue comes back through QEMU's receive path, where RSS picks its queue.
    The namespace exists only for QEMU (``unshare`` then ``exec``: QEMU keeps the
    PID), and goes with it and the tap when QEMU exits. Nothing leaves it.
    """
    tap = RSS_TAP
    script = "; ".join([
        "set -e",
        "for f in /proc/sys/net/ipv6/conf/default/disable_ipv6 /proc/sys/net/ipv6/conf/all/disable_ipv6; "
        "do [ -e $f ] && echo 1 > $f || true; done",
        f"ip tuntap add dev {tap} mode tap multi_queue",
        f"ip link set {tap} up",
        f"tc qdisc add dev {tap} ingress",
        f"tc filter add dev {tap} parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev {tap}",
        'exec "$@"',
    ])
    return ["unshare", "--net", "--", "sh", "-c", script, "pmd-rss-netns", *argv]


def _qemu_argv(kernel: Path, initrd: Path, run: Path, nets: dict, memory: int,
               smp: int, hugepages: int, aw_bits: int = 39, noiommu: bool = False,
               rss: bool = False) -> list[str]:
    # noiommu: no vIOMMU at all, so the devices have no IOMMU group and vfio-pci puts
    # them in no-IOMMU groups; DMA addresses are guest-physical.
    append = "console=ttyS0 " + ("" if noiommu else "intel_iommu=on ") + "panic=-1 quiet loglevel=4"
    iommu = [] if noiommu else [
        "-device", "intel-iommu,intremap=on,caching-mode=on" + ("" if aw_bits == 39 else f",aw-bits={int(aw_bits)}")]
    argv = [
        _which_qemu() or QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max",
        "-smp", str(smp), "-m", str(memory),
        "-machine", "q35,kernel-irqchip=split", *iommu,
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-serial", f"file:{run / 'console.log'}",
        "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
        "-fsdev", "local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot,addr={HOSTROOT_ADDR}",
        "-fsdev", f"local,id=fsres,path={run / 'share'},security_model=none,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=fsres,mount_tag=results,addr={RESULTS_ADDR}",
        "-chardev", f"socket,id=pmdhost,path={run / 'agent.sock'},server=on,wait=off",
        "-device", f"virtio-serial-pci,id=vser0,addr={SERIAL_ADDR}",
        "-device", f"virtserialport,bus=vser0.0,chardev=pmdhost,name={PORT_NAME}",
    ]
    addrs = {"modern": MODERN_BDF, "legacy": LEGACY_BDF, "knic": KNIC_BDF, "intx": INTX_BDF,
             "noiommu": NOIOMMU_BDF}
    for name, (dev, netdev, host, guest, mac) in nets.items():
        argv += ["-netdev", f"dgram,id={netdev},local.type=unix,local.path={run / guest},"
                            f"remote.type=unix,remote.path={run / host}"]
        opts = f"virtio-net-pci,id={dev},netdev={netdev},addr={addrs[name][-4:]},mac={mac},romfile="
        if name == "modern":
            # host_mtu: the device offers VIRTIO_NET_F_MTU 9000, for jumbo frames
            # over mergeable rx buffers; packed=on: it offers VIRTIO_F_RING_PACKED too,
            # so the driver test class runs on both ring layouts (tests/test_port.py).
            opts += ",disable-legacy=on,iommu_platform=on,host_mtu=9000,packed=on"
        elif name == "legacy":
            # Transitional: legacy I/O BAR0 and the modern capabilities.  QEMU refuses
            # iommu_platform=on with a legacy interface, so this device's DMA bypasses
            # the vIOMMU: its addresses are guest-physical (see docs/qemu.md).
            opts += ",disable-legacy=off,disable-modern=off"
        elif name == "intx":
            # No MSI-X capability (vectors=0) and no MSI (QEMU's virtio has none): the
            # device interrupts on its INTx pin, the cause in ISR (4.1.4.5).
            opts += ",disable-legacy=on,iommu_platform=on,vectors=0"
        elif name == "noiommu":
            # Modern, without ACCESS_PLATFORM: there is no IOMMU to go through.
            opts += ",disable-legacy=on"
        argv += ["-device", opts]
    if rss:
        # RSS and hash report need the control queue, MQ and a netdev with a queue per
        # pair; vhost=off: QEMU's own RSS in software (its eBPF program needs a
        # BPF-capable host, and hash=on is software-only in 7.2). Vectors: 2 per pair,
        # the control queue and the configuration.
        argv += ["-netdev", f"tap,id=nrss,ifname={RSS_TAP},script=no,downscript=no,queues={RSS_QUEUES},vhost=off",
                 "-device", f"virtio-net-pci,id=pmdrss,netdev=nrss,addr={RSS_BDF[-4:]},mac={RSS_MAC},romfile=,"
                            f"disable-legacy=on,iommu_platform=on,mq=on,rss=on,hash=on,vectors={2 * RSS_QUEUES + 2}"]
        argv = _rss_netns(argv)
    return argv


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


# The guest mounts fresh tmpfs file systems on /tmp and /run (init.sh).
_TMPFS_ROOTS = ("/tmp", "/run")


def _kept_dirs(cwd: str, env: dict) -> list:
    """Directories under the guest's fresh /tmp and /run that the command needs
    (this checkout, its cwd, the interpreter's prefix, PYTHONPATH entries): init.sh
    binds them back over the tmpfs, so a checkout in /tmp works in the guest."""
    wanted = [str(CHECKOUT), cwd, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))]
    wanted += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    keep: list = []
    for p in wanted:
        p = os.path.realpath(p)
        if not any(p == r or p.startswith(r + "/") for r in _TMPFS_ROOTS) or p in _TMPFS_ROOTS:
            continue
        if " " in p or not os.path.isdir(p):
            continue
        if not any(p == k or p.startswith(k + "/") for k in keep):
            keep = [k for k in keep if not k.startswith(p + "/")] + [p]
    return keep


def run_in_guest(command: Union[list, tuple], *, timeout: float = 600, legacy: bool = False,
                 env: Optional[dict] = None, cwd: Optional[Union[str, Path]] = None,
                 kernel_nic: bool = False, intx: bool = False, noiommu: bool = False,
                 rss: bool = False, stream: Optional[Union[TextIO, Callable]] = None,
                 memory: int = 1024, smp: int = 2, hugepages: int = 0, aw_bits: int = 39,
                 keep: Optional[bool] = None) -> GuestResult:
    """Boot a guest, run ``command`` in it, return its exit status and output.

    ``command`` runs with the host's root as the guest's root, in ``cwd`` (default:
    this checkout), with ``PMD_IN_GUEST=1``, ``PMD_VFIO_DEVICE=0000:00:03.0`` (bound
    to vfio-pci), ``env`` added, and a leading ``python``/``python3`` replaced by
    this interpreter (``sys.executable``).  ``legacy`` adds the transitional device
    (``PMD_VFIO_LEGACY_DEVICE``), ``kernel_nic`` a NIC driven by the guest kernel
    (``PMD_VM_KNIC``, its interface name in ``PMD_VM_KNIC_IFNAME``), ``intx`` a device
    without MSI-X bound to vfio-pci (``PMD_VFIO_INTX_DEVICE``).  ``noiommu`` boots with
    no vIOMMU and a vfio.ko rebuilt with CONFIG_VFIO_NOIOMMU (:func:`build_noiommu_vfio`),
    in no-IOMMU mode, with one device at 0000:00:07.0 (``PMD_VFIO_NOIOMMU_DEVICE``) and
    none of the others.  ``rss`` adds a device with RSS and hash report on a multi-queue
    tap that loops the guest's frames back (``PMD_VFIO_RSS_DEVICE``; :func:`_rss_netns`).
    ``stream``
    receives the output as it arrives (a file or a callable taking a str).

    ``timeout`` is a hard limit for everything (boot included): QEMU is then killed
    by its PID and the result has ``timed_out=True`` and ``returncode=124``.
    Raises :class:`HarnessError` when the guest cannot run or reports no status.
    """
    t0 = time.monotonic()
    command = [str(c) for c in command]
    if not command:
        raise ValueError("empty command")
    if noiommu and (legacy or intx or rss):
        raise ValueError("noiommu boots without a vIOMMU: the other devices need one")
    if command[0] in ("python", "python3"):
        command[0] = sys.executable
    if _which_qemu() is None:
        raise HarnessError(f"{QEMU} not found: run `sh tests/vm/setup.sh` (installs qemu-system-x86)")
    kver, kernel = find_kernel()
    initrd = build_initramfs(kver, replace={"vfio": build_noiommu_vfio(kver)} if noiommu else None)
    t_initrd = time.monotonic()
    if keep is None:
        keep = bool(os.environ.get("PMD_VM_KEEP"))
    cwd = str(Path(cwd).resolve()) if cwd else str(CHECKOUT)

    nets = {"noiommu": NETS["noiommu"]} if noiommu else {"modern": NETS["modern"]}
    if legacy:
        nets["legacy"] = NETS["legacy"]
    if kernel_nic:
        nets["knic"] = NETS["knic"]
    if intx:
        nets["intx"] = NETS["intx"]

    run = Path(tempfile.mkdtemp(prefix="pmd-vm-"))
    share = run / "share"
    share.mkdir()
    genv = _guest_env(env, nets)
    if rss:
        genv["PMD_VFIO_RSS_DEVICE"] = RSS_BDF
    bind = [NOIOMMU_BDF] if noiommu else \
        [MODERN_BDF] + ([LEGACY_BDF] if legacy else []) + ([INTX_BDF] if intx else []) + ([RSS_BDF] if rss else [])
    (share / "guest.conf").write_text(
        f"PMD_BIND={shlex.quote(' '.join(bind))}\n"
        f"PMD_KNIC={shlex.quote(KNIC_BDF if kernel_nic else '')}\n"
        f"PMD_HUGEPAGES={int(hugepages)}\n"
        f"PMD_NOIOMMU={1 if noiommu else 0}\n"
        f"PMD_KEEP={shlex.quote(' '.join(_kept_dirs(cwd, genv)))}\n")
    lines = ["#!/bin/sh", "# written by tests/vm/harness.py; runs chrooted in the guest"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(genv.items())]
    lines += ["[ -f /pmd-vm/guest.env ] && set -a && . /pmd-vm/guest.env && set +a",
              f"cd {shlex.quote(cwd)} || exit 97",
              "exec " + " ".join(shlex.quote(c) for c in command)]
    (share / "run.sh").write_text("\n".join(lines) + "\n")
    (share / "output").write_bytes(b"")

    agent = _Agent(run, nets)
    proc = None
    timed_out = False
    sent = 0
    t_start = t_cmd = t_end = None

    def emit(upto_end: bool = False):
        nonlocal sent
        if stream is None:
            return
        try:
            with open(share / "output", "rb") as f:
                f.seek(sent)
                data = f.read()
        except OSError:
            return
        if not upto_end:                                   # whole UTF-8 sequences only
            cut = len(data)
            while cut > 0 and cut > len(data) - 4 and (data[cut - 1] & 0xC0) == 0x80:
                cut -= 1
            if cut > 0 and data[cut - 1] >= 0xC0:
                cut -= 1
            data = data[:cut]
        if data:
            sent += len(data)
            text = data.decode("utf-8", "replace")
            if callable(stream):
                stream(text)
            else:
                stream.write(text)
                stream.flush()

    try:
        argv = _qemu_argv(kernel, initrd, run, nets, memory, smp, hugepages, aw_bits, noiommu, rss)
        (run / "qemu.argv").write_text(shlex.join(argv) + "\n")
        qlog = open(run / "qemu.log", "wb")
        t_start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                preexec_fn=_pdeathsig, start_new_session=True)
        qlog.close()
        deadline = t0 + timeout
        while True:
            if proc.poll() is not None:
                break
            if time.monotonic() >= deadline:
                timed_out = True
                proc.kill()
                proc.wait()
                break
            agent.try_connect()
            agent.poll(0.05)
            if t_cmd is None and (share / "started").exists():
                t_cmd = time.monotonic()
            emit()
        t_end = time.monotonic()
        emit(upto_end=True)
        output = (share / "output").read_bytes().decode("utf-8", "replace")
        console = _tail(run / "console.log", 200_000)
        timings = {"initramfs": round(t_initrd - t0, 3), "total": round(t_end - t0, 3)}
        if t_cmd is not None:
            timings["boot"] = round(t_cmd - t_start, 3)
            timings["command"] = round(t_end - t_cmd, 3)
        for name in ("started", "finished"):
            try:
                timings[f"guest_uptime_{name}"] = float((share / name).read_text().strip())
            except (OSError, ValueError):
                pass
        if timed_out:
            return GuestResult(TIMEOUT_STATUS, output, True, console, timings, agent.log)
        try:
            status = int((share / "status").read_text().strip())
        except (OSError, ValueError):
            qemu_log = _tail(run / "qemu.log")
            raise HarnessError(
                f"the guest reported no exit status (QEMU exited with {proc.returncode}, "
                f"{'after' if t_cmd else 'before'} the command started).\n"
                f"--- QEMU ---\n{qemu_log}\n--- console (tail) ---\n{console[-4000:]}\n"
                f"--- output (tail) ---\n{output[-2000:]}") from None
        return GuestResult(status, output, False, console, timings, agent.log)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        agent.close()
        if keep:
            print(f"harness: run directory kept: {run}", file=sys.stderr)
        else:
            shutil.rmtree(run, ignore_errors=True)


def run_pytest_in_guest(args: Iterable[str] = ("-m", "vfio", "-q"), *, expect_tests: bool = True,
                        **kwargs) -> GuestResult:
    """Run ``python -m pytest ARGS`` in the guest.

    pytest's status 5 ("no tests collected") stays 5 when ``expect_tests`` is true
    and becomes 0 when it is false (a selection that may legitimately be empty).
    """
    r = run_in_guest([sys.executable, "-m", "pytest", *args], **kwargs)
    if r.returncode == 5 and not expect_tests and not r.timed_out:
        r.returncode = 0
    return r


# --------------------------------------------------------------------------- CLI

def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python tests/vm/harness.py",
        description="Run a command in a QEMU guest whose virtio-net (0000:00:03.0) is bound to vfio-pci.",
        epilog="example: python tests/vm/harness.py -- python -m pytest -m vfio -q")
    p.add_argument("--timeout", type=float, default=600, help="hard limit in seconds (default 600)")
    p.add_argument("--legacy", action="store_true", help="add a transitional device at 0000:00:04.0")
    p.add_argument("--kernel-nic", action="store_true", help="add a kernel-driven NIC at 0000:00:05.0")
    p.add_argument("--intx", action="store_true", help="add a device without MSI-X (INTx) at 0000:00:06.0")
    p.add_argument("--noiommu", action="store_true",
                   help="no vIOMMU: vfio in no-IOMMU mode (rebuilt vfio.ko), one device at 0000:00:07.0")
    p.add_argument("--rss", action="store_true",
                   help="add a device with RSS and hash report on a looped-back multi-queue tap at 0000:00:0b.0")
    p.add_argument("--hugepages", type=int, default=0, help="2 MiB hugepages to reserve in the guest")
    p.add_argument("--aw-bits", type=int, default=39, choices=(39, 48),
                   help="address width of the emulated IOMMU (48 lets IOVA = user virtual address)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra guest environment")
    p.add_argument("--cwd", help="working directory in the guest (default: this checkout)")
    p.add_argument("--setup", action="store_true", help="run tests/vm/setup.sh first")
    p.add_argument("--build-only", action="store_true", help="build the initramfs and exit")
    p.add_argument("--allow-no-tests", action="store_true",
                   help="treat status 5 (pytest collected nothing) as success")
    p.add_argument("--keep", action="store_true", help="keep the run directory (console.log, ...)")
    p.add_argument("--console", action="store_true", help="print the guest console after the run")
    p.add_argument("--timings", action="store_true", help="print timings to stderr")
    p.add_argument("command", nargs="*", help="the command (after --)")
    a = p.parse_args(argv)
    try:
        if a.setup:
            ensure_installed()
        if a.build_only:
            t = time.monotonic()
            path = build_initramfs(force=True)
            print(f"{path} ({path.stat().st_size} bytes, {time.monotonic() - t:.2f} s)")
            return 0
        if not a.command:
            p.error("no command given (put it after --)")
        ok, why = available()
        if not ok:
            print(f"harness: cannot run the guest: {why}", file=sys.stderr)
            return 2
        env = dict(kv.split("=", 1) for kv in a.env)
        r = run_in_guest(a.command, timeout=a.timeout, legacy=a.legacy, kernel_nic=a.kernel_nic, intx=a.intx,
                         noiommu=a.noiommu, rss=a.rss,
                         env=env, cwd=a.cwd, stream=sys.stdout, hugepages=a.hugepages,
                         aw_bits=a.aw_bits,
                         keep=a.keep or None)
    except HarnessError as e:
        print(f"harness: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if a.console:
        sys.stderr.write(r.console)
    if a.timings:
        print(f"harness: timings {json.dumps(r.timings)}", file=sys.stderr)
    if r.timed_out:
        print(f"harness: TIMEOUT after {a.timeout:.0f} s: QEMU killed", file=sys.stderr)
    rc = r.returncode
    if rc == 5 and a.allow_no_tests:
        rc = 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
