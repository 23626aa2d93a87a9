"""UNIX socket files, as both sides make them: exactly the mode asked, never through a symlink.

The built-in device's vfio-user socket (:mod:`pmd.sim.server`) and control socket
(:mod:`pmd.sim.process`), and the vhost-user front-end listening for a back-end
(:mod:`pmd.driver.vhost_user`), put socket files in directories other users may
write to. ``chmod(path)`` after ``bind`` follows a symlink someone put there in
between (Linux has no ``lchmod``) and would change the mode of whatever it points
to. So the mode goes on the socket before ``bind`` (Linux gives the file the socket
inode's mode, less the umask: never wider than asked), and after ``bind`` the path
is opened ``O_PATH | O_NOFOLLOW`` (a symlink opens as itself, open(2)), checked to
be a socket of ours, and changed through ``/proc/self/fd/N``, which names that inode
and nothing else. A stale file (nobody listens) is replaced; anything else at the
path is refused. Removing the file later checks it is still the one made.

Each caller passes the exception its users expect (``error(message, errno)``:
:func:`pmd.errors.vfio_error`, :func:`pmd.abi.vhost_user.vhost_user_error`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from .errors import vfio_error

__all__ = ["Identity", "MAX_PATH", "check_path", "remove_stale", "bind_socket", "set_socket_mode",
           "remove_socket"]

log = logging.getLogger("pmd.sockets")

#: what a socket file is, to remove it later only if it is still that file
Identity = tuple[int, int]   # (st_dev, st_ino)
#: builds the caller's exception from a message and an errno
ErrorFactory = Callable[[str, int], Exception]

#: the longest path a UNIX socket address holds (sun_path is 108 bytes with its NUL, unix(7))
MAX_PATH = 107


def check_path(path: str, error: ErrorFactory = vfio_error) -> None:
    """Refuse a path too long for a socket address (the kernel would say only EINVAL)."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise error(f"socket path {path!r} is longer than the {MAX_PATH} bytes a UNIX socket address holds; "
                    "use a shorter path (a directory closer to /)", errno.ENAMETOOLONG)


def remove_stale(path: str, in_use: str, error: ErrorFactory = vfio_error) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``path``.

    ``in_use`` says what to do when something does listen there ("another vfio-user
    server listens on it; stop that one or choose another path").
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"cannot check {path}: {exc.strerror}", exc.errno or errno.EIO) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise error(f"{path} exists and is not a socket: refusing to replace it; choose another socket path "
                    "or remove the file yourself", errno.EEXIST)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # a stale socket file: its listener is gone
    except OSError as exc:
        raise error(f"cannot check whether {path} is in use: {exc.strerror}", exc.errno or errno.EIO) from None
    else:
        raise error(f"{path} is in use: {in_use}", errno.EADDRINUSE)
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    log.info("removed the stale socket file %s", path)


def bind_socket(sock: socket.socket, path: str, mode: int, what: str,
                error: ErrorFactory = vfio_error) -> Identity:
    """Bind ``sock`` at ``path`` and give the new file exactly ``mode``; returns its identity.

    ``what`` names the socket in errors (``"vfio-user socket"``).
    """
    os.fchmod(sock.fileno(), mode)
    try:
        sock.bind(path)
    except OSError as exc:
        raise error(f"cannot create the {what} {path}: {exc.strerror}", exc.errno or errno.EIO) from None
    return set_socket_mode(path, mode, what, error)


def set_socket_mode(path: str, mode: int, what: str, error: ErrorFactory = vfio_error) -> Identity:
    """Give the socket file just bound at ``path`` exactly ``mode``, never following a symlink."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"the {what} {path} is gone right after bind ({exc.strerror}): another process "
                    "removes files there; use a directory only this user can write", exc.errno or errno.ENOENT) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise error(f"{path} was replaced right after bind by something that is not this {what} "
                        f"({stat.filemode(st.st_mode)}, uid {st.st_uid}; a symlink?): not changing its mode; "
                        "use a directory only this user can write", errno.EEXIST)
        if stat.S_IMODE(st.st_mode) != mode:
            try:
                os.chmod(f"/proc/self/fd/{fd}", mode)
            except OSError as exc:
                remove_socket(path, (st.st_dev, st.st_ino))    # ours, and of no use: leave nothing behind
                raise error(f"cannot set mode {mode:#o} on the {what} {path} through /proc/self/fd "
                            f"({exc.strerror}); mount /proc, or set a umask that keeps those bits",
                            exc.errno or errno.EPERM) from None
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


def remove_socket(path: str, identity: Identity | None) -> None:
    """Remove the socket file at ``path`` if it is still the one made (``identity``)."""
    if identity is None:
        return
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass
