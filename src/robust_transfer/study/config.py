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

from ..attacks.settings import AttackSettings, AutoAttackPlan
from ..certify import BEST, certifier_names, default_certifier_names
from ..checks import Choice, check_number, check_positive_int, check_seed, parse_choice
from ..data.tasks import task_names
from ..errors import ConfigError, RobustTransferError
from ..losses import RegressionLoss
from ..models import resolve_spec, source_name
from ..schema import SAFE_NAME
from ..threat import Norm, ThreatModel, parse_eps
from ..training.adapt import AdaptConfig, AdaptProtocol
from ..training.pretrain import PretrainConfig, PretrainProtocol


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


@dataclass(frozen=True)
class AdaptationSpec:
    """An adaptation protocol; a certified probe has a radius rule and its ``config``
    gets the radius the rule gives for each threat model (:meth:`config_for`)."""

    name: str
    settings: Mapping[str, Any]
    radius: Radius | None = None

    @property
    def protocol(self) -> AdaptProtocol:
        protocol: AdaptProtocol = self.settings["protocol"]
        return protocol

    def config_for(self, radius: float | None = None) -> AdaptConfig:
        """The adaptation config, with the radius the rule gave (certified probe only)."""
        return AdaptConfig(**self.settings, radius=radius)


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
    source: dict[str, Any] = field(default_factory=dict)


_TOP = {
    "name",
    "seed",
    "eval_points",
    "radius_points",
    "shard_points",
    "certifiers",
    "cache_dir",
    "attack",
    "threats",
    "encoders",
    "adaptations",
    "tasks",
}
_TASK_KEYS = {
    "name",
    "kind",
    "loss",
    "encoders",
    "adaptations",
    "threats",
    "data",
    "test_data",
    "data_options",
}
# 'spec' takes any encoder spec; 'checkpoint' and 'factory' only that kind of spec.
_ENCODER_SOURCES = {"protocol", "spec", "checkpoint", "factory"}


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


def _checked(check: Callable[[object, str], Any], value: object, where: str) -> Any:
    """``check(value, name)`` with its error given the key path."""
    try:
        return check(value, where.rsplit(".", 1)[-1])
    except ValueError as err:
        raise _fail(where, str(err)) from err


def _positive_int(value: object, where: str) -> int:
    number: int = _checked(check_positive_int, value, where)
    return number


def _check_name(name: str, where: str) -> None:
    if not SAFE_NAME.fullmatch(name):
        raise _fail(
            where,
            f"name {name!r}: use letters, digits and . _ + = - (starting with a letter or "
            "digit, at most 80 characters); names become file names in the output folder",
        )


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
                threat = ThreatModel(norm, parse_eps(eps))
            except (ValueError, TypeError) as err:
                raise _fail(f"{where}.{norm_name}[{index}]", str(err)) from err
            if threat in threats:
                raise _fail(f"{where}.{norm_name}[{index}]", f"{threat} is given twice")
            threats.append(threat)
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


# What an encoder spec may be given besides its source (resolve_encoder's arguments).
_LOAD_KEYS = {"weights", "layer", "resize", "trust_checkpoint", "trust_code", "options"}


def _load_options(table: Mapping[str, Any], base: Path, where: str) -> dict[str, Any]:
    options: dict[str, Any] = dict(
        _expect(table.get("options", {}), dict, f"{where}.options", "a table")
    )
    if "weights" in table:
        path = base / _expect(table["weights"], str, f"{where}.weights", "a file path")
        if not path.is_file():
            raise _fail(f"{where}.weights", f"weights file not found: {path}")
        options["checkpoint"] = str(path)
    if "layer" in table:
        options["layer"] = _expect(table["layer"], str, f"{where}.layer", "a module name")
    for flag in ("resize", "trust_checkpoint", "trust_code"):
        if flag in table:
            options[flag] = _expect(table[flag], bool, f"{where}.{flag}", "true or false")
    return options


def _encoder(name: str, value: object, base: Path, seed: int) -> EncoderSpec:
    _check_name(name, f"encoders.{name!r}")
    where = f"encoders.{name}"
    table = dict(_expect(value, dict, where, "a table"))
    sources = _ENCODER_SOURCES & set(table)
    if len(sources) != 1:
        raise _fail(where, "give exactly one of 'protocol', 'spec', 'checkpoint' or 'factory'")
    (key,) = sources
    if key != "protocol":
        _unknown_keys(table, {key, *_LOAD_KEYS}, where)
        spec = _expect(table[key], str, f"{where}.{key}", "an encoder spec")
        options = _load_options(table, base, where)
        if key == "checkpoint" and not spec.startswith("checkpoint:"):
            spec = f"checkpoint:{spec}"
        try:
            resolved = resolve_spec(spec, base)
            kind = source_name(resolved)
        except RobustTransferError as err:
            raise _fail(f"{where}.{key}", str(err)) from err
        if key != "spec" and kind != key:
            raise _fail(f"{where}.{key}", f"{spec!r} names a {kind}, not a {key}")
        return EncoderSpec(name=name, source=resolved, options=options)
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


_RADIUS_KEYS = {"rule", "value", "method", "quantile"}


def _quantile(value: object, where: str) -> float:
    _expect(value, (int, float), where, "a number")
    quantile: float = _checked(
        lambda v, name: check_number(v, name, inclusive=True, most=1.0), value, where
    )
    return quantile


def _radius(table: dict[str, Any], where: str) -> Radius:
    """The certified probe's radius rule: ``radius = 0.3`` (fixed), a table
    ``{rule = "certified" | "quantile" | "fixed", ...}``, or ``radius_quantile = q``
    (shorthand for the certified rule falling back to that quantile). Default: the
    certified rule with ``best``, falling back to the median attacked shift."""
    value = table.pop("radius", None)
    shorthand = table.pop("radius_quantile", None)
    if shorthand is not None:
        if value is not None:
            raise _fail(f"{where}.radius_quantile", "give 'radius' or 'radius_quantile'")
        quantile = _quantile(shorthand, f"{where}.radius_quantile")
        return Radius(RadiusRule.CERTIFIED, quantile=quantile)
    if value is None:
        return Radius(RadiusRule.CERTIFIED)
    if not isinstance(value, dict):
        _expect(value, (int, float), f"{where}.radius", "a number or a table")
        radius: float = _checked(
            lambda v, name: check_number(v, name, inclusive=True), value, f"{where}.radius"
        )
        return Radius(RadiusRule.FIXED, value=radius)
    where = f"{where}.radius"
    _unknown_keys(value, _RADIUS_KEYS, where)
    try:
        rule = parse_choice(RadiusRule, value.get("rule", ""), "radius rule")
    except ValueError as err:
        raise _fail(f"{where}.rule", str(err)) from err
    fixed = None
    if "value" in value and rule is not RadiusRule.FIXED:
        raise _fail(f"{where}.value", f"only the fixed rule takes a value, not {rule.value!r}")
    if rule is RadiusRule.FIXED:
        if "value" not in value:
            raise _fail(f"{where}.value", "the fixed rule needs a value")
        _expect(value["value"], (int, float), f"{where}.value", "a number")
        fixed = _checked(
            lambda v, name: check_number(v, name, inclusive=True), value["value"], f"{where}.value"
        )
    method = _expect(value.get("method", BEST), str, f"{where}.method", "a certifier name")
    known = (BEST, *certifier_names())
    if method not in known:
        raise _fail(f"{where}.method", f"unknown certifier {method!r} (known: {', '.join(known)})")
    quantile = _quantile(value.get("quantile", 0.5), f"{where}.quantile")
    return Radius(rule, value=fixed, method=method, quantile=quantile)


def _adaptation(name: str, value: object, seed: int) -> AdaptationSpec:
    _check_name(name, f"adaptations.{name!r}")
    where = f"adaptations.{name}"
    table = dict(_expect(value, dict, where, "a table"))
    table.setdefault("seed", seed)
    table["protocol"] = _choice(AdaptProtocol, table.get("protocol", ""), f"{where}.protocol")
    given = sorted({"radius", "radius_quantile"} & set(table))
    rule = _radius(table, where)
    if table["protocol"] is not AdaptProtocol.CERTIFIED_PROBE:
        if given:
            raise _fail(f"{where}.{given[0]}", "only the certified probe takes a radius")
        _dataclass_from(AdaptConfig, _field_names(AdaptConfig), table, where)
        return AdaptationSpec(name=name, settings=table)
    # Checks the other settings; the rule sets the radius per threat model later.
    probe = rule.value if rule.rule is RadiusRule.FIXED else 0.0
    _dataclass_from(AdaptConfig, _field_names(AdaptConfig), table | {"radius": probe}, where)
    return AdaptationSpec(name=name, settings=table, radius=rule)


_DATA_KEYS = ("data", "test_data")


def _data_spec(value: object, where: str, base: Path) -> str | None:
    """A task's data spec, a file in it made absolute from ``base`` and checked."""
    if value is None:
        return None
    spec: str = _expect(value, str, where, "a data set spec")
    if not spec.endswith((".npz", ".pt")):
        return spec
    path = base / spec
    if not path.is_file():
        raise _fail(where, f"no such file: {path}")
    return str(path)


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
    _check_name(name, f"{where}.name")
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
    data, test_data = (_data_spec(table.get(key), f"{where}.{key}", base) for key in _DATA_KEYS)
    options = _expect(table.get("data_options", {}), dict, f"{where}.data_options", "a table")
    if data is None:
        given = sorted({"test_data", "data_options"} & set(table))
        if given:
            raise _fail(f"{where}.{given[0]}", "give 'data' too (the training data)")
        if name not in task_names():
            raise _fail(
                f"{where}.name",
                f"unknown task {name!r} (built in: {', '.join(task_names())}; "
                "or give 'data' for your own)",
            )
    chosen = []
    for key, known in (("encoders", encoders), ("adaptations", adaptations)):
        names = tuple(_expect(table.get(key, list(known)), list, f"{where}.{key}", "a list"))
        for index, item in enumerate(names):
            _expect(item, str, f"{where}.{key}[{index}]", "a name")
            if item not in known:
                raise _fail(
                    f"{where}.{key}", f"{item!r} is not defined (defined: {', '.join(known)})"
                )
        if not names:
            raise _fail(f"{where}.{key}", "empty list")
        chosen.append(names)
    if kind is TaskKind.REGRESSION:
        for item in chosen[1]:
            if adaptations[item].protocol is not AdaptProtocol.LINEAR_PROBE:
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
        test_data=test_data,
        data_options=options,
    )


def _autoattack_plan(value: object) -> AutoAttackPlan | None:
    """``attack.autoattack``: true (every unit and point), false, or a table that names
    ``points``, ``tasks``, ``encoders``, ``adaptations`` and ``threats``."""
    where = "attack.autoattack"
    if isinstance(value, bool):
        return AutoAttackPlan() if value else None
    table = _expect(value, dict, where, "true, false or a table")
    _unknown_keys(table, _field_names(AutoAttackPlan), where)

    def names(key: str) -> tuple[str, ...] | None:
        listed = table.get(key)
        if listed is None:
            return None
        return tuple(
            _expect(name, str, f"{where}.{key}", "a list of names")
            for name in _expect(listed, list, f"{where}.{key}", "a list")
        )

    points = table.get("points")
    threats = table.get("threats")
    return AutoAttackPlan(
        points=None if points is None else _positive_int(points, f"{where}.points"),
        tasks=names("tasks"),
        encoders=names("encoders"),
        adaptations=names("adaptations"),
        threats=None if threats is None else _threat_grid(threats, f"{where}.threats"),
    )


def _attack(table: Mapping[str, Any]) -> AttackSettings:
    values = dict(table)
    if "autoattack" in values:
        values["autoattack"] = _autoattack_plan(values["autoattack"])
    settings: AttackSettings = _dataclass_from(
        AttackSettings, _field_names(AttackSettings), values, "attack"
    )
    return settings


def parse_config(source: Mapping[str, Any], *, base: Path | None = None) -> StudyConfig:
    """Check a study configuration (the parsed TOML) whole; paths are relative to ``base``."""
    base = Path.cwd() if base is None else base
    _unknown_keys(source, _TOP, "")
    name = _expect(source.get("name", "study"), str, "name", "a string")
    seed: int = _checked(check_seed, source.get("seed", 0), "seed")
    eval_points = _positive_int(source.get("eval_points", 500), "eval_points")
    radius_points = _positive_int(source.get("radius_points", 200), "radius_points")
    shard_points = _positive_int(source.get("shard_points", 256), "shard_points")
    attack = _attack(_expect(source.get("attack", {}), dict, "attack", "a table"))
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
    certifiers = None
    if "certifiers" in source:
        names = _expect(source["certifiers"], list, "certifiers", "a list of certifier names")
        for index, method in enumerate(names):
            if method not in certifier_names():
                raise _fail(
                    f"certifiers[{index}]",
                    f"unknown certifier {method!r} (known: {', '.join(certifier_names())})",
                )
        if len(set(names)) != len(names):
            raise _fail("certifiers", f"a certifier is named twice: {names}")
        certifiers = tuple(names)
    chosen = default_certifier_names() if certifiers is None else certifiers
    for key, spec in adaptations.items():
        method = None if spec.radius is None else spec.radius.method
        if method is not None and method != BEST and method not in chosen:
            raise _fail(
                f"adaptations.{key}.radius.method",
                f"certifier {method!r} is not among the study's certifiers ({', '.join(chosen)})",
            )
    plan = attack.autoattack
    study_names = {
        "tasks": [task.name for task in tasks],
        "encoders": list(encoders),
        "adaptations": list(adaptations),
    }
    for key, known in study_names.items():
        for name in () if plan is None else getattr(plan, key) or ():
            if name not in known:
                raise _fail(
                    f"attack.autoattack.{key}",
                    f"unknown {key[:-1]} {name!r} (the study's: {', '.join(known)})",
                )
    grid = {threat for task in tasks for threat in task.threats}
    for threat in () if plan is None else plan.threats or ():
        if threat not in grid:
            raise _fail(
                "attack.autoattack.threats",
                f"{threat} is in no task's threat grid: the plan would cover no unit",
            )
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
        certifiers=certifiers,
        cache_dir=cache_dir,
        shard_points=shard_points,
        source=dict(source),
    )


def load_config(path: str | Path) -> StudyConfig:
    """Read and check a TOML study file; relative paths inside are relative to it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        source = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text, as TOML must be: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{path} nests tables or arrays too deeply to read") from err
    return parse_config(source, base=path.resolve().parent)


def default_config_text() -> str:
    """The embedded default study (what ``robust-transfer demo`` runs)."""
    return resources.files("robust_transfer.study").joinpath("demo.toml").read_text()


def default_config() -> StudyConfig:
    return parse_config(tomllib.loads(default_config_text()))
