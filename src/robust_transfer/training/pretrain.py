"""Pretraining protocols: standard, adversarial (PGD), TRADES, SimCLR, adversarial
contrastive, Lipschitz-margin, certified (IBP and CROWN-IBP), and the untrained floor.

Every protocol is seeded (same seed, same weights on the CPU), shuffles with its own
generator, and returns a built-in :class:`~robust_transfer.models.Encoder`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..certify.lipschitz import lipschitz_shift, proven_lipschitz
from ..core.atomic import remove_leftovers, waited_for
from ..core.checks import (
    EPOCHS,
    FEATURES,
    STEPS,
    check_number,
    check_positive_int,
    check_seed,
    parse_choice,
)
from ..core.errors import InputError, InputTypeError
from ..core.runtime import Runtime
from ..data.dataset import ImageDataset
from ..models import (
    ARCHITECTURES,
    CheckpointError,
    Classifier,
    Encoder,
    build_encoder,
    load_checkpoint,
)
from ..models.checkpoint import save_checkpoint, sidecar_path
from ..theory.bounds import criterion_holds
from ..theory.threat import ThreatModel
from .linear_probe import train_linear_probe
from .loop import train_epochs
from .objectives import (
    Contrastive,
    EpsSchedule,
    ModelLoss,
    adversarial_contrastive_loss,
    adversarial_loss,
    certified_loss,
    lipschitz_margin_loss,
    protocol_threat,
    simclr_loss,
    tightest_margins,
    trades_loss,
)


class PretrainProtocol(StrEnum):
    STANDARD = "standard"
    ADVERSARIAL = "adversarial"
    TRADES = "trades"
    SIMCLR = "simclr"
    ADVERSARIAL_CONTRASTIVE = "adversarial-contrastive"
    LIPSCHITZ = "lipschitz"
    IBP = "ibp"
    CROWN_IBP = "crown-ibp"
    RANDOM = "random"


_NEEDS_THREAT = {
    PretrainProtocol.ADVERSARIAL,
    PretrainProtocol.TRADES,
    PretrainProtocol.ADVERSARIAL_CONTRASTIVE,
    PretrainProtocol.LIPSCHITZ,
    PretrainProtocol.IBP,
    PretrainProtocol.CROWN_IBP,
}
# Trained on certified bounds of the classifier's margins (a ramped radius and weight).
_CERTIFIED = {PretrainProtocol.IBP, PretrainProtocol.CROWN_IBP}


def _default_feature_dim(arch: str) -> int | None:
    """The ``feature_dim`` an architecture builds when not given one (None: it depends on
    the images, as ``lipschitz-sll``'s does)."""
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        return None
    default = inspect.signature(cls).parameters["feature_dim"].default
    return default if isinstance(default, int) else None


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run. ``threat`` is the adversary of the adversarial protocols and
    the certified radius of the Lipschitz-margin loss; ``limit`` uses only the first
    ``limit`` training images; ``feature_dim`` None is the architecture's own (64 for the
    CNNs, 512 for ``resnet18``, the input's size for ``lipschitz-sll``)."""

    protocol: PretrainProtocol
    arch: str | None = None
    feature_dim: int | None = None
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    threat: ThreatModel | None = None
    attack_steps: int = 5
    trades_beta: float = 6.0
    temperature: float = 0.5
    limit: int | None = None

    def __post_init__(self) -> None:
        protocol = parse_choice(PretrainProtocol, self.protocol, "protocol")
        object.__setattr__(self, "protocol", protocol)
        check_positive_int(self.epochs, "epochs", EPOCHS)
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.attack_steps, "attack_steps", STEPS)
        if self.feature_dim is not None:
            check_positive_int(self.feature_dim, "feature_dim", FEATURES)
        for name in ("lr", "trades_beta", "temperature"):
            check_number(getattr(self, name), name)
        if self.limit is not None:
            check_positive_int(self.limit, "limit")
        check_seed(self.seed)
        if self.threat is not None and not isinstance(self.threat, ThreatModel):
            raise InputTypeError(f"threat must be a ThreatModel, got {type(self.threat).__name__}")
        if self.protocol in _NEEDS_THREAT and self.threat is None:
            raise InputError(f"protocol {self.protocol.value!r} needs a threat model")

    @property
    def architecture(self) -> str:
        if self.arch is not None:
            return self.arch
        return "lipschitz-cnn" if self.protocol is PretrainProtocol.LIPSCHITZ else "small-cnn"

    @property
    def uses_crown(self) -> bool:
        """Whether the certified objective mixes in CROWN-IBP's bounds."""
        return self.protocol is PretrainProtocol.CROWN_IBP

    def to_dict(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        values["protocol"] = self.protocol.value
        values["arch"] = self.architecture
        if self.feature_dim is None:
            # The architecture's own default, so that a config leaving it unset keys the
            # cache and reads in records like one that spells it out.
            values["feature_dim"] = _default_feature_dim(self.architecture)
        values["threat"] = (
            None
            if self.threat is None
            else {"norm": self.threat.norm.value, "eps": self.threat.eps}
        )
        return values


@dataclass(frozen=True)
class PretrainResult:
    encoder: Encoder
    metrics: dict[str, float]
    seconds: float


def _train(
    model: nn.Module, data: ImageDataset, config: PretrainConfig, loss: ModelLoss, progress: bool
) -> float:
    return train_epochs(
        model,
        model.parameters(),
        data,
        lambda x, y, generator: loss(model, x, y, generator),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        device=next(model.parameters()).device,
        one_cycle=True,
        desc=f"pretrain {config.protocol.value} ({len(data)} points)",
        progress=progress,
    )


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def pretrain(
    config: PretrainConfig,
    data: ImageDataset,
    *,
    runtime: Runtime | None = None,
    progress: bool = False,
) -> PretrainResult:
    """Train an encoder on ``data`` (its training part) with ``config.protocol``, on
    ``runtime``'s device (default: :meth:`Runtime.detect`)."""
    if not isinstance(data, ImageDataset):
        raise InputTypeError(f"data must be an ImageDataset, got {type(data).__name__}")
    if config.limit is not None:
        data = data.subset(torch.arange(min(config.limit, len(data))))
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    device = (runtime or Runtime.detect()).device
    sizes = {} if config.feature_dim is None else {"feature_dim": config.feature_dim}
    encoder = build_encoder(config.architecture, image_shape=data.image_shape, **sizes)
    radius = 0.0
    if config.protocol is PretrainProtocol.LIPSCHITZ:
        # The feature radius the encoder's constant guarantees at the threat model: the
        # constant it holds by construction, since its layers' norms change as it trains.
        constant = proven_lipschitz(encoder)
        if constant is None:
            raise InputError(
                f"protocol 'lipschitz' needs an encoder 1-Lipschitz by construction; "
                f"{config.architecture!r} is not (use 'lipschitz-cnn' or 'lipschitz-sll')"
            )
        radius = lipschitz_shift(constant, protocol_threat(config), data.x[0].numel())
    supervised: dict[PretrainProtocol, Callable[[], ModelLoss]] = {
        PretrainProtocol.STANDARD: lambda: lambda m, x, y, g: F.cross_entropy(m(x), y),
        PretrainProtocol.ADVERSARIAL: lambda: adversarial_loss(
            EpsSchedule(protocol_threat(config)), config.attack_steps
        ),
        PretrainProtocol.TRADES: lambda: trades_loss(
            EpsSchedule(protocol_threat(config)), config.attack_steps, config.trades_beta
        ),
        PretrainProtocol.LIPSCHITZ: lambda: lipschitz_margin_loss(radius),
    }
    for protocol in _CERTIFIED:
        supervised[protocol] = lambda: certified_loss(
            config, config.epochs * -(-len(data) // config.batch_size)
        )
    contrastive: dict[PretrainProtocol, Callable[[], ModelLoss]] = {
        PretrainProtocol.SIMCLR: lambda: simclr_loss(config),
        PretrainProtocol.ADVERSARIAL_CONTRASTIVE: lambda: adversarial_contrastive_loss(config),
    }
    metrics: dict[str, float] = {}
    probe_x, probe_y = data.x[:1000].to(device), data.y[:1000].to(device)
    if config.protocol in supervised:
        model = Classifier(encoder, data.num_classes).to(device)
        if config.protocol in _CERTIFIED:
            # An encoder the bounds cannot read is refused now, not after the clean
            # warm-up quarter of the steps.
            with torch.no_grad():
                tightest_margins(model, probe_x[:1], probe_y[:1], config)
        metrics["final_loss"] = _train(model, data, config, supervised[config.protocol](), progress)
        metrics["train_acc"] = _accuracy(model, probe_x, probe_y)
        if config.protocol is PretrainProtocol.LIPSCHITZ:
            with torch.no_grad():
                features = encoder(probe_x)
                correct = model.head(features).argmax(dim=1) == probe_y
                shift = torch.full((len(features),), radius, device=device)
                certified = correct & criterion_holds(model.head, features, shift)
            metrics["train_certified_acc"] = float(certified.float().mean())
        if config.protocol in _CERTIFIED:
            # The share of training points the protocol's bounds certify (a training
            # metric: unlike the certifiers, these bounds are not widened for rounding).
            with torch.no_grad():
                margins = tightest_margins(model.eval(), probe_x, probe_y, config)
                margins.scatter_(1, probe_y.view(-1, 1), float("-inf"))
            metrics["train_certified_acc"] = float((margins < 0).all(dim=1).float().mean())
    elif config.protocol in contrastive:
        wrapper = Contrastive(encoder).to(device)
        metrics["final_loss"] = _train(
            wrapper, data, config, contrastive[config.protocol](), progress
        )
    encoder = encoder.to(device).eval()
    with torch.no_grad():
        features = encoder(probe_x)
    probe = train_linear_probe(features, probe_y, num_classes=data.num_classes)
    with torch.no_grad():
        metrics["probe_train_acc"] = float(
            (probe(features).argmax(dim=1) == probe_y).float().mean()
        )
    return PretrainResult(encoder, metrics, time.perf_counter() - start)


def _data_digest(data: ImageDataset) -> str:
    digest = hashlib.sha256()
    digest.update(data.name.encode())
    digest.update(data.x.contiguous().numpy().tobytes())
    digest.update(data.y.contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_path(config: PretrainConfig, data: ImageDataset, cache_dir: str | Path) -> Path:
    key = json.dumps({"config": config.to_dict(), "data": _data_digest(data)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{config.protocol.value}-{digest}.safetensors"


def cached_pretrain(
    config: PretrainConfig,
    data: ImageDataset,
    cache_dir: str | Path,
    *,
    runtime: Runtime | None = None,
    progress: bool = False,
) -> PretrainResult:
    """:func:`pretrain`, or the checkpoint an identical earlier run left in ``cache_dir``.

    A damaged checkpoint is reported, retrained and overwritten. One process at a time
    trains a given encoder (others sharing the cache wait, then load its checkpoint),
    and the temporary files of a write killed mid-way are removed first.
    """
    runtime = runtime or Runtime.detect()
    path = cache_path(config, data, cache_dir)
    with waited_for(path.with_name(path.name + ".lock")):
        for name in (path.name, sidecar_path(path).name):
            remove_leftovers(path.parent, of=name)
        return _cached(config, data, path, runtime, progress)


def _cached(
    config: PretrainConfig, data: ImageDataset, path: Path, runtime: Runtime, progress: bool
) -> PretrainResult:
    if path.is_file():
        try:
            encoder, sidecar = load_checkpoint(path, arch=config.architecture)
            metadata = sidecar.get("metadata")
            if isinstance(metadata, dict):
                return PretrainResult(
                    encoder.to(runtime.device),
                    dict(metadata.get("metrics", {})),
                    float(metadata.get("seconds", 0.0)),
                )
        except CheckpointError as err:
            warnings.warn(f"retraining: {err}", stacklevel=2)
    result = pretrain(config, data, runtime=runtime, progress=progress)
    save_checkpoint(
        path,
        result.encoder,
        {
            "pretrain": config.to_dict(),
            "data": {"name": data.name, "size": len(data), "sha256": _data_digest(data)},
            "metrics": result.metrics,
            "seconds": result.seconds,
        },
    )
    return result
