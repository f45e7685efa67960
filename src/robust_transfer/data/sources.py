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
from .tasks import Split, get_task, stratified_sample, stratified_split
from .torchvision_sets import load_torchvision

_DSPRITES_N, _DSPRITES_SEED = 3000, 0

_BUILTIN: dict[str, Callable[[], ImageDataset]] = {
    "mnist": load_mnist,
    "digits8x8": load_sklearn_digits,
    "dsprites": lambda: render_dsprites(_DSPRITES_N, seed=_DSPRITES_SEED),
}

# Sources that take options (a root, a size): the rest are complete in their spec.
_WITH_OPTIONS: dict[str, Callable[..., ImageDataset]] = {
    "torchvision": load_torchvision,
    "folder": load_image_folder,
}

FORMS = (
    f"{' | '.join(_BUILTIN)} | torchvision:NAME[:train|test] (root=..., download=...) | "
    "folder:PATH (size=...) | task:NAME[:train|test] | FILE.npz | FILE.pt"
)


def load_dataset(spec: str, **kwargs: object) -> ImageDataset:
    """A data set from ``spec``: a built-in name, ``torchvision:NAME[:train|test]`` (the
    test part unless named), ``folder:PATH``, ``task:NAME[:train|test]`` or a ``.npz`` /
    ``.pt`` file; ``kwargs`` go to the torchvision or folder loader."""
    prefix, colon, rest = spec.partition(":")
    if not (colon and prefix in _WITH_OPTIONS):
        if kwargs:
            raise DataError(f"data spec {spec!r} takes no options, got {sorted(kwargs)}")
        return _plain(spec)
    loader = _WITH_OPTIONS[prefix]
    base: dict[str, object] = {"root": rest, "size": 64}
    if prefix == "torchvision":
        name, part = _part(spec, rest)
        base = {"name": name, "root": "data", "train": part == "train"}
    try:
        return loader(**(base | kwargs))
    except TypeError as err:
        raise DataError(f"data spec {spec!r}: bad options {sorted(kwargs)}: {err}") from err


def load_split(data: str, test_data: str | None = None, **kwargs: object) -> Split:
    """Training and held-out data: ``data`` split 80/20 per class, or ``data`` to train on
    and ``test_data`` held out (in a seeded order in which every prefix holds each class
    in proportion: image folders come sorted by class)."""
    train = load_dataset(data, **kwargs)
    if test_data is None:
        return stratified_split(train)
    test = load_dataset(test_data, **kwargs)
    return Split(train=train, test=stratified_sample(test, len(test)))


def _plain(spec: str) -> ImageDataset:
    if spec in _BUILTIN:
        return _BUILTIN[spec]()
    prefix, colon, rest = spec.partition(":")
    if colon and prefix == "task":
        name, part = _part(spec, rest)
        split = get_task(name).downstream
        return split.train if part == "train" else split.test
    if Path(spec).suffix in {".npz", ".pt"}:
        return load_array_file(spec)
    raise DataError(f"unknown data spec {spec!r}: expected {FORMS}")


def _part(spec: str, rest: str) -> tuple[str, str]:
    """``NAME[:train|test]`` -> (name, part); the test part when none is named."""
    name, _, part = rest.partition(":")
    if part not in {"", "train", "test"}:
        raise DataError(f"data spec {spec!r}: the part after the name must be train or test")
    return name, part or "test"
