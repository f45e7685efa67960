"""Runs a study: encoders -> heads -> attacks, certificates and bounds -> per-sample store.

Resumable: every unit of work (a measured shift, a certificate, a trained head, an
evaluation) lands in the store atomically as soon as it is done, and a rerun skips what
is there. Random starts are drawn per sample from the study's seed, so the order of
work, the batch size and any interruption leave the results unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..bounds import weight_gap
from ..certify import BEST
from ..certify.lipschitz import proven_lipschitz
from ..data.sources import load_split
from ..data.tasks import Split, get_task
from ..errors import ConfigError
from ..expected import EncoderProfile, profile_encoder
from ..features import extract_features, median_distance
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

Log = Callable[[str], None]

# A fine-tuned encoder's weights are stored beside its head under this prefix.
_ENCODER_PREFIX = "encoder."


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
        # Units come grouped by (task, encoder variant): one profile in memory suffices.
        self._profiled: tuple[tuple[str, str], EncoderProfile] | None = None
        self.encoders = _Encoders(
            self.config,
            self.cache_dir,
            self.out / ENCODERS_DIR,
            self.runtime,
            self.progress,
            self.log,
        )

    def units(self) -> Iterator[Unit]:
        for task in self.config.tasks:
            for encoder in task.encoders:
                for adaptation in task.adaptations:
                    for threat in task.threats:
                        yield Unit(task, encoder, adaptation, threat)

    def run(self) -> list[tuple[Unit, Arrays, dict[str, object]]]:
        todo = [unit for unit in self.units() if not self.store.has(unit.key())]
        total = sum(1 for _ in self.units())
        self.log(f"{total} evaluation units, {total - len(todo)} already in {self.store.root}")
        splits: dict[str, Split] = {}
        with tqdm(total=len(todo), desc="study", unit="unit", disable=not self.progress) as bar:
            for unit in todo:
                if unit.task.name not in splits:
                    splits[unit.task.name] = split = _downstream(unit.task)
                    if len(split.test) < self.config.eval_points:
                        self.log(
                            f"task {unit.task.name}: {len(split.test)} held-out points, fewer "
                            f"than eval_points = {self.config.eval_points}: evaluating all"
                        )
                bar.set_postfix_str(
                    f"{unit.task.name} {unit.encoder} {unit.adaptation} {unit.threat}"
                )
                self._evaluate(splits[unit.task.name], unit)
                bar.update()
        results = []
        for unit in self.units():
            loaded = self.store.load(unit.key())
            if loaded is None:
                raise RuntimeError(f"unit {unit.key()} is missing after the run")
            results.append((unit, *loaded))
        return results

    def encoder_info(self) -> dict[str, dict[str, object]]:
        used = dict.fromkeys(name for task in self.config.tasks for name in task.encoders)
        return {name: self.encoders.info(name) for name in used}

    def _eval_points(self, split: Split) -> tuple[Tensor, Tensor, Tensor | None]:
        test = split.test
        n = min(self.config.eval_points, len(test))
        device = self.runtime.device
        targets = None if test.targets is None else test.targets[:n].to(device)
        return test.x[:n].to(device), test.y[:n].to(device), targets

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
    ) -> Arrays:
        """The representation attack on ``x``, once per (points, encoder, threat)."""

        def compute() -> tuple[Arrays, dict[str, object]]:
            arrays = attacked_shift(
                encoder,
                x,
                threat,
                self.config.attack,
                seed=self.config.seed,
                progress=self.progress,
            )
            return arrays, {}

        return self._stored((kind, task, variant, *_threat_key(threat)), compute)[0]

    def _certificates(
        self,
        kind: StoreKind,
        task: str,
        variant: str,
        encoder: nn.Module,
        x: Tensor,
        threat: ThreatModel,
    ) -> tuple[Arrays, dict[str, object]]:
        """Every chosen certifier's bound on ``x``, once per (points, encoder, threat), and
        the reasons of those that gave none."""

        def compute() -> tuple[Arrays, dict[str, object]]:
            arrays, refused = certified_shifts(encoder, x, threat, self.config.certifiers)
            return arrays, {Meta.REFUSED: refused}

        return self._stored((kind, task, variant, *_threat_key(threat)), compute)

    def _profile(
        self, task: str, variant: str, encoder: nn.Module, x: Tensor, threat: ThreatModel
    ) -> EncoderProfile:
        """The encoder's profile on ``x`` (recomputed per run: its Jacobian costs one
        backward pass per feature) with the stored curvature factor of ``threat``."""
        if self._profiled is None or self._profiled[0] != (task, variant):
            profile = profile_encoder(encoder, x, batch_size=self.config.attack.batch_size)
            self._profiled = ((task, variant), profile)
        profile = self._profiled[1]

        def compute() -> tuple[Arrays, dict[str, object]]:
            return {Array.CURVATURE: profile.curvature_factor(threat)}, {}

        key = (StoreKind.CURVATURE, task, variant, *_threat_key(threat))
        profile.curvature[threat] = self._stored(key, compute)[0][Array.CURVATURE]
        return profile

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
        per_threat = spec.radius is not None and spec.radius.rule is not RadiusRule.FIXED
        key: tuple[str, ...] = (StoreKind.HEADS, unit.task.name, unit.encoder, unit.adaptation)
        if per_threat:
            key = (*key, *_threat_key(unit.threat))
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

    def _evaluate(self, split: Split, unit: Unit) -> None:
        x, y, targets = self._eval_points(split)
        encoder, head, head_meta = self._adapted(split, unit)
        variant = (
            unit.encoder
            if not head_meta.get(Meta.FINE_TUNED)
            else f"{unit.encoder}+{unit.adaptation}"
        )
        task, threat = unit.task, unit.threat
        shift = self._shift(StoreKind.SHIFT, task.name, variant, encoder, x, threat)
        certified, certified_meta = self._certificates(
            StoreKind.CERTIFICATES, task.name, variant, encoder, x, threat
        )
        shift |= certified
        start = time.perf_counter()
        settings, seed = self.config.attack, self.config.seed
        if task.kind is TaskKind.REGRESSION:
            if targets is None:
                raise ConfigError(f"task {task.name!r} has no regression targets")
            loss = task.loss or RegressionLoss.ABSOLUTE
            arrays = evaluate_regression(
                encoder, head, x, targets, loss, threat, shift, settings, seed=seed
            )
        else:
            profile = self._profile(task.name, variant, encoder, x, threat)
            arrays = evaluate_classification(
                encoder, head, x, y, threat, shift, settings, seed=seed, profile=profile
            )
        meta: dict[str, object] = {
            Meta.SECONDS: time.perf_counter() - start,
            Meta.WEIGHT_GAP: float(weight_gap(head)),
            Meta.HEAD: {k: v for k, v in head_meta.items() if k != Meta.CONFIG},
            Meta.ADAPTATION_CONFIG: head_meta.get(Meta.CONFIG),
            Meta.REFUSED: certified_meta.get(Meta.REFUSED, {}),
            Meta.FEATURE_SCALE: median_distance(shift[Array.FEATURES]),
        }
        self.store.save(unit.key(), arrays, meta)
