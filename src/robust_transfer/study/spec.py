"""A study's configuration as types: what a study runs, each part checking itself when
made (from TOML by :mod:`.config`, or in Python), the study as a whole checking the
names its parts give each other."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..attacks.settings import AttackSettings
from ..certify import BEST, HEAD_CERTIFIERS, certifier_names, default_certifier_names
from ..core.checks import Limit, check_number, check_positive_int, check_seed
from ..core.errors import ConfigError
from ..models import source_name
from ..theory.losses import RegressionLoss
from ..theory.threat import ThreatModel
from ..training.pretrain import PretrainConfig
from ..training.protocols import AdaptConfig, AdaptProtocol, Adversary


def config_error(where: str, reason: str) -> ConfigError:
    """The error of a value at a key path (``encoders.adversarial.epochs``)."""
    return ConfigError(f"config error at {where}: {reason}")


class FieldError(ConfigError):
    """A value of one field of a settings type; the parser adds the key path before it."""

    def __init__(self, owner: str, field: str, reason: str) -> None:
        super().__init__(f"{owner} {field}: {reason}")
        self.field, self.reason = field, reason


class TaskKind(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


@dataclass(frozen=True)
class EncoderSpec:
    """Where an encoder comes from: pretrained here, or an encoder spec (a checkpoint,
    a factory; see :mod:`robust_transfer.models.specs`)."""

    name: str
    pretrain: PretrainConfig | None = None
    pretrain_task: str | None = None
    source: str | None = None
    # resolve_encoder's keyword arguments (weights, layer, resize, ...)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pretraining(self) -> str:
        if self.pretrain is not None:
            return self.pretrain.protocol.value
        return source_name(str(self.source))


def _check_field(check: Callable[..., object], value: object, name: str, **limits: Any) -> None:
    try:
        check(value, name, **limits)
    except ValueError as err:
        raise FieldError("radius", name, str(err)) from err


def _check_curve_points(value: object, name: str) -> int:
    if value == 0 and not isinstance(value, bool):
        return 0
    count = check_positive_int(value, name, Limit(1000, "curve points"))
    if count < 3:
        raise ValueError(f"a curve needs at least 3 points (0: no curves), got {count}")
    return count


class RadiusRule(StrEnum):
    """How the certified probe's feature-space radius is set, per threat model."""

    FIXED = "fixed"  # the given value
    CERTIFIED = "certified"  # the largest certified shift on training points, by a method
    QUANTILE = "quantile"  # a quantile of the attacked shift on training points


@dataclass(frozen=True)
class Radius:
    """The certified probe's radius rule. ``certified`` falls back to the quantile rule
    with ``quantile`` where no certifier applies to the encoder (and says so)."""

    rule: RadiusRule
    value: float | None = None
    method: str = BEST
    quantile: float = 0.5

    def __post_init__(self) -> None:
        if self.rule is RadiusRule.FIXED:
            if self.value is None:
                raise FieldError("radius", "value", "the fixed rule needs a value")
            _check_field(check_number, self.value, "value", inclusive=True)
        elif self.value is not None:
            reason = f"only the fixed rule takes a value, not {self.rule.value!r}"
            raise FieldError("radius", "value", reason)
        _check_field(check_number, self.quantile, "quantile", inclusive=True, most=1.0)
        known = (BEST, *certifier_names())
        if self.method not in known:
            reason = f"unknown certifier {self.method!r} (known: {', '.join(known)})"
            raise FieldError("radius", "method", reason)


@dataclass(frozen=True)
class AdaptationSpec:
    """An adaptation protocol; a certified probe has a radius rule and its ``config``
    gets the radius the rule gives for each threat model (:meth:`config_for`); an
    adversarial one without a ``threat`` of its own trains against each unit's."""

    name: str
    settings: Mapping[str, Any]
    radius: Radius | None = None

    @property
    def protocol(self) -> AdaptProtocol:
        protocol: AdaptProtocol = self.settings["protocol"]
        return protocol

    @property
    def per_threat(self) -> bool:
        """Whether the head depends on the unit's threat model."""
        radius = self.radius is not None and self.radius.rule is not RadiusRule.FIXED
        return radius or (self.adversarial and "threat" not in self.settings)

    @property
    def adversarial(self) -> bool:
        return bool(self.settings.get("adversary", Adversary.NONE) != Adversary.NONE)

    def config_for(
        self, radius: float | None = None, threat: ThreatModel | None = None
    ) -> AdaptConfig:
        """The adaptation config, with the radius the rule gave (certified probe only)
        and, for an adversarial one without its own, the unit's threat model."""
        settings = dict(self.settings)
        if self.adversarial:
            settings.setdefault("threat", threat)
        return AdaptConfig(**settings, radius=radius)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: TaskKind
    encoders: tuple[str, ...]
    adaptations: tuple[str, ...]
    threats: tuple[ThreatModel, ...]
    loss: RegressionLoss | None = None
    data: str | None = None
    test_data: str | None = None  # held-out data; without it ``data`` is split 80/20
    data_options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyConfig:
    name: str
    seed: int
    eval_points: int
    radius_points: int
    attack: AttackSettings
    encoders: Mapping[str, EncoderSpec]
    adaptations: Mapping[str, AdaptationSpec]
    tasks: tuple[TaskSpec, ...]
    certifiers: tuple[str, ...] | None = None  # None: every registered certifier
    cache_dir: Path | None = None
    # Evaluation points are processed, stored and shared out among processes in shards
    # of this many: memory follows the shard, and a killed run loses one shard at most.
    shard_points: int = 256
    # Heads train on this many training points (a stratified sample; None: all of them).
    train_points: int | None = None
    # Each head's robustness curve at this many eps from 0 to the largest eps of each
    # norm of a task's grid (0: none).
    curve_points: int = 9
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The checks that need the whole study: names that refer to each other."""
        for name, check in (
            ("seed", check_seed),
            ("eval_points", check_positive_int),
            ("radius_points", check_positive_int),
            ("shard_points", check_positive_int),
            ("curve_points", _check_curve_points),
            ("train_points", lambda value, name: value is None or check_positive_int(value, name)),
        ):
            try:
                check(getattr(self, name), name)
            except ValueError as err:
                raise config_error(name, str(err)) from err
        if not self.tasks:
            raise config_error("tasks", "no task given")
        seen: set[tuple[str, str, str]] = set()
        for index, task in enumerate(self.tasks):
            for key, known in (("encoders", self.encoders), ("adaptations", self.adaptations)):
                for item in getattr(task, key):
                    if item not in known:
                        raise config_error(
                            f"tasks[{index}].{key}",
                            f"{item!r} is not defined (defined: {', '.join(known)})",
                        )
            if task.kind is TaskKind.REGRESSION:
                for item in task.adaptations:
                    spec = self.adaptations[item]
                    if spec.protocol is not AdaptProtocol.LINEAR_PROBE or spec.adversarial:
                        raise config_error(
                            f"tasks[{index}].adaptations",
                            f"regression tasks take clean linear probes only, {item!r} is not one",
                        )
            for encoder in task.encoders:
                for adaptation in task.adaptations:
                    triple = (task.name, encoder, adaptation)
                    if triple in seen:
                        raise config_error(
                            f"tasks[{index}]",
                            f"{task.name} x {encoder} x {adaptation} appears twice",
                        )
                    seen.add(triple)
        self._check_certifiers()
        self._check_autoattack_plan()

    def curve_points_of(self, task: TaskSpec, threat: ThreatModel) -> int | None:
        """How many eps the unit's curve has: the unit of the largest eps of its norm in
        the task's grid draws the task's curve for that norm, the others none."""
        same_norm = [t.eps for t in task.threats if t.norm is threat.norm]
        return self.curve_points or None if threat.eps == max(same_norm) else None

    def _check_certifiers(self) -> None:
        names = self.certifiers or ()
        known = (*certifier_names(), *HEAD_CERTIFIERS)
        for index, name in enumerate(names):
            if name not in known:
                raise config_error(
                    f"certifiers[{index}]",
                    f"unknown certifier {name!r} (known: {', '.join(known)})",
                )
        if len(set(names)) != len(names):
            raise config_error("certifiers", f"a certifier is named twice: {list(names)}")
        chosen = default_certifier_names() if self.certifiers is None else self.certifiers
        for key, spec in self.adaptations.items():
            method = None if spec.radius is None else spec.radius.method
            if method is not None and method != BEST and method not in chosen:
                raise config_error(
                    f"adaptations.{key}.radius.method",
                    f"certifier {method!r} is not among the study's certifiers "
                    f"({', '.join(chosen)})",
                )

    def _check_autoattack_plan(self) -> None:
        plan = self.attack.autoattack
        if plan is None:
            return
        study_names = {
            "tasks": [task.name for task in self.tasks],
            "encoders": list(self.encoders),
            "adaptations": list(self.adaptations),
        }
        for key, known in study_names.items():
            for name in getattr(plan, key) or ():
                if name not in known:
                    raise config_error(
                        f"attack.autoattack.{key}",
                        f"unknown {key[:-1]} {name!r} (the study's: {', '.join(known)})",
                    )
        grid = {threat for task in self.tasks for threat in task.threats}
        for threat in plan.threats or ():
            if threat not in grid:
                raise config_error(
                    "attack.autoattack.threats",
                    f"{threat} is in no task's threat grid: the plan would cover no unit",
                )
