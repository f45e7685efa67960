"""Encoder specs: one string names where an encoder comes from, as data specs do.

One table of sources, tried in order; the config, the study and the CLI all load
encoders through :func:`resolve_encoder`. Forms today:

- ``PATH.safetensors`` (or ``checkpoint:PATH``): a checkpoint of this library, checked
  against its sidecar's SHA-256;
- ``package.module:factory``: an importable ``nn.Module`` class, or a function annotated
  to return one (any other callable only with ``trust_code``: a shared config must be
  as safe to open as a shared checkpoint);
- ``torchvision:NAME[:WEIGHTS]``, ``timm:NAME[:TAG]``, ``robustbench:NAME:DATASET:THREAT``,
  ``open_clip:ARCH[:PRETRAINED]``: model zoos (:mod:`robust_transfer.models.zoo`).

Every form takes :class:`~robust_transfer.models.zoo.LoadOptions`: weights of one's
own (``checkpoint``), the layer to cut at, resizing, and trust in pickled files.
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.checks import check_seed
from ..core.errors import CheckpointError, InputError, InputTypeError, MissingFileError
from ..core.schema import Meta
from . import zoo
from .checkpoint import load_checkpoint
from .weights import load_weights_into, unpickling
from .zoo import LoadOptions, ZooEncoder

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
    load: Callable[[str, LoadOptions], LoadedEncoder]


def _checkpoint_path(spec: str) -> str:
    return spec.removeprefix(_CHECKPOINT_PREFIX)


def _resolve_checkpoint(spec: str, base: Path) -> str:
    path = base / _checkpoint_path(spec)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    return f"{_CHECKPOINT_PREFIX}{path}"


def _cut(model: nn.Module, spec: str, options: LoadOptions) -> nn.Module:
    """``model``, or its features at ``options.layer``."""
    if options.layer is None:
        return model
    return ZooEncoder(model, name=spec, layer=options.layer)


def _load_checkpoint(spec: str, options: LoadOptions) -> LoadedEncoder:
    if options.extra or options.checkpoint is not None or options.resize:
        raise InputError("a checkpoint of this library takes only a layer to cut at")
    encoder, sidecar = load_checkpoint(_checkpoint_path(spec))
    return LoadedEncoder(
        _cut(encoder, spec, options),
        {Meta.CHECKPOINT: _checkpoint_path(spec), Meta.SIDECAR: sidecar},
    )


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _split_factory(spec: str) -> tuple[str, str]:
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute or ":" in attribute:
        raise InputError(f"encoder spec {spec!r}: expected 'package.module:factory'")
    if not _DOTTED.fullmatch(module_name) or not attribute.isidentifier():
        raise InputError(
            f"encoder spec {spec!r}: expected 'package.module:factory', an absolute module "
            "path of Python names and a name in it"
        )
    return module_name, attribute


def _builds_a_module(factory: object) -> bool:
    """Whether ``factory`` can be seen, without calling it, to build an ``nn.Module``:
    a subclass of it, or a function whose return annotation is one."""
    if isinstance(factory, type):
        return issubclass(factory, nn.Module)
    if not inspect.isfunction(factory):
        return False  # builtins (os.system), partials, callable objects: unseen
    try:
        returned = typing.get_type_hints(factory).get("return")
    except Exception:  # an annotation that does not resolve tells nothing
        return False
    return isinstance(returned, type) and issubclass(returned, nn.Module)


def _resolve_factory(spec: str, base: Path) -> str:
    _split_factory(spec)
    return spec


def _load_factory(spec: str, options: LoadOptions) -> LoadedEncoder:
    module_name, attribute = _split_factory(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"encoder spec {spec!r}: cannot import {module_name!r}: {err}") from err
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"encoder spec {spec!r}: {module_name} has no callable {attribute!r}")
    if not options.trust_code and not _builds_a_module(factory):
        raise InputError(
            f"encoder spec {spec!r}: refused: {attribute} is neither an nn.Module class nor "
            "a function annotated to return one, so calling it could do anything; only if "
            "you vouch for it, pass trust_code=True (--trust-code, or trust_code = true in "
            "the config's encoder table)"
        )
    try:
        model = factory(**options.extra)
    except TypeError as err:
        raise InputError(f"encoder spec {spec!r}: cannot call the factory: {err}") from err
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"encoder spec {spec!r}: the factory returned {type(model).__name__}")
    if options.checkpoint is not None:
        load_weights_into(model, options.checkpoint, trust_checkpoint=options.trust_checkpoint)
    return LoadedEncoder(_cut(model.eval(), spec, options), {Meta.FACTORY: spec})


def _zoo_source(name: str, form: str, loader: Callable[[str, LoadOptions], ZooEncoder]) -> _Source:
    prefix = f"{name}:"

    def resolve(spec: str, base: Path) -> str:
        if spec == prefix or spec.split(":", 1)[1].startswith(":"):
            raise InputError(f"encoder spec {spec!r}: expected {form}")
        return spec

    def load(spec: str, options: LoadOptions) -> LoadedEncoder:
        encoder = loader(spec, options)
        info: dict[str, object] = {
            Meta.ZOO: name,
            Meta.INPUT_SIZE: list(encoder.input_size or ()),
            Meta.LAYER: encoder.layer or "output",
        }
        if options.checkpoint is not None:
            info[Meta.CHECKPOINT] = str(options.checkpoint)
        return LoadedEncoder(encoder, info)

    return _Source(name, form, lambda spec: spec.startswith(prefix), resolve, load)


_SOURCES: tuple[_Source, ...] = (
    _Source(
        "checkpoint",
        "a .safetensors checkpoint",
        lambda spec: spec.startswith(_CHECKPOINT_PREFIX) or spec.endswith(_CHECKPOINT_SUFFIX),
        _resolve_checkpoint,
        _load_checkpoint,
    ),
    _zoo_source("torchvision", "'torchvision:NAME[:WEIGHTS]'", zoo.load_torchvision),
    _zoo_source("timm", "'timm:NAME[:TAG]'", zoo.load_timm),
    _zoo_source("robustbench", "'robustbench:NAME:DATASET:THREAT'", zoo.load_robustbench),
    _zoo_source("open_clip", "'open_clip:ARCH[:PRETRAINED]'", zoo.load_open_clip),
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


def resolve_encoder(
    spec: str,
    checkpoint: str | Path | None = None,
    *,
    layer: str | None = None,
    resize: bool = False,
    trust_checkpoint: bool = False,
    trust_code: bool = False,
    seed: int = 0,
    **options: object,
) -> LoadedEncoder:
    """The encoder ``spec`` names, in eval mode, with its provenance.

    ``checkpoint``: a weights file for the architecture (safetensors, or a weights-only
    pickle; a pickle that needs code is refused unless ``trust_checkpoint``). ``layer``:
    the module to take pooled features from (``"penultimate"``: the input of the last
    linear layer). ``resize``: resize inputs to the encoder's input size.
    ``trust_code``: call a factory that is neither an ``nn.Module`` class nor annotated
    to return one (refused otherwise, as it could run anything). ``options``
    go to a factory (or a zoo loader, e.g. RobustBench's ``model_dir``). ``seed``: the
    generator state weights are initialised from where nothing loads them (a factory's
    random weights, a zoo architecture without weights), so two runs, or two processes
    of one run, build the same encoder; the caller's generator is left as it was.
    """
    source = _source(spec)
    load_options = LoadOptions(
        checkpoint=None if checkpoint is None else Path(checkpoint),
        layer=layer,
        resize=resize,
        trust_checkpoint=trust_checkpoint,
        trust_code=trust_code,
        extra=options,
    )
    with unpickling(trust_checkpoint), torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_seed(seed))
        loaded = source.load(source.resolve(spec, Path.cwd()), load_options)
    broken = [
        name
        for name, value in (*loaded.module.named_parameters(), *loaded.module.named_buffers())
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if broken:
        # NaN weights give NaN features, and NaN margins read as "robust" downstream.
        raise CheckpointError(
            f"encoder {spec!r} holds NaN or infinite weights in {len(broken)} tensors "
            f"({', '.join(broken[:3])})"
        )
    return LoadedEncoder(loaded.module.eval(), {Meta.SOURCE: spec, **loaded.info})


def load_encoder(
    spec: str,
    checkpoint: str | Path | None = None,
    *,
    layer: str | None = None,
    resize: bool = False,
    trust_checkpoint: bool = False,
    trust_code: bool = False,
    seed: int = 0,
    **options: object,
) -> nn.Module:
    """The encoder ``spec`` names (see the module docstring for the forms), in eval
    mode; the arguments are :func:`resolve_encoder`'s."""
    return resolve_encoder(
        spec,
        checkpoint,
        layer=layer,
        resize=resize,
        trust_checkpoint=trust_checkpoint,
        trust_code=trust_code,
        seed=seed,
        **options,
    ).module
