"""Shared memory between processes: memfds that a peer cannot shrink.

pmd shares memory with another process by file descriptor: the driver hands
its DMA memory to a vfio-user device (``DMA_MAP``), the built-in device hands
its BAR's notify area to the driver (region info). Both sides ``mmap`` the
file ``MAP_SHARED``. If the peer then shrinks the file (``ftruncate``), the
next access to a page past the new end kills the process that touches it
with ``SIGBUS`` (mmap(2)). So:

- memory pmd shares is a memfd created with ``MFD_ALLOW_SEALING`` and sealed
  ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`` before the fd leaves the
  process (memfd_create(2), fcntl(2) "File Sealing"): its size is fixed for
  good, and the peer cannot add seals either (no ``F_SEAL_FUTURE_WRITE``
  to break the next mapping);
- memory pmd is handed is mapped only if it carries ``F_SEAL_SHRINK`` and is
  long enough for what is mapped (:func:`require_sealed`). Seals can only be
  added, never removed, and a file that cannot shrink cannot become too
  short, so the check before ``mmap`` holds for as long as the mapping lives.

A file that cannot be sealed (a plain file, a file on tmpfs or hugetlbfs
opened by path, a memfd created without ``MFD_ALLOW_SEALING``) is refused:
there is no safe way to map it (a ``SIGBUS`` handler cannot be written in
Python, and DMA memory or a doorbell page cannot be copied instead). The
remedy is the peer's: create the memory with ``memfd_create(...,
MFD_ALLOW_SEALING)`` and add ``F_SEAL_SHRINK`` before sending it (QEMU's
``memory-backend-memfd`` does, its ``seal=on`` being the default).

Shared by both sides (driver and device); it imports nothing of either.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from ..errors import vfio_error

__all__ = ["SEALS", "create_sealed_memfd", "require_sealed", "seal_memfd", "seals_of"]

#: what pmd seals its own shared memory with: the size is fixed, and so is the seal set
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

_REMEDY = ("the peer must create it with memfd_create(..., MFD_ALLOW_SEALING) and seal it with "
           "fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) before sending it")


def seals_of(fd: int) -> int:
    """The seals of ``fd`` (``F_GET_SEALS``); 0 for a file that cannot carry seals (EINVAL)."""
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a memfd nor a shmem file: no seals at all
            return 0
        raise


def seal_memfd(fd: int) -> None:
    """Seal a memfd of pmd's against any change of size, and the seal set itself (:data:`SEALS`).

    The memfd must have been created with ``MFD_ALLOW_SEALING`` and sized first.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot seal the memfd against shrinking (F_ADD_SEALS): {exc.strerror}; "
                                 "it must be created with MFD_ALLOW_SEALING") from None


def create_sealed_memfd(name: str, size: int, flags: int = 0) -> int:
    """A new memfd of ``size`` bytes (``flags``: extra ``MFD_*`` bits), sealed with :data:`SEALS`."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    try:
        os.ftruncate(fd, size)
        seal_memfd(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def require_sealed(fd: int, end: int, what: str) -> None:
    """Raise :class:`pmd.errors.VfioError` unless ``fd`` may be mapped up to file offset ``end``.

    The file must be regular, carry ``F_SEAL_SHRINK`` (``EPERM`` otherwise:
    the peer could truncate it under the mapping) and be at least ``end``
    bytes long (``EINVAL``). ``what`` names the file in the message (``"the
    DMA_MAP file"``). Check before ``mmap``; the answer cannot change later.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise vfio_error(f"{what}: the file descriptor is unusable: {exc.strerror}", exc.errno or errno.EBADF) from None
    if not stat.S_ISREG(st.st_mode):
        raise vfio_error(f"{what} is not a regular file (a sealed memfd is needed): {_REMEDY}", errno.EINVAL)
    # Seals first, then the size: once F_SEAL_SHRINK is there the size can only grow.
    try:
        seals = seals_of(fd)
    except OSError as exc:  # an O_PATH fd, for one, has no seals to read (EBADF)
        raise vfio_error(f"{what}: cannot read its seals (F_GET_SEALS: {exc.strerror}); it must be an open "
                     f"memfd, not an O_PATH descriptor: {_REMEDY}", exc.errno or errno.EBADF) from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise vfio_error(f"{what} is not sealed against shrinking (seals {seals:#x}): truncating it would kill "
                     f"this process with SIGBUS, so it is not mapped; {_REMEDY}", errno.EPERM)
    size = os.fstat(fd).st_size
    if size < end:
        raise vfio_error(f"{what} is {size:#x} bytes long, but {end:#x} bytes of it would be mapped; touching the "
                     "rest would be SIGBUS, so it is not mapped", errno.EINVAL)
