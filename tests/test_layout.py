"""C layouts and ring geometry against Virtio 1.2 section 2.7 and 4.1.4."""

import pytest

from pmd.driver._virtqueue import need_event, ring_layout, ring_size
from pmd.abi._layout import struct_sizes


@pytest.mark.parametrize(
    "num, expected",
    [
        # Linux's vring_size(num, 4096), computed by hand from 2.7:
        # desc 16n, avail 6+2n (align up to 4096), used 6+8n.
        (1, 4096 + 6 + 8),
        (8, 4096 + 6 + 64),
        (64, 4096 + 6 + 512),
        (256, 8192 + 6 + 2048),
        (1024, 20480 + 6 + 8192),
        (32768, 524288 + 65542 + 4096 - (524288 + 65542) % 4096 + 6 + 262144),
    ],
)
def test_ring_size_matches_legacy_formula(num, expected):
    assert ring_size(num) == expected


@pytest.mark.parametrize("num", [2, 16, 128, 256, 4096])
def test_ring_areas_follow_the_spec_layout(num):
    lay = ring_layout(num)
    assert lay["desc"] == (0, 16 * num)
    assert lay["avail"] == (16 * num, 6 + 2 * num)
    used_off, used_len = lay["used"]
    assert used_off % 4096 == 0 and used_off >= 16 * num + 6 + 2 * num
    assert used_off - (16 * num + 6 + 2 * num) < 4096
    assert used_len == 6 + 8 * num
    assert lay["total"] == used_off + used_len


def test_ring_size_with_modern_alignment_packs_used_ring():
    lay = ring_layout(256, align=4)
    assert lay["used"][0] == 16 * 256 + 6 + 2 * 256 + 2  # next multiple of 4


@pytest.mark.parametrize("num", [0, 3, 100, 65536, 32769])
def test_queue_size_must_be_power_of_two_up_to_32768(num):
    with pytest.raises(ValueError, match="power of two"):
        ring_size(num)


def test_alignment_must_be_power_of_two():
    with pytest.raises(ValueError, match="alignment"):
        ring_size(8, 3)


def test_struct_sizes_match_spec():
    s = struct_sizes()
    assert s["vring_desc"] == 16
    assert s["vring_used_elem"] == 8
    assert s["virtio_net_hdr"] == 12
    assert s["virtio_pci_cap"] == 16
    assert s["virtio_pci_common_cfg"] == 56


@pytest.mark.parametrize(
    "event, new, old, expected",
    [
        (0, 1, 0, True),       # event entry just written
        (5, 5, 4, False),      # event is one ahead of the new index
        (4, 5, 4, True),
        (3, 5, 4, False),      # event already passed before old
        (65535, 0, 65534, True),   # wraps past 65535
        (65535, 2, 65534, True),
        (1, 2, 65534, True),
        (2, 2, 65534, False),
        (100, 100, 100, False),    # nothing moved
    ],
)
def test_need_event_is_event_in_old_to_new_modulo_2_16(event, new, old, expected):
    assert need_event(event, new, old) is expected


def test_need_event_exhaustive_against_model():
    # (new - event - 1) mod 2^16 < (new - old) mod 2^16  <=> event in [old, new)
    for old in (0, 100, 65500):
        for step in (0, 1, 7, 300):
            new = (old + step) & 0xFFFF
            for event in range(old - 5, old + 310):
                e = event & 0xFFFF
                in_range = ((e - old) & 0xFFFF) < step
                assert need_event(e, new, old) == in_range


# ---- one definition in Python, held against the C structures of csrc/ ----

def test_common_config_table_is_the_c_structure():
    # Virtio 1.2 4.1.4.3: the table the driver's modern transport and the built-in
    # device both use is struct virtio_pci_common_cfg as the compiler laid it out.
    from pmd.abi._layout import common_cfg_layout
    from pmd.abi.virtio_pci import COMMON_CFG, COMMON_CFG_LEN, COMMON_CFG_STRUCT

    assert {f.name: (f.offset, f.width) for f in COMMON_CFG} == common_cfg_layout()
    assert COMMON_CFG_LEN == COMMON_CFG_STRUCT.size == struct_sizes()["virtio_pci_common_cfg"]


def test_common_config_fields_tile_the_structure_and_the_driver_writes_only_its_own():
    from pmd.abi.virtio_pci import COMMON_CFG

    ends = [f.offset + f.width for f in COMMON_CFG]
    assert [f.offset for f in COMMON_CFG] == [0] + ends[:-1]       # no gap, no overlap
    assert all(f.offset % f.width == 0 for f in COMMON_CFG)         # 4.1.3.1: natural alignment
    read_only = {f.name for f in COMMON_CFG if f.access == "ro"}
    assert read_only == {"device_feature", "num_queues", "config_generation", "queue_notify_off"}


def test_net_header_table_is_the_c_structure():
    from pmd.abi._layout import net_hdr_layout
    from pmd.abi.virtio_net import NET_HDR, NET_HDR_LEN, NET_HDR_LEN_LEGACY

    assert {f.name: (f.offset, f.width) for f in NET_HDR} == net_hdr_layout()
    assert NET_HDR_LEN == struct_sizes()["virtio_net_hdr"] == NET_HDR[-1].offset + NET_HDR[-1].width
    assert NET_HDR_LEN_LEGACY == dict((f.name, f.offset) for f in NET_HDR)["num_buffers"]


def test_hash_header_table_is_the_c_structure():
    # 5.1.6 with HASH_REPORT: le32 hash_value, le16 hash_report, le16 padding after num_buffers
    from pmd.abi._layout import net_hdr_hash_layout
    from pmd.abi.virtio_net import NET_HDR_HASH, NET_HDR_HASH_REPORT, NET_HDR_HASH_VALUE, NET_HDR_LEN_HASH

    assert {f.name: (f.offset, f.width) for f in NET_HDR_HASH} == net_hdr_hash_layout()
    assert NET_HDR_LEN_HASH == struct_sizes()["virtio_net_hdr_v1_hash"] == NET_HDR_HASH[-1].offset + 2
    assert (NET_HDR_HASH_VALUE, NET_HDR_HASH_REPORT) == (12, 16)


def test_numbers_python_and_c_both_define_are_the_same():
    from pmd.abi import pci, virtio, virtio_net
    from pmd.abi._layout import constants

    python = {name: getattr(virtio, name) for name in ("STATUS_ACKNOWLEDGE", "STATUS_DRIVER", "STATUS_DRIVER_OK",
                                                        "STATUS_FEATURES_OK", "STATUS_DEVICE_NEEDS_RESET",
                                                        "STATUS_FAILED", "NO_VECTOR")}
    python.update({name: getattr(pci, name) for name in ("VIRTIO_PCI_CAP_COMMON_CFG", "VIRTIO_PCI_CAP_NOTIFY_CFG",
                                                          "VIRTIO_PCI_CAP_ISR_CFG", "VIRTIO_PCI_CAP_DEVICE_CFG",
                                                          "VIRTIO_PCI_CAP_PCI_CFG")})
    python.update(NET_HDR_LEN=virtio_net.NET_HDR_LEN, NET_HDR_LEN_LEGACY=virtio_net.NET_HDR_LEN_LEGACY,
                  NET_HDR_LEN_HASH=virtio_net.NET_HDR_LEN_HASH)
    assert python == constants()


def test_net_config_fields_tile_what_the_device_shows():
    # 5.1.4: mac[6], status, max_virtqueue_pairs, mtu, speed, duplex, one after the other.
    from pmd.abi.virtio_net import NET_CFG_LENGTH, NET_CONFIG

    ends = [f.offset + f.width for f in NET_CONFIG]
    assert [f.offset for f in NET_CONFIG] == [0] + ends[:-1]
    assert NET_CFG_LENGTH == 17
