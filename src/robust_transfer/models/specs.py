"""Encoder specs: one string names where an encoder comes from, as data specs do.

One table of sources, tried in order; the config, the study and the CLI all load
encoders through :func:`resolve_encoder`. Forms today:

- ``PATH.safetensors`` (or ``checkpoint:PATH``): a checkpoint of this library, checked
  against its sidecar's SHA-256;
- ``package.module:factory``: any importable callable returning an ``nn.Module``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import InputError, InputTypeError, MissingFileError
from ..schema import Meta
from .checkpoint import load_checkpoint

_CHECKPOINT_SUFFIX = ".safetensors"
_CHECKPOINT_PREFIX = "checkpoint:"


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder in eval mode and what is known of where it came from."""

    module: nn.Module
    info: dict[str, object]


@dataclass(frozen=True)
class _Source:
    name: str
    form: str  # how the spec is written, for error messages
    matches: Callable[[str], bool]
    # (spec, folder that relative paths start from) -> the spec with an absolute path,
    # after checking what can be checked without loading (a file exists, the syntax)
    resolve: Callable[[str, Path], str]
    load: Callable[[str, Mapping[str, object]], LoadedEncoder]


def _checkpoint_path(spec: str) -> str:
    return spec.removeprefix(_CHECKPOINT_PREFIX)


def _resolve_checkpoint(spec: str, base: Path) -> str:
    path = base / _checkpoint_path(spec)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    return f"{_CHECKPOINT_PREFIX}{path}"


def _load_checkpoint(spec: str, options: Mapping[str, object]) -> LoadedEncoder:
    if options:
        raise InputError(f"a checkpoint takes no options, got {sorted(options)}")
    encoder, sidecar = load_checkpoint(_checkpoint_path(spec))
    return LoadedEncoder(encoder, {Meta.CHECKPOINT: _checkpoint_path(spec), Meta.SIDECAR: sidecar})


def _split_factory(spec: str) -> tuple[str, str]:
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute or ":" in attribute:
        raise InputError(f"encoder spec {spec!r}: expected 'package.module:factory'")
    return module_name, attribute


def _resolve_factory(spec: str, base: Path) -> str:
    _split_factory(spec)
    return spec


def _load_factory(spec: str, options: Mapping[str, object]) -> LoadedEncoder:
    module_name, attribute = _split_factory(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"encoder spec {spec!r}: cannot import {module_name!r}: {err}") from err
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"encoder spec {spec!r}: {module_name} has no callable {attribute!r}")
    try:
        model = factory(**options)
    except TypeError as err:
        raise InputError(f"encoder spec {spec!r}: cannot call the factory: {err}") from err
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"encoder spec {spec!r}: the factory returned {type(model).__name__}")
    return LoadedEncoder(model.eval(), {Meta.FACTORY: spec})


_SOURCES: tuple[_Source, ...] = (
    _Source(
        "checkpoint",
        "a .safetensors checkpoint",
        lambda spec: spec.startswith(_CHECKPOINT_PREFIX) or spec.endswith(_CHECKPOINT_SUFFIX),
        _resolve_checkpoint,
        _load_checkpoint,
    ),
    _Source(
        "factory",
        "'package.module:factory'",
        lambda spec: ":" in spec,
        _resolve_factory,
        _load_factory,
    ),
)

FORMS = " | ".join(source.form for source in _SOURCES)


def _source(spec: object) -> _Source:
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"encoder spec must be a non-empty string ({FORMS}), got {spec!r}")
    for source in _SOURCES:
        if source.matches(spec):
            return source
    raise InputError(f"unknown encoder spec {spec!r}: expected {FORMS}")


def source_name(spec: str) -> str:
    """Which kind of source ``spec`` names (``checkpoint``, ``factory``)."""
    return _source(spec).name


def resolve_spec(spec: str, base: Path | None = None) -> str:
    """``spec`` checked without loading, relative paths made absolute from ``base``."""
    return _source(spec).resolve(spec, Path.cwd() if base is None else base)


def resolve_encoder(spec: str, **options: object) -> LoadedEncoder:
    """The encoder ``spec`` names, in eval mode, with its provenance; ``options`` go to
    a factory."""
    source = _source(spec)
    loaded = source.load(source.resolve(spec, Path.cwd()), options)
    return LoadedEncoder(loaded.module, {Meta.SOURCE: spec, **loaded.info})


def load_encoder(spec: str, **options: object) -> nn.Module:
    """The encoder ``spec`` names (see the module docstring for the forms), in eval mode;
    ``options`` go to a factory."""
    return resolve_encoder(spec, **options).module
