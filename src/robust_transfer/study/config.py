"""A study's configuration: read from TOML, checked whole before any work starts.

Every error names the key path (``encoders.adversarial.epochs``) and the reason, so a
typo costs a second, not a half-finished run.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from ..attacks.settings import AttackSettings
from ..checks import Choice, parse_choice
from ..data.tasks import task_names
from ..losses import RegressionLoss
from ..threat import Norm, ThreatModel, parse_eps
from ..training.adapt import AdaptConfig, AdaptProtocol
from ..training.pretrain import PretrainConfig, PretrainProtocol


class ConfigError(ValueError):
    """A study configuration that cannot be run; the message names the key."""


class TaskKind(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


@dataclass(frozen=True)
class EncoderSpec:
    """Where an encoder comes from: pretrained here, a checkpoint, or a factory."""

    name: str
    pretrain: PretrainConfig | None = None
    pretrain_task: str | None = None
    checkpoint: Path | None = None
    factory: str | None = None

    @property
    def pretraining(self) -> str:
        if self.pretrain is not None:
            return self.pretrain.protocol.value
        return "checkpoint" if self.checkpoint is not None else "factory"


@dataclass(frozen=True)
class AdaptationSpec:
    """An adaptation protocol; the certified probe's radius may be a quantile of the
    attacked shift on training points, set per threat model."""

    name: str
    config: AdaptConfig
    radius_quantile: float | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: TaskKind
    encoders: tuple[str, ...]
    adaptations: tuple[str, ...]
    threats: tuple[ThreatModel, ...]
    loss: RegressionLoss | None = None
    data: str | None = None


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
    cache_dir: Path | None = None
    source: dict[str, Any] = field(default_factory=dict)


_TOP = {
    "name",
    "seed",
    "eval_points",
    "radius_points",
    "cache_dir",
    "attack",
    "threats",
    "encoders",
    "adaptations",
    "tasks",
}
_TASK_KEYS = {"name", "kind", "loss", "encoders", "adaptations", "threats", "data"}
_ENCODER_SOURCES = {"protocol", "checkpoint", "factory"}


def _fail(where: str, reason: str) -> ConfigError:
    return ConfigError(f"config error at {where}: {reason}")


def _expect(value: object, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise _fail(where, f"expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise _fail(where, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def _choice(kind: type[Choice], value: object, where: str) -> Choice:
    try:
        return parse_choice(kind, value, "protocol")
    except ValueError as err:
        raise _fail(where, str(err)) from err


def _positive_int(value: object, where: str) -> int:
    number: int = _expect(value, int, where, "a positive integer")
    if number < 1:
        raise _fail(where, f"expected a positive integer, got {number}")
    return number


def _unknown_keys(table: Mapping[str, object], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise _fail(f"{prefix}{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _threat(value: object, where: str) -> ThreatModel:
    table = _expect(value, dict, where, "a table like {norm = 'Linf', eps = '8/255'}")
    _unknown_keys(table, {"norm", "eps"}, where)
    try:
        return ThreatModel(table.get("norm", ""), table.get("eps", 0))
    except (ValueError, TypeError) as err:
        raise _fail(where, str(err)) from err


def _threat_grid(value: object, where: str) -> tuple[ThreatModel, ...]:
    table = _expect(value, dict, where, "a table like {Linf = ['1/10'], L2 = [1.0]}")
    threats = []
    for norm_name, radii in table.items():
        try:
            norm = Norm.parse(norm_name)
        except ValueError as err:
            raise _fail(f"{where}.{norm_name}", str(err)) from err
        for index, eps in enumerate(_expect(radii, list, f"{where}.{norm_name}", "a list")):
            try:
                threats.append(ThreatModel(norm, parse_eps(eps)))
            except (ValueError, TypeError) as err:
                raise _fail(f"{where}.{norm_name}[{index}]", str(err)) from err
    if not threats:
        raise _fail(where, "no threat model given")
    return tuple(threats)


def _dataclass_from(
    cls: Callable[..., Any], fields: set[str], table: Mapping[str, Any], where: str
) -> Any:
    _unknown_keys(table, fields, where)
    try:
        return cls(**table)
    except (ValueError, TypeError) as err:
        raise _fail(where, str(err)) from err


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _converted(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Values that TOML cannot spell: threat models from tables."""
    converted = dict(table)
    if "threat" in converted:
        converted["threat"] = _threat(converted["threat"], f"{where}.threat")
    return converted


def _encoder(name: str, value: object, base: Path, seed: int) -> EncoderSpec:
    where = f"encoders.{name}"
    table = dict(_expect(value, dict, where, "a table"))
    sources = _ENCODER_SOURCES & set(table)
    if len(sources) != 1:
        raise _fail(where, "give exactly one of 'protocol', 'checkpoint' or 'factory'")
    if "checkpoint" in table:
        _unknown_keys(table, {"checkpoint"}, where)
        path = base / _expect(table["checkpoint"], str, f"{where}.checkpoint", "a path")
        if not path.is_file():
            raise _fail(f"{where}.checkpoint", f"no such file: {path}")
        return EncoderSpec(name=name, checkpoint=path)
    if "factory" in table:
        _unknown_keys(table, {"factory"}, where)
        spec = _expect(table["factory"], str, f"{where}.factory", "'package.module:function'")
        if spec.count(":") != 1:
            raise _fail(f"{where}.factory", f"expected 'package.module:function', got {spec!r}")
        return EncoderSpec(name=name, factory=spec)
    task = _expect(table.pop("pretrain_task", None), str, f"{where}.pretrain_task", "a task name")
    if task not in task_names():
        raise _fail(
            f"{where}.pretrain_task",
            f"unknown task {task!r} (built in: {', '.join(task_names())})",
        )
    table.setdefault("seed", seed)
    table["protocol"] = _choice(PretrainProtocol, table["protocol"], f"{where}.protocol")
    pretrain = _dataclass_from(
        PretrainConfig, _field_names(PretrainConfig), _converted(table, where), where
    )
    return EncoderSpec(name=name, pretrain=pretrain, pretrain_task=task)


def _adaptation(name: str, value: object, seed: int) -> AdaptationSpec:
    where = f"adaptations.{name}"
    table = dict(_expect(value, dict, where, "a table"))
    quantile = table.pop("radius_quantile", None)
    if quantile is not None:
        quantile = float(_expect(quantile, (int, float), f"{where}.radius_quantile", "a number"))
        if not 0.0 <= quantile <= 1.0:
            raise _fail(f"{where}.radius_quantile", f"must lie in [0, 1], got {quantile}")
    table.setdefault("seed", seed)
    table["protocol"] = _choice(AdaptProtocol, table.get("protocol", ""), f"{where}.protocol")
    certified = table["protocol"] is AdaptProtocol.CERTIFIED_PROBE
    if certified and quantile is None and table.get("radius") is None:
        # The radius follows the threat model: the encoder's certified shift where it has
        # one, otherwise this quantile of the attacked shift on training points.
        quantile = 0.5
    if certified and quantile is not None:
        # A placeholder radius for validation; the study sets it per threat model.
        table["radius"] = 1.0
    config = _dataclass_from(AdaptConfig, _field_names(AdaptConfig), table, where)
    return AdaptationSpec(name=name, config=config, radius_quantile=quantile)


def _task(
    index: int,
    value: object,
    encoders: Mapping[str, EncoderSpec],
    adaptations: Mapping[str, AdaptationSpec],
    default_threats: tuple[ThreatModel, ...] | None,
    base: Path,
) -> TaskSpec:
    where = f"tasks[{index}]"
    table = _expect(value, dict, where, "a table")
    _unknown_keys(table, _TASK_KEYS, where)
    name = _expect(table.get("name"), str, f"{where}.name", "a task name")
    try:
        kind = TaskKind(table.get("kind", "classification"))
    except ValueError as err:
        raise _fail(f"{where}.kind", "expected 'classification' or 'regression'") from err
    loss = None
    if kind is TaskKind.REGRESSION:
        try:
            loss = RegressionLoss.parse(table.get("loss", "absolute"))
        except ValueError as err:
            raise _fail(f"{where}.loss", str(err)) from err
    elif "loss" in table:
        raise _fail(f"{where}.loss", "only regression tasks take a loss")
    data = table.get("data")
    if data is not None:
        data = _expect(data, str, f"{where}.data", "a data set spec")
        if data.endswith((".npz", ".pt")):
            path = base / data
            if not path.is_file():
                raise _fail(f"{where}.data", f"no such file: {path}")
            data = str(path)
    elif name not in task_names():
        raise _fail(
            f"{where}.name",
            f"unknown task {name!r} (built in: {', '.join(task_names())}; "
            "or give 'data' for your own)",
        )
    chosen = []
    for key, known in (("encoders", encoders), ("adaptations", adaptations)):
        names = tuple(_expect(table.get(key, list(known)), list, f"{where}.{key}", "a list"))
        for item in names:
            if item not in known:
                raise _fail(
                    f"{where}.{key}", f"{item!r} is not defined (defined: {', '.join(known)})"
                )
        if not names:
            raise _fail(f"{where}.{key}", "empty list")
        chosen.append(names)
    if kind is TaskKind.REGRESSION:
        for item in chosen[1]:
            if adaptations[item].config.protocol is not AdaptProtocol.LINEAR_PROBE:
                raise _fail(
                    f"{where}.adaptations",
                    f"regression tasks take linear probes only, {item!r} is not one",
                )
    if "threats" in table:
        threats = _threat_grid(table["threats"], f"{where}.threats")
    elif default_threats is not None:
        threats = default_threats
    else:
        raise _fail(f"{where}.threats", "missing, and no top-level [threats] to fall back on")
    return TaskSpec(
        name=name,
        kind=kind,
        encoders=chosen[0],
        adaptations=chosen[1],
        threats=threats,
        loss=loss,
        data=data,
    )


def parse_config(source: Mapping[str, Any], *, base: Path | None = None) -> StudyConfig:
    """Check a study configuration (the parsed TOML) whole; paths are relative to ``base``."""
    base = Path.cwd() if base is None else base
    _unknown_keys(source, _TOP, "")
    name = _expect(source.get("name", "study"), str, "name", "a string")
    seed = _expect(source.get("seed", 0), int, "seed", "an integer")
    eval_points = _positive_int(source.get("eval_points", 500), "eval_points")
    radius_points = _positive_int(source.get("radius_points", 200), "radius_points")
    attack_table = _expect(source.get("attack", {}), dict, "attack", "a table")
    for key, value in attack_table.items():
        if key == "autoattack":
            _expect(value, bool, "attack.autoattack", "true or false")
        else:
            _positive_int(value, f"attack.{key}")
    attack = _dataclass_from(AttackSettings, _field_names(AttackSettings), attack_table, "attack")
    threats = _threat_grid(source["threats"], "threats") if "threats" in source else None
    encoder_tables = _expect(source.get("encoders"), dict, "encoders", "a table of encoders")
    encoders = {key: _encoder(key, value, base, seed) for key, value in encoder_tables.items()}
    adaptation_tables = _expect(
        source.get("adaptations"), dict, "adaptations", "a table of adaptations"
    )
    adaptations = {key: _adaptation(key, value, seed) for key, value in adaptation_tables.items()}
    task_list = _expect(source.get("tasks"), list, "tasks", "a list of [[tasks]]")
    if not task_list:
        raise _fail("tasks", "no task given")
    tasks = tuple(
        _task(index, value, encoders, adaptations, threats, base)
        for index, value in enumerate(task_list)
    )
    seen: set[tuple[str, str, str]] = set()
    for index, task in enumerate(tasks):
        for encoder in task.encoders:
            for adaptation in task.adaptations:
                triple = (task.name, encoder, adaptation)
                if triple in seen:
                    raise _fail(
                        f"tasks[{index}]",
                        f"{task.name} x {encoder} x {adaptation} appears twice",
                    )
                seen.add(triple)
    cache = source.get("cache_dir")
    cache_dir = None if cache is None else base / _expect(cache, str, "cache_dir", "a path")
    return StudyConfig(
        name=name,
        seed=seed,
        eval_points=eval_points,
        radius_points=radius_points,
        attack=attack,
        encoders=encoders,
        adaptations=adaptations,
        tasks=tasks,
        cache_dir=cache_dir,
        source=dict(source),
    )


def load_config(path: str | Path) -> StudyConfig:
    """Read and check a TOML study file; relative paths inside are relative to it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        source = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    return parse_config(source, base=path.resolve().parent)


def default_config_text() -> str:
    """The embedded default study (what ``robust-transfer demo`` runs)."""
    return resources.files("robust_transfer.study").joinpath("demo.toml").read_text()


def default_config() -> StudyConfig:
    return parse_config(tomllib.loads(default_config_text()))
