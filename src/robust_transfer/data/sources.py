"""One spec string for every data source the command line and studies accept."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from ..core.errors import DataError
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
# Their loaders' arguments that the spec itself gives.
_SET_BY_SPEC = {"torchvision": {"name", "train"}, "folder": {"root"}}

FORMS = (
    f"{' | '.join(_BUILTIN)} | torchvision:NAME[:train|test] (root=..., download=...) | "
    "folder:PATH (size=...) | task:NAME[:train|test] | FILE.npz | FILE.pt"
)


def _options(spec: str) -> set[str]:
    """The keyword options the loader of ``spec`` takes (none for most sources); what the
    spec itself sets (a folder's path, a torchvision set's name and part) is not one."""
    prefix, colon, _ = spec.partition(":")
    if not (colon and prefix in _WITH_OPTIONS):
        return set()
    return set(inspect.signature(_WITH_OPTIONS[prefix]).parameters) - _SET_BY_SPEC[prefix]


def load_dataset(spec: str, **kwargs: object) -> ImageDataset:
    """A data set from ``spec``: a built-in name, ``torchvision:NAME[:train|test]`` (the
    test part unless named), ``folder:PATH``, ``task:NAME[:train|test]`` or a ``.npz`` /
    ``.pt`` file; ``kwargs`` go to the torchvision or folder loader."""
    unknown = sorted(set(kwargs) - _options(spec))
    if unknown:
        accepted = ", ".join(sorted(_options(spec))) or "none"
        raise DataError(f"data spec {spec!r} takes no option {unknown} (it takes: {accepted})")
    prefix, colon, rest = spec.partition(":")
    if not (colon and prefix in _WITH_OPTIONS):
        return _plain(spec)
    base: dict[str, object] = {"root": rest, "size": 64}
    if prefix == "torchvision":
        name, part = _part(spec, rest)
        base = {"name": name, "root": "data", "train": part == "train"}
    try:
        return _WITH_OPTIONS[prefix](**(base | kwargs))
    except TypeError as err:
        raise DataError(f"data spec {spec!r}: bad options {sorted(kwargs)}: {err}") from err


def load_split(data: str, test_data: str | None = None, **kwargs: object) -> Split:
    """Training and held-out data: ``data`` split 80/20 per class, or ``data`` to train on
    and ``test_data`` held out (in a seeded order in which every prefix holds each class
    in proportion: image folders come sorted by class). Each spec gets the options its
    loader takes (a folder's ``size``, a torchvision ``root``)."""
    specs = [spec for spec in (data, test_data) if spec is not None]
    unused = sorted(set(kwargs) - set().union(*map(_options, specs)))
    if unused:
        raise DataError(f"data options {unused}: no loader of {specs} takes them")
    train, *held_out = (
        load_dataset(spec, **{k: v for k, v in kwargs.items() if k in _options(spec)})
        for spec in specs
    )
    if not held_out:
        return stratified_split(train)
    return Split(train=train, test=stratified_sample(held_out[0], len(held_out[0])))


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
