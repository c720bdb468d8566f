"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

Every file symatomic writes (checkpoints, exported models, predictions, plots) goes
through :func:`atomic_write`: a reader never sees a half-written file, an existing file
stays intact until its replacement is complete, and the temporary file is removed when
the write fails or is interrupted (Ctrl-C). Temporary files left by a process that was
killed (``SIGKILL``, power loss) are removed by the next write into the same folder.
"""

import contextlib
import os
import socket
import uuid
from typing import Iterator

__all__ = ["atomic_write", "check_output_file", "interrupted", "TEMPORARY_PREFIX"]

#: prefix of the temporary files (``.tmp-<host>-<pid>-<random>-<name>``)
TEMPORARY_PREFIX = ".tmp-"


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace(os.sep, "_") or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(folder: str) -> None:
    """Remove the temporary files of processes of this host that no longer run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    host = _host()
    for name in names:
        if not name.startswith(TEMPORARY_PREFIX):
            continue
        parts = name[len(TEMPORARY_PREFIX) :].split("-", 2)
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if not _process_alive(int(parts[1])):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def interrupted(error: BaseException) -> bool:
    """Whether ``error`` is, or happened while handling, a ``KeyboardInterrupt``."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__ or error.__cause__
    return False


def check_output_file(path: str, force: bool = False, what: str = "output") -> None:
    """Raise ``ValueError`` (before any work) when ``path`` can not be written as a
    file: it is (or names, with a trailing ``/``) a directory, or it exists and
    ``force`` is false."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(
            f"{what} '{path}' is a directory; give a file name, e.g. "
            f"'{os.path.join(path, 'model.pt')}'"
        )
    if os.path.exists(path) and not force:
        raise ValueError(f"{what} '{path}' exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_write(path: str, fsync: bool = False) -> Iterator[str]:
    """Context manager giving the name of a temporary file that replaces ``path``
    when the block completes; on any error or interruption it is removed instead.

    >>> with atomic_write("model.pt") as temporary:
    ...     exported.save(temporary)

    The file gets the permissions of a file created with ``open`` (the umask's).

    :param fsync: flush the temporary file to disk before it replaces ``path``
    """
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise IsADirectoryError(f"'{path}' is a directory, not a file name")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    name = os.path.basename(path)
    temporary = os.path.join(
        folder,
        f"{TEMPORARY_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}",
    )
    try:
        yield temporary
        if not os.path.exists(temporary):
            raise FileNotFoundError(f"nothing was written to '{path}'")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        if fsync:
            with open(temporary, "rb") as file:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if interrupted(error) and not isinstance(error, KeyboardInterrupt):
            # Ctrl-C inside a writer whose clean-up failed in turn (torch.save's
            # zip writer): it is still Ctrl-C
            raise KeyboardInterrupt from error
        raise
    finally:
        if os.path.exists(temporary):
            with contextlib.suppress(OSError):
                os.unlink(temporary)
