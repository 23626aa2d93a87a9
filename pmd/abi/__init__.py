"""The interfaces pmd speaks, as one shared vocabulary: the virtio, virtio-net, PCI, VFIO,
vfio-user and vhost-user specifications, Ethernet and pcap, as constants, layouts and strict
codecs (standard library only). Both sides, the driver and the built-in device, import it;
it imports neither.
"""
