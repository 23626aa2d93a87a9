"""C layouts and ring geometry against Virtio 1.2 section 2.7 and 4.1.4."""

import pytest

from pmd._virtqueue import need_event, ring_layout, ring_size, struct_sizes


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
