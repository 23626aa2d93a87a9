"""The vhost-user wire format: request codes, header, payloads, protocol features, framing.

The reference is QEMU's ``docs/interop/vhost-user.rst`` ("Vhost-user Protocol"); section
names below are that document's. A *front-end* (pmd, QEMU, DPDK's virtio-user) shares
its virtqueues and memory with a *back-end* (DPDK's vhost library, a software switch)
over a UNIX stream socket. Every message is a 12-byte header and a payload, in the
machine's native byte order ("Message Specification")::

    offset  size  field
    0       4     request   (a front-end message type on the main socket; a back-end
                             message type on the back-end channel)
    4       4     flags     bits 0-1 version (0x1), bit 2 reply, bit 3 need_reply
    8       4     size      of the payload (the header not included)

There is no message id: a reply is the next message the other side sends, and carries
the request code it answers. File descriptors travel beside the bytes as ``SCM_RIGHTS``
ancillary data of the ``sendmsg`` that carries the header: the memory of
``SET_MEM_TABLE``, the eventfds of ``SET_VRING_KICK``/``CALL``/``ERR``, ...

Everything decoded here is untrusted. Each ``decode_*`` checks the exact payload size
and every field it can and raises :class:`MessageError` saying what was wrong: never an
``IndexError``, a ``struct.error`` or a hang. :func:`recv_message` frames messages on a
stream socket with a deadline, a largest payload and a largest number of file
descriptors (the extra ones are closed); a message that breaks the framing raises a
*fatal* :class:`MessageError` (the byte stream cannot be trusted any more).

Pure vocabulary: the standard library and :mod:`pmd.errors`, nothing else of pmd, so
both a front-end (``pmd.driver.vhost_user``) and a back-end can be built on it.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import PmdError
from .stream import FdCarrier, close_fds, deadline_after, recv_upto, send_all

__all__ = [
    "VhostUserError",
    "MessageError",
    "vhost_user_error",
    "message_error",
    # header
    "VHOST_USER_VERSION",
    "FLAG_VERSION_MASK",
    "FLAG_REPLY",
    "FLAG_NEED_REPLY",
    "HEADER",
    "HEADER_SIZE",
    # feature bits
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_F_LOG_ALL",
    "VIRTIO_F_IOMMU_PLATFORM",
    "VIRTIO_F_RING_PACKED",
    "PROTOCOL_FEATURE_NAMES",
    "protocol_feature_names",
    # limits
    "VHOST_MEMORY_BASELINE_NREGIONS",
    "VHOST_USER_MAX_CONFIG_SIZE",
    "VHOST_USER_VRING_IDX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "VHOST_VRING_F_LOG",
    "VHOST_LOG_PAGE",
    "MAX_VRINGS",
    "MAX_QUEUE_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_FDS",
    # names
    "FRONTEND_REQUEST_NAMES",
    "BACKEND_REQUEST_NAMES",
    "REPLY_REQUESTS",
    "request_name",
    "has_reply",
    # payloads
    "VringState",
    "VringAddr",
    "VringFile",
    "MemoryRegion",
    "ConfigSpace",
    "Inflight",
    "IotlbMsg",
    "VringArea",
    "DeviceStateTransfer",
    "PackedBase",
    "encode_u64",
    "decode_u64",
    "encode_vring_state",
    "decode_vring_state",
    "decode_split_base",
    "encode_packed_base",
    "decode_packed_base",
    "encode_vring_addr",
    "decode_vring_addr",
    "encode_vring_file",
    "decode_vring_file",
    "encode_memory_table",
    "decode_memory_table",
    "encode_mem_region",
    "decode_mem_region",
    "encode_log",
    "decode_log",
    "encode_config",
    "decode_config",
    "encode_inflight",
    "decode_inflight",
    "encode_iotlb",
    "decode_iotlb",
    "encode_vring_area",
    "decode_vring_area",
    "encode_shared_object",
    "decode_shared_object",
    "encode_device_state",
    "decode_device_state",
    "decode_reply_ack",
    "decode_status",
    # framing
    "Message",
    "encode_header",
    "encode_message",
    "encode_reply",
    "decode_header",
    "check_request_flags",
    "check_reply",
    "deadline_after",
    "send_message",
    "recv_message",
    "close_fds",
]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


class VhostUserError(PmdError, OSError):
    """A vhost-user session failed; the message names the socket, the request and the remedy.

    ``errno`` says what kind of failure (``ENOENT`` no backend at the path, ``ETIMEDOUT``
    no reply in time, ``EPROTO`` a reply that breaks the protocol, ``EPIPE`` a session
    already broken, ``ENOTSUP`` a feature the backend did not offer, ...).
    """


class MessageError(VhostUserError):
    """A vhost-user message that breaks the protocol.

    ``fatal`` is true when the byte stream itself can no longer be trusted (a size that
    cannot be right, a message cut short, a timeout in the middle of one): the
    connection must be dropped. Otherwise the message was framed correctly and only
    its content is wrong. ``request`` is the message's request code when its header
    could be read.
    """

    fatal: bool = False
    request: int | None = None


def vhost_user_error(text: str, err: int) -> VhostUserError:
    """A :class:`VhostUserError` whose ``str()`` is ``text`` and whose ``errno`` is ``err``."""
    exc = VhostUserError(text)
    exc.errno = err
    return exc


def message_error(
    text: str, err: int = errno.EPROTO, *, fatal: bool = False, request: int | None = None
) -> MessageError:
    """A :class:`MessageError` whose ``str()`` is ``text`` and whose ``errno`` is ``err``."""
    exc = MessageError(text)
    exc.errno = err
    exc.fatal = fatal
    exc.request = request
    return exc


# ---------------------------------------------------------------------------
# header ("Message Specification", "Header")
# ---------------------------------------------------------------------------

VHOST_USER_VERSION = 0x1  # the only version there is; in the lower two bits of flags
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2  # set on every reply from the back-end
FLAG_NEED_REPLY = 1 << 3  # REPLY_ACK: the receiver must answer (section "VHOST_USER_PROTOCOL_F_REPLY_ACK")
_FLAG_KNOWN = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: request u32, flags u32, size u32; "All numbers are in the machine native byte order"
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12

# ---------------------------------------------------------------------------
# feature bits ("Communication", "Migration", "Memory access")
# ---------------------------------------------------------------------------

#: GET_FEATURES bit that says the back-end speaks GET/SET_PROTOCOL_FEATURES (virtio's unused bit 30)
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: the front-end logs dirty pages (live migration); pmd never sets it
VHOST_F_LOG_ALL = 26
#: virtio feature bits the spec itself gives meaning to: with IOMMU_PLATFORM (VIRTIO_F_ACCESS_PLATFORM)
#: ring and buffer addresses are IOVAs translated through IOTLB messages; with RING_PACKED the vring
#: base carries both indices and wrap counters
VIRTIO_F_IOMMU_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34

# protocol feature bits ("Protocol features")
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_NET_MTU = 4
VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5
VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6
VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7
VHOST_USER_PROTOCOL_F_PAGEFAULT = 8
VHOST_USER_PROTOCOL_F_CONFIG = 9
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 10
VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
VHOST_USER_PROTOCOL_F_STATUS = 16
VHOST_USER_PROTOCOL_F_XEN_MMAP = 17
VHOST_USER_PROTOCOL_F_SHARED_OBJECT = 18
VHOST_USER_PROTOCOL_F_DEVICE_STATE = 19

PROTOCOL_FEATURE_NAMES = {
    VHOST_USER_PROTOCOL_F_MQ: "MQ",
    VHOST_USER_PROTOCOL_F_LOG_SHMFD: "LOG_SHMFD",
    VHOST_USER_PROTOCOL_F_RARP: "RARP",
    VHOST_USER_PROTOCOL_F_REPLY_ACK: "REPLY_ACK",
    VHOST_USER_PROTOCOL_F_NET_MTU: "NET_MTU",
    VHOST_USER_PROTOCOL_F_BACKEND_REQ: "BACKEND_REQ",
    VHOST_USER_PROTOCOL_F_CROSS_ENDIAN: "CROSS_ENDIAN",
    VHOST_USER_PROTOCOL_F_CRYPTO_SESSION: "CRYPTO_SESSION",
    VHOST_USER_PROTOCOL_F_PAGEFAULT: "PAGEFAULT",
    VHOST_USER_PROTOCOL_F_CONFIG: "CONFIG",
    VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD: "BACKEND_SEND_FD",
    VHOST_USER_PROTOCOL_F_HOST_NOTIFIER: "HOST_NOTIFIER",
    VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: "INFLIGHT_SHMFD",
    VHOST_USER_PROTOCOL_F_RESET_DEVICE: "RESET_DEVICE",
    VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS: "INBAND_NOTIFICATIONS",
    VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS: "CONFIGURE_MEM_SLOTS",
    VHOST_USER_PROTOCOL_F_STATUS: "STATUS",
    VHOST_USER_PROTOCOL_F_XEN_MMAP: "XEN_MMAP",
    VHOST_USER_PROTOCOL_F_SHARED_OBJECT: "SHARED_OBJECT",
    VHOST_USER_PROTOCOL_F_DEVICE_STATE: "DEVICE_STATE",
}


def protocol_feature_names(features: int) -> list[str]:
    """Names of the set protocol feature bits, lowest first (unknown ones as ``bit N``)."""
    return [PROTOCOL_FEATURE_NAMES.get(i, f"bit {i}") for i in range(64) if features >> i & 1]


# ---------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------

#: regions in one SET_MEM_TABLE ("Multiple Memory regions description": region0 ... region7)
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: the largest GET_CONFIG/SET_CONFIG access (QEMU's and DPDK's VHOST_USER_MAX_CONFIG_SIZE)
VHOST_USER_MAX_CONFIG_SIZE = 256
#: SET_VRING_KICK/CALL/ERR: bits 0-7 the vring index, bit 8 "no fd" (poll instead)
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8
#: SET_VRING_ADDR flags: log used-ring writes (Linux vhost.h VHOST_VRING_F_LOG is bit 0)
VHOST_VRING_F_LOG = 1 << 0
#: dirty-log page size ("Migration")
VHOST_LOG_PAGE = 0x1000
#: vring indexes that fit the 8 bits of a kick/call message
MAX_VRINGS = VHOST_USER_VRING_IDX_MASK + 1
#: Virtio 1.2 2.7: a split queue has at most 32768 entries
MAX_QUEUE_SIZE = 32768
#: the largest payload pmd accepts: the largest defined one is a memory table of 8 Xen regions (328 bytes)
MAX_PAYLOAD_SIZE = 4096
#: the most fds one message may carry: one per region of SET_MEM_TABLE (and the back-end channel's limit)
MAX_FDS = VHOST_MEMORY_BASELINE_NREGIONS
_SCM_MAX_FD = 253  # Linux: the most fds one SCM_RIGHTS message can carry
_U64 = (1 << 64) - 1

# ---------------------------------------------------------------------------
# request codes ("Front-end message types", "Back-end message types")
# ---------------------------------------------------------------------------

VHOST_USER_GET_FEATURES = 1
VHOST_USER_SET_FEATURES = 2
VHOST_USER_SET_OWNER = 3
VHOST_USER_RESET_OWNER = 4
VHOST_USER_SET_MEM_TABLE = 5
VHOST_USER_SET_LOG_BASE = 6
VHOST_USER_SET_LOG_FD = 7
VHOST_USER_SET_VRING_NUM = 8
VHOST_USER_SET_VRING_ADDR = 9
VHOST_USER_SET_VRING_BASE = 10
VHOST_USER_GET_VRING_BASE = 11
VHOST_USER_SET_VRING_KICK = 12
VHOST_USER_SET_VRING_CALL = 13
VHOST_USER_SET_VRING_ERR = 14
VHOST_USER_GET_PROTOCOL_FEATURES = 15
VHOST_USER_SET_PROTOCOL_FEATURES = 16
VHOST_USER_GET_QUEUE_NUM = 17
VHOST_USER_SET_VRING_ENABLE = 18
VHOST_USER_SEND_RARP = 19
VHOST_USER_NET_SET_MTU = 20
VHOST_USER_SET_BACKEND_REQ_FD = 21
VHOST_USER_IOTLB_MSG = 22
VHOST_USER_SET_VRING_ENDIAN = 23
VHOST_USER_GET_CONFIG = 24
VHOST_USER_SET_CONFIG = 25
VHOST_USER_CREATE_CRYPTO_SESSION = 26
VHOST_USER_CLOSE_CRYPTO_SESSION = 27
VHOST_USER_POSTCOPY_ADVISE = 28
VHOST_USER_POSTCOPY_LISTEN = 29
VHOST_USER_POSTCOPY_END = 30
VHOST_USER_GET_INFLIGHT_FD = 31
VHOST_USER_SET_INFLIGHT_FD = 32
VHOST_USER_GPU_SET_SOCKET = 33
VHOST_USER_RESET_DEVICE = 34
VHOST_USER_VRING_KICK = 35
VHOST_USER_GET_MAX_MEM_SLOTS = 36
VHOST_USER_ADD_MEM_REG = 37
VHOST_USER_REM_MEM_REG = 38
VHOST_USER_SET_STATUS = 39
VHOST_USER_GET_STATUS = 40
VHOST_USER_GET_SHARED_OBJECT = 41
VHOST_USER_SET_DEVICE_STATE_FD = 42
VHOST_USER_CHECK_DEVICE_STATE = 43

# on the back-end channel (SET_BACKEND_REQ_FD), requests go the other way
VHOST_USER_BACKEND_IOTLB_MSG = 1
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG = 2
VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG = 3
VHOST_USER_BACKEND_VRING_CALL = 4
VHOST_USER_BACKEND_VRING_ERR = 5
VHOST_USER_BACKEND_SHARED_OBJECT_ADD = 6
VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE = 7
VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP = 8

FRONTEND_REQUEST_NAMES = {
    VHOST_USER_GET_FEATURES: "GET_FEATURES",
    VHOST_USER_SET_FEATURES: "SET_FEATURES",
    VHOST_USER_SET_OWNER: "SET_OWNER",
    VHOST_USER_RESET_OWNER: "RESET_OWNER",
    VHOST_USER_SET_MEM_TABLE: "SET_MEM_TABLE",
    VHOST_USER_SET_LOG_BASE: "SET_LOG_BASE",
    VHOST_USER_SET_LOG_FD: "SET_LOG_FD",
    VHOST_USER_SET_VRING_NUM: "SET_VRING_NUM",
    VHOST_USER_SET_VRING_ADDR: "SET_VRING_ADDR",
    VHOST_USER_SET_VRING_BASE: "SET_VRING_BASE",
    VHOST_USER_GET_VRING_BASE: "GET_VRING_BASE",
    VHOST_USER_SET_VRING_KICK: "SET_VRING_KICK",
    VHOST_USER_SET_VRING_CALL: "SET_VRING_CALL",
    VHOST_USER_SET_VRING_ERR: "SET_VRING_ERR",
    VHOST_USER_GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES",
    VHOST_USER_SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES",
    VHOST_USER_GET_QUEUE_NUM: "GET_QUEUE_NUM",
    VHOST_USER_SET_VRING_ENABLE: "SET_VRING_ENABLE",
    VHOST_USER_SEND_RARP: "SEND_RARP",
    VHOST_USER_NET_SET_MTU: "NET_SET_MTU",
    VHOST_USER_SET_BACKEND_REQ_FD: "SET_BACKEND_REQ_FD",
    VHOST_USER_IOTLB_MSG: "IOTLB_MSG",
    VHOST_USER_SET_VRING_ENDIAN: "SET_VRING_ENDIAN",
    VHOST_USER_GET_CONFIG: "GET_CONFIG",
    VHOST_USER_SET_CONFIG: "SET_CONFIG",
    VHOST_USER_CREATE_CRYPTO_SESSION: "CREATE_CRYPTO_SESSION",
    VHOST_USER_CLOSE_CRYPTO_SESSION: "CLOSE_CRYPTO_SESSION",
    VHOST_USER_POSTCOPY_ADVISE: "POSTCOPY_ADVISE",
    VHOST_USER_POSTCOPY_LISTEN: "POSTCOPY_LISTEN",
    VHOST_USER_POSTCOPY_END: "POSTCOPY_END",
    VHOST_USER_GET_INFLIGHT_FD: "GET_INFLIGHT_FD",
    VHOST_USER_SET_INFLIGHT_FD: "SET_INFLIGHT_FD",
    VHOST_USER_GPU_SET_SOCKET: "GPU_SET_SOCKET",
    VHOST_USER_RESET_DEVICE: "RESET_DEVICE",
    VHOST_USER_VRING_KICK: "VRING_KICK",
    VHOST_USER_GET_MAX_MEM_SLOTS: "GET_MAX_MEM_SLOTS",
    VHOST_USER_ADD_MEM_REG: "ADD_MEM_REG",
    VHOST_USER_REM_MEM_REG: "REM_MEM_REG",
    VHOST_USER_SET_STATUS: "SET_STATUS",
    VHOST_USER_GET_STATUS: "GET_STATUS",
    VHOST_USER_GET_SHARED_OBJECT: "GET_SHARED_OBJECT",
    VHOST_USER_SET_DEVICE_STATE_FD: "SET_DEVICE_STATE_FD",
    VHOST_USER_CHECK_DEVICE_STATE: "CHECK_DEVICE_STATE",
}

BACKEND_REQUEST_NAMES = {
    VHOST_USER_BACKEND_IOTLB_MSG: "BACKEND_IOTLB_MSG",
    VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: "BACKEND_CONFIG_CHANGE_MSG",
    VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG: "BACKEND_VRING_HOST_NOTIFIER_MSG",
    VHOST_USER_BACKEND_VRING_CALL: "BACKEND_VRING_CALL",
    VHOST_USER_BACKEND_VRING_ERR: "BACKEND_VRING_ERR",
    VHOST_USER_BACKEND_SHARED_OBJECT_ADD: "BACKEND_SHARED_OBJECT_ADD",
    VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE: "BACKEND_SHARED_OBJECT_REMOVE",
    VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP: "BACKEND_SHARED_OBJECT_LOOKUP",
}

#: front-end requests the back-end always answers: those with a reply payload of their own
#: ("Communication" and each message's "reply payload"); SET_LOG_BASE too with LOG_SHMFD
REPLY_REQUESTS = frozenset(
    {
        VHOST_USER_GET_FEATURES,
        VHOST_USER_GET_PROTOCOL_FEATURES,
        VHOST_USER_GET_VRING_BASE,
        VHOST_USER_GET_QUEUE_NUM,
        VHOST_USER_IOTLB_MSG,
        VHOST_USER_GET_CONFIG,
        VHOST_USER_CREATE_CRYPTO_SESSION,
        VHOST_USER_POSTCOPY_ADVISE,
        VHOST_USER_POSTCOPY_END,
        VHOST_USER_GET_INFLIGHT_FD,
        VHOST_USER_GET_MAX_MEM_SLOTS,
        VHOST_USER_GET_STATUS,
        VHOST_USER_GET_SHARED_OBJECT,
        VHOST_USER_SET_DEVICE_STATE_FD,
        VHOST_USER_CHECK_DEVICE_STATE,
    }
)


def request_name(request: int, *, backend: bool = False) -> str:
    """``"SET_MEM_TABLE"`` for 5 (``backend=True``: the back-end channel's names), ``"request 99"`` otherwise."""
    names = BACKEND_REQUEST_NAMES if backend else FRONTEND_REQUEST_NAMES
    return names.get(request, f"request {request}")


def has_reply(request: int, protocol_features: int = 0) -> bool:
    """Whether the back-end answers front-end ``request`` without being asked with NEED_REPLY."""
    if request in REPLY_REQUESTS:
        return True
    return request == VHOST_USER_SET_LOG_BASE and bool(protocol_features >> VHOST_USER_PROTOCOL_F_LOG_SHMFD & 1)


# ---------------------------------------------------------------------------
# payloads ("Payload")
# ---------------------------------------------------------------------------

_U64_S = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")  # index, num
_VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log (struct vhost_vring_addr)
_MEM_HEADER = struct.Struct("=II")  # nregions, padding
_MEM_REGION = struct.Struct("=QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
_LOG = struct.Struct("=QQ")  # mmap_size, mmap_offset
_CONFIG_HEADER = struct.Struct("=III")  # offset, size, flags
_VRING_AREA = struct.Struct("=QQQ")  # u64 (index and flags), size, offset
# VhostUserInflight is u64, u64, u16, u16 without a packed attribute: QEMU and DPDK send
# sizeof() = 24, the last 4 bytes padding.
_INFLIGHT = struct.Struct("=QQHH4x")
# struct vhost_iotlb_msg (Linux vhost_types.h): u64 iova, size, uaddr; u8 perm, type; padded to 32.
_IOTLB = struct.Struct("=QQQBB6x")
_DEVICE_STATE = struct.Struct("=II")  # transfer direction, migration phase
_UUID_SIZE = 16

#: GET/SET_CONFIG flags ("Virtio device config space"): 0 writable fields, 1 live migration
CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_MIGRATION = 1
#: IOTLB message types and permissions ("An IOTLB message")
IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL = 1, 2, 3, 4
IOTLB_PERM_MASK = 0x3


def _bad(what: str, text: str, err: int = errno.EPROTO) -> MessageError:
    return message_error(f"{what}: {text}", err)


def _exact(what: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise _bad(what, f"payload is {len(payload)} bytes, must be {size}")


def _u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} {value} does not fit in 32 bits")


def _u64(name: str, value: int) -> None:
    if not 0 <= value <= _U64:
        raise ValueError(f"{name} {value} does not fit in 64 bits")


def encode_u64(value: int) -> bytes:
    _u64("value", value)
    return _U64_S.pack(value)


def decode_u64(payload: bytes, what: str) -> int:
    """A single 64-bit integer ("A single 64-bit integer")."""
    _exact(what, payload, _U64_S.size)
    return int(_U64_S.unpack(payload)[0])


def decode_reply_ack(payload: bytes, what: str) -> int:
    """The u64 of a REPLY_ACK answer: 0 is success, anything else a failure the caller reports."""
    return decode_u64(payload, f"{what}: REPLY_ACK")


def decode_status(payload: bytes, what: str) -> int:
    """GET_STATUS: a u64 holding the virtio device status byte (Virtio 1.2 2.1)."""
    status = decode_u64(payload, what)
    if status > 0xFF:
        raise _bad(what, f"device status {status:#x} does not fit the 8-bit status field")
    return status


@dataclass(frozen=True)
class VringState:
    """"A vring state description": ``index`` of the vring, ``num`` (size, base, enable, ...)."""

    index: int
    num: int


def encode_vring_state(index: int, num: int) -> bytes:
    _u32("vring index", index)
    _u32("num", num)
    return _VRING_STATE.pack(index, num)


def decode_vring_state(payload: bytes, what: str, *, max_index: int = MAX_VRINGS - 1) -> VringState:
    _exact(what, payload, _VRING_STATE.size)
    index, num = _VRING_STATE.unpack(payload)
    if index > max_index:
        raise _bad(what, f"vring index {index} is out of range (0..{max_index})")
    return VringState(int(index), int(num))


def decode_split_base(num: int, what: str) -> int:
    """"A vring descriptor index for split virtqueues": bits 0-15 the next avail index, 16-31 reserved."""
    if num >> 16:
        raise _bad(what, f"vring base {num:#x} of a split virtqueue has reserved bits 16-31 set")
    return num


@dataclass(frozen=True)
class PackedBase:
    """"Vring descriptor indices for packed virtqueues": both indices with their wrap counters."""

    avail_idx: int
    avail_wrap: bool
    used_idx: int
    used_wrap: bool


def encode_packed_base(base: PackedBase) -> int:
    if not (0 <= base.avail_idx < 1 << 15 and 0 <= base.used_idx < 1 << 15):
        raise ValueError(f"packed ring indices must fit 15 bits, not {base.avail_idx} and {base.used_idx}")
    return base.avail_idx | int(base.avail_wrap) << 15 | base.used_idx << 16 | int(base.used_wrap) << 31


def decode_packed_base(num: int) -> PackedBase:
    return PackedBase(num & 0x7FFF, bool(num >> 15 & 1), num >> 16 & 0x7FFF, bool(num >> 31 & 1))


@dataclass(frozen=True)
class VringAddr:
    """"A vring address description" (``struct vhost_vring_addr``).

    Without IOMMU_PLATFORM the three ring addresses are *user* addresses of the
    front-end, translated through the ``userspace_addr`` of the memory table ("Memory
    access"); ``log`` is a guest address, used only with ``VHOST_VRING_F_LOG``.
    """

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0


def encode_vring_addr(addr: VringAddr) -> bytes:
    _u32("vring index", addr.index)
    _u32("flags", addr.flags)
    for name in ("desc", "used", "avail", "log"):
        _u64(name, getattr(addr, name))
    return _VRING_ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def decode_vring_addr(payload: bytes, what: str = "SET_VRING_ADDR") -> VringAddr:
    _exact(what, payload, _VRING_ADDR.size)
    index, flags, desc, used, avail, log = _VRING_ADDR.unpack(payload)
    if index >= MAX_VRINGS:
        raise _bad(what, f"vring index {index} is out of range (0..{MAX_VRINGS - 1})")
    if flags & ~VHOST_VRING_F_LOG:
        raise _bad(what, f"unknown vring flags {flags:#x} (only VHOST_VRING_F_LOG, bit 0, is defined)")
    if desc % 16 or avail % 2 or used % 4:
        raise _bad(what, f"misaligned ring: desc {desc:#x} (16), avail {avail:#x} (2), used {used:#x} (4) "
                         "(Virtio 1.2 2.7)")
    return VringAddr(int(index), int(flags), int(desc), int(used), int(avail), int(log))


@dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: the vring index and whether an fd comes with it."""

    index: int
    nofd: bool


def encode_vring_file(index: int, has_fd: bool) -> bytes:
    if not 0 <= index < MAX_VRINGS:
        raise ValueError(f"vring index {index} does not fit the 8 bits of a kick/call message (0..{MAX_VRINGS - 1})")
    return _U64_S.pack(index | (0 if has_fd else VHOST_USER_VRING_NOFD_MASK))


def decode_vring_file(payload: bytes, what: str, nfds: int) -> VringFile:
    """Also checks ``nfds`` (how many came with the message) against the "no fd" bit."""
    value = decode_u64(payload, what)
    if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        raise _bad(what, f"payload {value:#x} has bits above the index and the no-fd flag (bit 8)")
    nofd = bool(value & VHOST_USER_VRING_NOFD_MASK)
    want = 0 if nofd else 1
    if nfds != want:
        raise _bad(what, f"{nfds} file descriptors with the no-fd flag {'set' if nofd else 'clear'} (must be {want})")
    return VringFile(int(value & VHOST_USER_VRING_IDX_MASK), nofd)


@dataclass(frozen=True)
class MemoryRegion:
    """"Memory region description": where a file's range sits in both address spaces."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def guest_end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    @property
    def user_end(self) -> int:
        return self.userspace_addr + self.memory_size


def _check_region(what: str, i: int, r: MemoryRegion) -> None:
    if r.memory_size == 0:
        raise _bad(what, f"region {i} has size 0")
    for name, base in (("guest address", r.guest_phys_addr), ("user address", r.userspace_addr),
                       ("mmap offset", r.mmap_offset)):
        if base + r.memory_size - 1 > _U64:
            raise _bad(what, f"region {i}: {name} {base:#x} + size {r.memory_size:#x} wraps past 2^64")


def _check_regions(what: str, regions: Sequence[MemoryRegion]) -> None:
    for i, r in enumerate(regions):
        _check_region(what, i, r)
    for i, a in enumerate(regions):
        for j in range(i):
            b = regions[j]
            if a.guest_phys_addr < b.guest_end and b.guest_phys_addr < a.guest_end:
                raise _bad(what, f"regions {j} and {i} overlap in guest addresses")
            if a.userspace_addr < b.user_end and b.userspace_addr < a.user_end:
                raise _bad(what, f"regions {j} and {i} overlap in user addresses")


def encode_mem_region(r: MemoryRegion) -> bytes:
    for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
        _u64(name, getattr(r, name))
    return _MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)


def encode_memory_table(regions: Sequence[MemoryRegion]) -> bytes:
    """SET_MEM_TABLE: ``nregions``, padding, then only the regions used (as QEMU and DPDK send it)."""
    if not 1 <= len(regions) <= VHOST_MEMORY_BASELINE_NREGIONS:
        raise ValueError(f"a memory table holds 1 to {VHOST_MEMORY_BASELINE_NREGIONS} regions, not {len(regions)}")
    try:
        _check_regions("memory table", regions)
    except MessageError as exc:
        raise ValueError(str(exc)) from None
    return _MEM_HEADER.pack(len(regions), 0) + b"".join(encode_mem_region(r) for r in regions)


def decode_memory_table(payload: bytes, nfds: int, what: str = "SET_MEM_TABLE") -> list[MemoryRegion]:
    """The regions of SET_MEM_TABLE; one fd per region must have come with it (``nfds``)."""
    if len(payload) < _MEM_HEADER.size:
        raise _bad(what, f"payload is {len(payload)} bytes, shorter than its {_MEM_HEADER.size}-byte header")
    nregions, _padding = _MEM_HEADER.unpack_from(payload)
    if not 1 <= nregions <= VHOST_MEMORY_BASELINE_NREGIONS:
        raise _bad(what, f"{nregions} regions (1 to {VHOST_MEMORY_BASELINE_NREGIONS})")
    _exact(what, payload, _MEM_HEADER.size + nregions * _MEM_REGION.size)
    if nfds != nregions:
        raise _bad(what, f"{nregions} regions came with {nfds} file descriptors (one per region)")
    regions = [
        MemoryRegion(*(int(v) for v in _MEM_REGION.unpack_from(payload, _MEM_HEADER.size + i * _MEM_REGION.size)))
        for i in range(nregions)
    ]
    _check_regions(what, regions)
    return regions


def decode_mem_region(payload: bytes, what: str) -> MemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: "Single memory region description" (64-bit padding, then a region)."""
    _exact(what, payload, 8 + _MEM_REGION.size)
    region = MemoryRegion(*(int(v) for v in _MEM_REGION.unpack_from(payload, 8)))
    _check_region(what, 0, region)
    return region


def encode_log(mmap_size: int, mmap_offset: int) -> bytes:
    _u64("log size", mmap_size)
    _u64("log offset", mmap_offset)
    return _LOG.pack(mmap_size, mmap_offset)


def decode_log(payload: bytes, what: str = "SET_LOG_BASE") -> tuple[int, int]:
    """"Log description": ``(size, offset)`` of the dirty log in the attached fd."""
    _exact(what, payload, _LOG.size)
    size, offset = _LOG.unpack(payload)
    if offset + size - 1 > _U64:
        raise _bad(what, f"log offset {offset:#x} + size {size:#x} wraps past 2^64")
    return int(size), int(offset)


@dataclass(frozen=True)
class ConfigSpace:
    """"Virtio device config space": ``size`` bytes at ``offset`` of the device configuration."""

    offset: int
    size: int
    flags: int
    data: bytes


def encode_config(offset: int, data: bytes, flags: int = CONFIG_FLAG_WRITABLE) -> bytes:
    """GET_CONFIG sends ``size`` zero bytes (``data = bytes(size)``); SET_CONFIG the new contents."""
    if not 1 <= len(data) <= VHOST_USER_MAX_CONFIG_SIZE or not 0 <= offset <= VHOST_USER_MAX_CONFIG_SIZE - len(data):
        raise ValueError(
            f"a config access of {len(data)} bytes at offset {offset} must lie within the first "
            f"{VHOST_USER_MAX_CONFIG_SIZE} bytes and be at least 1 byte"
        )
    if flags not in (CONFIG_FLAG_WRITABLE, CONFIG_FLAG_MIGRATION):
        raise ValueError(f"config flags {flags} (0 writable fields, 1 live migration)")
    return _CONFIG_HEADER.pack(offset, len(data), flags) + bytes(data)


def decode_config(payload: bytes, what: str) -> ConfigSpace:
    if len(payload) < _CONFIG_HEADER.size:
        raise _bad(what, f"payload is {len(payload)} bytes, shorter than its {_CONFIG_HEADER.size}-byte header")
    offset, size, flags = _CONFIG_HEADER.unpack_from(payload)
    if not 1 <= size <= VHOST_USER_MAX_CONFIG_SIZE:
        raise _bad(what, f"config size {size} (1 to {VHOST_USER_MAX_CONFIG_SIZE})")
    if offset > VHOST_USER_MAX_CONFIG_SIZE - size:
        raise _bad(what, f"{size} bytes at offset {offset} run past the {VHOST_USER_MAX_CONFIG_SIZE}-byte config space")
    if flags not in (CONFIG_FLAG_WRITABLE, CONFIG_FLAG_MIGRATION):
        raise _bad(what, f"unknown config flags {flags} (0 writable fields, 1 live migration)")
    _exact(what, payload, _CONFIG_HEADER.size + size)
    return ConfigSpace(int(offset), int(size), int(flags), bytes(payload[_CONFIG_HEADER.size :]))


@dataclass(frozen=True)
class Inflight:
    """"Inflight description": the shared area tracking in-flight descriptors."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


def encode_inflight(inf: Inflight) -> bytes:
    _u64("mmap size", inf.mmap_size)
    _u64("mmap offset", inf.mmap_offset)
    if not (0 <= inf.num_queues <= 0xFFFF and 0 <= inf.queue_size <= 0xFFFF):
        raise ValueError("num_queues and queue_size are 16-bit fields")
    return _INFLIGHT.pack(inf.mmap_size, inf.mmap_offset, inf.num_queues, inf.queue_size)


def decode_inflight(payload: bytes, what: str) -> Inflight:
    _exact(what, payload, _INFLIGHT.size)
    size, offset, num_queues, queue_size = _INFLIGHT.unpack(payload)
    if offset + size - 1 > _U64:
        raise _bad(what, f"inflight offset {offset:#x} + size {size:#x} wraps past 2^64")
    if queue_size > MAX_QUEUE_SIZE:
        raise _bad(what, f"queue size {queue_size} (at most {MAX_QUEUE_SIZE})")
    return Inflight(int(size), int(offset), int(num_queues), int(queue_size))


@dataclass(frozen=True)
class IotlbMsg:
    """"An IOTLB message" (``struct vhost_iotlb_msg``)."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


def encode_iotlb(msg: IotlbMsg) -> bytes:
    for name in ("iova", "size", "uaddr"):
        _u64(name, getattr(msg, name))
    if msg.perm & ~IOTLB_PERM_MASK or not IOTLB_MISS <= msg.type <= IOTLB_ACCESS_FAIL:
        raise ValueError(f"IOTLB perm {msg.perm} (0..3) or type {msg.type} (1..4)")
    return _IOTLB.pack(msg.iova, msg.size, msg.uaddr, msg.perm, msg.type)


def decode_iotlb(payload: bytes, what: str) -> IotlbMsg:
    _exact(what, payload, _IOTLB.size)
    iova, size, uaddr, perm, kind = _IOTLB.unpack(payload)
    if perm & ~IOTLB_PERM_MASK:
        raise _bad(what, f"IOTLB permissions {perm:#x} (0 none, 1 read, 2 write, 3 both)")
    if not IOTLB_MISS <= kind <= IOTLB_ACCESS_FAIL:
        raise _bad(what, f"IOTLB message type {kind} (1 miss, 2 update, 3 invalidate, 4 access fail)")
    if iova + size - 1 > _U64 or uaddr + size - 1 > _U64:
        raise _bad(what, f"IOTLB range of {size:#x} bytes at {iova:#x} / {uaddr:#x} wraps past 2^64")
    return IotlbMsg(int(iova), int(size), int(uaddr), int(perm), int(kind))


@dataclass(frozen=True)
class VringArea:
    """"Vring area description" (BACKEND_VRING_HOST_NOTIFIER_MSG): index and flags, size, offset."""

    u64: int
    size: int
    offset: int

    @property
    def index(self) -> int:
        return self.u64 & VHOST_USER_VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VHOST_USER_VRING_NOFD_MASK)


def encode_vring_area(area: VringArea) -> bytes:
    for name in ("u64", "size", "offset"):
        _u64(name, getattr(area, name))
    return _VRING_AREA.pack(area.u64, area.size, area.offset)


def decode_vring_area(payload: bytes, what: str) -> VringArea:
    _exact(what, payload, _VRING_AREA.size)
    u64, size, offset = _VRING_AREA.unpack(payload)
    if u64 & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        raise _bad(what, f"index word {u64:#x} has bits above the index and the no-fd flag")
    if offset + size - 1 > _U64:
        raise _bad(what, f"area offset {offset:#x} + size {size:#x} wraps past 2^64")
    return VringArea(int(u64), int(size), int(offset))


def encode_shared_object(uuid: bytes) -> bytes:
    if len(uuid) != _UUID_SIZE:
        raise ValueError(f"a VhostUserShared UUID is {_UUID_SIZE} bytes, not {len(uuid)}")
    return bytes(uuid)


def decode_shared_object(payload: bytes, what: str) -> bytes:
    """"VhostUserShared": the 16-byte UUID."""
    _exact(what, payload, _UUID_SIZE)
    return bytes(payload)


@dataclass(frozen=True)
class DeviceStateTransfer:
    """"Device state transfer parameters": direction (0 save, 1 load) and phase (0 stopped)."""

    direction: int
    phase: int


def encode_device_state(state: DeviceStateTransfer) -> bytes:
    if state.direction not in (0, 1) or state.phase != 0:
        raise ValueError(f"device state direction {state.direction} (0 save, 1 load), phase {state.phase} (0)")
    return _DEVICE_STATE.pack(state.direction, state.phase)


def decode_device_state(payload: bytes, what: str) -> DeviceStateTransfer:
    _exact(what, payload, _DEVICE_STATE.size)
    direction, phase = _DEVICE_STATE.unpack(payload)
    if direction not in (0, 1):
        raise _bad(what, f"transfer direction {direction} (0 save, 1 load)")
    if phase != 0:
        raise _bad(what, f"migration phase {phase} (only 0, stopped, is defined)")
    return DeviceStateTransfer(int(direction), int(phase))


# ---------------------------------------------------------------------------
# messages and framing
# ---------------------------------------------------------------------------


@dataclass
class Message(FdCarrier):
    """One received message: header fields, payload and the fds that came with it.

    The receiver owns ``fds``: it takes the ones it keeps (:meth:`take_fds`) and closes
    the rest (:meth:`close_fds`).
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False  # more fds than allowed came; all were closed

    @property
    def version(self) -> int:
        return self.flags & FLAG_VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)

    def describe(self) -> str:
        kind = "reply" if self.is_reply else "request"
        return f"{self.name} {kind} ({HEADER_SIZE + len(self.payload)} bytes, {len(self.fds)} fds)"


def encode_header(request: int, payload_size: int, flags: int = VHOST_USER_VERSION) -> bytes:
    _u32("request", request)
    _u32("flags", flags)
    if not 0 <= payload_size <= MAX_PAYLOAD_SIZE:
        raise ValueError(f"a payload of {payload_size} bytes (pmd sends at most {MAX_PAYLOAD_SIZE})")
    return HEADER.pack(request, flags, payload_size)


def encode_message(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A request of the front-end (or of the back-end, on its channel): version 1, no reply bit."""
    flags = VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return encode_header(request, len(payload), flags) + payload


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    """The answer to ``request``: version 1 and the reply bit."""
    return encode_header(request, len(payload), VHOST_USER_VERSION | FLAG_REPLY) + payload


def decode_header(raw: bytes, max_payload: int = MAX_PAYLOAD_SIZE) -> tuple[int, int, int]:
    """``(request, flags, size)`` of a 12-byte header.

    Only the framing is judged here: a payload size above ``max_payload`` is fatal (the
    next message cannot be found, nor should that much be read). Flags are checked
    by :func:`check_request_flags` / :func:`check_reply` once the message is whole.
    """
    if len(raw) != HEADER_SIZE:
        raise message_error(f"a message header is {HEADER_SIZE} bytes, not {len(raw)}", fatal=True)
    request, flags, size = HEADER.unpack(raw)
    if size > max_payload:
        raise message_error(
            f"{request_name(request)} message claims a payload of {size} bytes, more than the {max_payload} "
            "this side accepts",
            errno.EMSGSIZE,
            fatal=True,
            request=request,
        )
    return int(request), int(flags), int(size)


def _check_flags(msg: Message, what: str) -> None:
    if msg.flags & ~_FLAG_KNOWN:
        raise message_error(f"{what} has unknown flag bits set ({msg.flags:#x}; only bits 0-3 are defined)",
                            request=msg.request)
    if msg.version != VHOST_USER_VERSION:
        raise message_error(f"{what} has protocol version {msg.version} in its flags ({msg.flags:#x}); "
                            f"vhost-user is version {VHOST_USER_VERSION}", request=msg.request)


def check_request_flags(msg: Message) -> None:
    """A request: version 1, no unknown bits, no reply bit."""
    what = f"{msg.name} request"
    _check_flags(msg, what)
    if msg.is_reply:
        raise message_error(f"{what} carries the reply flag", request=msg.request)


def check_reply(msg: Message, request: int) -> None:
    """The back-end's answer to front-end ``request``: version 1, the reply bit, no need_reply, the same code.

    A reply with another code, or a request of the back-end's where the answer was due,
    means the two sides no longer agree on what is being answered (vhost-user has no
    message ids): the caller must drop the connection.
    """
    what = f"the reply to {request_name(request)}"
    _check_flags(msg, what)
    if not msg.is_reply:
        if msg.request == request:
            raise message_error(f"{what} lacks the reply flag (flags {msg.flags:#x})", request=msg.request)
        raise message_error(
            f"the backend sent request code {msg.request} without the reply flag, a request of its own, "
            f"where {what} was due", request=msg.request)
    if msg.request != request:
        raise message_error(
            f"{what} names {msg.name} ({msg.request}): the backend answered a different request", request=msg.request
        )
    if msg.need_reply:
        raise message_error(f"{what} carries the need_reply flag, which only a request may", request=msg.request)


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = (), deadline: float | None = None) -> None:
    """Send one whole message; ``fds`` ride with its first byte (the header) as SCM_RIGHTS.

    Raises ``TimeoutError`` past ``deadline`` and the ``OSError`` of a connection that
    is gone (``BrokenPipeError``, ``ConnectionResetError``); never SIGPIPE.
    """
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} file descriptors in one message; vhost-user messages carry at most {MAX_FDS}")
    send_all(sock, data, fds, deadline)


def recv_message(
    sock: socket.socket,
    *,
    deadline: float | None,
    max_payload: int = MAX_PAYLOAD_SIZE,
    max_fds: int = MAX_FDS,
    first_byte_deadline: float | None = None,
) -> Message | None:
    """Receive one whole message, or ``None`` when the peer closed the connection between messages.

    ``deadline`` (a ``time.monotonic()`` value, or ``None`` to wait forever) bounds the
    whole message; ``first_byte_deadline``, when given, bounds only the wait for its
    first byte (a back-end waits for the next request as long as it likes, but not
    for the rest of one that started). More than ``max_fds`` fds (the kernel discards
    what does not fit the buffer) gives a message with ``fds_truncated`` set and all
    of its fds closed. Fatal :class:`MessageError`: a payload size above
    ``max_payload``, the connection closed or the deadline passed in the middle of a
    message, a reset connection, and a timeout before the first byte (``ETIMEDOUT``:
    an answer that does not come leaves the stream in an unknown state).
    """
    fds: list[int] = []
    state = [False]
    try:
        try:
            head = recv_upto(sock, HEADER_SIZE, deadline if first_byte_deadline is None else first_byte_deadline,
                              max_fds, fds, state)
        except TimeoutError:
            raise message_error("no message arrived before the deadline", errno.ETIMEDOUT, fatal=True) from None
        if not head:
            close_fds(fds)
            return None
        try:
            if len(head) < HEADER_SIZE:
                head += recv_upto(sock, HEADER_SIZE - len(head), deadline, max_fds, fds, state)
        except TimeoutError:
            raise message_error(f"timed out with {len(head)} of the {HEADER_SIZE} header bytes", errno.ETIMEDOUT,
                                fatal=True) from None
        if len(head) < HEADER_SIZE:
            raise message_error(f"connection closed after {len(head)} of the {HEADER_SIZE} header bytes",
                                errno.ECONNRESET, fatal=True)
        request, flags, size = decode_header(head, max_payload)
        body = b""
        if size:
            try:
                body = recv_upto(sock, size, deadline, max_fds, fds, state)
            except TimeoutError:
                raise message_error(
                    f"timed out in the middle of a {request_name(request)} message ({HEADER_SIZE + size} bytes)",
                    errno.ETIMEDOUT, fatal=True, request=request) from None
            if len(body) < size:
                raise message_error(
                    f"connection closed in the middle of a {request_name(request)} message: "
                    f"{HEADER_SIZE + len(body)} of {HEADER_SIZE + size} bytes arrived",
                    errno.ECONNRESET, fatal=True, request=request)
    except MessageError:
        close_fds(fds)
        raise
    except OSError as exc:  # ECONNRESET and friends
        close_fds(fds)
        raise message_error(f"connection failed while receiving: {exc.strerror or exc}", exc.errno or errno.EIO,
                            fatal=True) from None
    msg = Message(request, flags, body, fds, state[0])
    if msg.fds_truncated:
        msg.close_fds()
    return msg
