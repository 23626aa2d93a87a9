"""What the ``pmd`` commands print: a config space, the device list, a VFIO device.

Text only, built from the vocabulary (:mod:`pmd.abi.pci`, :mod:`pmd.abi.virtio_pci`,
:mod:`pmd.abi.vfio`) and what the driver side found (sysfs rows, an open
:class:`pmd.driver.access.vfio.VfioAccess`); nothing here touches a device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..errors import ConfigSpaceError
from ..abi.pci import (
    PCI_BASE_ADDRESS_0,
    PCI_CAPABILITY_LIST,
    PCI_STATUS_CAP_LIST,
    VIRTIO_PCI_CAP_PCI_CFG,
    Capability,
    ConfigSpace,
    MsiCapability,
    MsixCapability,
    PcieCapability,
    VendorCapability,
    VirtioPciCap,
    class_name,
    parse_config,
)
from ..abi.vfio import IOMMU_TYPE_NAMES
from ..abi.virtio_pci import select_virtio_structures

if TYPE_CHECKING:
    from ..driver.access.vfio import VfioAccess
    from ..driver.sysfs import StatusRow

__all__ = ["format_info", "format_status", "format_vfio"]


def _command_bits(command: int) -> str:
    # 6.2.2: bit 0 I/O space, 1 memory space, 2 bus master, 10 INTx disable.
    names = [(0x1, "I/O"), (0x2, "memory"), (0x4, "bus master"), (0x400, "INTx disabled")]
    bits = [n for bit, n in names if command & bit]
    return ", ".join(bits) if bits else "nothing enabled"


def _status_bits(status: int) -> str:
    names = [(0x8, "interrupt pending"), (0x10, "capability list"), (0x20, "66 MHz")]
    bits = [n for bit, n in names if status & bit]
    return ", ".join(bits) if bits else "-"


def _cap_detail(cap: Capability) -> str:
    if isinstance(cap, VirtioPciCap):
        text = f"virtio {cap.cfg_name}"
        if cap.cfg_type == VIRTIO_PCI_CAP_PCI_CFG:
            return text + f" (window, driver-written: BAR{cap.bar} + {cap.offset:#x} " \
                          f"len {cap.length:#x})"
        text += f": BAR{cap.bar} + {cap.offset:#x} len {cap.length:#x}"
        if cap.notify_off_multiplier is not None:
            text += f", notify_off_multiplier {cap.notify_off_multiplier}"
        if not cap.bar_valid:
            text += " (reserved BAR value: ignored, Virtio 1.2 4.1.4)"
        return text + (f", id {cap.id}" if cap.id else "")
    if isinstance(cap, MsixCapability):
        return (f"{cap.table_size} vectors, {'enabled' if cap.enabled else 'disabled'}"
                f"{', function masked' if cap.function_mask else ''}; "
                f"table BAR{cap.table_bir} + {cap.table_offset:#x}, "
                f"PBA BAR{cap.pba_bir} + {cap.pba_offset:#x}")
    if isinstance(cap, MsiCapability):
        return (f"{cap.vectors} vectors, {'enabled' if cap.enabled else 'disabled'}, "
                f"{'64' if cap.is_64bit else '32'}-bit address"
                f"{', per-vector masking' if cap.per_vector_masking else ''}")
    if isinstance(cap, PcieCapability):
        return f"version {cap.version}, {cap.port_type_name}"
    if isinstance(cap, VendorCapability):
        return f"length {cap.cap_len}"
    return ""


def format_info(config: ConfigSpace | bytes | bytearray | memoryview, *,
                bar_sizes: Mapping[int, int] | None = None, title: str | None = None) -> str:
    """A config space as text: header, BARs, the capability chain, virtio structures, MSI-X.

    Backs ``pmd info --config FILE``. ``bar_sizes`` (BAR index -> bytes) adds
    sizes, which config bytes alone cannot give.
    """
    cs = config if isinstance(config, ConfigSpace) else parse_config(config)
    out: list[str] = []
    ids = f"{cs.vendor_id:04x}:{cs.device_id:04x}"
    head = ids if cs.name == ids else f"{ids} {cs.name}"
    out.append(f"{title}: {head}" if title else head)
    out.append(f"  class {cs.class_code:06x} ({class_name(cs.class_code)}), "
               f"revision {cs.revision:#04x}, {cs.size} bytes of config space")
    layout = {0: "endpoint", 1: "PCI-to-PCI bridge"}[cs.layout]
    out.append(f"  header type {cs.header_type:#04x} ({layout}"
               f"{', multi-function' if cs.multifunction else ''})")
    out.append(f"  command {cs.command:#06x} ({_command_bits(cs.command)}), "
               f"status {cs.status:#06x} ({_status_bits(cs.status)})")
    if cs.subsystem_vendor_id is not None:
        out.append(f"  subsystem {cs.subsystem_vendor_id:04x}:{cs.subsystem_id:04x}")
    pin = "none" if cs.interrupt_pin == 0 else (
        f"INT{'ABCD'[cs.interrupt_pin - 1]}" if cs.interrupt_pin <= 4 else f"{cs.interrupt_pin}")
    out.append(f"  interrupt pin {pin}, line {cs.interrupt_line}")

    out.append("BARs (PCI 3.0 6.2.5.1)")
    index = 0
    while index < cs.bar_count:
        bar = cs.bar(index)
        pos = PCI_BASE_ADDRESS_0 + 4 * index
        if bar is None:
            out.append(f"  BAR{index} {pos:#04x}  upper half of BAR{index - 1}")
        elif bar.raw == 0:
            out.append(f"  BAR{index} {pos:#04x}  not set")
        else:
            size = bar_sizes.get(index) if bar_sizes else None
            out.append(f"  BAR{index} {pos:#04x}  {bar.kind} at {bar.address:#x}"
                       + (f", {size:#x} bytes" if size else ""))
        index += 1

    if not cs.capabilities_read:
        out.append("Capabilities: not read; only the 64-byte header is here "
                   "(sysfs gives more to root only)")
    elif not cs.status & PCI_STATUS_CAP_LIST:
        out.append("Capabilities: none (status bit 4 clear)")
    else:
        first = cs.data[PCI_CAPABILITY_LIST] & 0xFC
        out.append(f"Capabilities (PCI 3.0 6.7; list at 0x34 -> {first:#x})")
        if not cs.capabilities:
            out.append("  <empty>")
        for cap in cs.capabilities:
            detail = _cap_detail(cap)
            nxt = f"-> {cap.next_ptr:#x}" if cap.next_ptr else "-> end"
            out.append(f"  {cap.pos:#04x} [{cap.cap_id:#04x}] {cap.name:<16} {nxt:<8}"
                       + (f" {detail}" if detail else ""))
    for ext in cs.extended_capabilities:
        out.append(f"  {ext.pos:#05x} [{ext.cap_id:#06x}] {ext.name} v{ext.version}")

    if cs.virtio_caps:
        out.append("Virtio structures (Virtio 1.2 4.1.4; first usable of each type)")
        try:
            vs = select_virtio_structures(cs, bar_sizes)
        except ConfigSpaceError as exc:
            out.append(f"  unusable: {exc}")
        else:
            for name in ("common", "notify", "isr", "device"):
                cap = getattr(vs, name)
                if cap is None:
                    out.append(f"  {name:<7} missing")
                    continue
                text = (f"  {name:<7} BAR{cap.bar} + {cap.offset:#x} len {cap.length:#x} "
                        f"(capability at {cap.pos:#x})")
                if cap.notify_off_multiplier is not None:
                    text += f", notify_off_multiplier {cap.notify_off_multiplier}"
                out.append(text)
            if vs.pci_cfg is not None:
                out.append(f"  pci_cfg capability at {vs.pci_cfg.pos:#x}")
            if vs.missing:
                out.append(f"  not a modern device: {', '.join(vs.missing)} missing "
                           f"(Linux falls back to legacy virtio-pci)")
    msix = cs.msix
    if msix is not None:
        out.append(f"MSI-X (PCI 3.0 6.8.2): {msix.table_size} vectors, "
                   f"{'enabled' if msix.enabled else 'disabled'}; "
                   f"table BAR{msix.table_bir} + {msix.table_offset:#x} "
                   f"({msix.table_bytes:#x} bytes), "
                   f"PBA BAR{msix.pba_bir} + {msix.pba_offset:#x} ({msix.pba_bytes:#x} bytes)")
    return "\n".join(out) + "\n"


def format_status(rows: Iterable[StatusRow]) -> str:
    """The rows as text, usable devices first, in the manner of ``dpdk-devbind.py --status``."""
    rows = list(rows)
    out: list[str] = []
    for title, usable in (("Devices pmd can use now", True),
                          ("Devices pmd cannot use", False)):
        out += [title, "=" * len(title)]
        group = [r for r in rows if r.usable == usable]
        if not group:
            out.append("<none>")
        for r in group:
            ifaces = ",".join(f"{i}*" if i in r.active_interfaces else i for i in r.interfaces)
            text = (f"{r.address} '{r.name}' {r.vendor_device} drv={r.driver or '-'} "
                    f"group={'-' if r.iommu_group is None else r.iommu_group}")
            if ifaces:
                text += f" if={ifaces}"
            out.append(f"{text}  ({r.reason})")
        out.append("")
    if any(r.active_interfaces for r in rows):
        out.append("* interface is up")
    return "\n".join(out).rstrip("\n") + "\n"


_REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5",
                 6: "ROM", 7: "config", 8: "VGA"}


def _irq_flags(flags: int) -> str:
    names = [(1, "EVENTFD"), (2, "MASKABLE"), (4, "AUTOMASKED"), (8, "NORESIZE")]
    return "|".join(n for bit, n in names if flags & bit) or "0"


def _page_sizes(mask: int) -> str:
    """``0x40201000`` -> ``4K, 2M, 1G``."""
    sizes = []
    for bit in range(64):
        if mask >> bit & 1:
            shift, unit = next((s, u) for s, u in ((30, "G"), (20, "M"), (10, "K"), (0, "")) if bit >= s)
            sizes.append(f"{1 << (bit - shift)}{unit}")
    return ", ".join(sizes) or "not reported"


def format_vfio(vdev: VfioAccess) -> str:
    """VFIO's view of an open device: IOMMU, flags, regions (with sparse areas), IRQ indexes."""
    info = vdev.device_info
    out = [f"VFIO (group {vdev.group}, {vdev.group_path}, "
           f"{IOMMU_TYPE_NAMES.get(vdev.iommu_type, str(vdev.iommu_type))} IOMMU, IOVA mode {vdev.iova_mode})"]
    if vdev.iova_mode == "va":
        iommu = vdev.iommu_info()
        ranges = ", ".join(f"[{a:#x}, {b:#x}]" for a, b in iommu.iova_ranges) or "not reported (any)"
        out.append(f"  IOMMU page sizes {iommu.iova_pgsizes:#x} ({_page_sizes(iommu.iova_pgsizes)}); "
                   f"IOVA ranges {ranges}")
        if iommu.iova_ranges and max(b for _a, b in iommu.iova_ranges) < (1 << 47) - 1:
            out.append(f"  the IOMMU has {max(b for _a, b in iommu.iova_ranges).bit_length()} address bits: "
                       "IOVA = virtual address fails for memory mmap puts high; pmd's map_memory() "
                       "picks IOVAs inside these ranges")
    else:
        out.append("  no IOMMU: the device is given physical addresses (/proc/self/pagemap)")
    out.append(f"  device flags {info.flags:#x} ({'PCI' if info.is_pci else 'not PCI'}, "
               f"{'reset' if info.supports_reset else 'no reset'}), "
               f"{info.num_regions} regions, {info.num_irqs} IRQ indexes")
    for r in vdev.regions():
        name = _REGION_NAMES.get(r.index, f"region {r.index}")
        if not r.size:
            out.append(f"  region {r.index} {name:<6} not implemented")
            continue
        line = (f"  region {r.index} {name:<6} size {r.size:#x} offset {r.offset:#x} "
                f"[{r.describe_flags()}]")
        if r.sparse_areas is not None:
            line += " sparse mmap " + (", ".join(f"{a.offset:#x}+{a.size:#x}" for a in r.sparse_areas)
                                       or "(none)")
        if r.msix_mappable:
            line += " MSIX_MAPPABLE"
        if r.type is not None:
            line += f" type {r.type[0]}:{r.type[1]}"
        out.append(line)
    for index in range(info.num_irqs):
        irq = vdev.irq_info(index)
        out.append(f"  irq {index} {irq.name:<6} count {irq.count}"
                   + (f" [{_irq_flags(irq.flags)}]" if irq.flags else ""))
    return "\n".join(out)


#: ``pmd info``: what each interrupt mode of a port means (Transport.interrupt_mode)
INTERRUPT_MODES = {
    "msix": "MSI-X (a vector for configuration changes, one per rx queue, shared when too few)",
    "msi": "MSI (no MSI-X: one interrupt for every source, the cause read from ISR, 4.1.4.5)",
    "intx": "INTx (no MSI-X or MSI: the level-triggered line, the cause read from ISR, 4.1.4.5, "
            "then unmasked)",
    "callfd": "call eventfds (vhost-user: one per ring)",
    "none": "none (no interrupt with eventfds: link changes only by reading port.link, no rx_wait)",
}


def format_virtio(offered: int, *, transport_bits: int, transport: str, interrupts: str | None = None) -> str:
    """What the device offers, what pmd takes by default, and the ring layout that gives."""
    from ..abi import virtio as V
    from ..abi import virtio_net as NN
    from ..driver.virtio import net as N

    accepted = N.negotiate(offered, transport_bits=transport_bits)
    packed = V.bit(V.RING_PACKED)
    if accepted & packed:
        rings = 'packed (Virtio 1.2 2.8; disable="RING_PACKED", pmd fwd --disable RING_PACKED, for split)'
    elif offered & packed and N.OPT_IN & packed:
        rings = 'split (2.7); packed offered: enable="RING_PACKED", pmd fwd --enable RING_PACKED'
    else:
        rings = "split (Virtio 1.2 2.7; the device offers no VIRTIO_F_RING_PACKED)"
    in_order = V.bit(V.IN_ORDER)
    if accepted & in_order:
        order = 'in order (VIRTIO_F_IN_ORDER, 2.7.9 / 2.8.9; disable="IN_ORDER", pmd fwd --disable IN_ORDER)'
    elif offered & in_order & ((1 << transport_bits) - 1):
        order = 'not in order; IN_ORDER offered: enable="IN_ORDER", pmd fwd --enable IN_ORDER'
    else:
        order = "not in order (the device offers no VIRTIO_F_IN_ORDER)"
    return "\n".join([
        f"Virtio ({transport})",
        f"  device features {offered:#x}: {', '.join(NN.feature_names(offered)) or '(none)'}",
        f"  pmd takes {accepted:#x}: {', '.join(NN.feature_names(accepted)) or '(none)'}",
        f"  rings: {rings}",
        f"  used buffers: {order}",
        f"  rss: {rss_text(offered)}",
    ] + ([f"  interrupts: {INTERRUPT_MODES.get(interrupts, interrupts)}"] if interrupts else [])) + "\n"


def rss_text(offered: int) -> str:
    """What pmd does with the device's RSS and hash report (docs/rss.md)."""
    from ..abi import virtio as V
    from ..abi import virtio_net as NN

    rss, report = bool(offered & V.bit(NN.NET_RSS)), bool(offered & V.bit(NN.NET_HASH_REPORT))
    if not rss and not report:
        return "not offered (several queues use the device's automatic steering)"
    what = " and ".join(n for n, on in (("RSS", rss), ("HASH_REPORT", report)) if on)
    return f"{what} offered: taken with 2 queue pairs or more (disable=\"RSS,HASH_REPORT\" turns them off)"


def port_rss_text(rss: dict[str, object] | None) -> str:
    """One line on a started port's RSS (``Port.rss``)."""
    if rss is None:
        return "off"
    types = ",".join(rss["hash_types"]) if isinstance(rss["hash_types"], list) else rss["hash_types"]
    if rss["steering"]:
        return f"on, {rss['entries']} table entries, hash types {types}, hash report " + \
            ("on" if rss["hash_report"] else "off")
    return f"hash report only (HASH_CONFIG), hash types {types}"
