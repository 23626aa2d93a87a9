"""Messages with file descriptors over a UNIX stream socket, under a deadline.

vfio-user and vhost-user frame their messages differently (:mod:`pmd.abi.vfio_user`,
:mod:`pmd.abi.vhost_user`) but move them the same way: a whole message sent with
its fds riding on the first byte (SCM_RIGHTS, unix(7)), received in pieces until
the header or the payload is complete, every wait bounded by one deadline, and
never a SIGPIPE. That part is here, once; each protocol raises its own errors
around it.
"""

from __future__ import annotations

import array
import math
import os
import socket
import time
from collections.abc import Sequence

__all__ = ["SCM_MAX_FD", "FdCarrier", "close_fds", "deadline_after", "remaining", "send_all", "recv_upto"]

#: Linux: the most fds one SCM_RIGHTS message can carry (SCM_MAX_FD, include/net/scm.h)
SCM_MAX_FD = 253


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd, ignoring the ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class FdCarrier:
    """What a received message does with the fds that came with it (``fds``, which the
    receiver owns): hand them over, or close them."""

    fds: list[int]

    def take_fds(self) -> list[int]:
        """Hand the fds over to the caller (who then owns them)."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        close_fds(self.take_fds())


def deadline_after(timeout: float | None) -> float | None:
    """``time.monotonic() + timeout``, or ``None`` for no timeout (``inf`` counts as none)."""
    if timeout is None or math.isinf(timeout):
        return None
    return time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (``None``: no deadline)."""
    if deadline is None:
        return None
    return deadline - time.monotonic()


def send_all(sock: socket.socket, data: bytes, fds: Sequence[int] = (), deadline: float | None = None) -> None:
    """Send ``data`` whole; ``fds`` ride with its first byte as SCM_RIGHTS.

    Raises ``TimeoutError`` past ``deadline`` and the ``OSError`` of a connection that
    is gone (``BrokenPipeError``, ``ConnectionResetError``): MSG_NOSIGNAL, never SIGPIPE.
    """
    if len(fds) > SCM_MAX_FD:
        raise ValueError(f"{len(fds)} file descriptors in one message; Linux passes at most {SCM_MAX_FD}")
    left = remaining(deadline)
    if left is not None and left <= 0:
        raise TimeoutError("deadline passed before sending")
    sock.settimeout(left)
    view = memoryview(data)
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([view], ancillary, socket.MSG_NOSIGNAL)
    while sent < len(view):
        left = remaining(deadline)
        if left is not None and left <= 0:
            raise TimeoutError(f"sent {sent} of {len(view)} bytes before the deadline")
        sock.settimeout(left)
        sent += sock.send(view[sent:], socket.MSG_NOSIGNAL)


def recv_upto(sock: socket.socket, want: int, deadline: float | None, max_fds: int, fds: list[int],
              state: list[bool]) -> bytes:
    """Up to ``want`` bytes (fewer only at the end of the stream), collecting the fds
    that come with them into ``fds``; ``state[0]`` is set when fds were cut (more than
    ``max_fds``, or more than the buffer held: the kernel closes those).

    Raises ``TimeoutError`` past ``deadline``; other ``OSError``\\ s are the caller's.
    """
    chunks: list[bytes] = []
    got = 0
    space = socket.CMSG_SPACE(max(max_fds, 1) * 4)
    while got < want:
        left = remaining(deadline)
        if left is not None and left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        # MSG_CMSG_CLOEXEC: a peer's fd must not leak into a process this one starts
        try:
            data, ancdata, flags, _addr = sock.recvmsg(want - got, space, socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            break  # a peer that closed with our bytes unread (AF_UNIX reports a reset): closed all the same
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % 4
                fds.extend(array.array("i", cdata[:usable]))
        if flags & socket.MSG_CTRUNC or len(fds) > max_fds:
            state[0] = True
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)
