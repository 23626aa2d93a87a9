"""Virtio over PCI, driver side: which transport a device behind a device access speaks.

A PCI virtio device is reached through a :class:`pmd.driver.access.DeviceAccess`
(kernel VFIO, vfio-user, or a device model in this process); its configuration
space says whether it speaks the modern interface (vendor capabilities, 4.1.4)
or only the legacy one (a transitional device's I/O BAR0, 4.1.4.8).
:func:`open_transport` picks :class:`~pmd.driver.virtio.modern.ModernTransport`
or :class:`~pmd.driver.virtio.legacy.LegacyTransport`; what they share over
the access is :class:`~pmd.driver.virtio.pci_common.PciTransport`.
"""

from __future__ import annotations

from ...errors import DeviceError
from ...abi.pci import VIRTIO_VENDOR_ID, is_transitional, parse_config
from ..access import DeviceAccess
from .legacy import LegacyTransport
from .modern import ModernTransport
from .transport import Transport

__all__ = ["open_transport"]


def open_transport(access: DeviceAccess, *, legacy: bool | None = None, owns_access: bool = True) -> Transport:
    """The transport of a virtio device behind ``access``.

    ``legacy=None`` picks the modern interface when the virtio capabilities are
    there (4.1.4) and the legacy one otherwise (a transitional device's I/O BAR0);
    ``True``/``False`` insist on one. A device that is not virtio, or offers
    neither, is a clear error (and ``access`` stays open: the caller's to close).
    ``owns_access``: closing the transport closes ``access`` too.
    """
    raw = access.config_read(0, 256)
    config = parse_config(raw)
    if config.vendor_id != VIRTIO_VENDOR_ID:
        raise DeviceError(f"not a virtio device: vendor {config.vendor_id:#06x}, device "
                          f"{config.device_id:#06x} (virtio is vendor 0x1af4)")
    modern_ok = bool(config.virtio_caps)
    transitional = is_transitional(config.device_id)
    if legacy is None:
        legacy = not modern_ok and transitional
    if legacy:
        if not transitional:
            raise DeviceError(f"device {config.device_id:#06x} is not transitional: it has no legacy "
                              "interface (transitional ids are 0x1000-0x103f)")
        return LegacyTransport(access, owns_access=owns_access)
    if not modern_ok:
        raise DeviceError("the device has no virtio PCI capabilities (no modern interface)"
                          + ("; it is transitional: use legacy=True" if transitional else ""))
    return ModernTransport(access, config, owns_access=owns_access)
