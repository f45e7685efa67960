"""One spec string for every data source the command line and studies accept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from .builtin import load_mnist, load_sklearn_digits
from .dataset import ImageDataset
from .dsprites import render_dsprites
from .files import load_array_file
from .folder import load_image_folder
from .tasks import get_task
from .torchvision_sets import load_torchvision

_DSPRITES_N, _DSPRITES_SEED = 3000, 0

_BUILTIN: dict[str, Callable[[], ImageDataset]] = {
    "mnist": load_mnist,
    "digits8x8": load_sklearn_digits,
    "dsprites": lambda: render_dsprites(_DSPRITES_N, seed=_DSPRITES_SEED),
}

FORMS = (
    f"{' | '.join(_BUILTIN)} | torchvision:NAME (root=..., train=..., download=...) | "
    "folder:PATH (size=...) | task:NAME[:train|test] | FILE.npz | FILE.pt"
)


def load_dataset(spec: str, **kwargs: object) -> ImageDataset:
    """A data set from ``spec``: a built-in name, ``torchvision:NAME``, ``folder:PATH`` or
    a ``.npz`` / ``.pt`` file; ``kwargs`` go to the torchvision or folder loader."""
    if spec in _BUILTIN:
        return _BUILTIN[spec]()
    prefix, colon, rest = spec.partition(":")
    if colon and prefix == "torchvision":
        options = {"root": "data", "train": False} | kwargs
        return load_torchvision(rest, **options)  # type: ignore[arg-type]
    if colon and prefix == "folder":
        options = {"size": 64} | kwargs
        return load_image_folder(rest, **options)  # type: ignore[arg-type]
    if colon and prefix == "task":
        return _task_split(rest)
    if Path(spec).suffix in {".npz", ".pt"}:
        return load_array_file(spec)
    raise DataError(f"unknown data spec {spec!r}: expected {FORMS}")


def _task_split(rest: str) -> ImageDataset:
    """A built-in task's downstream data: ``NAME`` (its test part) or ``NAME:train``."""
    name, _, part = rest.partition(":")
    if part not in {"", "train", "test"}:
        raise DataError(f"task data spec 'task:{rest}': the part must be train or test")
    split = get_task(name).downstream
    return split.train if part == "train" else split.test
