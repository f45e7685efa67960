"""Runs a study: encoders -> heads -> attacks, certificates and bounds -> per-sample store.

Resumable: every unit of work (a measured shift, a certificate, a trained head, an
evaluation of one shard of points) lands in the store atomically as soon as it is done,
and a rerun skips what is there. Random starts are drawn per sample from the study's
seed, so the order of work, the batch size, the number of processes and any
interruption leave the results unchanged.

Evaluation streams: points are taken ``shard_points`` at a time, so memory follows the
shard, not the number of points. Under ``torchrun`` the process of rank 0 builds the
encoders and trains the heads, the shards are shared out among all processes, and rank 0
joins them into units.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..attacks.reference import refusal as autoattack_refusal
from ..bounds import weight_gap
from ..certify import BEST
from ..certify.lipschitz import proven_lipschitz
from ..checks import check_two_classes
from ..data.sources import load_split
from ..data.tasks import Split, get_task
from ..errors import ConfigError, SoundnessError
from ..expected import EncoderProfile, profile_encoder
from ..features import distance_ratio, extract_features, median_distance
from ..losses import RegressionLoss
from ..models import head_arrays, head_from_arrays, resolve_encoder
from ..runtime import Runtime
from ..schema import ENCODERS_DIR, STORE_DIR, Array, Arrays, Field, Meta, StoreKind, per_method
from ..store import Store
from ..threat import ThreatModel
from ..training.adapt import adapt, train_regression_probe
from ..training.pretrain import cached_pretrain
from .config import AdaptationSpec, EncoderSpec, RadiusRule, StudyConfig, TaskKind, TaskSpec
from .evaluate import attacked_shift, certified_shifts, evaluate_classification, evaluate_regression
from .records import soundness_violations

Log = Callable[[str], None]

# A fine-tuned encoder's weights are stored beside its head under this prefix.
_ENCODER_PREFIX = "encoder."
# The feature scale of a unit is the median distance among this many of its points.
_SCALE_POINTS = 1000


def _threat_key(threat: ThreatModel) -> tuple[str, str]:
    return threat.norm.value, f"{threat.eps:.8g}"


@dataclass(frozen=True)
class Unit:
    """One evaluation: a head of ``adaptation`` on ``encoder`` for ``task``, at ``threat``."""

    task: TaskSpec
    encoder: str
    adaptation: str
    threat: ThreatModel

    def key(self) -> tuple[str, ...]:
        return (
            StoreKind.UNITS,
            self.task.name,
            self.encoder,
            self.adaptation,
            *_threat_key(self.threat),
        )


@dataclass(frozen=True)
class Shard:
    """Evaluation points ``start`` to ``stop`` of a task: the piece of work a process
    takes, and what a kill loses at most."""

    index: int
    start: int
    stop: int

    def key(self) -> str:
        return f"shard{self.index:06d}"

    def ids(self) -> Tensor:
        return torch.arange(self.start, self.stop)


@dataclass
class _Encoders:
    """Encoders built on first use, then kept for the rest of the run."""

    config: StudyConfig
    cache_dir: Path
    info_dir: Path
    runtime: Runtime
    progress: bool
    log: Log
    built: dict[str, tuple[nn.Module, dict[str, object]]] = dataclasses.field(default_factory=dict)

    def get(self, name: str) -> tuple[nn.Module, dict[str, object]]:
        if name not in self.built:
            encoder, info = self._build(self.config.encoders[name])
            if self.runtime.rank == 0:
                atomic_write_text(
                    self.info_dir / f"{name}.json", json.dumps(info, indent=2, default=str)
                )
            self.built[name] = (encoder, info)
        return self.built[name]

    def info(self, name: str) -> dict[str, object]:
        """What is known of an encoder, also when a resumed run never had to build it."""
        path = self.info_dir / f"{name}.json"
        if name not in self.built and path.is_file():
            loaded: dict[str, object] = json.loads(path.read_text())
            return loaded
        return self.built[name][1] if name in self.built else {}

    def _build(self, spec: EncoderSpec) -> tuple[nn.Module, dict[str, object]]:
        info: dict[str, object] = {Meta.PRETRAINING: spec.pretraining}
        if spec.pretrain is not None and spec.pretrain_task is not None:
            self.log(f"encoder {spec.name}: {spec.pretrain.protocol.value} pretraining")
            pretrain = get_task(spec.pretrain_task).pretrain
            if pretrain is None:
                raise ConfigError(f"task {spec.pretrain_task!r} has no pretraining split")
            result = cached_pretrain(
                spec.pretrain,
                pretrain.train,
                self.cache_dir,
                runtime=self.runtime,
                progress=self.progress,
            )
            encoder: nn.Module = result.encoder
            info |= {
                Meta.PRETRAIN_TASK: spec.pretrain_task,
                Meta.PRETRAIN_CONFIG: spec.pretrain.to_dict(),
                Meta.PRETRAIN_METRICS: result.metrics,
                Meta.PRETRAIN_SECONDS: result.seconds,
            }
        else:
            loaded = resolve_encoder(str(spec.source), **spec.options)
            encoder = loaded.module
            info |= loaded.info
        info[Field.LIPSCHITZ_L2] = proven_lipschitz(encoder)
        return encoder.to(self.runtime.device).eval(), info


def _key(
    kind: StoreKind, task: str, variant: str, threat: ThreatModel, shard: Shard | None
) -> tuple[str, ...]:
    return (kind, task, variant, *_threat_key(threat), *([] if shard is None else [shard.key()]))


def _silent(_: str) -> None:
    return None


def _variant(unit: Unit, head_meta: dict[str, object]) -> str:
    """The name of the encoder a unit evaluates: its own when the head was put on the
    shared encoder, one per adaptation when that fine-tuned it."""
    return f"{unit.encoder}+{unit.adaptation}" if head_meta.get(Meta.FINE_TUNED) else unit.encoder


def _seconds(meta: dict[str, object]) -> float:
    value = meta.get(Meta.SECONDS, 0.0)
    return float(value) if isinstance(value, int | float) else 0.0


def _downstream(task: TaskSpec) -> Split:
    if task.data is None:
        return get_task(task.name).downstream
    return load_split(task.data, task.test_data, **task.data_options)


@dataclass
class StudyRun:
    """One run of a study into ``out``; :meth:`run` returns every unit's stored arrays."""

    config: StudyConfig
    out: Path
    cache_dir: Path
    runtime: Runtime
    progress: bool = True
    log: Log = print

    def __post_init__(self) -> None:
        self.store = Store(self.out / STORE_DIR)
        self.encoders = _Encoders(
            self.config,
            self.cache_dir,
            self.out / ENCODERS_DIR,
            self.runtime,
            self.progress,
            self.log if self.runtime.rank == 0 else _silent,
        )
        self._splits: dict[str, Split] = {}
        # Work comes grouped by (task, encoder, shard): what the group's units share (the
        # profile, the adapted models) is kept until the group changes.
        self._group: tuple[str, str, int] | None = None
        self._profiles: dict[str, EncoderProfile] = {}
        self._models: dict[tuple[str, ...], tuple[nn.Module, nn.Linear, dict[str, object]]] = {}
        self._prepared: dict[str, nn.Module] = {}

    def units(self) -> Iterator[Unit]:
        for task in self.config.tasks:
            for encoder in task.encoders:
                for adaptation in task.adaptations:
                    for threat in task.threats:
                        yield Unit(task, encoder, adaptation, threat)

    def run(self) -> list[tuple[Unit, Arrays, dict[str, object]]]:
        """Every unit's arrays and metadata, computed where missing. Each process of a
        ``torchrun`` launch calls it; all return the same."""
        units = list(self.units())
        todo = [unit for unit in units if not self.store.has(unit.key())]
        if self.runtime.rank == 0:
            self.log(
                f"{len(units)} evaluation units, {len(units) - len(todo)} already in "
                f"{self.store.root}"
            )
        self.runtime.together(lambda: self._prepare(todo))
        work = self.runtime.together(lambda: self._mine(todo))
        self.runtime.together(lambda: self._evaluate_all(work))
        self.runtime.together(lambda: self._join(todo))
        results = []
        for unit in units:
            loaded = self.store.load(unit.key())
            if loaded is None:
                raise RuntimeError(f"unit {unit.key()} is missing after the run")
            results.append((unit, *loaded))
        return results

    def check_data(self) -> None:
        """Load every task's data and refuse what no unit could use, before any work:
        a classification task needs two classes among its training points (on one
        class every head is always right), a regression task its targets."""
        for task in self.config.tasks:
            split = self._split(task)
            if task.kind is TaskKind.REGRESSION:
                if split.train.targets is None:
                    raise ConfigError(f"task {task.name!r} has no regression targets")
            else:
                check_two_classes(split.train.y, f"the training labels of task {task.name!r}")

    def encoder_info(self) -> dict[str, dict[str, object]]:
        used = dict.fromkeys(name for task in self.config.tasks for name in task.encoders)
        return {name: self.encoders.info(name) for name in used}

    def _split(self, task: TaskSpec) -> Split:
        if task.name not in self._splits:
            self._splits[task.name] = split = _downstream(task)
            if len(split.test) < self.config.eval_points and self.runtime.rank == 0:
                self.log(
                    f"task {task.name}: {len(split.test)} held-out points, fewer "
                    f"than eval_points = {self.config.eval_points}: evaluating all"
                )
        return self._splits[task.name]

    def _shards(self, task: TaskSpec) -> list[Shard]:
        n = min(self.config.eval_points, len(self._split(task).test))
        size = self.config.shard_points
        return [
            Shard(index, start, min(start + size, n))
            for index, start in enumerate(range(0, n, size))
        ]

    def _groups(self, units: list[Unit]) -> list[list[tuple[Unit, Shard]]]:
        """The work on ``units``, grouped by (task, encoder, shard): a group is what one
        process does, as its units share the encoder's profile of those points."""
        groups: dict[tuple[str, str, int], list[tuple[Unit, Shard]]] = {}
        for unit in units:
            for shard in self._shards(unit.task):
                key = (unit.task.name, unit.encoder, shard.index)
                groups.setdefault(key, []).append((unit, shard))
        return list(groups.values())

    def _mine(self, todo: list[Unit]) -> list[tuple[Unit, Shard]]:
        """This process's share of the work on ``todo``: whole groups, less what is done."""
        return [
            (unit, shard)
            for index, members in enumerate(self._groups(todo))
            if self.runtime.mine(index)
            for unit, shard in members
            if not self.store.has(self._shard_key(unit, shard))
        ]

    def _shard_key(self, unit: Unit, shard: Shard) -> tuple[str, ...]:
        return (StoreKind.UNIT_SHARDS, *unit.key()[1:], shard.key())

    def _prepare(self, todo: list[Unit]) -> None:
        """Rank 0 builds the encoders (pretraining into the cache) and trains the heads
        that every process then reads."""
        if self.runtime.rank != 0:
            return
        for unit in tqdm(todo, desc="heads", unit="unit", disable=not self.progress):
            self._adapted(self._split(unit.task), unit)

    def _evaluate_all(self, work: list[tuple[Unit, Shard]]) -> None:
        with tqdm(total=len(work), desc="study", unit="shard", disable=not self.progress) as bar:
            for unit, shard in work:
                bar.set_postfix_str(
                    f"{unit.task.name} {unit.encoder} {unit.adaptation} {unit.threat} "
                    f"points {shard.start}-{shard.stop}"
                )
                self._evaluate(unit, shard)
                bar.update()

    def _join(self, units: list[Unit]) -> None:
        """Rank 0 joins each unit's shards into the unit (what records and the report
        read)."""
        if self.runtime.rank == 0:
            for unit in units:
                self._join_unit(unit)

    def _join_unit(self, unit: Unit) -> None:
        parts = []
        for shard in self._shards(unit.task):
            loaded = self.store.load(self._shard_key(unit, shard))
            if loaded is None:
                raise RuntimeError(f"shard {self._shard_key(unit, shard)} is missing")
            parts.append(loaded)
        # A certifier may refuse the points of one shard only (its decomposition is checked
        # on them): it is then refused for the unit, whose arrays are those every shard has.
        names = set.intersection(*(set(arrays) for arrays, _ in parts))
        arrays = {name: torch.cat([part[0][name] for part in parts]) for name in sorted(names)}
        refused: dict[str, object] = {}
        for _, shard_meta in parts:
            reasons = shard_meta.get(Meta.REFUSED)
            refused |= reasons if isinstance(reasons, dict) else {}
        head = parts[0][1].get(Meta.HEAD)
        variant = _variant(unit, head if isinstance(head, dict) else {})
        features = self._features(unit, variant)
        # The first evaluation points, in the order their shards stored the features.
        inputs = self._split(unit.task).test.x[: len(features)]
        meta = parts[0][1] | {
            Meta.REFUSED: refused,
            Meta.SECONDS: sum(_seconds(meta) for _, meta in parts),
            Meta.FEATURE_SCALE: median_distance(features),
            Meta.DISTANCE_RATIO: distance_ratio(inputs, features),
        }
        self.store.save(unit.key(), arrays, meta)

    def _features(self, unit: Unit, variant: str) -> Tensor:
        """The clean features of the unit's first evaluation points (at most
        ``_SCALE_POINTS``), as the representation attack stored them."""
        parts, count = [], 0
        for shard in self._shards(unit.task):
            if count >= _SCALE_POINTS:
                break
            key = (StoreKind.SHIFT, unit.task.name, variant, *_threat_key(unit.threat))
            loaded = self.store.load((*key, shard.key()))
            if loaded is None:
                raise RuntimeError(f"shift {key} of {shard.key()} is missing")
            parts.append(loaded[0][Array.FEATURES])
            count += len(parts[-1])
        return torch.cat(parts)[:_SCALE_POINTS]

    def _eval_points(self, split: Split, shard: Shard) -> tuple[Tensor, Tensor, Tensor | None]:
        test, part = split.test, slice(shard.start, shard.stop)
        device = self.runtime.device
        targets = None if test.targets is None else test.targets[part].to(device)
        return test.x[part].to(device), test.y[part].to(device), targets

    def _train_points(self, split: Split) -> Tensor:
        return split.train.x[: self.config.radius_points].to(self.runtime.device)

    def _stored(
        self,
        key: tuple[str, ...],
        compute: Callable[[], tuple[Arrays, dict[str, object]]],
    ) -> tuple[Arrays, dict[str, object]]:
        """The arrays and metadata stored under ``key``, computed and stored if missing."""
        loaded = self.store.load(key)
        if loaded is None:
            start = time.perf_counter()
            arrays, meta = compute()
            meta = meta | {Meta.SECONDS: time.perf_counter() - start}
            self.store.save(key, arrays, meta)
            loaded = arrays, meta
        arrays, meta = loaded
        return {name: value.to(self.runtime.device) for name, value in arrays.items()}, meta

    def _shift(
        self,
        kind: StoreKind,
        task: str,
        variant: str,
        encoder: nn.Module,
        x: Tensor,
        threat: ThreatModel,
        shard: Shard | None = None,
    ) -> Arrays:
        """The representation attack on ``x`` (the points of ``shard``, when given), once
        per (points, encoder, threat)."""

        def compute() -> tuple[Arrays, dict[str, object]]:
            with self.runtime.search_precision():
                arrays = attacked_shift(
                    encoder,
                    x,
                    threat,
                    self.config.attack,
                    seed=self.config.seed,
                    sample_ids=None if shard is None else shard.ids(),
                    progress=self.progress,
                )
            return arrays, {}

        return self._stored(_key(kind, task, variant, threat, shard), compute)[0]

    def _certificates(
        self,
        kind: StoreKind,
        task: str,
        variant: str,
        encoder: nn.Module,
        x: Tensor,
        threat: ThreatModel,
        shard: Shard | None = None,
    ) -> tuple[Arrays, dict[str, object]]:
        """Every chosen certifier's bound on ``x``, once per (points, encoder, threat), and
        the reasons of those that gave none."""

        def compute() -> tuple[Arrays, dict[str, object]]:
            arrays, refused = certified_shifts(encoder, x, threat, self.config.certifiers)
            return arrays, {Meta.REFUSED: refused}

        return self._stored(_key(kind, task, variant, threat, shard), compute)

    def _profile(self, variant: str, encoder: nn.Module, x: Tensor) -> EncoderProfile:
        """The encoder's profile on the shard's points, shared by the units of the shard
        (recomputed per run: its Jacobian costs one backward pass per feature)."""
        if variant not in self._profiles:
            self._profiles[variant] = profile_encoder(
                encoder, x, batch_size=self.config.attack.batch_size
            )
        return self._profiles[variant]

    def _radius(
        self, spec: AdaptationSpec, unit: Unit, encoder: nn.Module, split: Split
    ) -> tuple[float, str]:
        """The certified probe's feature radius for the unit's threat, by the spec's rule,
        from training points only (never the evaluation points); and how it was set."""
        rule = spec.radius
        assert rule is not None  # the config gives every certified probe a rule
        if rule.rule is RadiusRule.FIXED:
            assert rule.value is not None
            return rule.value, RadiusRule.FIXED.value
        task, variant, threat = unit.task.name, unit.encoder, unit.threat
        x_train = self._train_points(split)
        if rule.rule is RadiusRule.CERTIFIED:
            certified, _ = self._certificates(
                StoreKind.TRAIN_CERTIFICATES, task, variant, encoder, x_train, threat
            )
            name = (
                Array.CERTIFIED_SHIFT
                if rule.method == BEST
                else per_method(Array.CERTIFIED_SHIFT, rule.method)
            )
            if name in certified:
                radius = float(certified[name].max())
                scale = median_distance(extract_features(encoder, x_train))
                if radius <= scale:
                    return radius, f"certified ({rule.method})"
                fallback = (
                    f"the {rule.method} certificate, {radius:.3g}, exceeds the median "
                    f"feature distance {scale:.3g} and would certify nothing"
                )
            else:
                fallback = f"no {rule.method} certificate for this encoder"
        shift = self._shift(StoreKind.TRAIN_SHIFT, task, variant, encoder, x_train, threat)
        radius = float(shift[Array.SHIFT].float().quantile(rule.quantile))
        how = f"quantile {rule.quantile:g} of the attacked shift"
        if rule.rule is RadiusRule.CERTIFIED:
            how += f" ({fallback})"
        return radius, how

    def _adapted(self, split: Split, unit: Unit) -> tuple[nn.Module, nn.Linear, dict[str, object]]:
        """The head (and fine-tuned encoder) of one adaptation, trained once and stored."""
        base, _ = self.encoders.get(unit.encoder)
        spec = self.config.adaptations[unit.adaptation]
        key = self._head_key(unit)
        device = self.runtime.device
        loaded = self.store.load(key)
        if loaded is not None:
            arrays, stored_meta = loaded
            head = head_from_arrays(arrays, f"stored head {key}")
            encoder = base
            if stored_meta.get(Meta.FINE_TUNED):
                encoder = copy.deepcopy(base)
                encoder.load_state_dict(
                    {
                        k.removeprefix(_ENCODER_PREFIX): v
                        for k, v in arrays.items()
                        if k.startswith(_ENCODER_PREFIX)
                    }
                )
            return encoder.to(device).eval(), head.to(device), stored_meta
        meta: dict[str, object] = {}
        radius = None
        if spec.radius is not None:
            radius, how = self._radius(spec, unit, base, split)
            meta |= {Meta.RADIUS: radius, Meta.RADIUS_RULE: how}
        config = spec.config_for(radius)
        start = time.perf_counter()
        if unit.task.kind is TaskKind.REGRESSION:
            if split.train.targets is None:
                raise ConfigError(f"task {unit.task.name!r} has no regression targets")
            features = extract_features(base, split.train.x, progress=self.progress)
            head = train_regression_probe(
                features, split.train.targets, unit.task.loss or RegressionLoss.ABSOLUTE
            )
            encoder, metrics = base, {}
        else:
            adapted = adapt(base, split.train, config, progress=self.progress)
            head, encoder, metrics = adapted.head, adapted.encoder, dict(adapted.metrics)
        meta |= {
            Meta.METRICS: metrics,
            Meta.SECONDS: time.perf_counter() - start,
            Meta.FINE_TUNED: encoder is not base,
            Meta.CONFIG: config.to_dict(),
        }
        arrays = head_arrays(head)
        if encoder is not base:
            arrays |= {_ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()}
        self.store.save(key, arrays, meta)
        return encoder.to(device).eval(), head.to(device).eval(), meta

    def _head_key(self, unit: Unit) -> tuple[str, ...]:
        spec = self.config.adaptations[unit.adaptation]
        key = (StoreKind.HEADS, unit.task.name, unit.encoder, unit.adaptation)
        if spec.radius is not None and spec.radius.rule is not RadiusRule.FIXED:
            return (*key, *_threat_key(unit.threat))
        return key

    def _model(self, unit: Unit) -> tuple[nn.Module, nn.Linear, dict[str, object]]:
        """The unit's encoder (prepared by the runtime: compiled when asked), head and
        the head's metadata, read from the store once per run."""
        key = self._head_key(unit)
        if key not in self._models:
            encoder, head, meta = self._adapted(self._split(unit.task), unit)
            if meta.get(Meta.FINE_TUNED):
                encoder = self.runtime.prepared(encoder)
            else:
                if unit.encoder not in self._prepared:
                    self._prepared[unit.encoder] = self.runtime.prepared(encoder)
                encoder = self._prepared[unit.encoder]
            self._models[key] = encoder, head, meta
        return self._models[key]

    def _autoattack_rows(self, unit: Unit, ids: Tensor, y: Tensor) -> Tensor | None:
        """The points of the unit's AutoAttack subset, if the plan covers it and its head
        has the classes AutoAttack's targeted attacks need."""
        plan = self.config.attack.autoattack
        if plan is None or not plan.covers(
            unit.task.name, unit.encoder, unit.adaptation, unit.threat
        ):
            return None
        test = self._split(unit.task).test
        refused = autoattack_refusal(test.image_shape, len(test.classes), unit.threat)
        if refused is not None:
            self.log(f"{unit.task.name} at {unit.threat}: {refused}; not run")
            return None
        return plan.rows(ids).to(y.device)

    def _evaluate(self, unit: Unit, shard: Shard) -> None:
        group = (unit.task.name, unit.encoder, shard.index)
        if self._group is None or group[:2] != self._group[:2]:
            # Another encoder or task: its models are not needed again.
            self._models, self._prepared = {}, {}
        if group != self._group:
            self._group, self._profiles = group, {}
        split = self._split(unit.task)
        x, y, targets = self._eval_points(split, shard)
        encoder, head, head_meta = self._model(unit)
        variant = _variant(unit, head_meta)
        task, threat = unit.task, unit.threat
        shift = self._shift(StoreKind.SHIFT, task.name, variant, encoder, x, threat, shard)
        certified, certified_meta = self._certificates(
            StoreKind.CERTIFICATES, task.name, variant, encoder, x, threat, shard
        )
        shift |= certified
        start = time.perf_counter()
        settings, seed, ids = self.config.attack, self.config.seed, shard.ids()
        if task.kind is TaskKind.REGRESSION:
            if targets is None:
                raise ConfigError(f"task {task.name!r} has no regression targets")
            loss = task.loss or RegressionLoss.ABSOLUTE
            with self.runtime.search_precision():
                arrays = evaluate_regression(
                    encoder,
                    head,
                    x,
                    targets,
                    loss,
                    threat,
                    shift,
                    settings,
                    seed=seed,
                    sample_ids=ids,
                )
        else:
            profile = self._profile(variant, encoder, x)
            with self.runtime.search_precision():
                arrays = evaluate_classification(
                    encoder,
                    head,
                    x,
                    y,
                    threat,
                    shift,
                    settings,
                    seed=seed,
                    sample_ids=ids,
                    profile=profile,
                    autoattack_rows=self._autoattack_rows(unit, ids, y),
                    # A study that pays for CROWN's own intermediate bounds gets them
                    # on every head's margins too.
                    margin_intermediate=(
                        "crown" if "crown-full" in (self.config.certifiers or ()) else "ibp"
                    ),
                )
        violations = soundness_violations(arrays)
        if violations:
            raise SoundnessError(
                f"unsound certificate in {task.name} / {unit.encoder} / {unit.adaptation} / "
                f"{threat}, points {shard.start}-{shard.stop}: {'; '.join(violations)}. A "
                "certified bound that an attack beats is a bug in the certifier, not noise. "
                "This shard was not stored, but the certificates were: after fixing the "
                "certifier, rerun into a new --out folder"
            )
        meta: dict[str, object] = {
            Meta.SECONDS: time.perf_counter() - start,
            Meta.WEIGHT_GAP: float(weight_gap(head)),
            Meta.HEAD: {k: v for k, v in head_meta.items() if k != Meta.CONFIG},
            Meta.ADAPTATION_CONFIG: head_meta.get(Meta.CONFIG),
            Meta.REFUSED: certified_meta.get(Meta.REFUSED, {}),
        }
        self.store.save(self._shard_key(unit, shard), arrays, meta)
