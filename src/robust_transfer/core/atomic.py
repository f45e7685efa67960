"""Atomic file writes: readers see the old file or the new one, whole, never a part.

Every file robust-transfer writes (checkpoints, the per-sample store, results and
reports) goes through :func:`atomic_write`: a temporary file in the same folder, synced,
then renamed into place, so a run killed at any moment leaves nothing half-written.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def remove_leftovers(root: Path, *, of: str | None = None) -> int:
    """Delete the temporary files that writes killed mid-way left under ``root`` (or,
    with ``of``, those of the file of that name in ``root``); only safe while no other
    process writes them. Returns how many."""
    if not root.is_dir():
        return 0
    leftovers = (
        list(root.rglob(f".*{TEMP_SUFFIX}"))
        if of is None
        else list(root.glob(f".{of}.*{TEMP_SUFFIX}"))
    )
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


@contextmanager
def waited_for(lock: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive ``flock`` on ``lock``: one process at a time
    in the block. The kernel releases it however the holder dies."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(handle)
    temp = Path(name)
    try:
        write(temp)
        with temp.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        if err.strerror is None:
            raise
        # Named by the file meant, not the temporary one beside it.
        raise OSError(err.errno, err.strerror, str(path)) from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    atomic_write(path, lambda temp: temp.write_bytes(payload))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
