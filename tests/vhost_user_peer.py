"""A fake vhost-user back-end for the front-end's tests: correct by default, misbehaving where told.

It runs in a thread on one end of a socketpair (or an accepted/connected socket),
decodes every request with pmd's own strict decoders (so it also checks what pmd
sends: ``errors`` must stay empty), answers as DPDK's vhost library does, and records
what it saw. ``actions`` maps a request name to a misbehaviour for the reply to that
request (the first one only, unless ``repeat``):

``close``         close the socket instead of answering
``silent``        never answer (keep reading)
``huge``          a header claiming a 4 GiB payload
``short``         a header promising 8 bytes, then 3 of them, then close
``half_header``   5 bytes of a header, then close
``wrong_request`` answer with another request code
``bad_version``   version 2 in the flags
``no_reply_flag`` the reply bit missing
``need_reply``    the need_reply bit set on the reply
``unknown_flag``  bit 7 set in the flags
``bad_size``      a 4-byte payload where 8 (or the structure) are due
``with_fd``       attach an eventfd to the reply
``nack``          REPLY_ACK status 1 (or a zero-length GET_CONFIG)
``split``         the header and the payload in two writes, 5 ms apart (must work)
``twice``         the reply twice (the second is taken for the next request's answer)
``unsolicited``   a request of the back-end's own (code 2, no reply flag) before the reply
``payload:HEX``   this exact payload

Used by tests/test_vhost_user.py and by its fuzzer's child process.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pmd.abi import vhost_user as v

#: what DPDK 22.11's net_vhost offered on this machine (CSUM ... IN_ORDER, bit 30 included)
DPDK_FEATURES = 0xD7C66E7CB
#: MQ LOG_SHMFD RARP REPLY_ACK NET_MTU BACKEND_REQ CRYPTO_SESSION BACKEND_SEND_FD HOST_NOTIFIER STATUS
DPDK_PROTOCOL_FEATURES = 0x10CBF
ALL_PROTOCOL = (1 << v.VHOST_USER_PROTOCOL_F_MQ | 1 << v.VHOST_USER_PROTOCOL_F_REPLY_ACK
                | 1 << v.VHOST_USER_PROTOCOL_F_CONFIG | 1 << v.VHOST_USER_PROTOCOL_F_STATUS)


@dataclass
class Seen:
    """One request as the fake back-end received it."""

    request: int
    flags: int
    payload: bytes
    fd_kinds: list[str] = field(default_factory=list)  # readlink of each fd ("anon_inode:[eventfd]", "/memfd:...")
    fd_inodes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return v.request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & v.FLAG_NEED_REPLY)


class FakeBackend:
    def __init__(
        self,
        sock: socket.socket,
        *,
        features: int = DPDK_FEATURES,
        protocol_features: int = DPDK_PROTOCOL_FEATURES | 1 << v.VHOST_USER_PROTOCOL_F_CONFIG,
        queue_num: int = 128,
        config: bytes = bytes.fromhex("525400123456") + b"\x01\x00" + b"\x01\x00" + b"\xdc\x05",
        actions: dict[str, str] | None = None,
        repeat: bool = False,
        bases: dict[int, int] | None = None,
        chooser: Callable[[v.Message], str | None] | None = None,
    ) -> None:
        self.sock = sock
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.config = config.ljust(v.VHOST_USER_MAX_CONFIG_SIZE, b"\0")
        self.actions = dict(actions or {})
        self.repeat = repeat
        self.bases = dict(bases or {})
        self.chooser = chooser  # the fuzzer's: picks an action per message
        self.seen: list[Seen] = []
        self.errors: list[str] = []  # what pmd sent that the strict decoders refused
        self.negotiated_protocol = 0
        self.status = 0
        self.acked_features: int | None = None
        self.mtu: int | None = None  # NET_SET_MTU
        self.regions: list[v.MemoryRegion] = []
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-vhost-backend", daemon=True)
        self._thread.start()

    # --- plumbing ---

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the fake backend did not finish")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.join()

    def names(self) -> list[str]:
        return [s.name for s in self.seen]

    def _send(self, data: bytes, fds: list[int] | None = None) -> None:
        v.send_message(self.sock, data, fds or [], v.deadline_after(5.0))

    def _run(self) -> None:
        try:
            while True:
                try:
                    msg = v.recv_message(self.sock, deadline=None, max_payload=v.MAX_PAYLOAD_SIZE)
                except v.MessageError as exc:
                    if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                        self.errors.append(f"framing: {exc}")
                    return
                if msg is None:
                    return
                if not self._handle(msg):
                    return
        except OSError:
            return
        finally:
            self.sock.close()
            self.done.set()

    # --- requests ---

    def _record(self, msg: v.Message) -> Seen:
        kinds, inodes = [], []
        for fd in msg.fds:
            try:
                kinds.append(os.readlink(f"/proc/self/fd/{fd}"))
                inodes.append(os.fstat(fd).st_ino)
            except OSError:
                kinds.append("?")
                inodes.append(-1)
        seen = Seen(msg.request, msg.flags, msg.payload, kinds, inodes)
        self.seen.append(seen)
        return seen

    def _action(self, msg: v.Message) -> str | None:
        if self.chooser is not None:
            return self.chooser(msg)
        action = self.actions.get(msg.name)
        if action is not None and not self.repeat:
            del self.actions[msg.name]
        return action

    def _handle(self, msg: v.Message) -> bool:
        """Answer one request; False ends the session."""
        self._record(msg)
        nfds = len(msg.fds)
        msg.close_fds()
        try:
            v.check_request_flags(msg)
            reply = self._reply_payload(msg, nfds)
        except v.MessageError as exc:
            self.errors.append(f"{msg.name}: {exc}")
            reply = None
            if msg.need_reply:
                return self._answer(msg, v.encode_u64(1), None)
            return True
        if reply is None and not msg.need_reply:
            action = self._action(msg)
            if action == "close":
                return False
            return True
        if reply is None:
            reply = v.encode_u64(0)
        return self._answer(msg, reply, self._action(msg))

    def _answer(self, msg: v.Message, payload: bytes, action: str | None) -> bool:
        req = msg.request
        flags = v.VHOST_USER_VERSION | v.FLAG_REPLY
        fds: list[int] = []
        if action is None:
            pass
        elif action == "close":
            return False
        elif action == "silent":
            return True
        elif action == "huge":
            self._send(struct.pack("=III", req, flags, 0xFFFFFFFF))
            return True
        elif action == "short":
            self._send(struct.pack("=III", req, flags, 8) + b"abc")
            return False
        elif action == "half_header":
            self._send(struct.pack("=III", req, flags, 8)[:5])
            return False
        elif action == "wrong_request":
            req = v.VHOST_USER_GET_STATUS if req != v.VHOST_USER_GET_STATUS else v.VHOST_USER_GET_FEATURES
        elif action == "bad_version":
            flags = 2 | v.FLAG_REPLY
        elif action == "no_reply_flag":
            flags = v.VHOST_USER_VERSION
        elif action == "need_reply":
            flags |= v.FLAG_NEED_REPLY
        elif action == "unknown_flag":
            flags |= 1 << 7
        elif action == "bad_size":
            payload = payload[:4]
        elif action == "with_fd":
            fds = [os.eventfd(0, os.EFD_CLOEXEC)]
        elif action == "nack":
            payload = b"" if req == v.VHOST_USER_GET_CONFIG else v.encode_u64(1)
        elif action.startswith("payload:"):
            payload = bytes.fromhex(action[len("payload:"):])
        elif action == "split":
            self._send(struct.pack("=III", req, flags, len(payload)))
            time.sleep(0.005)
            if payload:
                self._send(payload)
            return True
        elif action == "unsolicited":
            self._send(struct.pack("=III", v.VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, v.VHOST_USER_VERSION, 0))
        elif action != "twice":
            raise AssertionError(f"unknown action {action}")
        data = struct.pack("=III", req, flags, len(payload)) + payload
        try:
            self._send(data, fds)
            if action == "twice":
                self._send(data)
        finally:
            v.close_fds(fds)
        return True

    def _reply_payload(self, msg: v.Message, nfds: int) -> bytes | None:
        """The reply a correct back-end sends (None: none), checking the request on the way."""
        r, p, name = msg.request, msg.payload, msg.name
        if r in (v.VHOST_USER_SET_OWNER, v.VHOST_USER_GET_FEATURES, v.VHOST_USER_GET_PROTOCOL_FEATURES,
                 v.VHOST_USER_GET_QUEUE_NUM, v.VHOST_USER_GET_STATUS):
            if p or nfds:
                raise v.message_error(f"{name} must have no payload and no fds")
            if r == v.VHOST_USER_GET_FEATURES:
                return v.encode_u64(self.features)
            if r == v.VHOST_USER_GET_PROTOCOL_FEATURES:
                return v.encode_u64(self.protocol_features)
            if r == v.VHOST_USER_GET_QUEUE_NUM:
                return v.encode_u64(self.queue_num)
            if r == v.VHOST_USER_GET_STATUS:
                return v.encode_u64(self.status)
            return None
        if r == v.VHOST_USER_SET_PROTOCOL_FEATURES:
            self.negotiated_protocol = v.decode_u64(p, name)
            if self.negotiated_protocol & ~self.protocol_features:
                raise v.message_error(f"{name} asks for protocol features never offered")
            return None
        if r == v.VHOST_USER_SET_FEATURES:
            value = v.decode_u64(p, name)
            if value & ~self.features:
                raise v.message_error(f"{name} asks for features never offered: {value & ~self.features:#x}")
            self.acked_features = value
            return None
        if r == v.VHOST_USER_SET_STATUS:
            self.status = v.decode_status(p, name)
            return None
        if r == v.VHOST_USER_SET_MEM_TABLE:
            self.regions = v.decode_memory_table(p, nfds)
            return None
        if r in (v.VHOST_USER_SET_VRING_NUM, v.VHOST_USER_SET_VRING_BASE, v.VHOST_USER_SET_VRING_ENABLE):
            state = v.decode_vring_state(p, name)
            if r == v.VHOST_USER_SET_VRING_BASE:
                self.bases.setdefault(state.index, state.num)
            return None
        if r == v.VHOST_USER_SET_VRING_ADDR:
            v.decode_vring_addr(p, name)
            return None
        if r in (v.VHOST_USER_SET_VRING_KICK, v.VHOST_USER_SET_VRING_CALL):
            v.decode_vring_file(p, name, nfds)
            return None
        if r == v.VHOST_USER_GET_VRING_BASE:
            state = v.decode_vring_state(p, name)
            return v.encode_vring_state(state.index, self.bases.get(state.index, 0))
        if r == v.VHOST_USER_NET_SET_MTU:
            if not self.negotiated_protocol >> v.VHOST_USER_PROTOCOL_F_NET_MTU & 1:
                raise v.message_error(f"{name} without VHOST_USER_PROTOCOL_F_NET_MTU")
            self.mtu = v.decode_u64(p, name)
            return None
        if r == v.VHOST_USER_GET_CONFIG:
            cfg = v.decode_config(p, name)
            return v.encode_config(cfg.offset, self.config[cfg.offset:cfg.offset + cfg.size])
        raise v.message_error(f"the fake backend does not implement {name}")
