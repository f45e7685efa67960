"""The command line's argument types: each checks its value where it is parsed, so a
bad one is one line of error, never a usage dump or a failure after the work."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from ..core.checks import POINTS, Limit, check_number, check_positive_int, check_seed
from ..core.errors import InputError
from ..theory.threat import Norm
from ..training.protocols import AdaptProtocol

T = TypeVar("T")

PROBE_FILE, HEAD_FILE = "probe.json", "head.safetensors"
ADAPT_FILE, ENCODER_FILE = "adapt.json", "encoder.safetensors"
PROBES = (AdaptProtocol.LINEAR_PROBE, AdaptProtocol.CERTIFIED_PROBE)


def default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "robust-transfer" / "encoders"


def json_target(value: str) -> Path:
    """``--json FILE``, checked before any work: a folder or a missing parent would only
    fail once the results are computed."""
    if not value.strip():
        raise InputError("an empty path: name a file")
    path = Path(value)
    if path.is_dir():
        raise InputError(f"{value} is a folder: name a file")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent} does not exist")
    try:  # found now, not once the rows are computed
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise InputError(f"cannot write into {path.parent}: {err.strerror}") from err
    return path


def argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse type whose errors keep their reason (argparse words any
    other exception as "invalid <function name> value")."""

    def checked(value: str) -> T:
        try:
            return parse(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    checked.__name__ = parse.__name__
    return checked


def threat_name(norm: str) -> str:
    Norm.parse(norm)
    return norm


def integer(value: str) -> int:
    try:
        return int(value)
    except ValueError as err:
        raise InputError(f"expected an integer, got {value!r}") from err


def count(limit: Limit) -> Callable[[str], int]:
    """A positive integer at most ``limit``, checked where it is parsed."""
    return argument(lambda value: check_positive_int(integer(value), "the value", limit))


def train_points(value: str) -> int | None:
    """A count of training points, or ``all``."""
    if value == "all":
        return None
    return check_positive_int(integer(value), "the value", POINTS)


def seed(value: str) -> int:
    return check_seed(integer(value))


def real(value: str, *, inclusive: bool, most: float = 1e15) -> float:
    try:
        number = float(value)
    except ValueError as err:
        raise InputError(f"expected a number, got {value!r}") from err
    return check_number(number, "the value", inclusive=inclusive, most=most)


def folder(value: str) -> Path:
    """An output folder, named: an empty string is not the current folder."""
    if not value.strip():
        raise InputError("an empty path: name a folder")
    path = Path(value)
    if path.is_symlink() and not path.exists():
        raise InputError(f"{value} is a symbolic link to nothing: name a folder")
    return path


class Parser(argparse.ArgumentParser):
    """Says what is wrong with the command line in one line, as every other error is
    said (``--help`` still prints the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
