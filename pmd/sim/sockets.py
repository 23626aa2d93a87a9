"""The device's UNIX socket files: made with exactly the mode asked, never through a symlink.

The vfio-user socket (:mod:`pmd.sim.server`) and the device process's control
socket (:mod:`pmd.sim.process`) are files in a directory other users may write
to. ``chmod(path)`` after ``bind`` follows a symlink someone put there in
between (Linux has no ``lchmod``) and would change the mode of whatever it
points to. So the mode goes on the socket before ``bind`` (Linux gives the file
the socket inode's mode, less the umask: never wider than asked), and after
``bind`` the path is opened ``O_PATH | O_NOFOLLOW`` (a symlink opens as
itself, open(2)), checked to be a socket of ours, and changed through
``/proc/self/fd/N``, which names that inode and nothing else. Removing the
file later checks it is still the one made.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from ..errors import vfio_error

__all__ = ["bind_socket", "set_socket_mode", "remove_socket"]

#: what a socket file is, to remove it later only if it is still that file
Identity = tuple[int, int]   # (st_dev, st_ino)


def bind_socket(sock: socket.socket, path: str, mode: int, what: str) -> Identity:
    """Bind ``sock`` at ``path`` and give the new file exactly ``mode``; returns its identity.

    ``what`` names the socket in errors (``"vfio-user socket"``).
    """
    os.fchmod(sock.fileno(), mode)
    try:
        sock.bind(path)
    except OSError as exc:
        raise vfio_error(f"cannot create the {what} {path}: {exc.strerror}", exc.errno) from exc
    return set_socket_mode(path, mode, what)


def set_socket_mode(path: str, mode: int, what: str) -> Identity:
    """Give the socket file just bound at ``path`` exactly ``mode``, never following a symlink."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise vfio_error(
            f"the {what} {path} is gone right after bind ({exc.strerror}): another process "
            "removes files there; use a directory only this user can write",
            exc.errno,
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise vfio_error(
                f"{path} was replaced right after bind by something that is not this {what} "
                f"({stat.filemode(st.st_mode)}, uid {st.st_uid}; a symlink?): not changing its mode; "
                "use a directory only this user can write",
                errno.EEXIST,
            )
        if stat.S_IMODE(st.st_mode) != mode:
            try:
                os.chmod(f"/proc/self/fd/{fd}", mode)
            except OSError as exc:
                remove_socket(path, (st.st_dev, st.st_ino))    # ours, and of no use: leave nothing behind
                raise vfio_error(
                    f"cannot set mode {mode:#o} on the {what} {path} through /proc/self/fd "
                    f"({exc.strerror}); mount /proc, or set a umask that keeps those bits",
                    exc.errno,
                ) from None
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
