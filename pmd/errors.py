"""pmd's exceptions. Every one says what went wrong and what to do about it.

The hierarchy lets callers catch broadly (``PmdError``) or narrowly; each
class also derives from the builtin a Python user would expect (a bad argument
is still a ``ValueError``).
"""

from __future__ import annotations


class PmdError(Exception):
    """Base class of every error pmd raises on purpose."""


class ConfigSpaceError(PmdError, ValueError):
    """A PCI configuration space is malformed (truncated, looping capability list, ...)."""


class DeviceError(PmdError):
    """The device did something the specification forbids, or stopped answering.

    Values written by a device are untrusted: a used-ring entry naming a
    descriptor that is not in flight, a length larger than the buffer, ...
    The message says what was seen; the remedy is usually a device reset.
    """


class QueueStateError(PmdError, RuntimeError):
    """An operation on a queue, pool or memory region in the wrong state (closed, not started)."""


class PoolError(PmdError, ValueError):
    """A buffer id given back to a pool it does not belong to, or twice."""


class VfioError(PmdError, OSError):
    """A VFIO (kernel or vfio-user) operation failed; the message names the file or request."""


def vfio_error(message: str, err: int | None = None) -> VfioError:
    """A :class:`VfioError` whose ``str()`` is exactly ``message`` and whose ``errno`` is ``err``.

    Both sides build them: the driver's device access and the built-in device's
    server (an error reply carries the errno).
    """
    exc = VfioError(message)
    exc.errno = err
    return exc
