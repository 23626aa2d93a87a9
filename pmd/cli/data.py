"""What the ``pmd`` commands print with ``--json``: the facts of :mod:`pmd.cli.text` as plain data.

Dicts, lists, strings, numbers and booleans only, ready for :func:`json.dumps`; numbers stay
numbers (a feature mask, an address), the names beside them are what the text shows.
Nothing here touches a device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..abi.pci import ConfigSpace, MsixCapability, VirtioPciCap, class_name, parse_config
from ..abi.vfio import IOMMU_TYPE_NAMES
from ..abi.virtio_pci import select_virtio_structures
from ..errors import ConfigSpaceError
from .text import _REGION_NAMES, _cap_detail, _irq_flags

if TYPE_CHECKING:
    from ..driver.access.vfio import VfioAccess
    from ..driver.sysfs import StatusRow

__all__ = ["status_data", "info_data", "vfio_data", "virtio_data"]


def status_data(rows: Iterable[StatusRow], why_none_usable: Sequence[str] | None = None) -> dict[str, Any]:
    """``pmd status --json``: every device, usable ones first, and why none is usable."""
    rows = sorted(rows, key=lambda r: not r.usable)
    return {
        "devices": [{"address": str(r.address), "name": r.name, "vendor_id": r.vendor_id,
                     "device_id": r.device_id, "driver": r.driver, "iommu_group": r.iommu_group,
                     "interfaces": list(r.interfaces), "active_interfaces": list(r.active_interfaces),
                     "usable": r.usable, "reason": r.reason} for r in rows],
        "usable": [str(r.address) for r in rows if r.usable],
        "why_none_usable": list(why_none_usable) if why_none_usable else [],
    }


def info_data(config: ConfigSpace | bytes | bytearray | memoryview, *,
              bar_sizes: Mapping[int, int] | None = None, title: str | None = None) -> dict[str, Any]:
    """``pmd info --json``: a config space's header, BARs, capabilities, virtio structures, MSI-X."""
    cs = config if isinstance(config, ConfigSpace) else parse_config(config)
    bars: list[dict[str, Any]] = []
    for index in range(cs.bar_count):
        bar = cs.bar(index)
        if bar is None or bar.raw == 0:
            continue                          # the upper half of a 64-bit BAR, or not set
        bars.append({"index": index, "kind": bar.kind, "address": bar.address, "io": bar.io,
                     "is_64bit": bar.is_64bit, "prefetchable": bar.prefetchable,
                     "size": bar_sizes.get(index) if bar_sizes else None})
    caps: list[dict[str, Any]] = []
    for cap in cs.capabilities:
        entry: dict[str, Any] = {"pos": cap.pos, "id": cap.cap_id, "name": cap.name, "next": cap.next_ptr,
                                 "detail": _cap_detail(cap)}
        if isinstance(cap, VirtioPciCap):
            entry["virtio"] = {"cfg_type": cap.cfg_type, "cfg_name": cap.cfg_name, "bar": cap.bar,
                               "offset": cap.offset, "length": cap.length,
                               "notify_off_multiplier": cap.notify_off_multiplier}
        caps.append(entry)
    out: dict[str, Any] = {
        "title": title, "vendor_id": cs.vendor_id, "device_id": cs.device_id, "name": cs.name,
        "class_code": cs.class_code, "class_name": class_name(cs.class_code), "revision": cs.revision,
        "config_size": cs.size, "header_type": cs.header_type, "multifunction": cs.multifunction,
        "command": cs.command, "status": cs.status,
        "subsystem_vendor_id": cs.subsystem_vendor_id, "subsystem_id": cs.subsystem_id,
        "interrupt_pin": cs.interrupt_pin, "interrupt_line": cs.interrupt_line,
        "bars": bars, "capabilities_read": cs.capabilities_read, "capabilities": caps,
        "extended_capabilities": [{"pos": e.pos, "id": e.cap_id, "name": e.name, "version": e.version}
                                  for e in cs.extended_capabilities],
        "virtio_structures": None, "msix": None,
    }
    if cs.virtio_caps:
        try:
            vs = select_virtio_structures(cs, bar_sizes)
        except ConfigSpaceError as exc:
            out["virtio_structures"] = {"unusable": str(exc)}
        else:
            chosen: dict[str, Any] = {}
            for name in ("common", "notify", "isr", "device"):
                cap = getattr(vs, name)
                chosen[name] = None if cap is None else {
                    "bar": cap.bar, "offset": cap.offset, "length": cap.length, "pos": cap.pos,
                    "notify_off_multiplier": cap.notify_off_multiplier}
            chosen["pci_cfg"] = vs.pci_cfg.pos if vs.pci_cfg is not None else None
            chosen["missing"] = list(vs.missing)
            out["virtio_structures"] = chosen
    msix = cs.msix
    if isinstance(msix, MsixCapability):
        out["msix"] = {"table_size": msix.table_size, "enabled": msix.enabled,
                       "table_bar": msix.table_bir, "table_offset": msix.table_offset,
                       "table_bytes": msix.table_bytes, "pba_bar": msix.pba_bir,
                       "pba_offset": msix.pba_offset, "pba_bytes": msix.pba_bytes}
    return out


def vfio_data(vdev: VfioAccess) -> dict[str, Any]:
    """VFIO's view of an open device: IOMMU, regions, IRQ indexes."""
    info = vdev.device_info
    out: dict[str, Any] = {"group": vdev.group, "group_path": str(vdev.group_path),
                           "iommu": IOMMU_TYPE_NAMES.get(vdev.iommu_type, str(vdev.iommu_type)),
                           "iova_mode": vdev.iova_mode, "flags": info.flags, "regions": [], "irqs": []}
    if vdev.iova_mode == "va":
        iommu = vdev.iommu_info()
        out["iova_pgsizes"] = iommu.iova_pgsizes
        out["iova_ranges"] = [[a, b] for a, b in iommu.iova_ranges]
    for r in vdev.regions():
        out["regions"].append({"index": r.index, "name": _REGION_NAMES.get(r.index, f"region {r.index}"),
                               "size": r.size, "offset": r.offset, "flags": r.describe_flags() if r.size else "",
                               "sparse_areas": None if r.sparse_areas is None else
                               [[a.offset, a.size] for a in r.sparse_areas],
                               "msix_mappable": bool(r.msix_mappable),
                               "type": list(r.type) if r.type is not None else None})
    for index in range(info.num_irqs):
        irq = vdev.irq_info(index)
        out["irqs"].append({"index": index, "name": irq.name, "count": irq.count, "flags": irq.flags,
                            "flag_names": _irq_flags(irq.flags) if irq.flags else ""})
    return out


def virtio_data(offered: int, *, transport_bits: int, transport: str,
                interrupts: str | None = None) -> dict[str, Any]:
    """What the device offers and what pmd takes by default (the facts of ``format_virtio``)."""
    from ..abi import virtio as V
    from ..abi import virtio_net as NN
    from ..driver.virtio import net as N

    accepted = N.negotiate(offered, transport_bits=transport_bits)
    return {"transport": transport, "device_features": offered, "device_feature_names": NN.feature_names(offered),
            "accepted_features": accepted, "accepted_feature_names": NN.feature_names(accepted),
            "ring_layout": "packed" if accepted & V.bit(V.RING_PACKED) else "split",
            "in_order": bool(accepted & V.bit(V.IN_ORDER)),
            "rss_offered": bool(offered & V.bit(NN.NET_RSS)),
            "hash_report_offered": bool(offered & V.bit(NN.NET_HASH_REPORT)),
            "interrupts": interrupts}
