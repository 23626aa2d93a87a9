"""The driver side of pmd: what talks to a device, and never to the built-in device.

Bottom up (docs/architecture.md):

- reaching a device: :mod:`pmd.driver.sysfs` (this host's PCI devices),
  :mod:`pmd.driver.access` (the :class:`~pmd.driver.access.DeviceAccess` interface:
  kernel VFIO, vfio-user), :mod:`pmd.driver._mmio` (register windows),
  :mod:`pmd.driver.vhost_user` (a vhost-user session);
- :mod:`pmd.driver.interrupts`: eventfds and the interrupt thread;
- the data path (Cython): :mod:`~pmd.driver._pool` (packet buffers),
  :mod:`~pmd.driver._virtqueue` (the split ring), :mod:`~pmd.driver._rx`
  (receive and refill), :mod:`~pmd.driver._tx` (transmit and reclaim), with
  what they share in :mod:`~pmd.driver._queue`;
- :mod:`pmd.driver.virtio`: the transport interface, the PCI transports, virtio-net;
- :mod:`pmd.driver.port`: the :class:`~pmd.driver.port.Port`.

It imports the shared vocabulary (:mod:`pmd.abi`, :mod:`pmd.memory`) and
nothing of :mod:`pmd.sim`.
"""
