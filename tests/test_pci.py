"""pmd.pci: PCI addresses, sysfs discovery, config-space parsing.

One test per rule, named after it. Real config spaces come from
tests/data/pci-config/ (dumps from a Firecracker VM, see its README.md);
generated and corrupted ones from hypothesis. Sysfs is always a fake tree
under tmp_path: nothing here reads or writes this machine's /sys.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmd.cli import text as cli_text
from pmd.driver import sysfs as pci_sysfs
from pmd.abi import pci
from pmd.errors import ConfigSpaceError, PmdError
from pmd.driver.sysfs import DeviceBusyError, NoSuchDeviceError
from pmd.abi.pci import (
    Bar,
    ConfigSpace,
    MsiCapability,
    MsixCapability,
    PciAddress,
    PcieCapability,
    VendorCapability,
    VirtioPciCap,
    parse_config,
)
from pmd.abi.virtio_pci import select_virtio_structures

DATA = Path(__file__).parent / "data" / "pci-config"
FIXTURES = sorted(DATA.glob("*.bin"))
VIRTIO_NET = DATA / "0000_00_03_0_1af4_1041.bin"
HOST_BRIDGE = DATA / "0000_00_00_0_8086_0d57.bin"


@pytest.fixture(autouse=True)
def _no_real_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test that forgets to pass a root lands in an empty directory,
    # never in /sys/bus/pci/devices; and no test writes there whatever it passes.
    monkeypatch.setenv("SYSFS_PCI_DEVICES", str(tmp_path / "no-sysfs-here"))
    refuse_writes_to_real_sysfs(monkeypatch)


def refuse_writes_to_real_sysfs(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def guarded(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR) and os.path.realpath(path).startswith("/sys/"):
            raise AssertionError(f"a test tried to write {path} on this machine")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", guarded)


@pytest.fixture()
def alarm() -> Iterator[None]:
    """Fail instead of hanging: a parse that loops forever is killed after 60 s."""
    def timeout(signum: int, frame: object) -> None:
        raise TimeoutError("config-space parsing hung")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------
# Building config spaces
# ---------------------------------------------------------------------------

def header(*, vendor: int = 0x1AF4, device: int = 0x1041, status: int = 0x10,
           cap_ptr: int = 0, header_type: int = 0, class_code: int = 0x020000,
           bars: tuple[int, ...] = (0x0000000C, 0x40, 0, 0, 0, 0),
           size: int = 256) -> bytearray:
    """A type-0 header: by default a virtio-net device, BAR0 64-bit prefetchable at 0x40_00000000."""
    buf = bytearray(size)
    struct.pack_into("<HHHH", buf, 0, vendor, device, 0x0006, status)
    struct.pack_into("<I", buf, 0x08, (class_code << 8) | 0x01)
    buf[0x0E] = header_type
    for i, value in enumerate(bars):
        struct.pack_into("<I", buf, 0x10 + 4 * i, value)
    struct.pack_into("<HH", buf, 0x2C, vendor, device)
    buf[0x34] = cap_ptr
    return buf


def virtio_cap(buf: bytearray, pos: int, cfg_type: int, *, bar: int = 0, offset: int = 0,
               length: int = 0x1000, next_ptr: int = 0, cap_len: int | None = None,
               multiplier: int = 4) -> None:
    notify = cfg_type in (pci.VIRTIO_PCI_CAP_NOTIFY_CFG, pci.VIRTIO_PCI_CAP_PCI_CFG)
    cap_len = cap_len if cap_len is not None else (20 if notify else 16)
    struct.pack_into("<BBBBBB2xII", buf, pos, 0x09, next_ptr, cap_len, cfg_type, bar, 0,
                     offset, length)
    if cfg_type == pci.VIRTIO_PCI_CAP_NOTIFY_CFG and pos + 20 <= len(buf):
        struct.pack_into("<I", buf, pos + 16, multiplier)


def msix_cap(buf: bytearray, pos: int, *, control: int = 0x8002, table: int = 0x8000,
             pba: int = 0x48000, next_ptr: int = 0) -> None:
    struct.pack_into("<BBHII", buf, pos, 0x11, next_ptr, control, table, pba)


def modern_virtio_net(size: int = 256) -> bytearray:
    """common, ISR, device, notify, then MSI-X: the fixture's layout, built by hand."""
    buf = header(cap_ptr=0x40, size=size)
    virtio_cap(buf, 0x40, 1, offset=0x0, length=0x38, next_ptr=0x50)
    virtio_cap(buf, 0x50, 3, offset=0x2000, length=1, next_ptr=0x60)
    virtio_cap(buf, 0x60, 4, offset=0x4000, length=0x1000, next_ptr=0x70)
    virtio_cap(buf, 0x70, 2, offset=0x6000, length=0x1000, next_ptr=0x98)
    msix_cap(buf, 0x98)
    return buf


# ---------------------------------------------------------------------------
# PCI addresses
# ---------------------------------------------------------------------------

def test_address_full_form_parses() -> None:
    assert PciAddress.parse("0000:00:03.0") == PciAddress(0, 0, 3, 0)
    assert PciAddress.parse("0001:af:1f.7") == PciAddress(1, 0xAF, 0x1F, 7)


def test_address_short_form_means_domain_zero() -> None:
    assert PciAddress.parse("00:03.0") == PciAddress(0, 0, 3, 0)


def test_address_str_is_the_full_lowercase_sysfs_form() -> None:
    assert str(PciAddress.parse("AF:1F.7")) == "0000:af:1f.7"
    assert str(PciAddress(0x10000, 0, 0, 0)) == "10000:00:00.0"  # VMD domains exceed 16 bits


def test_address_is_frozen_and_ordered() -> None:
    a = PciAddress.parse("00:03.0")
    with pytest.raises(AttributeError):
        a.bus = 1  # type: ignore[misc]
    assert sorted([PciAddress.parse("01:00.0"), a]) == [a, PciAddress.parse("01:00.0")]


@pytest.mark.parametrize("text", ["", "00:03", "0000:00:03", "00:03.8", "00:20.0",
                                  "zz:03.0", "0000:000:03.0", "00:03.0.1", "0000-00-03.0",
                                  "123456789:00:03.0"])
def test_bad_address_raises_value_error_with_expected_format(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected DDDD:BB:DD\.F or BB:DD\.F"):
        PciAddress.parse(text)


def test_address_field_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="device 0x20 out of range"):
        PciAddress(0, 0, 0x20, 0)
    with pytest.raises(ValueError, match="function"):
        PciAddress(0, 0, 0, 8)


@settings(database=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_address_str_parse_round_trip(domain: int, bus: int, device: int, function: int) -> None:
    addr = PciAddress(domain, bus, device, function)
    assert PciAddress.parse(str(addr)) == addr
    assert pci.parse_address(addr) is addr


# ---------------------------------------------------------------------------
# The real config spaces
# ---------------------------------------------------------------------------

def test_fixtures_and_their_readme_are_in_the_project() -> None:
    assert (DATA / "README.md").is_file()
    assert len(FIXTURES) == 6


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_every_fixture_parses(path: Path) -> None:
    cs = parse_config(path.read_bytes())
    # File names are <domain>_<bus>_<dev>_<fn>_<vendor>_<device>.bin.
    vendor, device = path.stem.split("_")[-2:]
    assert (cs.vendor_id, cs.device_id) == (int(vendor, 16), int(device, 16))
    assert cli_text.format_info(cs)


@pytest.mark.parametrize("path", [p for p in FIXTURES if "1af4" in p.name], ids=lambda p: p.name)
def test_every_virtio_fixture_is_a_modern_device(path: Path) -> None:
    cs = parse_config(path.read_bytes())
    vs = select_virtio_structures(cs)
    assert vs.modern and vs.device is not None and vs.pci_cfg is not None
    assert cs.msix is not None and cs.msix.enabled


def test_virtio_net_fixture_header() -> None:
    cs = parse_config(VIRTIO_NET.read_bytes())
    assert (cs.vendor_id, cs.device_id) == (0x1AF4, 0x1041)
    assert (cs.subsystem_vendor_id, cs.subsystem_id) == (0x1AF4, 0x1041)
    assert cs.class_code == 0x020000 and cs.base_class == 0x02
    assert cs.revision == 0x01 and cs.header_type == 0x00 and cs.layout == 0
    assert cs.command == 0x0406 and cs.status & pci.PCI_STATUS_CAP_LIST
    assert (cs.interrupt_pin, cs.interrupt_line) == (0, 0)
    assert cs.name == "virtio-net (modern)"


def test_virtio_net_fixture_bar0_is_64bit_memory_at_0x4000100000() -> None:
    cs = parse_config(VIRTIO_NET.read_bytes())
    bar0 = cs.bar(0)
    assert bar0 is not None
    assert bar0.memory and bar0.is_64bit and bar0.address == 0x4000100000
    # The README calls BAR0 prefetchable; the bytes say otherwise (raw 0x00100004:
    # bit 3 clear), and so does sysfs on the VM (resource flags 0x140204, no
    # IORESOURCE_PREFETCH). The bytes win.
    assert not bar0.prefetchable
    assert cs.bar(1) is None  # upper half of BAR0
    assert [b.index for b in cs.bars] == [0, 2, 3, 4, 5]


def test_virtio_net_fixture_capabilities_match_readme() -> None:
    cs = parse_config(VIRTIO_NET.read_bytes())
    assert [(c.pos, c.cap_id) for c in cs.capabilities] == [
        (0x40, 0x09), (0x50, 0x09), (0x60, 0x09), (0x70, 0x09), (0x84, 0x09), (0x98, 0x11)]
    got = [(c.pos, c.cfg_type, c.bar, c.offset, c.length) for c in cs.virtio_caps]
    assert got[:4] == [
        (0x40, pci.VIRTIO_PCI_CAP_COMMON_CFG, 0, 0x0, 0x38),
        (0x50, pci.VIRTIO_PCI_CAP_ISR_CFG, 0, 0x2000, 1),
        (0x60, pci.VIRTIO_PCI_CAP_DEVICE_CFG, 0, 0x4000, 0x1000),
        (0x70, pci.VIRTIO_PCI_CAP_NOTIFY_CFG, 0, 0x6000, 0x1000),
    ]
    assert cs.virtio_caps[3].notify_off_multiplier == 4
    assert (got[4][0], got[4][1]) == (0x84, pci.VIRTIO_PCI_CAP_PCI_CFG)


def test_virtio_net_fixture_msix_has_3_vectors_enabled_table_and_pba_in_bar0() -> None:
    msix = parse_config(VIRTIO_NET.read_bytes()).msix
    assert msix is not None and msix.pos == 0x98
    assert msix.table_size == 3 and msix.enabled and not msix.function_mask
    assert (msix.table_bir, msix.table_offset) == (0, 0x8000)
    assert (msix.pba_bir, msix.pba_offset) == (0, 0x48000)
    assert (msix.table_bytes, msix.pba_bytes) == (48, 8)


def test_virtio_net_fixture_structures_selected_like_linux() -> None:
    vs = select_virtio_structures(parse_config(VIRTIO_NET.read_bytes()))
    assert vs.common is not None and vs.common.pos == 0x40
    assert vs.isr is not None and vs.isr.pos == 0x50
    assert vs.device is not None and vs.device.pos == 0x60
    assert vs.notify is not None and vs.notify.pos == 0x70
    assert vs.pci_cfg is not None and vs.pci_cfg.pos == 0x84
    assert vs.missing == ()


def test_host_bridge_has_no_capability_list_when_status_bit4_is_clear() -> None:
    cs = parse_config(HOST_BRIDGE.read_bytes())
    assert cs.size == 4096 and cs.status & 0x10 == 0
    assert cs.capabilities == () and cs.capabilities_read
    assert cs.extended_capabilities == ()  # header at 0x100 is zero
    assert cs.class_code == 0x060000
    assert "Capabilities: none (status bit 4 clear)" in cli_text.format_info(cs)


def test_format_info_shows_where_each_virtio_structure_lives() -> None:
    text = cli_text.format_info(VIRTIO_NET.read_bytes(), title="0000:00:03.0")
    assert text.startswith("0000:00:03.0: 1af4:1041 virtio-net (modern)")
    assert "BAR0 0x10  memory, 64-bit, non-prefetchable at 0x4000100000" in text
    assert "BAR1 0x14  upper half of BAR0" in text
    for line in ("common  BAR0 + 0x0 len 0x38 (capability at 0x40)",
                 "isr     BAR0 + 0x2000 len 0x1 (capability at 0x50)",
                 "device  BAR0 + 0x4000 len 0x1000 (capability at 0x60)",
                 "notify  BAR0 + 0x6000 len 0x1000 (capability at 0x70), "
                 "notify_off_multiplier 4",
                 "pci_cfg capability at 0x84"):
        assert line in text
    assert ("MSI-X (PCI 3.0 6.8.2): 3 vectors, enabled; table BAR0 + 0x8000 (0x30 bytes), "
            "PBA BAR0 + 0x48000 (0x8 bytes)") in text
    assert "0x98 [0x11] MSI-X" in text


def test_format_info_adds_bar_sizes_when_given() -> None:
    text = cli_text.format_info(VIRTIO_NET.read_bytes(), bar_sizes={0: 0x80000})
    assert "at 0x4000100000, 0x80000 bytes" in text


def test_format_info_reports_an_unusable_virtio_layout_instead_of_raising() -> None:
    buf = modern_virtio_net()
    struct.pack_into("<I", buf, 0x40 + 12, 0x10)  # common cfg shorter than 0x38
    text = cli_text.format_info(buf)
    assert "unusable: virtio common config capability at 0x40: length 0x10 < 0x38" in text


# ---------------------------------------------------------------------------
# Header and size
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 16, 63])
def test_shorter_than_64_bytes_is_an_error(size: int) -> None:
    with pytest.raises(ConfigSpaceError, match=f"config space is {size} bytes.*needs 64 bytes"):
        parse_config(VIRTIO_NET.read_bytes()[:size])


@pytest.mark.parametrize("size", [65, 0x99, 0xA0, 255, 257, 4095, 4097, 8192])
def test_size_other_than_64_256_4096_is_a_truncated_file(size: int) -> None:
    data = (VIRTIO_NET.read_bytes() * 40)[:size]
    with pytest.raises(ConfigSpaceError, match=f"config space is {size} bytes; expected 64"):
        parse_config(data)


def test_header_only_64_bytes_parses_header_and_bars_but_no_capabilities() -> None:
    cs = parse_config(VIRTIO_NET.read_bytes()[:64])
    assert not cs.capabilities_read and cs.capabilities == ()
    assert cs.bar(0) is not None and cs.bar(0).address == 0x4000100000  # type: ignore[union-attr]
    assert "only the 64-byte header" in cli_text.format_info(cs)


def test_vendor_id_all_ones_means_no_device() -> None:
    with pytest.raises(ConfigSpaceError, match="0xffff: no device"):
        parse_config(b"\xff" * 256)


def test_header_layout_other_than_endpoint_or_bridge_is_an_error() -> None:
    with pytest.raises(ConfigSpaceError, match="header type 0x82 at 0xe: layout 2"):
        parse_config(header(header_type=0x82))


def test_multifunction_bit_is_not_part_of_the_layout() -> None:
    cs = parse_config(header(header_type=0x80))
    assert cs.multifunction and cs.layout == 0


def test_bridge_header_has_two_bars_and_no_subsystem_ids() -> None:
    cs = parse_config(header(header_type=0x01, bars=(0x1, 0xFEB00000, 0x0C, 0, 0, 0),
                             class_code=0x060400))
    assert cs.bar_count == 2 and [b.index for b in cs.bars] == [0, 1]
    assert cs.subsystem_vendor_id is None and cs.subsystem_id is None


def test_interrupt_pin_and_line_are_read() -> None:
    buf = header()
    buf[0x3C], buf[0x3D] = 11, 1
    cs = parse_config(buf)
    assert (cs.interrupt_line, cs.interrupt_pin) == (11, 1)
    assert "interrupt pin INTA, line 11" in cli_text.format_info(cs)


# ---------------------------------------------------------------------------
# BARs (PCI 3.0 6.2.5.1)
# ---------------------------------------------------------------------------

def bar0(raw: tuple[int, ...]) -> Bar:
    b = parse_config(header(bars=raw)).bar(0)
    assert b is not None
    return b


def test_bar_bit0_set_is_io_space_with_address_in_bits_31_2() -> None:
    b = bar0((0xC041, 0, 0, 0, 0, 0))
    assert b.io and not b.memory and b.address == 0xC040 and b.kind == "I/O"


def test_bar_type_00_is_32bit_memory() -> None:
    b = bar0((0xFEB00000, 0, 0, 0, 0, 0))
    assert b.memory and not b.is_64bit and not b.prefetchable and b.address == 0xFEB00000


def test_bar_type_10_is_64bit_and_consumes_the_next_register() -> None:
    cs = parse_config(header(bars=(0, 0xFE00000C, 0x12, 0, 0, 0)))
    b = cs.bar(1)
    assert b is not None and b.is_64bit and b.address == 0x12_FE000000
    assert cs.bar(2) is None and [x.index for x in cs.bars] == [0, 1, 3, 4, 5]


def test_bar_bit3_is_prefetchable() -> None:
    assert bar0((0xE0000008, 0, 0, 0, 0, 0)).prefetchable
    assert bar0((0x0000000C, 0x40, 0, 0, 0, 0)).kind == "memory, 64-bit, prefetchable"


def test_64bit_bar_in_the_last_slot_is_an_error() -> None:
    with pytest.raises(ConfigSpaceError, match="BAR5 at 0x24 is a 64-bit memory BAR"):
        parse_config(header(bars=(0, 0, 0, 0, 0, 0x0000000C)))


def test_64bit_bar_in_the_last_slot_of_a_bridge_is_an_error() -> None:
    with pytest.raises(ConfigSpaceError, match="BAR1 at 0x14"):
        parse_config(header(header_type=1, bars=(0, 0x4, 0, 0, 0, 0)))


@pytest.mark.parametrize("mem_type", [0b01, 0b11])
def test_reserved_memory_bar_types_are_read_as_32bit_like_linux(mem_type: int) -> None:
    b = bar0((0xFEB00000 | (mem_type << 1), 0, 0, 0, 0, 0))
    assert b.memory and not b.is_64bit and b.mem_type == mem_type


# ---------------------------------------------------------------------------
# The capability list (PCI 3.0 6.7)
# ---------------------------------------------------------------------------

def test_capability_list_is_not_walked_when_status_bit4_is_clear() -> None:
    buf = modern_virtio_net()
    struct.pack_into("<H", buf, 0x06, 0)
    assert parse_config(buf).capabilities == ()


def test_capability_pointer_low_two_bits_are_masked() -> None:
    buf = modern_virtio_net()
    buf[0x34] = 0x43
    buf[0x41] = 0x53  # next pointer 0x50 with reserved bits set
    cs = parse_config(buf)
    assert [c.pos for c in cs.capabilities][:2] == [0x40, 0x50]


def test_zero_capability_pointer_is_an_empty_list() -> None:
    assert parse_config(header(cap_ptr=0)).capabilities == ()


@pytest.mark.parametrize("ptr", [0x04, 0x10, 0x3C])
def test_first_capability_pointer_inside_the_header_is_an_error(ptr: int) -> None:
    with pytest.raises(ConfigSpaceError, match=f"pointer at 0x34 is {ptr:#x}, inside the"):
        parse_config(header(cap_ptr=ptr))


def test_next_pointer_inside_the_header_is_an_error() -> None:
    buf = modern_virtio_net()
    buf[0x51] = 0x20
    with pytest.raises(ConfigSpaceError, match="pointer at 0x51 is 0x20, inside the"):
        parse_config(buf)


def test_capability_pointing_to_itself_is_a_loop() -> None:
    buf = header(cap_ptr=0x40)
    buf[0x40:0x42] = bytes([0x01, 0x40])
    struct.pack_into("<HH", buf, 0x42, 0, 0)
    with pytest.raises(ConfigSpaceError, match="loops: pointer at 0x41 goes back to 0x40"):
        parse_config(buf)


def test_capability_list_looping_back_is_an_error() -> None:
    buf = modern_virtio_net()
    buf[0x99] = 0x50  # MSI-X points back to the ISR capability
    with pytest.raises(ConfigSpaceError, match="loops: pointer at 0x99 goes back to 0x50"):
        parse_config(buf)


def test_longest_possible_list_of_48_capabilities_parses() -> None:
    buf = header(vendor=0x8086, device=0x1234, cap_ptr=0x40)
    for pos in range(0x40, 0x100, 4):
        buf[pos] = 0x0A  # debug port, no body we read
        buf[pos + 1] = (pos + 4) & 0xFF  # the last one wraps to 0: end
    assert len(parse_config(buf).capabilities) == pci.PCI_FIND_CAP_TTL


def test_capability_past_the_end_is_an_error() -> None:
    buf = header(cap_ptr=0xF8)
    buf[0xF8] = 0x11  # MSI-X needs 12 bytes: 0xf8 + 12 > 0x100
    with pytest.raises(ConfigSpaceError, match=r"MSI-X capability at 0xf8 needs 12 bytes"
                                                r".*ends at 0x100, 4 bytes short"):
        parse_config(buf)


def test_capability_pointer_past_the_end_of_a_64_byte_header_is_not_followed() -> None:
    # The 64-byte header is what a non-root reader gets: the list is simply not there.
    assert parse_config(modern_virtio_net()[:64]).capabilities == ()


def test_msix_capability_fields() -> None:
    buf = header(cap_ptr=0x40)
    msix_cap(buf, 0x40, control=0x47FF, table=0x2003, pba=0x3004)
    m = parse_config(buf).msix
    assert isinstance(m, MsixCapability)
    assert m.table_size == 0x800 and not m.enabled and m.function_mask
    assert (m.table_bir, m.table_offset, m.pba_bir, m.pba_offset) == (3, 0x2000, 4, 0x3000)
    assert m.pba_bytes == 256


@pytest.mark.parametrize("table, pba, what", [(0x2006, 0, "table BIR 6"), (0, 0x3007, "PBA BIR 7")])
def test_msix_reserved_bir_is_an_error(table: int, pba: int, what: str) -> None:
    buf = header(cap_ptr=0x40)
    msix_cap(buf, 0x40, table=table, pba=pba)
    with pytest.raises(ConfigSpaceError, match=f"MSI-X capability at 0x40: {what} names no BAR"):
        parse_config(buf)


def test_msi_capability_fields_and_size_from_message_control() -> None:
    buf = header(cap_ptr=0x40)
    struct.pack_into("<BBH", buf, 0x40, 0x05, 0, 0x01A7)  # 64-bit, masking, 8 vectors, on
    m = parse_config(buf).msi
    assert isinstance(m, MsiCapability)
    assert m.enabled and m.is_64bit and m.per_vector_masking
    assert (m.vectors, m.multiple_message_enable, m.size) == (8, 2, 24)


def test_msi_capability_that_does_not_fit_is_an_error() -> None:
    buf = header(cap_ptr=0xF0)
    struct.pack_into("<BBH", buf, 0xF0, 0x05, 0, 0x0180)  # 24 bytes from 0xf0
    with pytest.raises(ConfigSpaceError, match="MSI capability at 0xf0 needs 24 bytes"):
        parse_config(buf)


def test_pcie_capability_version_and_port_type() -> None:
    buf = header(cap_ptr=0x40)
    struct.pack_into("<BBH", buf, 0x40, 0x10, 0, 0x0002)
    p = parse_config(buf).pcie
    assert isinstance(p, PcieCapability)
    assert (p.version, p.port_type, p.port_type_name) == (2, 0, "endpoint")


def test_vendor_capability_of_a_non_virtio_device_is_not_read_as_virtio() -> None:
    buf = header(vendor=0x8086, device=0x1572, cap_ptr=0x40)
    buf[0x40:0x44] = bytes([0x09, 0, 0x08, 0x01])
    cap = parse_config(buf).capabilities[0]
    assert type(cap) is VendorCapability and cap.cap_len == 8


def test_extended_capabilities_are_walked_in_4k_config_space() -> None:
    buf = header(size=4096)
    struct.pack_into("<I", buf, 0x100, 0x0001 | (1 << 16) | (0x140 << 20))  # AER -> 0x140
    struct.pack_into("<I", buf, 0x140, 0x000E | (1 << 16))  # ARI, end
    ext = parse_config(buf).extended_capabilities
    assert [(e.pos, e.name) for e in ext] == [(0x100, "AER"), (0x140, "ARI")]


def test_looping_extended_capability_list_is_an_error() -> None:
    buf = header(size=4096)
    struct.pack_into("<I", buf, 0x100, 0x0001 | (0x140 << 20))
    struct.pack_into("<I", buf, 0x140, 0x000E | (0x100 << 20))
    with pytest.raises(ConfigSpaceError, match="extended capability list loops"):
        parse_config(buf)


# ---------------------------------------------------------------------------
# Virtio capabilities (Virtio 1.2 4.1.4)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cap_len", [0, 3, 15])
def test_virtio_cap_len_shorter_than_16_is_an_error(cap_len: int) -> None:
    buf = modern_virtio_net()
    buf[0x52] = cap_len
    with pytest.raises(ConfigSpaceError, match=f"capability at 0x50: cap_len {cap_len} is "
                                                f"shorter than struct virtio_pci_cap"):
        parse_config(buf)


def test_virtio_notify_cap_len_shorter_than_20_is_an_error() -> None:
    buf = modern_virtio_net()
    buf[0x72] = 16
    with pytest.raises(ConfigSpaceError, match="notify capability at 0x70: cap_len 16 < 20"):
        parse_config(buf)


def test_virtio_pci_cfg_cap_len_shorter_than_20_is_an_error() -> None:
    buf = modern_virtio_net()
    virtio_cap(buf, 0xA8, 5, cap_len=16)
    buf[0x99] = 0xA8
    with pytest.raises(ConfigSpaceError, match="PCI config access capability at 0xa8"):
        parse_config(buf)


def test_virtio_cap_running_past_the_end_is_an_error() -> None:
    buf = modern_virtio_net()
    buf[0xF4:0xF8] = bytes([0x09, 0, 16, 4])  # 16 bytes from 0xf4 end at 0x104
    buf[0x99] = 0xF4
    with pytest.raises(ConfigSpaceError, match=r"virtio capability at 0xf4 needs 16 bytes "
                                                r"\(its cap_len\) but the config space ends "
                                                r"at 0x100, 4 bytes short"):
        parse_config(buf)


def test_virtio_cap_fields_are_little_endian() -> None:
    buf = header(cap_ptr=0x40)
    virtio_cap(buf, 0x40, 2, bar=2, offset=0x12345678, length=0x9ABCDEF0, multiplier=0x100)
    buf[0x45] = 7
    cap = parse_config(buf).virtio_caps[0]
    assert isinstance(cap, VirtioPciCap)
    assert (cap.bar, cap.id, cap.offset, cap.length) == (2, 7, 0x12345678, 0x9ABCDEF0)
    assert cap.notify_off_multiplier == 0x100 and cap.cfg_name == "notify"


def test_virtio_cap_with_reserved_bar_is_kept_but_ignored_by_selection() -> None:
    # Virtio 1.2 4.1.4: bar values 0x6-0xff are reserved and the driver MUST
    # ignore the structure; the next common cfg capability wins instead.
    buf = modern_virtio_net()
    virtio_cap(buf, 0xA8, 1, bar=6, length=0x38, next_ptr=0xB8)
    virtio_cap(buf, 0xB8, 1, bar=0, offset=0x100, length=0x38)
    buf[0x34], buf[0x99], buf[0x41] = 0xA8, 0x00, 0x50
    buf[0xB9] = 0x40
    cs = parse_config(buf)
    assert not cs.virtio_caps[0].bar_valid
    vs = select_virtio_structures(cs)
    assert vs.common is not None and vs.common.pos == 0xB8
    assert "reserved BAR value: ignored" in cli_text.format_info(cs)


# ---------------------------------------------------------------------------
# Choosing the structures (Linux virtio_pci_find_capability)
# ---------------------------------------------------------------------------

def test_selection_takes_the_first_capability_of_each_type() -> None:
    buf = modern_virtio_net()
    virtio_cap(buf, 0xA8, 1, offset=0x9000, length=0x38)
    buf[0x99] = 0xA8
    vs = select_virtio_structures(parse_config(buf))
    assert vs.common is not None and vs.common.offset == 0x0


def test_selection_skips_a_structure_in_an_io_bar() -> None:
    buf = header(cap_ptr=0x40, bars=(0xC001, 0xFEB00000, 0, 0, 0, 0))
    virtio_cap(buf, 0x40, 1, bar=0, length=0x38, next_ptr=0x50)
    virtio_cap(buf, 0x50, 1, bar=1, length=0x38)
    vs = select_virtio_structures(parse_config(buf))
    assert vs.common is not None and vs.common.pos == 0x50


def test_selection_skips_a_structure_in_the_upper_half_of_a_64bit_bar() -> None:
    buf = modern_virtio_net()
    virtio_cap(buf, 0x40, 1, bar=1, length=0x38, next_ptr=0x50)
    assert select_virtio_structures(parse_config(buf)).common is None


def test_selection_skips_a_bar_of_size_zero_when_sizes_are_known() -> None:
    cs = parse_config(modern_virtio_net())
    vs = select_virtio_structures(cs, bar_sizes={0: 0})
    assert vs.missing == ("common", "notify", "isr") and not vs.modern


def test_selection_rejects_a_structure_running_past_its_bar() -> None:
    cs = parse_config(modern_virtio_net())
    with pytest.raises(ConfigSpaceError, match="device config capability at 0x60: BAR0 \\+ "
                                                "0x4000 len 0x1000 runs past the BAR"):
        select_virtio_structures(cs, bar_sizes={0: 0x4800})


def test_selection_rejects_common_cfg_shorter_than_0x38() -> None:
    buf = modern_virtio_net()
    struct.pack_into("<I", buf, 0x4C, 0x34)
    with pytest.raises(ConfigSpaceError, match="common config capability at 0x40: length 0x34"):
        select_virtio_structures(parse_config(buf))


def test_selection_rejects_misaligned_notify_offset() -> None:
    buf = modern_virtio_net()
    struct.pack_into("<I", buf, 0x78, 0x6001)
    with pytest.raises(ConfigSpaceError, match="offset 0x6001 is not 2-byte aligned"):
        select_virtio_structures(parse_config(buf))


def test_selection_reports_missing_notify_and_isr() -> None:
    buf = header(cap_ptr=0x40)
    virtio_cap(buf, 0x40, 1, length=0x38)
    vs = select_virtio_structures(parse_config(buf))
    assert vs.missing == ("notify", "isr") and not vs.modern
    assert "not a modern device: notify, isr missing" in cli_text.format_info(buf)


def test_selection_ignores_reserved_cfg_types() -> None:
    buf = modern_virtio_net()
    virtio_cap(buf, 0xA8, 8, length=0x1000)  # shared memory: not a structure we map
    buf[0x99] = 0xA8
    cs = parse_config(buf)
    assert cs.virtio_caps[-1].cfg_name == "shared memory"
    assert select_virtio_structures(cs).modern


# ---------------------------------------------------------------------------
# Generated and corrupted config spaces: a clear error, never a hang or a crash
# ---------------------------------------------------------------------------

def parse_or_config_error(data: bytes) -> ConfigSpace | None:
    """Parse, format and select; only ConfigSpaceError may escape."""
    try:
        cs = parse_config(data)
    except ConfigSpaceError as exc:
        assert str(exc)
        return None
    cli_text.format_info(cs)
    try:
        select_virtio_structures(cs)
    except ConfigSpaceError:
        pass
    return cs


_SETTINGS = settings(max_examples=400, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(st.binary(min_size=0, max_size=300))
def test_random_bytes_of_any_length_never_crash(alarm: None, data: bytes) -> None:
    parse_or_config_error(data)


@_SETTINGS
@given(st.sampled_from([64, 256, 4096]).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
def test_random_bytes_of_valid_size_never_crash(alarm: None, data: bytes) -> None:
    parse_or_config_error(data)


@_SETTINGS
@given(st.binary(min_size=0xC0, max_size=0xC0), st.integers(0, 0xFF))
def test_random_capability_area_behind_a_virtio_header_never_crashes(
        alarm: None, body: bytes, first: int) -> None:
    buf = header(cap_ptr=first)
    buf[0x40:] = body
    parse_or_config_error(bytes(buf))


@_SETTINGS
@given(st.sampled_from(FIXTURES),
       st.lists(st.tuples(st.integers(0, 0xFF), st.integers(0, 0xFF)), min_size=1, max_size=8))
def test_corrupted_fixtures_never_crash(alarm: None, path: Path,
                                        edits: list[tuple[int, int]]) -> None:
    data = bytearray(path.read_bytes())
    for pos, value in edits:  # corrupt the header and the standard capability area
        data[pos] = value
    parse_or_config_error(bytes(data))


@_SETTINGS
@given(st.lists(st.sampled_from(range(0x40, 0x100, 4)), min_size=1, max_size=48, unique=True),
       st.data())
def test_generated_capability_chains_end_or_raise(alarm: None, chain: list[int],
                                                  data: st.DataObject) -> None:
    # A chain of distinct slots that ends, or whose last entry points back
    # into the chain: the loop must raise, the simple path must parse.
    back = data.draw(st.none() | st.integers(0, len(chain) - 1))
    buf = header(vendor=0x8086, device=0x1234, cap_ptr=chain[0])
    for here, nxt in zip(chain, chain[1:] + [0 if back is None else chain[back]]):
        buf[here] = 0x0A
        buf[here + 1] = nxt
    if back is not None:
        with pytest.raises(ConfigSpaceError, match=f"loops: pointer at {chain[-1] + 1:#x} goes "
                                                    f"back to {chain[back]:#x}"):
            parse_config(bytes(buf))
    else:
        assert [c.pos for c in parse_config(bytes(buf)).capabilities] == chain


@_SETTINGS
@given(st.integers(0, 4096))
def test_truncated_fixture_is_an_error_unless_a_whole_header(alarm: None, size: int) -> None:
    data = (VIRTIO_NET.read_bytes() + bytes(4096))[:size]
    if size in (64, 256, 4096):
        parse_config(data)
    else:
        with pytest.raises(ConfigSpaceError, match=f"config space is {size} bytes"):
            parse_config(data)


@_SETTINGS
@given(st.integers(0x40, 0xFC).map(lambda p: p & ~3), st.integers(0, 0xFF),
       st.integers(1, 9))
def test_generated_virtio_caps_are_validated(alarm: None, pos: int, cap_len: int,
                                             cfg_type: int) -> None:
    buf = header(cap_ptr=pos)
    buf[pos:pos + 4] = bytes([0x09, 0, cap_len, cfg_type])
    need = 20 if cfg_type in (2, 5) else 16
    fits = pos + cap_len <= 256
    if cap_len >= need and fits:
        assert parse_config(bytes(buf)).virtio_caps[0].cap_len == cap_len
    else:
        with pytest.raises(ConfigSpaceError, match=f"capability at {pos:#x}"):
            parse_config(bytes(buf))


# ---------------------------------------------------------------------------
# sysfs: a fake tree shaped like the real one
# ---------------------------------------------------------------------------

class FakeSysfs:
    """/sys laid out as Linux does: bus/pci/devices/X -> ../../../devices/pci0000:00/X."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.root = top / "bus" / "pci" / "devices"
        self.root.mkdir(parents=True)
        (top / "bus" / "pci" / "drivers_probe").write_text("")

    def add(self, address: str, *, vendor: int = 0x1AF4, device: int = 0x1041,
            class_code: int = 0x020000, subsystem: tuple[int, int] | None = (0x1AF4, 0x1041),
            driver: str | None = "virtio-pci", group: int | None = 7,
            numa: str | None = "0", override: str | None = "(null)",
            interfaces: dict[str, int] | None = None, iface_parent: str = "virtio2",
            config: bytes | None = None) -> Path:
        real = self.top / "devices" / "pci0000:00" / address
        real.mkdir(parents=True)
        (self.root / address).symlink_to(f"../../../devices/pci0000:00/{address}")
        (real / "vendor").write_text(f"{vendor:#06x}\n")
        (real / "device").write_text(f"{device:#06x}\n")
        (real / "class").write_text(f"{class_code:#08x}\n")
        if subsystem is not None:
            (real / "subsystem_vendor").write_text(f"{subsystem[0]:#06x}\n")
            (real / "subsystem_device").write_text(f"{subsystem[1]:#06x}\n")
        if numa is not None:
            (real / "numa_node").write_text(numa + "\n")
        if override is not None:
            (real / "driver_override").write_text(override + "\n")
        if driver is not None:
            self.driver_dir(driver)
            (real / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
        if group is not None:
            (self.top / "kernel" / "iommu_groups" / str(group) / "devices").mkdir(
                parents=True, exist_ok=True)
            (real / "iommu_group").symlink_to(f"../../../kernel/iommu_groups/{group}")
        for name, flags in (interfaces or {}).items():
            net = (real / iface_parent / "net" / name) if iface_parent else (real / "net" / name)
            net.mkdir(parents=True)
            (net / "flags").write_text(f"{flags:#x}\n")
        (real / "config").write_bytes(config if config is not None else VIRTIO_NET.read_bytes())
        (real / "resource").write_text(
            "0x0000004000100000 0x000000400017ffff 0x0000000000140204\n"
            + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 12)
        return real

    def driver_dir(self, driver: str) -> Path:
        path = self.top / "bus" / "pci" / "drivers" / driver
        path.mkdir(parents=True, exist_ok=True)
        for name in ("bind", "unbind"):
            (path / name).touch()
        return path


@pytest.fixture()
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    fake = FakeSysfs(tmp_path / "sys")
    monkeypatch.setenv("SYSFS_PCI_DEVICES", str(fake.root))
    return fake


def test_sysfs_root_is_sys_bus_pci_devices_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYSFS_PCI_DEVICES")
    assert pci_sysfs.sysfs_pci_devices() == Path("/sys/bus/pci/devices")


def test_sysfs_root_comes_from_SYSFS_PCI_DEVICES(sysfs: FakeSysfs) -> None:
    assert pci_sysfs.sysfs_pci_devices() == sysfs.root
    assert pci_sysfs.sysfs_pci_devices("/elsewhere") == Path("/elsewhere")  # explicit root wins


def test_scan_lists_devices_sorted_and_skips_names_that_are_not_addresses(
        sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:05.0")
    sysfs.add("0000:00:03.0")
    (sysfs.root / "not-a-device").mkdir()
    assert [str(d.address) for d in pci_sysfs.scan()] == ["0000:00:03.0", "0000:00:05.0"]


def test_scan_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert pci_sysfs.scan(tmp_path / "absent") == []


def test_device_reads_ids_class_driver_group_numa_and_config_path(sysfs: FakeSysfs) -> None:
    real = sysfs.add("0000:00:03.0", numa="1", interfaces={"eth0": 0x1003})
    d = pci_sysfs.read_device("00:03.0")
    assert (d.vendor_id, d.device_id) == (0x1AF4, 0x1041)
    assert (d.subsystem_vendor_id, d.subsystem_id) == (0x1AF4, 0x1041)
    assert d.class_code == 0x020000 and d.is_network and d.is_virtio_net
    assert d.driver == "virtio-pci" and d.iommu_group == 7 and d.numa_node == 1
    assert d.driver_override is None  # "(null)"
    assert d.interfaces == ("eth0",) and d.active_interfaces == ("eth0",)
    assert d.config_path == sysfs.root / "0000:00:03.0" / "config"
    assert d.config_path.resolve() == (real / "config").resolve()


def test_unbound_device_without_group_numa_or_override(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", driver=None, group=None, numa=None, override=None,
              subsystem=None)
    d = pci_sysfs.read_device("0000:00:03.0")
    assert d.driver is None and d.iommu_group is None and d.numa_node == -1
    assert d.driver_override is None and d.subsystem_id is None


def test_driver_override_is_read(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", override="vfio-pci")
    assert pci_sysfs.read_device("0000:00:03.0").driver_override == "vfio-pci"


def test_interfaces_are_found_under_net_and_under_a_virtio_child(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1002}, iface_parent="")
    sysfs.add("0000:00:04.0", interfaces={"ens4": 0x1003}, iface_parent="virtio3")
    a, b = pci_sysfs.scan()
    assert (a.interfaces, a.active_interfaces) == (("eth0",), ())  # IFF_UP clear
    assert (b.interfaces, b.active_interfaces) == (("ens4",), ("ens4",))


def test_interfaces_of_functions_behind_a_bridge_are_not_the_bridges(sysfs: FakeSysfs) -> None:
    bridge = sysfs.add("0000:00:1c.0", vendor=0x8086, device=0x1234, class_code=0x060400)
    child = bridge / "0000:01:00.0" / "net" / "eth9"
    child.mkdir(parents=True)
    assert pci_sysfs.read_device("0000:00:1c.0").interfaces == ()


def test_iommu_group_is_the_last_component_of_the_link(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", group=42)
    link = sysfs.root / "0000:00:03.0" / "iommu_group"
    assert os.readlink(link) == "../../../kernel/iommu_groups/42"
    assert link.resolve() == (sysfs.top / "kernel" / "iommu_groups" / "42").resolve()
    assert pci_sysfs.iommu_group("0000:00:03.0") == 42


def test_missing_device_raises_no_such_device(sysfs: FakeSysfs) -> None:
    with pytest.raises(NoSuchDeviceError, match="no PCI device 0000:00:09.0 under") as info:
        pci_sysfs.read_device("0000:00:09.0")
    assert isinstance(info.value, PmdError) and isinstance(info.value, LookupError)


def test_bad_address_to_read_device_is_a_value_error(sysfs: FakeSysfs) -> None:
    with pytest.raises(ValueError, match="bad PCI address"):
        pci_sysfs.read_device("eth0")


def test_config_read_through_sysfs_parses(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0")
    cs = parse_config(pci_sysfs.read_device("0000:00:03.0").read_config())
    assert cs.msix is not None and cs.msix.table_size == 3


def test_bar_sizes_come_from_the_resource_file(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0")
    assert pci_sysfs.read_device("0000:00:03.0").bar_sizes() == {0: 0x80000}


# --- status ---------------------------------------------------------------------

@pytest.fixture()
def vfio_dir(tmp_path: Path) -> Path:
    path = tmp_path / "dev-vfio"
    path.mkdir()
    (path / "vfio").touch()
    return path


def rows_by_address(vfio_dir: Path) -> dict[str, pci_sysfs.StatusRow]:
    return {str(r.address): r for r in pci_sysfs.status_rows(vfio_dir=vfio_dir)}


def test_status_lists_network_and_virtio_devices_only(sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:00.0", vendor=0x8086, device=0x0D57, class_code=0x060000,
              config=HOST_BRIDGE.read_bytes())
    sysfs.add("0000:00:02.0", device=0x1042, class_code=0x018000, subsystem=(0x1AF4, 0x1042))
    sysfs.add("0000:00:03.0")
    sysfs.add("0000:00:06.0", vendor=0x8086, device=0x1572)
    assert list(rows_by_address(vfio_dir)) == ["0000:00:02.0", "0000:00:03.0", "0000:00:06.0"]


def test_status_virtio_net_bound_to_vfio_pci_with_group_file_is_usable(
        sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", driver="vfio-pci", group=12)
    (vfio_dir / "12").touch()
    row = rows_by_address(vfio_dir)["0000:00:03.0"]
    assert row.usable and row.reason == str(vfio_dir / "12")
    assert (row.vendor_device, row.driver, row.iommu_group) == ("1af4:1041", "vfio-pci", 12)


def test_status_no_iommu_group_file_is_usable_in_noiommu_mode(
        sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", driver="vfio-pci", group=0)
    (vfio_dir / "noiommu-0").touch()
    row = rows_by_address(vfio_dir)["0000:00:03.0"]
    assert row.usable and "no-IOMMU mode" in row.reason


def test_status_bound_to_kernel_driver_is_not_usable_and_says_how_to_bind(
        sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1003})
    row = rows_by_address(vfio_dir)["0000:00:03.0"]
    assert not row.usable
    assert row.reason == ("bound to virtio-pci, interface eth0 is up; "
                          "`pmd bind 0000:00:03.0` moves it to vfio-pci")
    assert row.interfaces == ("eth0",)


def test_status_unbound_device_is_not_usable(sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", driver=None)
    assert rows_by_address(vfio_dir)["0000:00:03.0"].reason.startswith("bound to no driver")


def test_status_vfio_pci_without_group_file_is_not_usable(
        sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", driver="vfio-pci", group=12)
    row = rows_by_address(vfio_dir)["0000:00:03.0"]
    assert not row.usable and row.reason.endswith("12 does not exist (is the vfio-pci "
                                                  "module loaded?)")


def test_status_vfio_pci_without_iommu_group_is_not_usable(
        sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", driver="vfio-pci", group=None)
    row = rows_by_address(vfio_dir)["0000:00:03.0"]
    assert not row.usable and "no IOMMU group" in row.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root can open any file")
def test_status_group_file_without_permission_is_not_usable(
        sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", driver="vfio-pci", group=12)
    (vfio_dir / "12").touch(mode=0o000)
    row = rows_by_address(vfio_dir)["0000:00:03.0"]
    assert not row.usable and row.reason.startswith("no permission on")


def test_status_devices_pmd_does_not_drive_are_not_usable(
        sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:02.0", device=0x1042, class_code=0x018000, subsystem=(0x1AF4, 0x1042),
              driver="vfio-pci", group=3)
    sysfs.add("0000:00:06.0", vendor=0x8086, device=0x1572, driver="vfio-pci", group=4)
    (vfio_dir / "3").touch()
    (vfio_dir / "4").touch()
    rows = rows_by_address(vfio_dir)
    assert rows["0000:00:02.0"].reason == "virtio-block (modern): pmd drives only virtio-net"
    assert rows["0000:00:06.0"].reason == "not a virtio device: pmd drives only virtio-net"
    assert not any(r.usable for r in rows.values())


def test_status_transitional_virtio_net_is_recognised(sysfs: FakeSysfs, vfio_dir: Path) -> None:
    # Virtio 1.2 4.1.2.3: transitional device id 0x1000, type in the subsystem id.
    sysfs.add("0000:00:03.0", device=0x1000, subsystem=(0x1AF4, 0x0001), driver="vfio-pci",
              group=5)
    (vfio_dir / "5").touch()
    row = rows_by_address(vfio_dir)["0000:00:03.0"]
    assert row.usable and row.name == "virtio-net (transitional)"


def test_format_status_groups_usable_devices_first(sysfs: FakeSysfs, vfio_dir: Path) -> None:
    sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1003})
    sysfs.add("0000:00:07.0", driver="vfio-pci", group=12)
    (vfio_dir / "12").touch()
    text = cli_text.format_status(pci_sysfs.status_rows(vfio_dir=vfio_dir))
    usable, unusable = text.split("Devices pmd cannot use")
    assert "0000:00:07.0 'virtio-net (modern)' 1af4:1041 drv=vfio-pci group=12" in usable
    assert "0000:00:03.0" in unusable and "if=eth0*" in unusable
    assert text.rstrip().endswith("* interface is up")


# --- bind / unbind: only ever into the fake tree ---------------------------------

def test_bind_writes_driver_override_then_unbinds_then_probes(sysfs: FakeSysfs) -> None:
    real = sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1002})  # present but down
    previous = pci_sysfs.bind("0000:00:03.0", root=sysfs.root)
    assert previous == "virtio-pci"
    assert (real / "driver_override").read_text() == "vfio-pci"
    drivers = sysfs.top / "bus" / "pci" / "drivers"
    assert (drivers / "virtio-pci" / "unbind").read_text() == "0000:00:03.0"
    assert (sysfs.top / "bus" / "pci" / "drivers_probe").read_text() == "0000:00:03.0"


def test_bind_of_an_unbound_device_skips_the_unbind(sysfs: FakeSysfs) -> None:
    real = sysfs.add("0000:00:03.0", driver=None)
    assert pci_sysfs.bind("0000:00:03.0", root=sysfs.root) is None
    assert (real / "driver_override").read_text() == "vfio-pci"
    assert (sysfs.top / "bus" / "pci" / "drivers_probe").read_text() == "0000:00:03.0"


def test_bind_to_the_current_driver_writes_nothing(sysfs: FakeSysfs) -> None:
    real = sysfs.add("0000:00:03.0", driver="vfio-pci")
    assert pci_sysfs.bind("0000:00:03.0", root=sysfs.root) == "vfio-pci"
    assert (real / "driver_override").read_text() == "(null)\n"


def test_bind_refuses_a_device_whose_interface_is_up_unless_forced(sysfs: FakeSysfs) -> None:
    real = sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1003})
    with pytest.raises(DeviceBusyError, match="eth0, which is up"):
        pci_sysfs.bind("0000:00:03.0", root=sysfs.root)
    assert (real / "driver_override").read_text() == "(null)\n"  # nothing written
    pci_sysfs.bind("0000:00:03.0", root=sysfs.root, force=True)
    assert (real / "driver_override").read_text() == "vfio-pci"


def test_unbind_unbinds_clears_override_and_reprobes(sysfs: FakeSysfs) -> None:
    real = sysfs.add("0000:00:03.0", driver="vfio-pci", override="vfio-pci")
    assert pci_sysfs.unbind("0000:00:03.0", root=sysfs.root) == "vfio-pci"
    assert (sysfs.top / "bus/pci/drivers/vfio-pci/unbind").read_text() == "0000:00:03.0"
    assert (real / "driver_override").read_text() == "\n"
    assert (sysfs.top / "bus" / "pci" / "drivers_probe").read_text() == "0000:00:03.0"


def test_unbind_refuses_an_active_interface(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", interfaces={"eth0": 0x1003})
    with pytest.raises(DeviceBusyError):
        pci_sysfs.unbind("0000:00:03.0", root=sysfs.root)


def test_bind_never_creates_a_sysfs_file(sysfs: FakeSysfs) -> None:
    sysfs.add("0000:00:03.0", driver=None)
    (sysfs.top / "bus" / "pci" / "drivers_probe").unlink()
    with pytest.raises(FileNotFoundError, match="drivers_probe"):
        pci_sysfs.bind("0000:00:03.0", root=sysfs.root)
    assert not (sysfs.top / "bus" / "pci" / "drivers_probe").exists()


def _as(monkeypatch: pytest.MonkeyPatch, uid: int) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    monkeypatch.setattr(os, "getuid", lambda: uid)


def test_as_root_SYSFS_PCI_DEVICES_is_honoured_for_reading_only(sysfs: FakeSysfs,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # sudo -E keeps the variable: as root it must not choose where root writes
    # (a tree of symlinks would make bind write "vfio-pci" into any file).
    real = sysfs.add("0000:00:03.0")
    _as(monkeypatch, 0)
    assert pci_sysfs.read_device("0000:00:03.0").driver == "virtio-pci"     # reading: the variable holds
    assert [str(d.address) for d in pci_sysfs.scan()] == ["0000:00:03.0"]
    for call in (pci_sysfs.bind, pci_sysfs.unbind):
        with pytest.raises(PmdError, match="SYSFS_PCI_DEVICES.*as root.*unset it"):
            call("0000:00:03.0")
    assert (real / "driver_override").read_text() == "(null)\n"       # nothing written anywhere
    assert (sysfs.top / "bus/pci/drivers/virtio-pci/unbind").read_text() == ""
    assert (sysfs.top / "bus/pci/drivers_probe").read_text() == ""
    assert pci_sysfs.bind("0000:00:03.0", root=sysfs.root) == "virtio-pci"  # root= is the caller's own choice
    assert (real / "driver_override").read_text() == "vfio-pci"


def test_without_root_SYSFS_PCI_DEVICES_is_honoured_for_writing_too(sysfs: FakeSysfs,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = sysfs.add("0000:00:03.0")
    _as(monkeypatch, 1000)
    assert pci_sysfs.bind("0000:00:03.0") == "virtio-pci"
    assert (real / "driver_override").read_text() == "vfio-pci"


@pytest.mark.parametrize("which", ["driver_override", "unbind", "drivers_probe"])
def test_sysfs_writes_never_follow_a_symlink(sysfs: FakeSysfs, tmp_path: Path, which: str) -> None:
    # A sysfs attribute is never a symlink (the links are devices, drivers,
    # groups): one where pmd writes means this is not sysfs. O_NOFOLLOW.
    real = sysfs.add("0000:00:03.0")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = {"driver_override": real / "driver_override",
              "unbind": sysfs.top / "bus/pci/drivers/virtio-pci/unbind",
              "drivers_probe": sysfs.top / "bus/pci/drivers_probe"}[which]
    target.unlink()
    target.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        pci_sysfs.bind("0000:00:03.0", root=sysfs.root)
    assert victim.read_text() == "precious\n"


def test_sysfs_writes_go_only_to_regular_files(sysfs: FakeSysfs, no_hang: None) -> None:
    sysfs.add("0000:00:03.0")
    probe = sysfs.top / "bus/pci/drivers_probe"
    probe.unlink()
    os.mkfifo(probe)                                  # a plain O_WRONLY open would block forever
    with pytest.raises(OSError, match="not a regular file"):
        pci_sysfs.bind("0000:00:03.0", root=sysfs.root)


@pytest.fixture()
def no_hang() -> Iterator[None]:
    """Fail in seconds instead of hanging in an open or a read that never ends."""
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("a sysfs read or write blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_fifo_where_an_attribute_should_be_is_an_error_not_a_hang(sysfs: FakeSysfs, no_hang: None) -> None:
    real = sysfs.add("0000:00:03.0")
    (real / "driver_override").unlink()
    os.mkfifo(real / "driver_override")
    with pytest.raises(ValueError, match="not a regular file"):
        pci_sysfs.read_device("0000:00:03.0")


def test_a_device_node_where_config_should_be_is_an_error_not_an_endless_read(sysfs: FakeSysfs,
                                                                              no_hang: None) -> None:
    real = sysfs.add("0000:00:03.0")
    (real / "config").unlink()
    (real / "config").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        pci_sysfs.read_device("0000:00:03.0").read_config()


def test_docs_example_is_what_format_info_prints() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "pci.md").read_text()
    assert cli_text.format_info(VIRTIO_NET.read_bytes()) in doc
