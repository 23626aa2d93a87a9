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

from ..driver.access import DeviceAccess
from ..driver.port import Port
from ..driver.virtio.pci import open_transport
from ..abi.ethernet import format_mac

__all__ = ["open_port"]


def open_port(address: str | DeviceAccess = "sim", *, legacy: bool | None = None, disable: int | str = 0,
              enable: int | str = 0,
              mac: str | bytes | None = None, name: str | None = None, **kwargs: Any) -> Port:
    """Open a virtio-net device; the port is returned stopped (call :meth:`Port.start`).

    ``address`` is one of:

    - ``"sim"``: pmd's built-in virtio-net device, started in a process of its
      own and reached over vfio-user; keyword arguments are its options
      (``wire="loopback"``, ``queue_pairs=``, ``features_off=``, ... see
      docs/sim.md). It stops when the port closes.
    - ``"vfio-user:PATH"``: a vfio-user device already serving on the socket PATH
      (for example ``pmd sim --socket PATH``).
    - ``"vhost-user:PATH"``: a vhost-user back-end (DPDK's ``net_vhost``, OVS-DPDK)
      listening on the socket PATH; with ``server=True`` pmd listens there and waits
      for the back-end to connect (DPDK: ``client=1``) and, unless ``reconnect=False``,
      resumes on a back-end that connects again after the first went away (the link
      goes down meanwhile); ``mtu=`` is the MTU the device reports (VIRTIO_NET_F_MTU;
      the back-end is told with NET_SET_MTU). Other keyword arguments go to
      :meth:`pmd.driver.vhost_user.VhostUserFrontend.connect` (``timeout=``, ``wait=``)
      or :meth:`~pmd.driver.vhost_user.VhostUserFrontend.listen` (``accept_timeout=``);
      see docs/vhost-user.md.
    - a PCI address of a device bound to vfio-pci (``"0000:00:03.0"``, ``"00:03.0"``):
      kernel VFIO; keyword arguments go to :meth:`pmd.driver.access.vfio.VfioAccess.open`;
    - a :class:`pmd.driver.access.DeviceAccess` already open (kernel VFIO, vfio-user,
      :class:`pmd.backends.local.LocalAccess`): the port owns it from here on.

    ``disable`` names features not to negotiate, ``enable`` the ones pmd takes only when asked
    (``"RING_PACKED"``: the packed ring, Virtio 1.2 2.8). ``legacy`` picks the PCI interface (:func:`pmd.driver.virtio.pci.open_transport`);
    ``name`` names the port (default: the address).
    """
    if isinstance(address, DeviceAccess):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} are for a device open_port opens itself, not for an access")
        return _port(address, legacy=legacy, disable=disable, enable=enable, mac=mac, name=name)
    if address == "sim" or address.startswith("sim:"):
        from ..driver.access.vfio_user import VfioUserAccess
        from ..sim.process import spawn_device

        if mac is not None:
            kwargs.setdefault("mac", mac if isinstance(mac, str) else format_mac(mac))
        sim = spawn_device(**kwargs)
        try:
            port = _port(VfioUserAccess.connect(sim.socket_path), legacy=legacy, disable=disable, enable=enable,
                         mac=None, name=name or "sim")
        except BaseException:
            sim.stop()
            raise
        port.sim = sim
        port.after_close(sim.stop)
        return port
    if address.startswith("vhost-user:"):
        if legacy:
            raise ValueError("legacy= picks a PCI interface; a vhost-user device has none")
        return _vhost_user_port(address[len("vhost-user:"):], disable=disable, enable=enable, mac=mac,
                                name=name or address,
                                **kwargs)
    if address.startswith("vfio-user:"):
        from ..driver.access.vfio_user import VfioUserAccess

        access = VfioUserAccess.connect(address[len("vfio-user:"):], **kwargs)
        return _port(access, legacy=legacy, disable=disable, enable=enable, mac=mac, name=name or address)
    from ..driver.access.vfio import VfioAccess

    vfio = VfioAccess.open(address, **kwargs)
    return _port(vfio, legacy=legacy, disable=disable, enable=enable, mac=mac, name=name or str(address))


def _port(access: DeviceAccess, *, legacy: bool | None, disable: int | str, enable: int | str,
          mac: str | bytes | None,
          name: str | None) -> Port:
    """A port on the virtio transport behind ``access``; it owns the access (closed on failure too)."""
    try:
        transport = open_transport(access, legacy=legacy)
    except BaseException:
        access.close()
        raise
    return Port(transport, disable=disable, enable=enable, mac=mac, name=name)


def _vhost_user_port(path: str, *, server: bool = False, disable: int | str, enable: int | str,
                     mac: str | bytes | None,
                     name: str, **kwargs: Any) -> Port:
    from ..driver.vhost_user import VhostUserFrontend
    from ..driver.virtio.vhost_user import VhostUserTransport

    if not path:
        raise ValueError("vhost-user: needs a socket path: open_port('vhost-user:/path/to.sock')")
    # DPDK's back-end answers late while its main thread is busy (its mbuf pool at start):
    # the session's 1 s default is too short on a loaded machine
    kwargs.setdefault("timeout", 5.0)
    reconnect = kwargs.pop("reconnect", None)
    mtu = kwargs.pop("mtu", None)
    if reconnect and not server:
        raise ValueError("reconnect=True needs server=True: pmd listens, and a backend that comes back "
                         "connects to it again")
    frontend = VhostUserFrontend.listen(path, **kwargs) if server else VhostUserFrontend.connect(path, **kwargs)
    try:
        transport = VhostUserTransport(frontend, reconnect=reconnect, mtu=mtu)
    except BaseException:
        frontend.close()
        raise
    return Port(transport, disable=disable, enable=enable, mac=mac, name=name)
