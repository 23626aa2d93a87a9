"""The vfio-user wire format: the messages pmd sends and answers, and nothing it does not.

The reference is QEMU's ``docs/devel/vfio-user.rst`` (protocol version 0.9.1);
libvfio-user speaks the same protocol. Every message is a 16-byte header
followed by a command-specific payload, little-endian (as the spec says)::

    offset  size  field
    0       2     message id     (the sender's; echoed in the reply)
    2       2     command        (also set in the reply)
    4       4     message size   (header included)
    8       4     flags          bits 0-3 type (0 command, 1 reply), bit 4 no-reply, bit 5 error
    12      4     error          (an errno, in a reply with the error bit)

File descriptors travel beside the bytes as ``SCM_RIGHTS`` ancillary data of
the same ``sendmsg``: the memory of a ``DMA_MAP``, the eventfds of a
``DEVICE_SET_IRQS``, the file of an mmap-able region in a
``DEVICE_GET_REGION_INFO`` reply.

Everything decoded here is untrusted. Each ``decode_*`` checks the exact
payload size and every field it can, and raises :class:`MessageError` (a
:class:`pmd.errors.VfioError`) saying what was wrong: never an
``IndexError``, a ``struct.error`` or a hang. :func:`recv_message` frames
messages on a stream socket with a deadline, a maximum message size and a
maximum number of file descriptors; a message that breaks the framing raises
a *fatal* :class:`MessageError` (the connection cannot be trusted any more).

The region-info structure and its capability chain are the kernel's
(``struct vfio_region_info``): they are decoded by :func:`pmd.abi.vfio.parse_region_info`,
shared with kernel VFIO.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import VfioError
from .stream import FdCarrier, SCM_MAX_FD, close_fds, deadline_after, recv_upto
from .stream import send_all as send_message
from .vfio import (
    REGION_INFO_FLAG_CAPS,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    DeviceInfo,
    IrqInfo,
    RegionInfo,
    SparseArea,
    parse_region_info,
)

__all__ = [
    "VFIO_USER_MAJOR",
    "VFIO_USER_MINOR",
    "VFIO_USER_VERSION",
    "VFIO_USER_DMA_MAP",
    "VFIO_USER_DMA_UNMAP",
    "VFIO_USER_DEVICE_GET_INFO",
    "VFIO_USER_DEVICE_GET_REGION_INFO",
    "VFIO_USER_DEVICE_GET_REGION_IO_FDS",
    "VFIO_USER_DEVICE_GET_IRQ_INFO",
    "VFIO_USER_DEVICE_SET_IRQS",
    "VFIO_USER_REGION_READ",
    "VFIO_USER_REGION_WRITE",
    "VFIO_USER_DMA_READ",
    "VFIO_USER_DMA_WRITE",
    "VFIO_USER_DEVICE_RESET",
    "COMMAND_NAMES",
    "TYPE_COMMAND",
    "TYPE_REPLY",
    "FLAG_TYPE_MASK",
    "FLAG_NO_REPLY",
    "FLAG_ERROR",
    "HEADER",
    "HEADER_SIZE",
    "DMA_FLAG_READ",
    "DMA_FLAG_WRITE",
    "DEFAULT_MAX_MSG_FDS",
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "MAX_DATA_XFER_SIZE",
    "MAX_MSG_FDS",
    "MAX_VERSION_DATA",
    "MAX_INFO_SIZE",
    "MAX_REGIONS",
    "MAX_IRQ_INDEXES",
    "IRQ_SET_DATA_MASK",
    "IRQ_SET_ACTION_MASK",
    "MessageError",
    "message_error",
    "command_name",
    "Capabilities",
    "Message",
    "DmaMap",
    "DmaUnmap",
    "IrqSet",
    "RegionAccess",
    "max_message_size",
    "encode_header",
    "decode_header",
    "check_flags",
    "deadline_after",
    "encode_message",
    "encode_version",
    "decode_version",
    "encode_dma_map",
    "decode_dma_map",
    "encode_dma_unmap",
    "decode_dma_unmap",
    "encode_device_info_request",
    "decode_device_info_request",
    "encode_device_info",
    "decode_device_info",
    "encode_region_info_request",
    "decode_region_info_request",
    "encode_region_info",
    "decode_region_info",
    "encode_irq_info_request",
    "decode_irq_info_request",
    "encode_irq_info",
    "decode_irq_info",
    "encode_set_irqs",
    "decode_set_irqs",
    "encode_region_access",
    "decode_region_access",
    "send_message",
    "recv_message",
    "close_fds",
]

# --- protocol version (libvfio-user and QEMU speak 0.1) ---
VFIO_USER_MAJOR = 0
VFIO_USER_MINOR = 1

# --- commands ---
VFIO_USER_VERSION = 1
VFIO_USER_DMA_MAP = 2
VFIO_USER_DMA_UNMAP = 3
VFIO_USER_DEVICE_GET_INFO = 4
VFIO_USER_DEVICE_GET_REGION_INFO = 5
VFIO_USER_DEVICE_GET_REGION_IO_FDS = 6
VFIO_USER_DEVICE_GET_IRQ_INFO = 7
VFIO_USER_DEVICE_SET_IRQS = 8
VFIO_USER_REGION_READ = 9
VFIO_USER_REGION_WRITE = 10
VFIO_USER_DMA_READ = 11
VFIO_USER_DMA_WRITE = 12
VFIO_USER_DEVICE_RESET = 13

COMMAND_NAMES = {
    VFIO_USER_VERSION: "VERSION",
    VFIO_USER_DMA_MAP: "DMA_MAP",
    VFIO_USER_DMA_UNMAP: "DMA_UNMAP",
    VFIO_USER_DEVICE_GET_INFO: "DEVICE_GET_INFO",
    VFIO_USER_DEVICE_GET_REGION_INFO: "DEVICE_GET_REGION_INFO",
    VFIO_USER_DEVICE_GET_REGION_IO_FDS: "DEVICE_GET_REGION_IO_FDS",
    VFIO_USER_DEVICE_GET_IRQ_INFO: "DEVICE_GET_IRQ_INFO",
    VFIO_USER_DEVICE_SET_IRQS: "DEVICE_SET_IRQS",
    VFIO_USER_REGION_READ: "REGION_READ",
    VFIO_USER_REGION_WRITE: "REGION_WRITE",
    VFIO_USER_DMA_READ: "DMA_READ",
    VFIO_USER_DMA_WRITE: "DMA_WRITE",
    VFIO_USER_DEVICE_RESET: "DEVICE_RESET",
}

# --- header flags ---
TYPE_COMMAND = 0
TYPE_REPLY = 1
FLAG_TYPE_MASK = 0xF
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5
_FLAG_KNOWN = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR

HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size  # 16

# --- DMA_MAP flags ---
DMA_FLAG_READ = 1 << 0
DMA_FLAG_WRITE = 1 << 1

# --- DEVICE_SET_IRQS flag groups (the kernel's VFIO_IRQ_SET_* bits) ---
IRQ_SET_DATA_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK = VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER

# --- limits ---
#: what a peer that does not say may assume (the spec's defaults)
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
#: what pmd accepts: data bytes of one REGION_READ/WRITE, fds in one message
MAX_DATA_XFER_SIZE = 1 << 20
MAX_MSG_FDS = 16
#: the JSON of a VERSION message (a few hundred bytes in practice)
MAX_VERSION_DATA = 4096
#: a region-info reply with its capability chain
MAX_INFO_SIZE = 1 << 16
#: sanity limits on what a device may claim
MAX_REGIONS = 64
MAX_IRQ_INDEXES = 16
_U64 = (1 << 64) - 1

_DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
_DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, address, size
_INFO4 = struct.Struct("<IIII")  # device info, irq info: four u32
_REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
_CAP_HEADER = struct.Struct("<HHI")  # id, version, next
_SPARSE_HEADER = struct.Struct("<II")  # nr_areas, reserved
_SPARSE_AREA = struct.Struct("<QQ")  # offset, size
_IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count
_REGION_ACCESS = struct.Struct("<QII")  # offset, region, count
_VERSION = struct.Struct("<HH")


class MessageError(VfioError):
    """A vfio-user message that breaks the protocol.

    ``fatal`` is true when the byte stream itself can no longer be trusted
    (a size that cannot be right, a message cut short, a timeout in the middle
    of one): the connection must be dropped. Otherwise the message was framed
    correctly and only its content is wrong, so the receiver can answer it
    with an error reply and go on. ``msg_id``/``command`` identify the message
    when its header could be read.
    """

    fatal: bool = False
    msg_id: int | None = None
    command: int | None = None


def message_error(
    text: str,
    err: int = errno.EPROTO,
    *,
    fatal: bool = False,
    msg_id: int | None = None,
    command: int | None = None,
) -> MessageError:
    """A :class:`MessageError` whose ``str()`` is ``text`` and whose ``errno`` is ``err``."""
    exc = MessageError(text)
    exc.errno = err
    exc.fatal = fatal
    exc.msg_id = msg_id
    exc.command = command
    return exc


def command_name(command: int) -> str:
    """``"DMA_MAP"`` for 2, ``"command 99"`` for what is not a vfio-user command."""
    return COMMAND_NAMES.get(command, f"command {command}")


@dataclass
class Message(FdCarrier):
    """One received message: header fields, payload and the fds that came with it.

    The receiver owns ``fds``: it takes the ones it keeps (removing them from
    the list) and closes the rest (:meth:`close_fds`).
    """

    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False  # the peer sent more fds than allowed; the extra ones were discarded

    @property
    def type(self) -> int:
        return self.flags & FLAG_TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.type == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def name(self) -> str:
        return command_name(self.command)

    def describe(self) -> str:
        kind = "reply" if self.is_reply else "command"
        return f"{self.name} {kind} id {self.msg_id} ({HEADER_SIZE + len(self.payload)} bytes, {len(self.fds)} fds)"


# ---------------------------------------------------------------------------
# header
# ---------------------------------------------------------------------------


def max_message_size(max_data_xfer_size: int = MAX_DATA_XFER_SIZE) -> int:
    """The largest message either side of pmd sends or accepts, for a given data transfer size."""
    return HEADER_SIZE + max(
        _REGION_ACCESS.size + max_data_xfer_size,
        _VERSION.size + MAX_VERSION_DATA,
        MAX_INFO_SIZE,
    )


def encode_header(msg_id: int, command: int, payload_size: int, flags: int = TYPE_COMMAND, error: int = 0) -> bytes:
    if not 0 <= msg_id <= 0xFFFF:
        raise ValueError(f"message id {msg_id} does not fit in 16 bits")
    if not 0 <= command <= 0xFFFF:
        raise ValueError(f"command {command} does not fit in 16 bits")
    size = HEADER_SIZE + payload_size
    if size > 0xFFFFFFFF:
        raise ValueError(f"message of {size} bytes does not fit in 32 bits")
    return HEADER.pack(msg_id, command, size, flags, error)


def encode_message(msg_id: int, command: int, payload: bytes = b"", flags: int = TYPE_COMMAND, error: int = 0) -> bytes:
    return encode_header(msg_id, command, len(payload), flags, error) + payload


def decode_header(raw: bytes, max_size: int) -> tuple[int, int, int, int, int]:
    """``(msg_id, command, size, flags, error)`` of a 16-byte header.

    Only the framing is judged here (a size below 16 or above ``max_size`` is
    fatal: the next message cannot be found); flags are checked by
    :func:`check_flags` once the whole message has been read.
    """
    if len(raw) != HEADER_SIZE:
        raise message_error(f"a message header is {HEADER_SIZE} bytes, not {len(raw)}", fatal=True)
    msg_id, command, size, flags, error = HEADER.unpack(raw)
    if size < HEADER_SIZE:
        raise message_error(
            f"{command_name(command)} message id {msg_id} claims a size of {size} bytes, "
            f"less than its own {HEADER_SIZE}-byte header",
            fatal=True,
            msg_id=msg_id,
            command=command,
        )
    if size > max_size:
        raise message_error(
            f"{command_name(command)} message id {msg_id} claims a size of {size} bytes, "
            f"more than the {max_size} this side accepts",
            errno.EMSGSIZE,
            fatal=True,
            msg_id=msg_id,
            command=command,
        )
    return msg_id, command, size, flags, error


def check_flags(msg: Message) -> None:
    """Reject unknown flag bits, unknown message types and an error bit on a command."""
    if msg.flags & ~_FLAG_KNOWN:
        raise message_error(
            f"{msg.name} message id {msg.msg_id} has reserved flag bits set ({msg.flags:#x})",
            errno.EINVAL,
            msg_id=msg.msg_id,
            command=msg.command,
        )
    if msg.type not in (TYPE_COMMAND, TYPE_REPLY):
        raise message_error(
            f"{msg.name} message id {msg.msg_id} has message type {msg.type} (0 command, 1 reply)",
            errno.EINVAL,
            msg_id=msg.msg_id,
            command=msg.command,
        )
    if msg.type == TYPE_COMMAND and msg.flags & FLAG_ERROR:
        raise message_error(
            f"{msg.name} command id {msg.msg_id} has the error flag, which only a reply may carry",
            errno.EINVAL,
            msg_id=msg.msg_id,
            command=msg.command,
        )
    if msg.type == TYPE_REPLY and msg.flags & FLAG_NO_REPLY:
        raise message_error(
            f"{msg.name} reply id {msg.msg_id} has the no-reply flag, which only a command may carry",
            errno.EINVAL,
            msg_id=msg.msg_id,
            command=msg.command,
        )


def _bad(what: str, text: str, err: int = errno.EINVAL) -> MessageError:
    return message_error(f"{what}: {text}", err)


def _exact(what: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise _bad(what, f"payload is {len(payload)} bytes, must be {size}")


def _at_least(what: str, payload: bytes, size: int) -> None:
    if len(payload) < size:
        raise _bad(what, f"payload is {len(payload)} bytes, shorter than the {size}-byte structure")


# ---------------------------------------------------------------------------
# VERSION
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """The ``capabilities`` object of a VERSION message, with the spec's defaults filled in."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    migration: dict[str, Any] | None = None
    other: dict[str, Any] = field(default_factory=dict)  # capabilities pmd does not know, kept as given

    def to_json(self) -> dict[str, Any]:
        caps: dict[str, Any] = dict(self.other)
        caps["max_msg_fds"] = self.max_msg_fds
        caps["max_data_xfer_size"] = self.max_data_xfer_size
        if self.migration is not None:
            caps["migration"] = dict(self.migration)
        return {"capabilities": caps}


def encode_version(major: int, minor: int, caps: Capabilities | None) -> bytes:
    """Version payload: major, minor, then the JSON (NUL-terminated) when ``caps`` is given."""
    data = b""
    if caps is not None:
        data = json.dumps(caps.to_json(), separators=(",", ":")).encode() + b"\0"
        if len(data) > MAX_VERSION_DATA:
            raise ValueError(f"version JSON of {len(data)} bytes exceeds {MAX_VERSION_DATA}")
    return _VERSION.pack(major, minor) + data


def _positive_int(what: str, name: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise _bad(what, f"capability {name!r} must be an integer in 1..{limit}, not {value!r}")
    return value


def decode_version(payload: bytes) -> tuple[int, int, Capabilities]:
    """``(major, minor, capabilities)`` of a VERSION command or reply."""
    what = "VERSION"
    _at_least(what, payload, _VERSION.size)
    major, minor = _VERSION.unpack_from(payload)
    data = payload[_VERSION.size :]
    if not data:
        return major, minor, Capabilities()
    if len(data) > MAX_VERSION_DATA:
        raise _bad(what, f"version data of {len(data)} bytes exceeds {MAX_VERSION_DATA}", errno.E2BIG)
    if data.endswith(b"\0"):
        data = data[:-1]
    if b"\0" in data:
        raise _bad(what, "version data has a NUL byte inside the JSON")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(what, f"version data is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # 4096 bytes of "[" nest deeper than the parser recurses
        raise _bad(what, "version data nests JSON arrays or objects too deeply") from None
    if not isinstance(doc, dict):
        raise _bad(what, f"version data must be a JSON object, not {type(doc).__name__}")
    raw = doc.get("capabilities", {})
    if not isinstance(raw, dict):
        raise _bad(what, f"'capabilities' must be a JSON object, not {type(raw).__name__}")
    caps: dict[str, Any] = dict(raw)
    max_fds = DEFAULT_MAX_MSG_FDS
    if "max_msg_fds" in caps:
        max_fds = _positive_int(what, "max_msg_fds", caps.pop("max_msg_fds"), SCM_MAX_FD)
    xfer = DEFAULT_MAX_DATA_XFER_SIZE
    if "max_data_xfer_size" in caps:
        xfer = _positive_int(what, "max_data_xfer_size", caps.pop("max_data_xfer_size"), 0xFFFFFFFF)
    migration = caps.pop("migration", None)
    if migration is not None and not isinstance(migration, dict):
        raise _bad(what, f"capability 'migration' must be a JSON object, not {type(migration).__name__}")
    return major, minor, Capabilities(max_fds, xfer, migration, caps)


# ---------------------------------------------------------------------------
# DMA_MAP / DMA_UNMAP
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DmaMap:
    flags: int
    offset: int  # in the fd that comes with the message
    address: int  # IOVA
    size: int

    @property
    def readable(self) -> bool:
        return bool(self.flags & DMA_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DMA_FLAG_WRITE)


def encode_dma_map(address: int, size: int, offset: int, flags: int = DMA_FLAG_READ | DMA_FLAG_WRITE) -> bytes:
    return _DMA_MAP.pack(_DMA_MAP.size, flags, offset, address, size)


def decode_dma_map(payload: bytes) -> DmaMap:
    what = "DMA_MAP"
    _exact(what, payload, _DMA_MAP.size)
    argsz, flags, offset, address, size = _DMA_MAP.unpack(payload)
    if argsz != _DMA_MAP.size:
        raise _bad(what, f"argsz is {argsz}, must be {_DMA_MAP.size}")
    if flags & ~(DMA_FLAG_READ | DMA_FLAG_WRITE):
        raise _bad(what, f"unknown flags {flags:#x} (bit 0 readable, bit 1 writeable)")
    if size == 0:
        raise _bad(what, "size is 0")
    if address + size - 1 > _U64 or offset + size - 1 > _U64:
        raise _bad(what, f"[{address:#x} + {size:#x}) or file offset {offset:#x} wraps past 2^64")
    return DmaMap(flags, offset, address, size)


@dataclass(frozen=True)
class DmaUnmap:
    argsz: int
    flags: int
    address: int
    size: int


def encode_dma_unmap(address: int, size: int, flags: int = 0, argsz: int = _DMA_UNMAP.size) -> bytes:
    return _DMA_UNMAP.pack(argsz, flags, address, size)


def decode_dma_unmap(payload: bytes, what: str = "DMA_UNMAP") -> DmaUnmap:
    _exact(what, payload, _DMA_UNMAP.size)
    argsz, flags, address, size = _DMA_UNMAP.unpack(payload)
    if argsz < _DMA_UNMAP.size:
        raise _bad(what, f"argsz is {argsz}, less than the {_DMA_UNMAP.size}-byte structure")
    if flags:
        raise _bad(what, f"flags {flags:#x}: dirty-page bitmaps and other unmap flags are not supported", errno.ENOTSUP)
    if size == 0:
        raise _bad(what, "size is 0")
    if address + size - 1 > _U64:
        raise _bad(what, f"[{address:#x} + {size:#x}) wraps past 2^64")
    return DmaUnmap(argsz, flags, address, size)


# ---------------------------------------------------------------------------
# DEVICE_GET_INFO
# ---------------------------------------------------------------------------


def encode_device_info_request(argsz: int = _INFO4.size) -> bytes:
    return _INFO4.pack(argsz, 0, 0, 0)


def decode_device_info_request(payload: bytes) -> int:
    """The request's ``argsz`` (the largest reply payload the client takes)."""
    what = "DEVICE_GET_INFO"
    _exact(what, payload, _INFO4.size)
    argsz, flags, num_regions, num_irqs = _INFO4.unpack(payload)
    if argsz < _INFO4.size:
        raise _bad(what, f"argsz {argsz} is less than the {_INFO4.size}-byte reply")
    if flags or num_regions or num_irqs:
        raise _bad(what, "flags, num_regions and num_irqs must be 0 in the request")
    return int(argsz)


def encode_device_info(flags: int, num_regions: int, num_irqs: int) -> bytes:
    return _INFO4.pack(_INFO4.size, flags, num_regions, num_irqs)


def decode_device_info(payload: bytes) -> DeviceInfo:
    what = "DEVICE_GET_INFO reply"
    _at_least(what, payload, _INFO4.size)
    argsz, flags, num_regions, num_irqs = _INFO4.unpack_from(payload)
    if argsz < _INFO4.size:
        raise _bad(what, f"argsz {argsz} is less than {_INFO4.size}")
    if num_regions > MAX_REGIONS:
        raise _bad(what, f"{num_regions} regions (pmd accepts at most {MAX_REGIONS})")
    if num_irqs > MAX_IRQ_INDEXES:
        raise _bad(what, f"{num_irqs} IRQ indexes (pmd accepts at most {MAX_IRQ_INDEXES})")
    return DeviceInfo(flags=int(flags), num_regions=int(num_regions), num_irqs=int(num_irqs))


# ---------------------------------------------------------------------------
# DEVICE_GET_REGION_INFO
# ---------------------------------------------------------------------------


def encode_region_info_request(index: int, argsz: int) -> bytes:
    return _REGION_INFO.pack(argsz, 0, index, 0, 0, 0)


def decode_region_info_request(payload: bytes) -> tuple[int, int]:
    """``(argsz, index)`` of a region-info request."""
    what = "DEVICE_GET_REGION_INFO"
    _exact(what, payload, _REGION_INFO.size)
    argsz, flags, index, cap_offset, size, offset = _REGION_INFO.unpack(payload)
    if argsz < _REGION_INFO.size:
        raise _bad(what, f"argsz {argsz} is less than the {_REGION_INFO.size}-byte struct vfio_region_info")
    if flags or cap_offset or size or offset:
        raise _bad(what, "flags, cap_offset, size and offset must be 0 in the request")
    return int(argsz), int(index)


def encode_region_info(
    index: int, flags: int, size: int, offset: int, areas: Sequence[SparseArea] | None, argsz: int
) -> bytes:
    """A region-info reply: the fixed structure, then (``areas`` not ``None``) a sparse-mmap capability.

    ``argsz`` is the most the client takes; when the capability does not fit,
    the reply is the fixed structure alone with ``argsz`` set to the size
    needed (as the kernel does), so the client can ask again.
    """
    cap = b""
    if areas is not None:
        cap = _CAP_HEADER.pack(VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0) + _SPARSE_HEADER.pack(len(areas), 0)
        cap += b"".join(_SPARSE_AREA.pack(a.offset, a.size) for a in areas)
        flags |= REGION_INFO_FLAG_CAPS
    needed = _REGION_INFO.size + len(cap)
    if cap and needed <= argsz:
        return _REGION_INFO.pack(needed, flags, index, _REGION_INFO.size, size, offset) + cap
    return _REGION_INFO.pack(needed, flags, index, 0, size, offset)


def decode_region_info(payload: bytes, index: int) -> tuple[int, RegionInfo]:
    """``(argsz, info)`` of a region-info reply to a request for region ``index``.

    ``argsz`` larger than the payload means the server had more to say (a
    capability chain) than the request allowed: ask again with that ``argsz``.
    """
    what = f"DEVICE_GET_REGION_INFO reply for region {index}"
    _at_least(what, payload, _REGION_INFO.size)
    argsz, flags, got_index, _cap_offset, size, offset = _REGION_INFO.unpack_from(payload)
    if got_index != index:
        raise _bad(what, f"it describes region {got_index}")
    if argsz < _REGION_INFO.size:
        raise _bad(what, f"argsz {argsz} is less than {_REGION_INFO.size}")
    if len(payload) > argsz:
        raise _bad(what, f"payload of {len(payload)} bytes is longer than its argsz ({argsz})")
    if flags & ~(REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS):
        raise _bad(what, f"unknown flags {flags:#x}")
    if offset + size - 1 > _U64:
        raise _bad(what, f"offset {offset:#x} + size {size:#x} wraps past 2^64")
    try:
        info = parse_region_info(payload)
    except VfioError as exc:
        raise _bad(what, str(exc)) from None
    except (ValueError, struct.error) as exc:  # parse_region_info checks bounds; this is a second net
        raise _bad(what, f"malformed capability chain ({exc})") from None
    return int(argsz), info


# ---------------------------------------------------------------------------
# DEVICE_GET_IRQ_INFO
# ---------------------------------------------------------------------------


def encode_irq_info_request(index: int) -> bytes:
    return _INFO4.pack(_INFO4.size, 0, index, 0)


def decode_irq_info_request(payload: bytes) -> int:
    """The IRQ index asked about."""
    what = "DEVICE_GET_IRQ_INFO"
    _exact(what, payload, _INFO4.size)
    argsz, flags, index, count = _INFO4.unpack(payload)
    if argsz < _INFO4.size:
        raise _bad(what, f"argsz {argsz} is less than the {_INFO4.size}-byte reply")
    if flags or count:
        raise _bad(what, "flags and count must be 0 in the request")
    return int(index)


def encode_irq_info(index: int, flags: int, count: int) -> bytes:
    return _INFO4.pack(_INFO4.size, flags, index, count)


def decode_irq_info(payload: bytes, index: int) -> IrqInfo:
    what = f"DEVICE_GET_IRQ_INFO reply for index {index}"
    _at_least(what, payload, _INFO4.size)
    argsz, flags, got_index, count = _INFO4.unpack_from(payload)
    if argsz < _INFO4.size:
        raise _bad(what, f"argsz {argsz} is less than {_INFO4.size}")
    if got_index != index:
        raise _bad(what, f"it describes IRQ index {got_index}")
    if flags & ~0xF:
        raise _bad(what, f"unknown flags {flags:#x}")
    if count > 2048:  # MSI-X has at most 2048 vectors
        raise _bad(what, f"{count} interrupts (MSI-X, the largest, has at most 2048)")
    return IrqInfo(index=int(index), flags=int(flags), count=int(count))


# ---------------------------------------------------------------------------
# DEVICE_SET_IRQS
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IrqSet:
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""  # DATA_BOOL: one byte per interrupt

    @property
    def data_type(self) -> int:
        return self.flags & IRQ_SET_DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & IRQ_SET_ACTION_MASK


def encode_set_irqs(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    """``struct vfio_irq_set``; eventfds are not in the bytes (they go as SCM_RIGHTS)."""
    return _IRQ_SET.pack(_IRQ_SET.size + len(data), flags, index, start, count) + data


def decode_set_irqs(payload: bytes) -> IrqSet:
    what = "DEVICE_SET_IRQS"
    _at_least(what, payload, _IRQ_SET.size)
    argsz, flags, index, start, count = _IRQ_SET.unpack_from(payload)
    if argsz != len(payload):
        raise _bad(what, f"argsz {argsz} differs from the payload size {len(payload)}")
    if flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK):
        raise _bad(what, f"unknown flags {flags:#x}")
    data_type, action = flags & IRQ_SET_DATA_MASK, flags & IRQ_SET_ACTION_MASK
    if bin(data_type).count("1") != 1 or bin(action).count("1") != 1:
        raise _bad(what, f"flags {flags:#x} must name exactly one DATA_ and one ACTION_ bit")
    if start + count > 0xFFFFFFFF:
        raise _bad(what, f"start {start} + count {count} wraps")
    data = bytes(payload[_IRQ_SET.size :])
    if data_type == VFIO_IRQ_SET_DATA_BOOL:
        if len(data) != count:
            raise _bad(what, f"DATA_BOOL needs {count} bytes of data, the message has {len(data)}")
    elif data:
        raise _bad(what, f"{len(data)} bytes of data with DATA_NONE/DATA_EVENTFD (eventfds go as SCM_RIGHTS)")
    return IrqSet(int(flags), int(index), int(start), int(count), data)


# ---------------------------------------------------------------------------
# REGION_READ / REGION_WRITE
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionAccess:
    offset: int
    region: int
    count: int
    data: bytes = b""


def encode_region_access(offset: int, region: int, count: int, data: bytes = b"") -> bytes:
    return _REGION_ACCESS.pack(offset, region, count) + data


def decode_region_access(payload: bytes, what: str, *, with_data: bool, max_count: int) -> RegionAccess:
    """A REGION_READ/WRITE request or reply: ``with_data`` when ``count`` bytes follow."""
    _at_least(what, payload, _REGION_ACCESS.size)
    offset, region, count = _REGION_ACCESS.unpack_from(payload)
    if count == 0:
        raise _bad(what, "count is 0")
    if count > max_count:
        raise _bad(what, f"count {count} exceeds max_data_xfer_size {max_count}", errno.E2BIG)
    if offset + count - 1 > _U64:
        raise _bad(what, f"offset {offset:#x} + count {count} wraps past 2^64")
    expected = _REGION_ACCESS.size + (count if with_data else 0)
    if len(payload) != expected:
        raise _bad(what, f"payload is {len(payload)} bytes, must be {expected} for count {count}")
    return RegionAccess(int(offset), int(region), int(count), bytes(payload[_REGION_ACCESS.size :]))


# ---------------------------------------------------------------------------
# sending and receiving on a stream socket
# ---------------------------------------------------------------------------


def recv_message(
    sock: socket.socket,
    *,
    deadline: float | None,
    max_size: int,
    max_fds: int = MAX_MSG_FDS,
    first_byte_deadline: float | None = None,
) -> Message | None:
    """Receive one whole message, or ``None`` when the peer closed the connection between messages.

    ``deadline`` (a ``time.monotonic()`` value, or ``None`` to wait forever)
    bounds the whole message; ``first_byte_deadline``, when given, bounds only
    the wait for its first byte (a server waits for a client's next command
    for as long as it likes, but not for the rest of one it started).

    More than ``max_fds`` fds (the kernel discards what does not fit) gives a
    message with ``fds_truncated`` set and no fds: the caller answers with an
    error. Fatal :class:`MessageError`: a size in the header that cannot be
    right, the connection closed or the deadline passed in the middle of a
    message, a reset connection. A timeout before any byte raises a fatal
    ``MessageError`` with ``errno.ETIMEDOUT`` too: a reply that does not come
    leaves the stream in an unknown state.
    """
    fds: list[int] = []
    state = [False]
    try:
        try:
            head = recv_upto(
                sock,
                HEADER_SIZE,
                deadline if first_byte_deadline is None else first_byte_deadline,
                max_fds,
                fds,
                state,
            )
        except TimeoutError:
            raise message_error("no message arrived before the deadline", errno.ETIMEDOUT, fatal=True) from None
        if not head:
            close_fds(fds)
            return None
        try:
            if len(head) < HEADER_SIZE:
                more = recv_upto(sock, HEADER_SIZE - len(head), deadline, max_fds, fds, state)
                head += more
        except TimeoutError:
            raise message_error(
                f"timed out with {len(head)} of the {HEADER_SIZE} header bytes", errno.ETIMEDOUT, fatal=True
            ) from None
        if len(head) < HEADER_SIZE:
            raise message_error(
                f"connection closed after {len(head)} of the {HEADER_SIZE} header bytes", errno.ECONNRESET, fatal=True
            )
        msg_id, command, size, flags, error = decode_header(head, max_size)
        body = b""
        if size > HEADER_SIZE:
            try:
                body = recv_upto(sock, size - HEADER_SIZE, deadline, max_fds, fds, state)
            except TimeoutError:
                raise message_error(
                    f"timed out in the middle of a {size}-byte {command_name(command)} message id {msg_id}",
                    errno.ETIMEDOUT,
                    fatal=True,
                    msg_id=msg_id,
                    command=command,
                ) from None
            if len(body) < size - HEADER_SIZE:
                raise message_error(
                    f"connection closed in the middle of {command_name(command)} message id {msg_id}: "
                    f"{HEADER_SIZE + len(body)} of {size} bytes arrived",
                    errno.ECONNRESET,
                    fatal=True,
                    msg_id=msg_id,
                    command=command,
                )
    except MessageError:
        close_fds(fds)
        raise
    except OSError as exc:  # ECONNRESET and friends
        close_fds(fds)
        raise message_error(
            f"connection failed while receiving: {exc.strerror or exc}", exc.errno or errno.EIO, fatal=True
        ) from None
    msg = Message(msg_id, command, flags, error, body, fds, state[0])
    if msg.fds_truncated:
        msg.close_fds()
    return msg
