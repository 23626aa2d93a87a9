"""Where a virtio-net device comes from: the one place that knows every backend.

:func:`open_port` stands above both sides of pmd: it starts the built-in device
(:mod:`pmd.sim`, a process of its own) or finds a device served elsewhere, opens
the driver's device access to it (:mod:`pmd.driver.access`: kernel VFIO or
vfio-user) and gives the driver (:class:`pmd.driver.port.Port`) what it drives.
The driver never imports the device side, and the device side never imports
the driver; only this package (and the in-process pieces that sit with it,
:mod:`pmd.backends.local`, :mod:`pmd.loopback`) puts them together.
"""

from __future__ import annotations

from typing import Any

from ..driver.port import Port
from ..spec.ethernet import format_mac

__all__ = ["open_port"]


def open_port(address: str = "sim", *, legacy: bool | None = None, disable: int | str = 0,
              mac: str | bytes | None = None, **kwargs: Any) -> Port:
    """Open a virtio-net device; the port is returned stopped (call :meth:`Port.start`).

    ``address`` is one of:

    - ``"sim"``: pmd's built-in virtio-net device, started in a process of its
      own and reached over vfio-user; keyword arguments are its options
      (``wire="loopback"``, ``queue_pairs=``, ``features_off=``, ... see
      docs/sim.md). It stops when the port closes.
    - ``"vfio-user:PATH"``: a vfio-user device already serving on the socket PATH
      (for example ``pmd sim --socket PATH``).
    - a PCI address of a device bound to vfio-pci (``"0000:00:03.0"``, ``"00:03.0"``):
      kernel VFIO; keyword arguments go to :meth:`pmd.driver.access.vfio.VfioAccess.open`.
    """
    if address == "sim" or address.startswith("sim:"):
        from ..driver.access.vfio_user import VfioUserAccess
        from ..sim.process import spawn_device

        if mac is not None:
            kwargs.setdefault("mac", mac if isinstance(mac, str) else format_mac(mac))
        sim = spawn_device(**kwargs)
        try:
            access = VfioUserAccess.connect(sim.socket_path)
            port = Port(access, legacy=legacy, disable=disable, name="sim")
        except BaseException:
            sim.stop()
            raise
        port.sim = sim
        port._on_close.append(sim.stop)
        return port
    if address.startswith("vfio-user:"):
        from ..driver.access.vfio_user import VfioUserAccess

        access = VfioUserAccess.connect(address[len("vfio-user:"):], **kwargs)
        return Port(access, legacy=legacy, disable=disable, mac=mac, name=address)
    from ..driver.access.vfio import VfioAccess

    vfio = VfioAccess.open(address, **kwargs)
    return Port(vfio, legacy=legacy, disable=disable, mac=mac, name=str(address))
