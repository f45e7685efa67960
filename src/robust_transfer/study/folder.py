"""A study's output folder: claimed for one configuration and its inputs, written by one
run at a time, never shared with a user's own files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from ..atomic import atomic_write_text, remove_leftovers
from ..certify import default_certifier_names
from ..errors import ConfigError, InputError, ResultsFormatError
from ..schema import (
    ENCODERS_DIR,
    LOCK_FILE,
    RESULTS_FILE,
    RESULTS_FORMAT,
    STORE_DIR,
    STUDY_MARKER,
    Key,
)
from .config import StudyConfig

_CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_digest(root: Path) -> str:
    """Names, sizes and modification times of every file under ``root``: an image folder
    can hold gigabytes, and a changed or added image changes one of these."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _input_digest(spec: str) -> str | None:
    """A digest of the local file or folder a data or encoder spec reads, if any (files a
    zoo or torchvision downloads are versioned by their names)."""
    prefix, colon, rest = spec.partition(":")
    if colon and prefix == "folder":
        return _tree_digest(Path(rest)) if Path(rest).is_dir() else None
    path = Path(spec.removeprefix("checkpoint:"))
    if path.suffix in {".npz", ".pt", ".safetensors", ".pth", ".bin"} and path.is_file():
        return _file_digest(path)
    return None


def input_digests(config: StudyConfig) -> dict[str, str]:
    """Digests of the data files, image folders and weights files the study reads."""
    specs: list[str] = []
    for encoder in config.encoders.values():
        specs += [str(encoder.source)] if encoder.source else []
        checkpoint = encoder.options.get("checkpoint")
        specs += [str(checkpoint)] if checkpoint else []
    for task in config.tasks:
        specs += [spec for spec in (task.data, task.test_data) if spec]
    digests = {spec: _input_digest(spec) for spec in specs}
    return {spec: digest for spec, digest in digests.items() if digest is not None}


def fingerprint(config: StudyConfig) -> str:
    # The certifiers a default config runs depend on what is registered: part of it too.
    certifiers = list(config.certifiers or default_certifier_names())
    identity = [config.source, certifiers, input_digests(config)]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _has_results(out: Path) -> bool:
    return (out / RESULTS_FILE).is_file() or any((out / STORE_DIR).rglob("*.safetensors"))


def _check_marker(out: Path, expected: str) -> bool:
    """Whether ``out``'s marker is this study's; refuse another study's results."""
    marker = out / STUDY_MARKER
    try:
        stored = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ResultsFormatError(f"{marker} is damaged: {err}; choose another folder") from err
    if not isinstance(stored, dict) or stored.get(Key.FORMAT) != RESULTS_FORMAT:
        found = stored.get(Key.FORMAT, 1) if isinstance(stored, dict) else None
        raise ResultsFormatError(
            f"{out} holds results of format {found!r}, this "
            f"robust-transfer writes format {RESULTS_FORMAT}; choose another --out folder"
        )
    if stored.get(Key.FINGERPRINT) == expected:
        return True
    if not _has_results(out):
        return False  # a run that failed before its first result: its fix may take over
    raise ConfigError(
        f"{out} holds the results of a different study configuration or different input "
        "files (data, weights); choose another --out folder or delete this one"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(out: Path) -> Path:
    """Create ``out/.lock`` or refuse: two runs writing one folder would interleave units.
    A lock left by a killed run on this host is taken over."""
    lock = out / LOCK_FILE
    owner = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid_text, _, host = lock.read_text().partition(" ")
            pid = int(pid_text) if pid_text.isdigit() else -1
            if host == socket.gethostname() and not _alive(pid):
                lock.unlink(missing_ok=True)
                continue
            raise InputError(
                f"another run (pid {pid_text} on {host or 'an unknown host'}) is writing into "
                f"{out}; wait for it, or delete {lock} if that run is gone"
            ) from None
        with os.fdopen(descriptor, "w") as handle:
            handle.write(owner)
        return lock
    raise InputError(f"cannot take the lock {lock}")


@contextlib.contextmanager
def claimed(out: Path, config: StudyConfig) -> Iterator[None]:
    """Hold ``out`` for ``config`` while the block runs.

    Refused: ``out`` naming a file, a folder of other files (a study would write its
    reports beside them), a folder of another study's results (or of this study's over
    changed input files: resuming would report old units as new), and a folder another
    run is writing into.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    expected = fingerprint(config)
    marker = out / STUDY_MARKER
    ours = marker.is_file() and _check_marker(out, expected)
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if not marker.is_file() and others:
        raise InputError(
            f"{out} holds other files ({', '.join(others[:3])}{', ...' if others[3:] else ''}); "
            "a study writes into a new or empty folder: choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        remove_leftovers(out)  # of a killed run; the lock keeps other writers out
        if not ours:
            # What a failed run of another configuration left: encoder descriptions only.
            shutil.rmtree(out / ENCODERS_DIR, ignore_errors=True)
            atomic_write_text(
                marker,
                json.dumps(
                    {Key.FINGERPRINT: expected, Key.NAME: config.name, Key.FORMAT: RESULTS_FORMAT}
                ),
            )
        yield
    finally:
        lock.unlink(missing_ok=True)
