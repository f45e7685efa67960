"""Encoders from model zoos: torchvision, timm, RobustBench and open_clip.

Each adapter returns a :class:`ZooEncoder`: it takes images in ``[0, 1]``, normalises
them as the model was trained, states its input size, and returns the features at a
named layer, pooled (default: the penultimate representation, the input of the model's
last linear layer, or the model's own output for feature models such as timm with
``num_classes=0`` and CLIP's image tower). The zoo packages are optional
(``pip install robust-transfer[zoo]``); weights are downloaded by the packages' own
code on machines with a network and read from where they look for them otherwise.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import InputError, MissingFileError
from .weights import load_weights_into, read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ZOO_EXTRA = "pip install 'robust-transfer[zoo]'"
PENULTIMATE = "penultimate"


@dataclass(frozen=True)
class LoadOptions:
    """What every encoder spec may be given besides its name: weights of one's own,
    the layer to cut at, resizing, trust in pickled checkpoints, trust in a factory that
    cannot be seen to build a module (``trust_code``), and a factory's or loader's own
    keyword arguments (``extra``)."""

    checkpoint: Path | None = None
    layer: str | None = None
    resize: bool = False
    trust_checkpoint: bool = False
    trust_code: bool = False
    extra: Mapping[str, object] = field(default_factory=dict)


class _Captured(Exception):
    """Stops the forward pass once the requested layer has run."""


class ZooEncoder(nn.Module):
    """A model as an encoder of ``[0, 1]`` images: normalisation inside, features at
    ``layer`` (global average pooled over positions or tokens, then flattened).

    ``layer``: a module name of ``model``; ``"penultimate"`` is the input of its last
    ``nn.Linear``; None is the model's output. ``input_size`` (C, H, W), when known,
    is checked, or inputs are resized to it (and grey images repeated over RGB) when
    ``resize`` is set.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        input_size: tuple[int, int, int] | None = None,
        layer: str | None = None,
        resize: bool = False,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.input_size = input_size
        self.resize = resize
        self.layer = layer
        self._module = _find_layer(model, layer, name) if layer is not None else None
        channels = len(mean) if mean is not None else 1
        mean_t = torch.tensor(mean if mean is not None else (0.0,)).view(1, channels, 1, 1)
        std_t = torch.tensor(std if std is not None else (1.0,)).view(1, channels, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, layer={self.layer!r}"

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise InputError(f"{self.name} takes images (N, C, H, W), got {tuple(x.shape)}")
        if self.input_size is None or tuple(x.shape[1:]) == self.input_size:
            return x
        channels, height, width = self.input_size
        if not self.resize:
            raise InputError(
                f"{self.name} takes {channels}x{height}x{width} images, got "
                f"{'x'.join(map(str, x.shape[1:]))}: resize them inside the encoder with "
                "resize=True (--resize)"
            )
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != channels:
            raise InputError(f"{self.name} takes {channels} channels, got {x.shape[1]}")
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        x = (self._prepare(x) - self.mean) / self.std
        if self._module is None:
            return _pooled(self.model(x))
        captured: list[Tensor] = []
        penultimate = self.layer == PENULTIMATE

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any = None) -> None:
            captured.append(args[0] if penultimate else output)
            raise _Captured

        handle = (
            self._module.register_forward_pre_hook(hook)
            if penultimate
            else self._module.register_forward_hook(hook)
        )
        try:
            self.model(x)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured or not isinstance(captured[0], Tensor):
            raise InputError(f"{self.name}: layer {self.layer!r} did not give a tensor")
        return _pooled(captured[0])


def _pooled(features: Tensor) -> Tensor:
    if features.dim() == 4:  # (N, C, H, W): average over positions
        return features.mean(dim=(2, 3))
    if features.dim() == 3:  # (N, tokens, D): average over tokens
        return features.mean(dim=1)
    return features.flatten(1)


def _find_layer(model: nn.Module, layer: str, name: str) -> nn.Module:
    if layer == PENULTIMATE:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise InputError(f"{name} has no linear layer: name the layer to cut at")
        return linears[-1]
    modules: dict[str, nn.Module] = dict(model.named_modules())
    if layer not in modules or not layer:
        raise InputError(f"{name} has no layer {layer!r}{_close(layer, modules)}")
    found: nn.Module = modules[layer]
    return found


def _close(word: str, choices: Iterable[str]) -> str:
    """ "; close: a, b" for the names nearest ``word``, or nothing when none is near."""
    close = difflib.get_close_matches(word, [choice for choice in choices if choice], n=5)
    return f"; close: {', '.join(close)}" if close else ""


def _import(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise InputError(f"encoder needs the '{package}' package ({err}): {ZOO_EXTRA}") from err


def _own_weights(model: nn.Module, options: LoadOptions, strip: tuple[str, ...] = ()) -> None:
    if options.checkpoint is not None:
        load_weights_into(
            model, options.checkpoint, trust_checkpoint=options.trust_checkpoint, strip=strip
        )


def _check_extra(options: LoadOptions, allowed: set[str], what: str) -> None:
    unknown = set(options.extra) - allowed
    if unknown:
        raise InputError(f"{what} takes no options {sorted(unknown)}")


def _split(spec: str, prefix: str, parts: int, form: str, *, required: int = 1) -> list[str]:
    values = spec.removeprefix(prefix).split(":", parts - 1)
    if len(values) < required or any(not value for value in values):
        raise InputError(f"encoder spec {spec!r}: expected {form}")
    return values


def _layer(options: LoadOptions, default: str | None) -> str | None:
    return default if options.layer is None else options.layer


def load_torchvision(spec: str, options: LoadOptions) -> ZooEncoder:
    """``torchvision:NAME[:WEIGHTS]``: WEIGHTS is a member of the model's weights enum
    (e.g. ``IMAGENET1K_V1``, ``DEFAULT``); without it, random weights."""
    _check_extra(options, set(), "a torchvision encoder")
    name, *rest = _split(spec, "torchvision:", 2, "'torchvision:NAME[:WEIGHTS]'")
    models = _import("torchvision.models", "torchvision")
    try:
        builder = models.get_model_builder(name)
    except ValueError as err:
        hint = _close(name, models.list_models())
        raise InputError(f"torchvision has no model {name!r}{hint}") from err
    weights = None
    if rest:
        enum = models.get_model_weights(name)
        members = [*enum.__members__]
        if rest[0] not in members:
            raise InputError(f"torchvision {name} has no weights {rest[0]!r}: one of {members}")
        weights = enum[rest[0]]
    url = "" if weights is None else str(weights.url)
    with _download_errors(spec, lambda: Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name):
        model = builder(weights=weights)
    _own_weights(model, options)
    mean, std, crop = IMAGENET_MEAN, IMAGENET_STD, 224
    if weights is not None:
        transforms = weights.transforms()
        mean, std = tuple(transforms.mean), tuple(transforms.std)
        crop = int(transforms.crop_size[0])
    return ZooEncoder(
        model,
        name=spec,
        mean=mean,
        std=std,
        input_size=(3, crop, crop),
        layer=_layer(options, PENULTIMATE),
        resize=options.resize,
    )


def load_timm(spec: str, options: LoadOptions) -> ZooEncoder:
    """``timm:NAME[:TAG]``: features with ``num_classes=0``; a TAG (``pretrained`` for
    the default weights, or a weights tag such as ``in1k``) loads timm's weights."""
    _check_extra(options, set(), "a timm encoder")
    name, *rest = _split(spec, "timm:", 2, "'timm:NAME[:TAG]'")
    timm = _import("timm", "timm")
    if not timm.is_model(name):
        raise InputError(f"timm has no model {name!r}{_close(name, timm.list_models())}")
    full = name if not rest or rest[0] == "pretrained" else f"{name}.{rest[0]}"
    with _download_errors(spec, lambda: "the Hugging Face cache (HF_HOME)"):
        model = timm.create_model(full, pretrained=bool(rest), num_classes=0)
    _own_weights(model, options)
    config = model.pretrained_cfg
    return ZooEncoder(
        model,
        name=spec,
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        input_size=tuple(config.get("input_size", (3, 224, 224))),
        layer=options.layer,
        resize=options.resize,
    )


def load_open_clip(spec: str, options: LoadOptions) -> ZooEncoder:
    """``open_clip:ARCH[:PRETRAINED]``: CLIP's image tower (its embedding by default).
    PRETRAINED is an open_clip tag; robust CLIP weights (TeCoA, FARE) published as a
    file come through ``checkpoint=`` (a whole model's or the image tower's state dict).
    """
    _check_extra(options, set(), "an open_clip encoder")
    arch, *rest = _split(spec, "open_clip:", 2, "'open_clip:ARCH[:PRETRAINED]'")
    open_clip = _import("open_clip", "open-clip-torch")
    if arch not in open_clip.list_models():
        hint = _close(arch, open_clip.list_models())
        raise InputError(f"open_clip has no model {arch!r}{hint}")
    with _download_errors(spec, lambda: "the Hugging Face cache (HF_HOME)"):
        model = open_clip.create_model(arch, pretrained=rest[0] if rest else None)
    visual: nn.Module = model.visual
    _own_weights(visual, options, strip=("visual.",))
    size = getattr(visual, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return ZooEncoder(
        visual,
        name=spec,
        mean=tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        std=tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
        input_size=(3, int(height), int(width)),
        layer=options.layer,
        resize=options.resize,
    )


_ROBUSTBENCH_SIZES = {"cifar10": 32, "cifar100": 32, "imagenet": 224}


def _robustbench() -> ModuleType:
    """robustbench imports ``autoattack``, which PyPI ships as ``pyautoattack``: alias
    the installed package under that name (in this process only)."""
    if importlib.util.find_spec("autoattack") is None:
        package = _import("pyautoattack", "pyautoattack")
        sys.modules["autoattack"] = package
        for sub in ("autoattack", "state", "autopgd_base", "fab_pt", "square", "checks"):
            sys.modules[f"autoattack.{sub}"] = importlib.import_module(f"pyautoattack.{sub}")
    return _import("robustbench.utils", "robustbench")


def load_robustbench(spec: str, options: LoadOptions) -> ZooEncoder:
    """``robustbench:NAME:DATASET:THREAT`` (e.g. ``Addepalli2022Efficient_WRN_34_10:
    cifar100:Linf``): the model's penultimate features. Weights are read from
    ``MODEL_DIR/DATASET/THREAT/NAME.pt`` (``model_dir=``, default ``models``, as
    RobustBench) and downloaded there when missing."""
    _check_extra(options, {"model_dir"}, "a RobustBench encoder")
    name, dataset, threat = _split(
        spec, "robustbench:", 3, "'robustbench:NAME:DATASET:THREAT'", required=3
    )
    utils = _robustbench()
    enums = importlib.import_module("robustbench.model_zoo.enums")
    try:
        dataset_enum = enums.BenchmarkDataset(dataset)
        threat_enum = enums.ThreatModel(threat)
    except ValueError as err:
        raise InputError(
            f"encoder spec {spec!r}: {err}; datasets "
            f"{[d.value for d in enums.BenchmarkDataset]}, threats "
            f"{[t.value for t in enums.ThreatModel]}"
        ) from err
    zoo = importlib.import_module("robustbench.model_zoo").model_dicts
    known = zoo[dataset_enum][threat_enum]
    if name not in known:
        raise InputError(
            f"RobustBench has no {dataset}/{threat} model {name!r}{_close(name, known)}"
        )
    model_dir = Path(str(options.extra.get("model_dir", "models")))
    path = model_dir / dataset / threat / f"{name}.pt"
    if path.is_file():
        # Read it here first: a pickle that needs code is refused before RobustBench
        # opens it.
        read_weights(path, trust_checkpoint=options.trust_checkpoint)
    with _download_errors(spec, lambda: path):
        model = utils.load_model(
            model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat
        )
    _own_weights(model, options)
    size = _ROBUSTBENCH_SIZES.get(dataset, 224)
    # RobustBench models take [0, 1] inputs and normalise inside.
    return ZooEncoder(
        model,
        name=spec,
        input_size=(3, size, size),
        layer=_layer(options, PENULTIMATE),
        resize=options.resize,
    )


@contextlib.contextmanager
def _download_errors(spec: str, where: Any) -> Iterator[None]:
    """A failed download (no network, no file) becomes one line saying where the
    weights must be put."""
    try:
        yield
    except (InputError, MissingFileError):
        raise
    except Exception as err:  # the zoos raise many types for a failed download
        if _is_download_error(err):
            raise MissingFileError(
                f"encoder {spec!r}: weights missing and could not be downloaded "
                f"({type(err).__name__}: {str(err)[:200]}); download them on a machine with "
                f"a network and put them at {where()}"
            ) from err
        raise


def _is_download_error(err: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(err)}
    return bool(
        names
        & {
            "URLError",
            "HTTPError",
            "ConnectionError",
            "gaierror",
            "LocalEntryNotFoundError",
            "OfflineModeIsEnabled",
            "FileURLRetrievalError",
            "MaxRetryError",
            "NameResolutionError",
            "ConnectError",
            "Timeout",
            "TimeoutError",
            "OSError",
            "FileNotFoundError",
        }
    )


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
