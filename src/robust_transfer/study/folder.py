"""A study's output folder: claimed for one configuration and its inputs, written by one
run at a time, never shared with a user's own files."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from ..certify import default_certifier_names
from ..core.atomic import TEMP_SUFFIX, atomic_write_text, remove_leftovers
from ..core.errors import ConfigError, InputError, ResultsFormatError
from ..core.schema import (
    ENCODERS_DIR,
    LOCK_FILE,
    RESULTS_FILE,
    RESULTS_FORMAT,
    STORE_DIR,
    STUDY_MARKER,
    Key,
)
from .spec import StudyConfig

_CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_digest(root: Path) -> str:
    """Names and sizes of every file under ``root`` (relative: the folder may move; no
    times: copying it keeps the study): an image folder can hold gigabytes, and an added,
    removed or re-encoded image changes these."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _input_digest(spec: str) -> str | None:
    """A digest of the local file or folder a data or encoder spec reads, if any (files a
    zoo or torchvision downloads are versioned by their names)."""
    prefix, colon, rest = spec.partition(":")
    if colon and prefix == "folder":
        return _tree_digest(Path(rest)) if Path(rest).is_dir() else None
    path = Path(spec.removeprefix("checkpoint:"))
    return _file_digest(path) if path.is_file() else None


def input_digests(config: StudyConfig) -> list[str]:
    """Digests of the data files, image folders and weights files the study reads, in
    config order and without their paths: a project moved elsewhere resumes."""
    specs: list[str] = []
    for encoder in config.encoders.values():
        specs += [str(encoder.source)] if encoder.source else []
        checkpoint = encoder.options.get("checkpoint")
        specs += [str(checkpoint)] if checkpoint else []
    for task in config.tasks:
        specs += [spec for spec in (task.data, task.test_data) if spec]
    return [digest for digest in map(_input_digest, specs) if digest is not None]


def _certifiers(config: StudyConfig) -> list[str]:
    # The certifiers a default config runs depend on what is registered: part of it too.
    return list(config.certifiers or default_certifier_names())


def _digest(identity: list[object]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(config: StudyConfig, precision: str = "fp32") -> str:
    """The identity of a study folder: config, certifiers, inputs, and the attacks'
    search precision where it is not float32 (bf16 finds other points)."""
    parts: list[object] = [config.source, _certifiers(config), input_digests(config)]
    return _digest(parts if precision == "fp32" else [*parts, precision])


def _fingerprint_before_inputs(config: StudyConfig) -> str:
    """Folders written before input files were part of a study's identity."""
    return _digest([config.source, _certifiers(config)])


def _has_results(out: Path) -> bool:
    return (out / RESULTS_FILE).is_file() or any((out / STORE_DIR).rglob("*.safetensors"))


def _marker_is_ours(out: Path, config: StudyConfig, expected: str) -> bool:
    """Whether ``out``'s marker is this study's; refuse another study's results."""
    marker = out / STUDY_MARKER
    try:
        stored = json.loads(marker.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ResultsFormatError(f"{marker} is damaged: {err}; choose another folder") from err
    if not isinstance(stored, dict) or stored.get(Key.FORMAT) != RESULTS_FORMAT:
        found = stored.get(Key.FORMAT, 1) if isinstance(stored, dict) else None
        raise ResultsFormatError(
            f"{out} holds results of format {found!r}, this "
            f"robust-transfer writes format {RESULTS_FORMAT}; choose another --out folder"
        )
    if stored.get(Key.FINGERPRINT) == expected:
        return True
    if stored.get(Key.FINGERPRINT) == _fingerprint_before_inputs(config):
        return False  # this study, marked by an earlier version: marked again
    if not _has_results(out):
        return False  # a run that failed before its first result: its fix may take over
    raise ConfigError(
        f"{out} holds the results of a different study configuration or different input "
        "files (data, weights); choose another --out folder or delete this one"
    )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.lock`` or refuse: two runs writing one
    folder would interleave units. The kernel releases it when the holder dies, however
    it dies; the file keeps the last holder's pid and host for the message."""
    lock = out / LOCK_FILE
    with lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            raise InputError(
                f"another run ({holder}) is writing into {out}; wait for it to finish"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _others(out: Path) -> list[str]:
    """What ``out`` holds besides the lock and the leftovers of killed writes."""
    return sorted(
        p.name for p in out.iterdir() if p.name != LOCK_FILE and not p.name.endswith(TEMP_SUFFIX)
    )


def refuse_a_file(out: Path) -> None:
    """An output folder's first check: ``--out`` must name a folder, or nothing yet: not
    an existing file, nor a link to nothing (it cannot be made)."""
    if out.is_symlink() and not out.exists():
        raise InputError(f"--out {out} is a symbolic link to nothing: name a folder")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")


@contextlib.contextmanager
def claimed(out: Path, config: StudyConfig, precision: str = "fp32") -> Iterator[None]:
    """Hold ``out`` for ``config`` (run at ``precision``) while the block runs.

    Refused: ``out`` naming a file, a folder of other files (a study would write its
    reports beside them), a folder of another study's results (or of this study's over
    changed input files: resuming would report old units as new), and a folder another
    run is writing into.
    """
    refuse_a_file(out)
    marker = out / STUDY_MARKER
    others = _others(out) if out.is_dir() else []
    if not marker.is_file() and others:
        raise InputError(
            f"{out} holds other files ({', '.join(others[:3])}{', ...' if others[3:] else ''}); "
            "a study writes into a new or empty folder: choose another --out"
        )
    expected = fingerprint(config, precision)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        # Checked again under the lock: another run may have finished meanwhile.
        ours = marker.is_file() and _marker_is_ours(out, config, expected)
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
