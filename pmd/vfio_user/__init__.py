"""vfio-user: PCI devices served by another process over a UNIX socket.

- :mod:`pmd.vfio_user.protocol`: the wire format (header, commands, payloads) with strict decoding;
- :mod:`pmd.vfio_user.client`: :class:`VfioUserDevice`, a :class:`pmd.access.DeviceAccess`;
- :mod:`pmd.vfio_user.server`: :class:`VfioUserServer`, which serves a
  :class:`pmd.vfio_user.model.DeviceModel` (pmd's built-in virtio-net device is one).

See docs/vfio-user.md.
"""

from __future__ import annotations

from .client import VfioUserDevice
from .model import DeviceModel, RegionSpec
from .server import VfioUserServer

__all__ = ["VfioUserDevice", "VfioUserServer", "DeviceModel", "RegionSpec"]
