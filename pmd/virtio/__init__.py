"""Virtio over PCI: the transports (modern, legacy) and the virtio-net device logic."""

from __future__ import annotations

from ..access import DeviceAccess
from ..errors import DeviceError
from ..pci import VIRTIO_VENDOR_ID, parse_config
from .legacy import LegacyTransport
from .modern import ModernTransport
from .transport import NO_VECTOR, Transport


def open_transport(access: DeviceAccess, *, legacy: bool | None = None) -> Transport:
    """The transport of a virtio device behind ``access``.

    ``legacy=None`` picks the modern interface when the virtio capabilities are
    there (4.1.4) and the legacy one otherwise (a transitional device's I/O BAR0);
    ``True``/``False`` insist on one. A device that is not virtio, or offers
    neither, is a clear error.
    """
    raw = access.config_read(0, 256)
    config = parse_config(raw)
    if config.vendor_id != VIRTIO_VENDOR_ID:
        raise DeviceError(f"not a virtio device: vendor {config.vendor_id:#06x}, device "
                          f"{config.device_id:#06x} (virtio is vendor 0x1af4)")
    modern_ok = bool(config.virtio_caps)
    transitional = 0x1000 <= config.device_id <= 0x103F
    if legacy is None:
        legacy = not modern_ok and transitional
    if legacy:
        if not transitional:
            raise DeviceError(f"device {config.device_id:#06x} is not transitional: it has no legacy "
                              "interface (transitional ids are 0x1000-0x103f)")
        return LegacyTransport(access)
    if not modern_ok:
        raise DeviceError("the device has no virtio PCI capabilities (no modern interface)"
                          + ("; it is transitional: use legacy=True" if transitional else ""))
    return ModernTransport(access, config)


__all__ = ["open_transport", "Transport", "ModernTransport", "LegacyTransport", "NO_VECTOR"]
