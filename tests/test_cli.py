"""The ``pmd`` command, run as ``python -m pmd`` in a subprocess.

Three settings:

- a fake sysfs tree (``SYSFS_PCI_DEVICES``, the tree of tests/test_pci.py): status,
  info, and the only place ``bind``/``unbind`` ever run (in this process, as an
  ordinary user or as root: as root pmd refuses to write where the variable points);
- this machine's real sysfs, read only: ``status`` and ``info`` (never bind);
- marked ``vfio``, inside the QEMU guest of tests/vm, against QEMU's virtio-net bound to
  vfio-pci (``PMD_VFIO_DEVICE``): status, info with VFIO's view, and what pmd parsed
  against what ``lspci -vv`` reports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from pmd.cli import text as cli_text
from pmd.driver import sysfs as pci_sysfs
from pmd.abi.pci import parse_config

from .docblocks import block_after
from .test_pci import VIRTIO_NET, FakeSysfs

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "pci-config"
REAL_SYSFS = Path("/sys/bus/pci/devices")


def pmd_cmd(*args: str, sysfs: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m pmd ARGS``; with ``sysfs`` the command sees only that tree."""
    env = {k: v for k, v in os.environ.items() if k != "SYSFS_PCI_DEVICES"}
    if sysfs is not None:
        env["SYSFS_PCI_DEVICES"] = str(sysfs)
    return subprocess.run([sys.executable, "-m", "pmd", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[str], command: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pmd {command}: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture()
def sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


@pytest.fixture()
def vfio_dir(tmp_path: Path) -> Path:
    path = tmp_path / "dev-vfio"
    path.mkdir()
    (path / "vfio").touch()
    return path


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------

def test_status_on_a_fake_tree_lists_the_usable_device_first(sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1003})
    sysfs.add("0000:00:07.0", driver="vfio-pci", group=12)
    sysfs.add("0000:00:02.0", device=0x1042, class_code=0x018000, subsystem=(0x1AF4, 0x1042))
    (vfio_dir / "12").touch()
    r = pmd_cmd("status", "--vfio-dir", str(vfio_dir), sysfs=sysfs.root)
    assert r.returncode == 0 and r.stderr == ""
    usable, unusable = r.stdout.split("Devices pmd cannot use")
    assert f"0000:00:07.0 'virtio-net (modern)' 1af4:1041 drv=vfio-pci group=12  ({vfio_dir}/12)" in usable
    assert "0000:00:03.0 'virtio-net (modern)' 1af4:1041 drv=virtio-pci group=7 if=eth0*" in unusable
    assert "`pmd bind 0000:00:03.0` moves it to vfio-pci" in unusable
    assert "virtio-block (modern): pmd drives only virtio-net" in unusable
    assert "No device is usable" not in r.stdout


def test_status_on_a_fake_tree_says_why_nothing_is_usable(sysfs: FakeSysfs, tmp_path: Path) -> None:
    sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1003}, group=None)
    sysfs.add("0000:00:02.0", device=0x1042, class_code=0x018000, subsystem=(0x1AF4, 0x1042), group=None)
    r = pmd_cmd("status", "--vfio-dir", str(tmp_path / "no-vfio"), sysfs=sysfs.root)
    assert r.returncode == 0
    why = r.stdout.split("No device is usable by pmd now: ")[1]
    assert "this kernel offers no VFIO" in why
    assert "no device is in an IOMMU group" in why
    assert "0000:00:03.0 is bound to virtio-pci and carries eth0, which is up" in why


def test_status_without_any_virtio_net_device(sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:02.0", device=0x1042, class_code=0x018000, subsystem=(0x1AF4, 0x1042))
    r = pmd_cmd("status", "--vfio-dir", str(vfio_dir), sysfs=sysfs.root)
    assert r.returncode == 0 and "there is no virtio-net device on this machine" in r.stdout


def test_status_of_this_machine_read_only() -> None:
    if not REAL_SYSFS.is_dir():
        pytest.skip(f"{REAL_SYSFS} does not exist here")
    if os.environ.get("PMD_IN_GUEST"):
        pytest.skip("in the QEMU guest a device is usable: see TestInGuest")
    before = {p.name: p.stat().st_mtime for p in REAL_SYSFS.iterdir()}
    r = pmd_cmd("status")
    assert r.returncode == 0, r.stderr
    assert "Devices pmd can use now\n=======================\n<none>" in r.stdout
    why = r.stdout.split("No device is usable by pmd now: ")[1].split("\n")[0]
    assert why.endswith(".") and len(why) > 20
    rows = pci_sysfs.status_rows()
    assert not any(row.usable for row in rows)
    for row in rows:  # every device with its reason
        assert f"{row.address} '{row.name}'" in r.stdout and f"({row.reason})" in r.stdout
    if not Path("/dev/vfio/vfio").exists():
        assert "this kernel offers no VFIO (/dev/vfio/vfio does not exist" in why
    assert {p.name: p.stat().st_mtime for p in REAL_SYSFS.iterdir()} == before


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------

def test_info_of_a_config_file_is_format_info() -> None:
    path = DATA / "0000_00_03_0_1af4_1041.bin"
    r = pmd_cmd("info", "--config", str(path))
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == cli_text.format_info(path.read_bytes(), title=str(path))
    assert "0x98 [0x11] MSI-X            -> end   3 vectors, enabled" in r.stdout
    assert "notify  BAR0 + 0x6000 len 0x1000 (capability at 0x70), notify_off_multiplier 4" in r.stdout


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.bin")))
def test_info_of_every_fixture(name: str) -> None:
    r = pmd_cmd("info", "--config", str(DATA / name))
    assert r.returncode == 0, r.stderr
    vendor, device = name[:-4].split("_")[-2:]
    assert r.stdout.startswith(f"{DATA / name}: {vendor}:{device}")


def test_info_says_which_ring_layout_the_device_offers_and_pmd_takes() -> None:
    from pmd.abi import virtio as V
    from pmd.driver.virtio import net as N

    base = V.bit(V.VERSION_1) | 1 << 5                 # VERSION_1, MAC
    out = cli_text.format_virtio(base | V.bit(V.RING_PACKED), transport_bits=64, transport="modern")
    assert out.startswith("Virtio (modern)\n") and "RING_PACKED" in out.splitlines()[1]
    rings = out.splitlines()[3]
    if N.OPT_IN & V.bit(V.RING_PACKED):
        assert rings.startswith("  rings: split") and 'enable="RING_PACKED"' in rings
    else:
        assert rings.startswith("  rings: packed") and 'disable="RING_PACKED"' in rings
    out = cli_text.format_virtio(base, transport_bits=64, transport="modern")
    assert "  rings: split (Virtio 1.2 2.7; the device offers no VIRTIO_F_RING_PACKED)" in out
    # a legacy transport has 32 feature bits: RING_PACKED (34) cannot be taken
    out = cli_text.format_virtio(base | V.bit(V.RING_PACKED), transport_bits=32, transport="legacy")
    assert "RING_PACKED" not in out.splitlines()[2]


def test_info_says_whether_the_device_offers_in_order_and_how_to_take_it() -> None:
    from pmd.abi import virtio as V
    from pmd.driver.virtio import net as N

    base = V.bit(V.VERSION_1) | 1 << 5
    line = cli_text.format_virtio(base | V.bit(V.IN_ORDER), transport_bits=64, transport="modern").splitlines()[4]
    if N.OPT_IN & V.bit(V.IN_ORDER):
        assert line == '  used buffers: not in order; IN_ORDER offered: enable="IN_ORDER", pmd fwd --enable IN_ORDER'
    else:
        assert line.startswith("  used buffers: in order") and 'disable="IN_ORDER"' in line
    line = cli_text.format_virtio(base, transport_bits=64, transport="modern").splitlines()[4]
    assert line == "  used buffers: not in order (the device offers no VIRTIO_F_IN_ORDER)"
    # 32 feature bits (legacy): bit 35 cannot be taken, so it is not on offer either
    line = cli_text.format_virtio(base | V.bit(V.IN_ORDER), transport_bits=32, transport="legacy").splitlines()[4]
    assert line == "  used buffers: not in order (the device offers no VIRTIO_F_IN_ORDER)"


def test_info_json_says_what_the_device_offers_and_pmd_takes() -> None:
    from pmd.abi import virtio as V
    from pmd.cli.data import virtio_data
    from pmd.driver.virtio import net as N

    offered = V.bit(V.VERSION_1) | 1 << 5 | V.bit(V.RING_PACKED)
    data = virtio_data(offered, transport_bits=64, transport="modern")
    assert data["device_features"] == offered and "RING_PACKED" in data["device_feature_names"]
    assert data["accepted_features"] == N.negotiate(offered, transport_bits=64)
    assert data["ring_layout"] == ("packed" if data["accepted_features"] & V.bit(V.RING_PACKED) else "split")
    assert virtio_data(offered, transport_bits=32, transport="legacy")["ring_layout"] == "split"


def test_info_on_a_fake_tree_shows_the_device_and_why_no_vfio(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", numa="0")
    r = pmd_cmd("info", "00:03.0", sysfs=sysfs.root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("0000:00:03.0: 1af4:1041 virtio-net (modern)")
    assert "BAR0 0x10  memory, 64-bit, non-prefetchable at 0x4000100000, 0x80000 bytes" in r.stdout
    assert "Sysfs: driver virtio-pci, IOMMU group 7, NUMA node 0" in r.stdout
    assert "VFIO: not shown, the device is not bound to vfio-pci (pmd bind 0000:00:03.0)" in r.stdout


def test_info_of_a_vfio_device_that_cannot_be_opened(sysfs: FakeSysfs, tmp_path: Path) -> None:
    sysfs.add("0000:00:03.0", driver="vfio-pci", group=12)
    r = pmd_cmd("info", "0000:00:03.0", "--vfio-dir", str(tmp_path / "none"), sysfs=sysfs.root)
    assert "Sysfs: driver vfio-pci, IOMMU group 12" in r.stdout  # what could be read is shown
    line = one_line_error(r, "info")
    assert "does not exist: VFIO is not available in this kernel" in line


def test_info_of_this_machine_read_only() -> None:
    addr = "0000:00:03.0"
    config = REAL_SYSFS / addr / "config"
    if not config.exists():
        pytest.skip(f"{config} does not exist on this machine")
    if os.environ.get("PMD_IN_GUEST"):
        pytest.skip("in the QEMU guest this device is bound to vfio-pci: see TestInGuest")
    r = pmd_cmd("info", addr)
    assert r.returncode == 0, r.stderr
    cs = parse_config(config.read_bytes())  # what the file gives this user (64 bytes unless root)
    assert r.stdout.startswith(f"{addr}: {cs.vendor_id:04x}:{cs.device_id:04x}")
    if cs.capabilities_read:
        assert cs.capabilities, "the device has a capability list"
        for cap in cs.capabilities:
            assert re.search(rf"^  {cap.pos:#04x} \[{cap.cap_id:#04x}\] ", r.stdout, re.M), cap
    else:
        assert "Capabilities: not read" in r.stdout
    driver = pci_sysfs.read_device(addr).driver
    if driver != "vfio-pci":
        assert "VFIO: not shown, the device is not bound to vfio-pci" in r.stdout


@pytest.mark.parametrize(
    "args,expect",
    [
        (("info", "zz:zz"), "bad PCI address 'zz:zz'"),
        (("info", "0000:00:03"), "bad PCI address"),
        (("info", "0000:00:1f.7"), "no PCI device 0000:00:1f.7"),
        (("info", "--config", "/nonexistent/config.bin"), "/nonexistent/config.bin: No such file or directory"),
        (("info",), "give a DEVICE"),
        (("bind", "00:03"), "bad PCI address"),
    ],
)
def test_bad_input_is_one_line_and_status_1(sysfs: FakeSysfs, args: tuple[str, ...], expect: str) -> None:
    sysfs.add("0000:00:03.0")
    line = one_line_error(pmd_cmd(*args, sysfs=sysfs.root), args[0])
    assert expect in line


def test_unbind_of_a_missing_device_is_one_line(sysfs: FakeSysfs, pmd_user: Any) -> None:
    sysfs.add("0000:00:03.0")
    assert "no PCI device" in one_line_error(pmd_user("unbind", "0000:00:1f.7", sysfs=sysfs.root), "unbind")


def test_truncated_config_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(VIRTIO_NET.read_bytes()[:100])
    line = one_line_error(pmd_cmd("info", "--config", str(path)), "info")
    assert "config space is 100 bytes" in line


def test_directory_instead_of_config_file_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(pmd_cmd("info", "--config", str(tmp_path)), "info")
    assert "Is a directory" in line


# ---------------------------------------------------------------------------
# bind / unbind: only ever against the fake tree
# ---------------------------------------------------------------------------

@pytest.fixture()
def fake_only(sysfs: FakeSysfs, tmp_path: Path) -> Iterator[FakeSysfs]:
    """The tree bind/unbind may write to: under tmp_path, never /sys."""
    assert str(sysfs.root.resolve()).startswith(str(tmp_path.resolve()))
    assert not str(sysfs.root.resolve()).startswith("/sys")
    yield sysfs


@pytest.fixture()
def pmd_user(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """``pmd ARGS`` in this process as an ordinary user (uid 1000) or as root (uid 0),
    on the fake tree through ``SYSFS_PCI_DEVICES``, with writes to the real /sys
    refused: as root the variable no longer says where pmd writes, and the
    tests may run as root, so the identity is set here rather than inherited."""
    from pmd import cli

    from .test_pci import refuse_writes_to_real_sysfs

    refuse_writes_to_real_sysfs(monkeypatch)

    def run(*args: str, sysfs: Path, uid: int = 1000) -> subprocess.CompletedProcess[str]:
        monkeypatch.setenv("SYSFS_PCI_DEVICES", str(sysfs))
        monkeypatch.setattr(os, "geteuid", lambda: uid)
        monkeypatch.setattr(os, "getuid", lambda: uid)
        code = cli.main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


def test_bind_through_driver_override(fake_only: FakeSysfs, pmd_user: Any) -> None:
    real = fake_only.add("0000:00:03.0", interfaces={"eth0": 0x1002})  # down
    r = pmd_user("bind", "00:03.0", sysfs=fake_only.root)
    assert r.returncode == 0 and r.stdout == "00:03.0: bound to vfio-pci (was virtio-pci)\n"
    assert (real / "driver_override").read_text() == "vfio-pci"
    assert (fake_only.top / "bus/pci/drivers/virtio-pci/unbind").read_text() == "0000:00:03.0"
    assert (fake_only.top / "bus/pci/drivers_probe").read_text() == "0000:00:03.0"


def test_bind_refuses_an_interface_that_is_up_unless_forced(fake_only: FakeSysfs, pmd_user: Any) -> None:
    real = fake_only.add("0000:00:03.0", interfaces={"eth0": 0x1003})
    line = one_line_error(pmd_user("bind", "0000:00:03.0", sysfs=fake_only.root), "bind")
    assert "eth0, which is up" in line and "--force" in line
    assert (real / "driver_override").read_text() == "(null)\n"
    r = pmd_user("bind", "0000:00:03.0", "--force", sysfs=fake_only.root)
    assert r.returncode == 0 and (real / "driver_override").read_text() == "vfio-pci"


def test_unbind_gives_the_device_back(fake_only: FakeSysfs, pmd_user: Any) -> None:
    real = fake_only.add("0000:00:03.0", driver="vfio-pci", override="vfio-pci")
    r = pmd_user("unbind", "0000:00:03.0", sysfs=fake_only.root)
    assert r.returncode == 0
    assert r.stdout.startswith("0000:00:03.0: unbound from vfio-pci")
    assert (fake_only.top / "bus/pci/drivers/vfio-pci/unbind").read_text() == "0000:00:03.0"
    assert (real / "driver_override").read_text() == "\n"


def test_bind_with_a_missing_sysfs_file_is_one_line(fake_only: FakeSysfs, pmd_user: Any) -> None:
    fake_only.add("0000:00:03.0", driver=None)
    (fake_only.top / "bus/pci/drivers_probe").unlink()
    line = one_line_error(pmd_user("bind", "0000:00:03.0", sysfs=fake_only.root), "bind")
    assert "drivers_probe" in line
    assert not (fake_only.top / "bus/pci/drivers_probe").exists()


@pytest.mark.parametrize("command", ["bind", "unbind"])
def test_as_root_bind_and_unbind_refuse_to_write_where_SYSFS_PCI_DEVICES_points(
        fake_only: FakeSysfs, pmd_user: Any, command: str) -> None:
    real = fake_only.add("0000:00:03.0", driver="vfio-pci" if command == "unbind" else "virtio-pci")
    line = one_line_error(pmd_user(command, "0000:00:03.0", sysfs=fake_only.root, uid=0), command)
    assert "SYSFS_PCI_DEVICES" in line and "unset it" in line
    assert (real / "driver_override").read_text() == "(null)\n"
    assert (fake_only.top / "bus/pci/drivers_probe").read_text() == ""
    r = pmd_user("status", "--vfio-dir", str(fake_only.top / "no-vfio"), sysfs=fake_only.root, uid=0)
    assert r.returncode == 0 and "0000:00:03.0" in r.stdout                 # reading: still there


# ===========================================================================
# In the QEMU guest (tests/vm), against QEMU's virtio-net bound to vfio-pci
# ===========================================================================

VFIO_DEVICE = os.environ.get("PMD_VFIO_DEVICE", "")
LSPCI_NAMES = {  # lspci -vv's capability names -> PCI capability id
    "Power Management": 0x01,
    "MSI": 0x05,
    "Vendor Specific Information": 0x09,
    "Express": 0x10,
    "MSI-X": 0x11,
}


def lspci(address: str) -> str:
    exe = shutil.which("lspci")
    assert exe is not None, "lspci is missing: tests/vm/setup.sh installs pciutils"
    r = subprocess.run([exe, "-vv", "-s", address], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return r.stdout


def parse_lspci(text: str) -> dict[str, object]:
    """Capabilities (offset -> name), BAR addresses, MSI-X count and virtio structures from ``lspci -vv``."""
    caps: dict[int, str] = {}
    for pos, name in re.findall(r"^\s+Capabilities: \[([0-9a-f]+)\] ([^:\n]+)", text, re.M):
        caps[int(pos, 16)] = name.strip()
    bars = {int(i): int(a, 16) for i, a in
            re.findall(r"^\s+Region (\d): (?:Memory|I/O ports) at ([0-9a-f]+)", text, re.M)}
    msix = re.search(r"MSI-X: Enable[+-] Count=(\d+)", text)
    virtio = {(int(b), int(o, 16), int(n, 16)) for b, o, n in
              re.findall(r"BAR=(\d+) offset=([0-9a-f]+) size=([0-9a-f]+)", text)}
    return {"caps": caps, "bars": bars, "msix": int(msix.group(1)) if msix else None, "virtio": virtio}


@pytest.mark.vfio
@pytest.mark.skipif(not VFIO_DEVICE, reason="PMD_VFIO_DEVICE is not set: no vfio-pci device here "
                    "(run: python tests/vm/harness.py -- python -m pytest tests/test_cli.py -m vfio -q)")
class TestInGuest:
    def test_status_lists_the_device_as_usable(self) -> None:
        r = pmd_cmd("status", timeout=300)
        assert r.returncode == 0, r.stderr
        usable = r.stdout.split("Devices pmd cannot use")[0]
        group = pci_sysfs.read_device(VFIO_DEVICE).iommu_group
        assert re.search(rf"^{VFIO_DEVICE} 'virtio-net \(modern\)' 1af4:1041 drv=vfio-pci "
                         rf"group={group}  \(/dev/vfio/{group}\)$", usable, re.M), r.stdout
        assert "No device is usable" not in r.stdout
        legacy = os.environ.get("PMD_VFIO_LEGACY_DEVICE")
        if legacy:
            assert f"{legacy} 'virtio-net (transitional)' 1af4:1000 drv=vfio-pci" in usable

    def test_info_shows_vfio_regions_and_irq_indexes(self) -> None:
        r = pmd_cmd("info", VFIO_DEVICE, timeout=300)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        group = pci_sysfs.read_device(VFIO_DEVICE).iommu_group
        assert f"VFIO (group {group}, /dev/vfio/{group}, type1v2 IOMMU, IOVA mode va)" in out
        assert re.search(r"^  IOMMU page sizes 0x[0-9a-f]+ \(4K.*\); IOVA ranges \[0x0, ", out, re.M)
        assert "  device flags 0x2 (PCI, no reset), 9 regions, 5 IRQ indexes" in out
        assert re.search(r"^  region 1 BAR1   size 0x1000 offset 0x10000000000 \[READ\|WRITE\|MMAP", out, re.M)
        assert re.search(r"^  region 4 BAR4   size 0x4000 offset 0x40000000000 \[READ\|WRITE\|MMAP\]", out, re.M)
        assert re.search(r"^  region 7 config size 0x100 offset 0x70000000000 \[READ\|WRITE\]$", out, re.M)
        assert "  region 0 BAR0   not implemented" in out
        assert re.search(r"^  irq 2 MSI-X  count 4 \[EVENTFD\|NORESIZE\]$", out, re.M)
        assert re.search(r"^  irq 0 INTx   count 1 \[EVENTFD\|MASKABLE\|AUTOMASKED\]$", out, re.M)
        for index in range(5):
            assert re.search(rf"^  irq {index} ", out, re.M)
        assert "notify  BAR4 + 0x3000 len 0x1000" in out
        # QEMU's device has packed=on (tests/vm/harness.py): offered, and the layout said
        assert re.search(r"^Virtio \(.*\)\n  device features 0x[0-9a-f]+: .*RING_PACKED", out, re.M), out
        assert re.search(r"^  rings: (packed|split)", out, re.M), out

    def test_info_json_has_vfio_regions_irqs_and_features(self) -> None:
        import json

        r = pmd_cmd("info", VFIO_DEVICE, "--json", timeout=300)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        group = pci_sysfs.read_device(VFIO_DEVICE).iommu_group
        assert data["vfio"]["group"] == group and data["vfio"]["iova_mode"] == "va"
        assert {x["index"]: x["size"] for x in data["vfio"]["regions"]}[7] == 0x100
        assert {x["name"]: x["count"] for x in data["vfio"]["irqs"]}["MSI-X"] == 4
        assert "RING_PACKED" in data["virtio"]["device_feature_names"]
        assert data["virtio"]["ring_layout"] in ("split", "packed")

    def test_what_pmd_parsed_matches_lspci(self) -> None:
        seen = parse_lspci(lspci(VFIO_DEVICE))
        dev = pci_sysfs.read_device(VFIO_DEVICE)
        cs = parse_config(dev.read_config())
        assert cs.capabilities_read, "root in the guest reads the whole config space"
        # the same capabilities at the same offsets
        caps = seen["caps"]
        assert isinstance(caps, dict)
        assert sorted(caps) == [c.pos for c in sorted(cs.capabilities, key=lambda c: c.pos)] + \
            [e.pos for e in cs.extended_capabilities]
        for cap in cs.capabilities:
            if caps[cap.pos] in LSPCI_NAMES:
                assert LSPCI_NAMES[caps[cap.pos]] == cap.cap_id, (cap, caps[cap.pos])
        # the same BAR addresses
        ours = {i: b.address for i in range(cs.bar_count) if (b := cs.bar(i)) is not None and b.raw}
        assert seen["bars"] == ours
        # the same MSI-X vector count, and the same virtio structures
        assert cs.msix is not None and seen["msix"] == cs.msix.table_size == 4
        assert seen["virtio"] == {(c.bar, c.offset, c.length) for c in cs.virtio_caps
                                  }  # PCI-config access too: lspci prints its (zero) BAR, offset and size

    def test_vfio_config_region_agrees_with_lspci(self) -> None:
        """What pmd reads through VFIO's config region (virtualized by vfio-pci) names the same
        capabilities and BARs."""
        from pmd.driver.access.vfio import VfioAccess

        seen = parse_lspci(lspci(VFIO_DEVICE))
        with VfioAccess.open(VFIO_DEVICE) as dev:
            size = dev.region_info(7).size
            cs = parse_config(dev.config_read(0, 256 if size < 4096 else 4096))
        caps = seen["caps"]
        assert isinstance(caps, dict)
        assert [c.pos for c in cs.capabilities] and all(c.pos in caps for c in cs.capabilities)
        assert seen["bars"] == {i: b.address for i in range(cs.bar_count)
                                if (b := cs.bar(i)) is not None and b.raw}


# ---------------------------------------------------------------------------- the README's commands

def _readme_command(heading: str) -> str:
    return block_after((ROOT / "README.md").read_text(), heading, "sh").code.strip()


def test_readme_main_job_runs_on_the_built_in_device_and_prints_a_summary():
    setup, job = _readme_command("Set up and run the main job").split(" && ")
    assert setup == "bash scripts/setup.sh"
    argv = job.split()
    assert argv[:3] == ["python3", "-m", "pmd"] and "fwd" in argv
    r = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sim" in r.stdout.splitlines()[0]                       # the built-in device
    m = re.search(r"^summary: .*\bmpps=([0-9.]+)", r.stdout, re.M)
    assert m and float(m.group(1)) > 0, r.stdout


def test_readme_api_example_receives_packets_from_the_built_in_device():
    code = block_after((ROOT / "README.md").read_text(), "## The API in short", "python").code
    assert 'pmd.open_port("sim"' in code                        # runs as written, no hardware
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    counts = [int(n) for n in re.findall(r"^received (\d+) packets", r.stdout, re.M)]
    assert len(counts) == 2 and all(n > 0 for n in counts), r.stdout


def test_ci_runs_the_readme_test_command():
    command = _readme_command("Set up and pass the tests")
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


# ---------------------------------------------------------------------------- help and recommended commands

def _subcommands() -> list[str]:
    from pmd.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help_that_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pmd.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: pmd {command}"), out


def _recommended_commands() -> list[tuple[str, str]]:
    """Every ``pmd ...`` command line pmd's messages tell the user to run: in
    backquotes, or in parentheses ("(pmd bind DEVICE)"), with placeholders filled."""
    found: list[tuple[str, str]] = []
    # In backquotes anything is a command; in parentheses or quotes, prose
    # ("pmd takes ...") is told apart by a subcommand's name.
    sub = "|".join(_subcommands())
    pattern = rf"`(pmd [^`\n]+)`|\((pmd (?:{sub})\b[^()\n]*)\)|'(pmd (?:{sub})\b[^'\n]*)'"
    for path in sorted((ROOT / "pmd").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(pattern, text):
            command = next(g for g in m.groups() if g)
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            found.append((where, command))
    return found


def _fill(command: str) -> list[str]:
    argv = command.split()[1:]
    out = []
    for i, word in enumerate(argv):
        if word.startswith("{") or word.isupper():
            word = "/tmp/pmd-example.sock" if argv[i - 1] == "--socket" else "0000:00:03.0"
        out.append(word)
    return out


def test_the_messages_recommend_commands_at_all() -> None:
    commands = {c.split()[1] for _, c in _recommended_commands()}
    assert {"bind", "status", "sim", "fwd"} <= commands, commands


@pytest.mark.parametrize("where,command", _recommended_commands())
def test_every_command_a_message_recommends_parses(where: str, command: str) -> None:
    from pmd.cli import build_parser

    try:
        build_parser().parse_args(_fill(command))
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` does not parse (argparse exit {e.code})")


def test_pmd_sim_as_the_vfio_user_error_recommends_serves_a_driver(tmp_path: Path) -> None:
    # The client's error for a missing socket names a command; run exactly that.
    import signal
    import time

    import pmd
    from pmd.errors import PmdError

    path = str(tmp_path / "dev.sock")
    with pytest.raises(PmdError) as e:
        pmd.open_port("vfio-user:" + path)
    m = re.search(r"`(pmd sim [^`]+)`", str(e.value))
    assert m, str(e.value)
    argv = m.group(1).split()
    proc = subprocess.Popen([sys.executable, "-m", "pmd", *argv[1:], "--wire", "null", "--queue-pairs", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not Path(path + ".ctl").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path(path + ".ctl").exists(), proc.stderr.read() if proc.poll() is not None else "not serving"
        with pmd.open_port("vfio-user:" + path) as port:
            port.start(queue_pairs=2)
            assert port.max_queue_pairs == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not Path(path).exists() and not Path(path + ".ctl").exists()


# ---------------------------------------------------------------------------- --version

def test_version_is_the_package_version() -> None:
    import tomllib

    import pmd

    r = pmd_cmd("--version")
    assert r.returncode == 0, r.stderr
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert r.stdout == f"pmd {declared}\n" and pmd.__version__ == declared


# ---------------------------------------------------------------------------- status and info --json

def test_status_json_is_the_device_list_as_data(sysfs: FakeSysfs, vfio_dir: Path) -> None:
    import json

    sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1003})
    sysfs.add("0000:00:07.0", driver="vfio-pci", group=12)
    (vfio_dir / "12").touch()
    r = pmd_cmd("status", "--json", "--vfio-dir", str(vfio_dir), sysfs=sysfs.root)
    assert r.returncode == 0 and r.stderr == ""
    data = json.loads(r.stdout)
    assert data["usable"] == ["0000:00:07.0"] and data["why_none_usable"] == []
    first, second = data["devices"]
    assert first == {"address": "0000:00:07.0", "name": "virtio-net (modern)", "vendor_id": 0x1AF4,
                     "device_id": 0x1041, "driver": "vfio-pci", "iommu_group": 12, "interfaces": [],
                     "active_interfaces": [], "usable": True, "reason": f"{vfio_dir}/12"}
    assert second["active_interfaces"] == ["eth0"] and not second["usable"]
    assert "pmd bind 0000:00:03.0" in second["reason"]


def test_status_without_a_usable_device_points_at_the_built_in_device(sysfs: FakeSysfs, tmp_path: Path) -> None:
    import json

    sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1003}, group=None)
    r = pmd_cmd("status", "--vfio-dir", str(tmp_path / "no-vfio"), sysfs=sysfs.root)
    assert r.returncode == 0
    hint = r.stdout.splitlines()[-1]
    assert "built-in virtio-net device" in hint and "`pmd fwd` with no DEVICE" in hint
    assert 'open_port("sim")' in hint and "loopback" not in hint
    r = pmd_cmd("status", "--json", "--vfio-dir", str(tmp_path / "no-vfio"), sysfs=sysfs.root)
    data = json.loads(r.stdout)
    assert data["usable"] == [] and any("this kernel offers no VFIO" in w for w in data["why_none_usable"])
    assert "`pmd fwd` with no DEVICE" in data["without_a_device"]


def test_info_json_of_a_config_file_is_what_the_text_shows() -> None:
    import json

    path = DATA / "0000_00_03_0_1af4_1041.bin"
    r = pmd_cmd("info", "--config", str(path), "--json")
    assert r.returncode == 0 and r.stderr == ""
    data = json.loads(r.stdout)
    cs = parse_config(path.read_bytes())
    assert (data["vendor_id"], data["device_id"], data["name"]) == (0x1AF4, 0x1041, "virtio-net (modern)")
    assert [c["pos"] for c in data["capabilities"]] == [c.pos for c in cs.capabilities]
    assert data["msix"]["table_size"] == 3 and data["msix"]["enabled"]
    assert data["virtio_structures"]["notify"] == {"bar": 0, "offset": 0x6000, "length": 0x1000, "pos": 0x70,
                                                   "notify_off_multiplier": 4}
    assert data["bars"][0]["index"] == 0 and data["bars"][0]["address"] == cs.bar(0).address


def test_info_json_of_a_device_not_bound_to_vfio(sysfs: FakeSysfs) -> None:
    import json

    sysfs.add("0000:00:03.0", numa="0")
    r = pmd_cmd("info", "00:03.0", "--json", sysfs=sysfs.root)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["title"] == "0000:00:03.0" and data["sysfs"] == {"driver": "virtio-pci", "iommu_group": 7,
                                                                 "numa_node": 0}
    assert data["vfio"] is None and "pmd bind 0000:00:03.0" in data["vfio_not_shown"]
    assert data["bars"][0]["size"] == 0x80000


# ---------------------------------------------------------------------------- fwd: --json, wires, --tx-first

def fwd_json(*args: str) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    """``pmd fwd --json ARGS``: every line of stdout parsed (the test fails on one that is not JSON)."""
    import json

    r = pmd_cmd("fwd", "--json", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()], r


def test_fwd_json_prints_only_the_summary_as_json() -> None:
    (summary,), r = fwd_json("--mode", "rxonly", "--duration", "0.5")
    assert summary["type"] == "summary" and summary["mode"] == "rxonly" and summary["device"] == "sim"
    assert summary["rx_packets"] > 0 and summary["mpps"] > 0 and summary["errors"] == 0
    assert r.stderr.startswith("pmd fwd: sim")                        # the banner, for a person


def test_fwd_json_with_stats_period_prints_one_object_per_period() -> None:
    lines, _ = fwd_json("--mode", "txonly", "--duration", "1", "--stats-period", "0.25")
    *periods, summary = lines
    assert 2 <= len(periods) <= 4 and all(p["type"] == "stats" for p in periods), lines
    assert all(p["tx_pps"] > 0 for p in periods) and 0 < periods[-1]["tx_packets"] <= summary["tx_packets"]
    assert summary["type"] == "summary"


def test_fwd_stats_period_sets_the_text_statistics_too() -> None:
    r = pmd_cmd("fwd", "--mode", "txonly", "--duration", "0.6", "--stats-period", "0")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["pmd", "placement:", "summary:"], r.stdout
    r = pmd_cmd("fwd", "--mode", "txonly", "--duration", "0.6", "--stats-period", "0.2")
    assert len(re.findall(r"^ +[0-9.]+s  rx ", r.stdout, re.M)) >= 2, r.stdout


def test_fwd_loopback_wire_with_tx_first_moves_packets() -> None:
    (summary,), r = fwd_json("--wire", "loopback", "--mode", "io", "--tx-first", "--duration", "0.5")
    assert summary["rx_packets"] > 1000 and summary["tx_packets"] > 1000 and summary["wire"] == "loopback"
    assert "tx first" in r.stderr


@pytest.mark.parametrize("args,missing", [
    (("--wire", "loopback", "--mode", "io"), "--tx-first"),
    (("--wire", "loopback", "--mode", "macswap"), "--tx-first"),
    (("--wire", "loopback", "--mode", "rxonly"), "--tx-first"),
    (("--wire", "pcap",), "--pcap-in FILE"),
    (("--wire", "pcap", "--pcap-out", "/tmp/pmd-never-written.pcap"), "--pcap-in FILE"),
    (("--wire", "tap",), "--tap NAME"),
    (("--wire", "loopback", "--tx-first", "--flows", "4"), "--flows (generator)"),
    (("--wire", "pcap", "--pcap-in", "/nonexistent.pcap"), "--pcap-in /nonexistent.pcap: no such file"),
    (("0000:00:03.0", "--pcap-in", "x.pcap"), "apply to the built-in device only"),
])
def test_fwd_a_wire_without_what_it_needs_is_a_usage_error(args: tuple[str, ...], missing: str) -> None:
    r = pmd_cmd("fwd", *args, "--duration", "0.5")
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("pmd fwd: --") and missing in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def _pcap_file(path: Path, count: int) -> list[bytes]:
    from pmd.abi.ethernet import udp_frame
    from pmd.abi.pcap import PcapWriter

    frames = [udp_frame(60 + i, bytes.fromhex("02504d440001")) for i in range(count)]
    with PcapWriter(path) as w:
        for f in frames:
            w.write(f)
    return frames


def test_fwd_pcap_wire_plays_pcap_in_and_writes_pcap_out(tmp_path: Path) -> None:
    from pmd.abi.pcap import read_pcap

    frames = _pcap_file(tmp_path / "in.pcap", 50)
    (summary,), _ = fwd_json("--wire", "pcap", "--pcap-in", str(tmp_path / "in.pcap"), "--pcap-out",
                             str(tmp_path / "out.pcap"), "--mode", "io", "--duration", "1")
    assert summary["rx_packets"] == summary["tx_packets"] == 50
    assert [r[1] for r in read_pcap(tmp_path / "out.pcap")] == frames      # forwarded back, in order


def test_fwd_generator_takes_rate_and_flows() -> None:
    from pmd.cli import _wire_options, build_parser

    args = build_parser().parse_args(["fwd", "--flows", "8", "--rate", "2000", "--size", "128"])
    assert _wire_options(args) == {"wire": "generator", "rate": 2000.0, "size": 128, "flows": 8}
    args = build_parser().parse_args(["fwd", "--wire", "tap", "--tap", "pmdtest0"])
    assert _wire_options(args) == {"wire": "tap", "tap": "pmdtest0"}
    (summary,), _ = fwd_json("--mode", "rxonly", "--rate", "2000", "--flows", "8", "--duration", "1")
    assert 0 < summary["rx_packets"] <= 4000, summary                    # paced, not flat out


def test_fwd_txonly_writes_what_it_sends_to_pcap(tmp_path: Path) -> None:
    from pmd.abi.pcap import read_pcap
    from pmd.abi.ethernet import udp_frame

    (summary,), _ = fwd_json("--mode", "txonly", "--size", "80", "--pcap", str(tmp_path / "tx.pcap"),
                             "--duration", "0.5")
    recs = list(read_pcap(tmp_path / "tx.pcap"))
    assert summary["tx_packets"] > 0 and len(recs) == summary["tx_packets"]
    assert {r[1] for r in recs} == {udp_frame(80, recs[0][1][6:12])}
