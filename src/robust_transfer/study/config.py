"""A study's configuration: read from TOML, checked whole before any work starts.

Every error names the key path (``encoders.adversarial.epochs``) and the reason, so a
typo costs a second, not a half-finished run.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from ..attacks.settings import AttackSettings, AutoAttackPlan
from ..certify import BEST
from ..core.checks import check_number, check_seed, parse_choice
from ..core.errors import ConfigError, RobustTransferError
from ..data.tasks import task_names
from ..models import resolve_spec, source_name
from ..theory.losses import RegressionLoss
from ..theory.threat import ThreatModel
from ..training.pretrain import PretrainConfig, PretrainProtocol
from ..training.protocols import AdaptConfig, AdaptProtocol
from .config_values import (
    LOAD_KEYS,
    check_name,
    checked,
    choice,
    converted,
    dataclass_from,
    expect,
    field_names,
    load_options,
    positive_int,
    threat_grid,
    unknown_keys,
)
from .spec import (
    AdaptationSpec,
    EncoderSpec,
    FieldError,
    Radius,
    RadiusRule,
    StudyConfig,
    TaskKind,
    TaskSpec,
    config_error,
)

_TOP = {
    "name",
    "seed",
    "eval_points",
    "radius_points",
    "shard_points",
    "curve_points",
    "train_points",
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


def _encoder(name: str, value: object, base: Path, seed: int) -> EncoderSpec:
    check_name(name, f"encoders.{name!r}")
    where = f"encoders.{name}"
    table = dict(expect(value, dict, where, "a table"))
    sources = _ENCODER_SOURCES & set(table)
    if len(sources) != 1:
        raise config_error(
            where, "give exactly one of 'protocol', 'spec', 'checkpoint' or 'factory'"
        )
    (key,) = sources
    if key != "protocol":
        unknown_keys(table, {key, *LOAD_KEYS}, where)
        spec = expect(table[key], str, f"{where}.{key}", "an encoder spec")
        options = load_options(table, base, where)
        if key == "checkpoint" and not spec.startswith("checkpoint:"):
            spec = f"checkpoint:{spec}"
        try:
            resolved = resolve_spec(spec, base)
            kind = source_name(resolved)
        except RobustTransferError as err:
            raise config_error(f"{where}.{key}", str(err)) from err
        if key != "spec" and kind != key:
            raise config_error(f"{where}.{key}", f"{spec!r} names a {kind}, not a {key}")
        return EncoderSpec(name=name, source=resolved, options=options)
    task = expect(table.pop("pretrain_task", None), str, f"{where}.pretrain_task", "a task name")
    if task not in task_names():
        raise config_error(
            f"{where}.pretrain_task",
            f"unknown task {task!r} (built in: {', '.join(task_names())})",
        )
    table.setdefault("seed", seed)
    table["protocol"] = choice(PretrainProtocol, table["protocol"], f"{where}.protocol")
    pretrain = dataclass_from(
        PretrainConfig, field_names(PretrainConfig), converted(table, where), where
    )
    return EncoderSpec(name=name, pretrain=pretrain, pretrain_task=task)


_RADIUS_KEYS = {"rule", "value", "method", "quantile"}


def _quantile(value: object, where: str) -> float:
    expect(value, (int, float), where, "a number")
    quantile: float = checked(
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
            raise config_error(f"{where}.radius_quantile", "give 'radius' or 'radius_quantile'")
        quantile = _quantile(shorthand, f"{where}.radius_quantile")
        return Radius(RadiusRule.CERTIFIED, quantile=quantile)
    if value is None:
        return Radius(RadiusRule.CERTIFIED)
    if not isinstance(value, dict):
        expect(value, (int, float), f"{where}.radius", "a number or a table")
        radius: float = checked(
            lambda v, name: check_number(v, name, inclusive=True), value, f"{where}.radius"
        )
        return Radius(RadiusRule.FIXED, value=radius)
    where = f"{where}.radius"
    unknown_keys(value, _RADIUS_KEYS, where)
    try:
        rule = parse_choice(RadiusRule, value.get("rule", ""), "radius rule")
    except ValueError as err:
        raise config_error(f"{where}.rule", str(err)) from err
    fixed = value.get("value")
    if fixed is not None:
        expect(fixed, (int, float), f"{where}.value", "a number")
    method = expect(value.get("method", BEST), str, f"{where}.method", "a certifier name")
    quantile = expect(value.get("quantile", 0.5), (int, float), f"{where}.quantile", "a number")
    try:
        return Radius(rule, value=fixed, method=method, quantile=quantile)
    except FieldError as err:
        raise config_error(f"{where}.{err.field}", err.reason) from err


def _adaptation(name: str, value: object, seed: int) -> AdaptationSpec:
    check_name(name, f"adaptations.{name!r}")
    where = f"adaptations.{name}"
    table = converted(expect(value, dict, where, "a table"), where)
    table.setdefault("seed", seed)
    table["protocol"] = choice(AdaptProtocol, table.get("protocol", ""), f"{where}.protocol")
    given = sorted({"radius", "radius_quantile"} & set(table))
    rule = _radius(table, where)
    if table["protocol"] is not AdaptProtocol.CERTIFIED_PROBE:
        if given:
            raise config_error(f"{where}.{given[0]}", "only the certified probe takes a radius")
        # An adversarial adaptation without a threat of its own gets each unit's.
        unit_threat = {"threat": ThreatModel("Linf", 0.1)} if "threat" not in table else {}
        adversarial = table.get("adversary", "none") != "none"
        dataclass_from(
            AdaptConfig,
            field_names(AdaptConfig),
            table | (unit_threat if adversarial else {}),
            where,
        )
        return AdaptationSpec(name=name, settings=table)
    # Checks the other settings; the rule sets the radius per threat model later.
    probe = rule.value if rule.rule is RadiusRule.FIXED else 0.0
    dataclass_from(AdaptConfig, field_names(AdaptConfig), table | {"radius": probe}, where)
    return AdaptationSpec(name=name, settings=table, radius=rule)


_DATA_KEYS = ("data", "test_data")


def _data_spec(value: object, where: str, base: Path) -> str | None:
    """A task's data spec, a file in it made absolute from ``base`` and checked."""
    if value is None:
        return None
    spec: str = expect(value, str, where, "a data set spec")
    if not spec.endswith((".npz", ".pt")):
        return spec
    path = base / spec
    if not path.is_file():
        raise config_error(where, f"no such file: {path}")
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
    table = expect(value, dict, where, "a table")
    unknown_keys(table, _TASK_KEYS, where)
    name = expect(table.get("name"), str, f"{where}.name", "a task name")
    check_name(name, f"{where}.name")
    try:
        kind = TaskKind(table.get("kind", "classification"))
    except ValueError as err:
        raise config_error(f"{where}.kind", "expected 'classification' or 'regression'") from err
    loss = None
    if kind is TaskKind.REGRESSION:
        try:
            loss = RegressionLoss.parse(table.get("loss", "absolute"))
        except ValueError as err:
            raise config_error(f"{where}.loss", str(err)) from err
    elif "loss" in table:
        raise config_error(f"{where}.loss", "only regression tasks take a loss")
    data, test_data = (_data_spec(table.get(key), f"{where}.{key}", base) for key in _DATA_KEYS)
    options = expect(table.get("data_options", {}), dict, f"{where}.data_options", "a table")
    if data is None:
        given = sorted({"test_data", "data_options"} & set(table))
        if given:
            raise config_error(f"{where}.{given[0]}", "give 'data' too (the training data)")
        if name not in task_names():
            raise config_error(
                f"{where}.name",
                f"unknown task {name!r} (built in: {', '.join(task_names())}; "
                "or give 'data' for your own)",
            )
    chosen = []
    for key, known in (("encoders", encoders), ("adaptations", adaptations)):
        names = tuple(expect(table.get(key, list(known)), list, f"{where}.{key}", "a list"))
        for index, item in enumerate(names):
            expect(item, str, f"{where}.{key}[{index}]", "a name")
        if not names:
            raise config_error(f"{where}.{key}", "empty list")
        chosen.append(names)
    if "threats" in table:
        threats = threat_grid(table["threats"], f"{where}.threats")
    elif default_threats is not None:
        threats = default_threats
    else:
        raise config_error(
            f"{where}.threats", "missing, and no top-level [threats] to fall back on"
        )
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
    table = expect(value, dict, where, "true, false or a table")
    unknown_keys(table, field_names(AutoAttackPlan), where)

    def names(key: str) -> tuple[str, ...] | None:
        listed = table.get(key)
        if listed is None:
            return None
        return tuple(
            expect(name, str, f"{where}.{key}", "a list of names")
            for name in expect(listed, list, f"{where}.{key}", "a list")
        )

    points = table.get("points")
    threats = table.get("threats")
    return AutoAttackPlan(
        points=None if points is None else positive_int(points, f"{where}.points"),
        tasks=names("tasks"),
        encoders=names("encoders"),
        adaptations=names("adaptations"),
        threats=None if threats is None else threat_grid(threats, f"{where}.threats"),
    )


def _attack(table: Mapping[str, Any]) -> AttackSettings:
    values = dict(table)
    if "autoattack" in values:
        values["autoattack"] = _autoattack_plan(values["autoattack"])
    settings: AttackSettings = dataclass_from(
        AttackSettings, field_names(AttackSettings), values, "attack"
    )
    return settings


def parse_config(source: Mapping[str, Any], *, base: Path | None = None) -> StudyConfig:
    """Check a study configuration (the parsed TOML) whole; paths are relative to ``base``."""
    base = Path.cwd() if base is None else base
    unknown_keys(source, _TOP, "")
    name = expect(source.get("name", "study"), str, "name", "a string")
    seed: int = checked(check_seed, source.get("seed", 0), "seed")
    eval_points = positive_int(source.get("eval_points", 500), "eval_points")
    radius_points = positive_int(source.get("radius_points", 200), "radius_points")
    shard_points = positive_int(source.get("shard_points", 256), "shard_points")
    curve_points = expect(source.get("curve_points", 9), int, "curve_points", "a number of eps")
    train_points = source.get("train_points")
    if train_points is not None:
        train_points = positive_int(train_points, "train_points")
    attack = _attack(expect(source.get("attack", {}), dict, "attack", "a table"))
    threats = threat_grid(source["threats"], "threats") if "threats" in source else None
    encoder_tables = expect(source.get("encoders"), dict, "encoders", "a table of encoders")
    encoders = {key: _encoder(key, value, base, seed) for key, value in encoder_tables.items()}
    adaptation_tables = expect(
        source.get("adaptations"), dict, "adaptations", "a table of adaptations"
    )
    adaptations = {key: _adaptation(key, value, seed) for key, value in adaptation_tables.items()}
    task_list = expect(source.get("tasks"), list, "tasks", "a list of [[tasks]]")
    if not task_list:
        raise config_error("tasks", "no task given")
    tasks = tuple(
        _task(index, value, encoders, adaptations, threats, base)
        for index, value in enumerate(task_list)
    )
    certifiers = None
    if "certifiers" in source:
        names = expect(source["certifiers"], list, "certifiers", "a list of certifier names")
        certifiers = tuple(
            expect(method, str, f"certifiers[{index}]", "a certifier name")
            for index, method in enumerate(names)
        )
    cache = source.get("cache_dir")
    cache_dir = None if cache is None else base / expect(cache, str, "cache_dir", "a path")
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
        curve_points=curve_points,
        train_points=train_points,
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
