"""The virtio layer of the driver: the transport interface, its PCI transports, virtio-net.

- :mod:`pmd.driver.virtio.transport`: :class:`Transport`, what the virtio-net
  logic and the Port see of a device (DPDK's ``virtio_ops``); it assumes no PCI;
- :mod:`pmd.driver.virtio.pci`, :mod:`~pmd.driver.virtio.modern`,
  :mod:`~pmd.driver.virtio.legacy`: the modern and legacy PCI transports over a
  :class:`pmd.driver.access.DeviceAccess`, and :func:`~pmd.driver.virtio.pci.open_transport`;
- :mod:`pmd.driver.virtio.net`: virtio-net negotiation, configuration, the control queue.
"""
