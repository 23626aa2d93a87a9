"""Checks of the guest itself, run inside it by tests/test_vm_harness.py.

Prints one line ``PMD-VM-SELFCHECK {json}`` with what it found; the host-side
tests assert on it.  Exits 0 when every check passed, 1 otherwise.  Standard
library only (it must not depend on pmd being built).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guest  # noqa: E402

MARK = "PMD-VM-SELFCHECK"
ETHERTYPE = 0x88B5            # IEEE local experimental


def device_facts(bdf: str) -> dict:
    d = f"/sys/bus/pci/devices/{bdf}"
    group = os.path.basename(os.readlink(f"{d}/iommu_group"))
    driver = os.path.basename(os.readlink(f"{d}/driver")) if os.path.exists(f"{d}/driver") else None
    with open(f"{d}/device") as f:
        device_id = f.read().strip()
    return {"bdf": bdf, "group": group, "driver": driver, "device_id": device_id,
            "dev_vfio_group": os.path.exists(f"/dev/vfio/{group}"),
            "dev_vfio_vfio": os.path.exists("/dev/vfio/vfio")}


def wait_carrier(ifname: str, want: int, timeout: float = 10.0) -> float:
    """Seconds until the guest kernel's NIC ``ifname`` shows carrier ``want``; -1 on timeout."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        with open(f"/sys/class/net/{ifname}/carrier") as f:
            if int(f.read().strip() or -1) == want:
                return round(time.monotonic() - t, 3)
        time.sleep(0.01)
    return -1.0


def knic_echo(ifname: str) -> dict:
    """Frames both ways between the host agent and the guest kernel's NIC."""
    out = {}
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((ifname, ETHERTYPE))
    s.settimeout(10)
    mac = bytes.fromhex(guest.nets()["knic"]["mac"].replace(":", ""))
    guest.host_clear("knic")
    # guest -> host
    frame = b"\xff" * 6 + mac + struct.pack("!H", ETHERTYPE) + b"guest-to-host".ljust(50, b".")
    s.send(frame)
    got = guest.host_recv(timeout=10, net="knic")
    mine = [f for f in got if f[12:14] == struct.pack("!H", ETHERTYPE)]
    out["guest_to_host"] = bool(mine) and mine[0] == frame
    # host -> guest
    back = mac + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETHERTYPE) + b"host-to-guest".ljust(50, b".")
    out["sent"] = guest.host_send([back], net="knic")
    deadline = time.monotonic() + 10
    out["host_to_guest"] = False
    while time.monotonic() < deadline:
        try:
            data = s.recv(2048)
        except socket.timeout:
            break
        if data == back:
            out["host_to_guest"] = True
            break
    s.close()
    return out


def main() -> int:
    res: dict = {"env": {k: v for k, v in os.environ.items() if k.startswith("PMD_")}, "failures": []}

    def check(name, fn):
        try:
            res[name] = fn()
        except Exception:
            res[name] = None
            res["failures"].append(f"{name}: {traceback.format_exc(limit=3)}")

    check("modern", lambda: device_facts(os.environ["PMD_VFIO_DEVICE"]))
    if os.environ.get("PMD_VFIO_LEGACY_DEVICE"):
        check("legacy", lambda: device_facts(os.environ["PMD_VFIO_LEGACY_DEVICE"]))
    check("ping", lambda: guest.ping()["pong"])

    def link():
        # The device pmd drives: QMP must answer success (nothing in the guest can
        # see its status without a driver; the vfio tests check the interrupt).
        steps = {}
        t = time.monotonic()
        guest.set_link(False)
        guest.set_link(True)
        steps["round_trip_ms"] = round((time.monotonic() - t) * 1000 / 2, 1)
        steps["modern"] = "ok"
        if os.environ.get("PMD_VFIO_LEGACY_DEVICE"):
            guest.set_link(False, "legacy")
            guest.set_link(True, "legacy")
            steps["legacy"] = "ok"
        ifname = os.environ.get("PMD_VM_KNIC_IFNAME")
        if ifname:
            # The kernel-driven NIC shows the effect: carrier follows set_link.
            steps["knic_carrier_before"] = wait_carrier(ifname, 1)
            guest.set_link(False, "knic")
            steps["knic_down_s"] = wait_carrier(ifname, 0)
            guest.set_link(True, "knic")
            steps["knic_up_s"] = wait_carrier(ifname, 1)
        return steps
    check("set_link", link)

    def bad_name():
        try:
            guest.set_link(False, "no-such-device")
        except guest.HostError as e:
            return str(e)
        return None
    check("set_link_error", bad_name)
    if os.environ.get("PMD_VM_KNIC_IFNAME"):
        check("knic", lambda: knic_echo(os.environ["PMD_VM_KNIC_IFNAME"]))
    print(MARK, json.dumps(res), flush=True)
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
