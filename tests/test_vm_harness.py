"""The QEMU guest harness (tests/vm): host-side checks.

Tests marked ``qemu`` boot a TCG guest (see docs/qemu.md) and skip, with the
reason, where that cannot run (no QEMU or guest kernel: ``sh tests/vm/setup.sh``
installs them; or already inside the guest).  The others check the harness's
pieces (initramfs archive, host agent protocol, guest client) without QEMU.

Environment:
  PMD_VM_REQUIRE_VFIO_TESTS=1  an empty ``-m vfio`` selection in the guest fails
                               (default: it skips, while those tests are written)
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import pty
import socket
import sys
import threading
import time
import tty
from pathlib import Path

import pytest

VM = Path(__file__).resolve().parent / "vm"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, VM / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


harness = _load("pmd_vm_harness", "harness.py")
guest = _load("pmd_vm_guest", "guest.py")

AVAILABLE, WHY = harness.available()


# --------------------------------------------------------------------------- one boot

@pytest.fixture(scope="module")
def selfcheck():
    """Boot once (with the transitional device and a kernel NIC) and run selfcheck.py.

    The command also writes to stderr and exits 7, to check that both come back.
    """
    if not AVAILABLE:
        pytest.skip(f"QEMU guest unavailable: {WHY}")
    cmd = ["sh", "-c",
           f'{sys.executable} tests/vm/selfcheck.py; echo "selfcheck=$?"; '
           'echo "to-stderr" >&2; exit 7']
    t = time.monotonic()
    r = harness.run_in_guest(cmd, timeout=240, legacy=True, kernel_nic=True)
    wall = time.monotonic() - t
    found = [line for line in r.output.splitlines() if line.startswith("PMD-VM-SELFCHECK ")]
    facts = json.loads(found[-1].split(" ", 1)[1]) if found else None
    return r, facts, wall


def _facts(selfcheck):
    r, facts, _ = selfcheck
    assert facts is not None, f"no selfcheck report; output:\n{r.output}\n{r.console[-3000:]}"
    return facts


@pytest.mark.qemu
@pytest.mark.skipif(not AVAILABLE, reason=f"QEMU guest unavailable: {WHY}")
class TestGuest:
    def test_exit_status_and_output_come_back(self, selfcheck):
        r, _, wall = selfcheck
        assert not r.timed_out
        assert r.returncode == 7, r.output
        assert "selfcheck=0" in r.output, r.output
        assert "to-stderr" in r.output
        assert r.timings["boot"] > 0 and r.timings["total"] <= wall + 1

    def test_selfcheck_passed(self, selfcheck):
        assert _facts(selfcheck)["failures"] == []

    def test_environment(self, selfcheck):
        env = _facts(selfcheck)["env"]
        assert env["PMD_IN_GUEST"] == "1"
        assert env["PMD_VFIO_DEVICE"] == "0000:00:03.0"
        assert env["PMD_VFIO_LEGACY_DEVICE"] == "0000:00:04.0"
        assert env["PMD_VM_PORT"] == "/dev/virtio-ports/pmd.host"

    def test_modern_device_bound_to_vfio_pci(self, selfcheck):
        dev = _facts(selfcheck)["modern"]
        assert dev["driver"] == "vfio-pci"
        assert dev["device_id"] == "0x1041"            # modern-only virtio-net
        assert dev["group"].isdigit()
        assert dev["dev_vfio_group"] and dev["dev_vfio_vfio"]

    def test_transitional_device_bound_to_vfio_pci(self, selfcheck):
        dev = _facts(selfcheck)["legacy"]
        assert dev["driver"] == "vfio-pci"
        assert dev["device_id"] == "0x1000"            # transitional virtio-net
        assert dev["dev_vfio_group"]
        assert dev["group"] != _facts(selfcheck)["modern"]["group"]

    def test_set_link_reaches_qmp(self, selfcheck):
        facts = _facts(selfcheck)
        link = facts["set_link"]
        assert link["modern"] == "ok" and link["legacy"] == "ok"
        # the kernel-driven NIC shows that set_link changed the device's link
        assert link["knic_down_s"] >= 0 and link["knic_up_s"] >= 0
        r = selfcheck[0]
        assert r.requests.count(("set_link", True)) == 6

    def test_set_link_error_comes_back(self, selfcheck):
        err = _facts(selfcheck)["set_link_error"]
        assert err and "DeviceNotFound" in err

    def test_frames_both_ways(self, selfcheck):
        knic = _facts(selfcheck)["knic"]
        assert knic == {"guest_to_host": True, "sent": 1, "host_to_guest": True}


@pytest.mark.qemu
@pytest.mark.skipif(not AVAILABLE, reason=f"QEMU guest unavailable: {WHY}")
def test_hard_timeout_kills_the_guest():
    t = time.monotonic()
    r = harness.run_in_guest(["sleep", "600"], timeout=20)
    took = time.monotonic() - t
    assert r.timed_out and r.returncode == harness.TIMEOUT_STATUS
    assert took < 30


@pytest.mark.qemu
@pytest.mark.skipif(not AVAILABLE, reason=f"QEMU guest unavailable: {WHY}")
def test_vfio_suite_in_guest():
    """``pytest -m vfio`` in the guest, on this checkout, must pass.

    Collecting nothing (status 5) skips unless PMD_VM_REQUIRE_VFIO_TESTS=1.
    """
    require = os.environ.get("PMD_VM_REQUIRE_VFIO_TESTS", "") not in ("", "0")
    r = harness.run_pytest_in_guest(["-m", "vfio", "-q", "-p", "no:cacheprovider", "tests"],
                                    expect_tests=True, timeout=480)
    assert not r.timed_out, f"guest timed out; output:\n{r.output[-5000:]}"
    if r.returncode == 5 and not require:
        pytest.skip("no tests marked vfio were collected in the guest")
    assert r.returncode == 0, f"pytest -m vfio in the guest: status {r.returncode}\n{r.output[-8000:]}"


# --------------------------------------------------------------------------- no QEMU needed

def test_cpio_archive_round_trips(tmp_path):
    data = harness._cpio_newc([("d", 0o040755, b"", 0, 0),
                               ("d/f", 0o100644, b"hello", 0, 0),
                               ("dev/console", 0o020600, b"", 5, 1)])
    assert data.startswith(b"070701") and len(data) % 4 == 0
    names = []
    off = 0
    while True:
        hdr = data[off:off + 110]
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off:off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            break
        names.append((name, fields[1], body, fields[9], fields[10]))
    assert names == [("d", 0o040755, b"", 0, 0), ("d/f", 0o100644, b"hello", 0, 0),
                     ("dev/console", 0o020600, b"", 5, 1)]
    assert off == len(data)


@pytest.mark.skipif(not AVAILABLE, reason=f"QEMU guest unavailable: {WHY}")
def test_modules_resolve_dependencies_first():
    kver, _ = harness.find_kernel()
    mods = [m.name.split(".")[0].replace("-", "_") for m in harness.resolve_modules(kver)]
    for need in ("virtio_pci", "9p", "overlay", "vfio", "vfio_iommu_type1", "vfio_pci"):
        assert need in mods
    assert mods.index("virtio") < mods.index("virtio_pci")
    assert mods.index("vfio_pci_core") < mods.index("vfio_pci")
    assert mods.index("9pnet") < mods.index("9pnet_virtio") < mods.index("9p")
    assert len(mods) == len(set(mods))


def test_qemu_command_line(tmp_path):
    nets = {n: harness.NETS[n] for n in ("modern", "legacy")}
    argv = harness._qemu_argv(Path("/boot/vmlinuz-x"), Path("/i.cpio"), tmp_path, nets, 1024, 2, 0)
    line = " ".join(argv)
    assert "tcg,thread=multi,tb-size=256" in line and "q35,kernel-irqchip=split" in line
    assert "intel-iommu,intremap=on,caching-mode=on" in line
    assert "intel_iommu=on" in line and "console=ttyS0" in line
    assert ",addr=03.0," in line and "disable-legacy=on,iommu_platform=on" in line
    assert ",addr=04.0," in line and "disable-legacy=off" in line
    assert f"remote.path={tmp_path}/host.sock" in line and f"local.path={tmp_path}/guest.sock" in line
    assert f"unix:{tmp_path}/qmp.sock,server=on,wait=off" in line
    assert "aw-bits" not in line
    argv = harness._qemu_argv(Path("/k"), Path("/i"), tmp_path, nets, 1024, 2, 0, aw_bits=48)
    assert "intel-iommu,intremap=on,caching-mode=on,aw-bits=48" in argv


class _FakeQMP:
    def __init__(self):
        self.calls = []

    def execute(self, command, arguments=None):
        self.calls.append((command, arguments))
        if arguments and arguments.get("name") == "nope":
            return {"error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}}
        return {"return": {}}

    def close(self):
        pass


@pytest.fixture
def agent(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    a = harness._Agent(run, {"modern": harness.NETS["modern"]})
    a.qmp = _FakeQMP()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    a.port = theirs
    a.sel.register(theirs, harness.selectors.EVENT_READ, ("port", None))
    wire = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)    # stands in for QEMU
    wire.bind(str(run / "guest.sock"))
    wire.settimeout(2)
    ours.settimeout(2)

    def ask(req, polls=1):
        ours.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        deadline = time.monotonic() + 5
        while b"\n" not in buf and time.monotonic() < deadline:
            a.poll(0.05)
            try:
                ours.setblocking(False)
                buf += ours.recv(65536)
            except BlockingIOError:
                pass
            finally:
                ours.setblocking(True)
        return json.loads(buf.split(b"\n", 1)[0])

    yield a, ask, wire, run
    wire.close()
    ours.close()
    a.close()


def test_agent_ping_set_link_and_errors(agent):
    a, ask, _, _ = agent
    assert ask({"id": 1, "op": "ping"})["result"]["pong"] is True
    assert ask({"id": 2, "op": "set_link", "name": "modern", "up": False}) == {"id": 2, "ok": True, "result": {}}
    assert a.qmp.calls[-1] == ("set_link", {"name": "pmd0", "up": False})
    r = ask({"id": 3, "op": "set_link", "name": "nope", "up": True})
    assert r["ok"] is False and "DeviceNotFound" in r["error"]
    r = ask({"id": 4, "op": "frobnicate"})
    assert r["ok"] is False and "unknown op" in r["error"]
    r = ask({"id": 5, "op": "send", "net": "knic", "frames": []})
    assert r["ok"] is False and "no network" in r["error"]


def test_agent_frames_both_ways(agent):
    a, ask, wire, run = agent
    r = ask({"id": 1, "op": "send", "net": "modern",
             "frames": [base64.b64encode(b"\x01" * 60).decode(), base64.b64encode(b"\x02" * 64).decode()]})
    assert r["result"] == {"sent": 2}
    assert wire.recv(2048) == b"\x01" * 60 and wire.recv(2048) == b"\x02" * 64
    r = ask({"id": 2, "op": "recv", "wait": 0.1})              # nothing yet: empty after the wait
    assert r["result"] == {"frames": []}
    for i in range(3):
        wire.sendto(bytes([i]) * 60, str(run / "host.sock"))
    r = ask({"id": 3, "op": "recv", "count": 3, "max": 2, "wait": 2})
    assert [base64.b64decode(f) for f in r["result"]["frames"]] == [b"\x00" * 60, b"\x01" * 60]
    assert ask({"id": 4, "op": "clear"})["result"] == {"dropped": 1}


def test_guest_client_matches_reply_ids(monkeypatch):
    master, slave = pty.openpty()
    tty.setraw(slave)
    monkeypatch.setattr(guest, "PORT", os.ttyname(slave))
    seen = []

    def host():
        buf = b""
        while b"\n" not in buf:
            buf += os.read(master, 4096)
        req = json.loads(buf.split(b"\n")[0])
        seen.append(req)
        os.write(master, b'{"id": -1, "ok": true, "result": "stale"}\n')
        os.write(master, json.dumps({"id": req["id"], "ok": False, "error": "nope"}).encode() + b"\n")

    t = threading.Thread(target=host, daemon=True)
    t.start()
    with pytest.raises(guest.HostError, match="set_link: nope"):
        guest.set_link(False, timeout=5)
    t.join(5)
    assert seen[0]["op"] == "set_link" and seen[0]["up"] is False and seen[0]["name"] == "modern"
    os.close(master)
    os.close(slave)


def test_guest_client_times_out(monkeypatch):
    master, slave = pty.openpty()
    tty.setraw(slave)
    monkeypatch.setattr(guest, "PORT", os.ttyname(slave))
    t = time.monotonic()
    with pytest.raises(guest.HostError, match="no reply"):
        guest.ping(timeout=0.5)
    assert time.monotonic() - t < 3
    os.close(master)
    os.close(slave)


def test_available_says_why_inside_the_guest(monkeypatch):
    monkeypatch.setenv("PMD_IN_GUEST", "1")
    ok, why = harness.available()
    assert not ok and "inside the QEMU guest" in why
