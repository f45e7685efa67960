"""The study's heads: each adaptation of each encoder trained once per unit (per threat
where the certified probe's radius depends on it) and stored with its fine-tuned encoder,
so that every process, and every rerun, reads the same weights."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from torch import nn

from ..certify import BEST
from ..core.errors import ConfigError
from ..core.schema import Array, Meta, StoreKind, per_method
from ..data.tasks import Split
from ..models import head_arrays, head_from_arrays
from ..models.features import extract_features, median_distance
from ..theory.losses import RegressionLoss
from ..training.adapt import adapt
from ..training.advice import measure_advice
from ..training.linear_probe import train_regression_probe
from ..training.protocols import PROBES, AdaptProtocol
from .encoders import Encoders
from .plan import Unit, threat_key
from .spec import AdaptationSpec, RadiusRule, StudyConfig, TaskKind
from .stored import StoredWork

# A fine-tuned encoder's weights are stored beside its head under this prefix.
_ENCODER_PREFIX = "encoder."

Adapted = tuple[nn.Module, nn.Linear, dict[str, object]]


@dataclass
class Heads:
    config: StudyConfig
    work: StoredWork
    encoders: Encoders

    def key(self, unit: Unit) -> tuple[str, ...]:
        spec = self.config.adaptations[unit.adaptation]
        key = (StoreKind.HEADS, unit.task.name, unit.encoder, unit.adaptation)
        return (*key, *threat_key(unit.threat)) if spec.per_threat else key

    def advice_key(self, unit: Unit) -> tuple[str, ...]:
        return (StoreKind.ADVICE, unit.task.name, unit.encoder, *threat_key(unit.threat))

    def needs_advice(self, unit: Unit) -> bool:
        """Whether the unit's head moves the encoder or trains against an attack: the
        advice on its encoder and threat comes first."""
        spec = self.config.adaptations[unit.adaptation]
        moves = spec.protocol not in PROBES
        return unit.task.kind is TaskKind.CLASSIFICATION and (moves or spec.adversarial)

    def advise(self, split: Split, unit: Unit) -> dict[str, object]:
        """The advice on the unit's encoder and threat, measured on training points only
        (before any head of the study is trained) and stored; read back if stored."""
        key = self.advice_key(unit)
        loaded = self.work.store.load(key)
        if loaded is not None:
            return loaded[1]
        base, _ = self.encoders.get(unit.encoder)
        features = self.work.train_features(unit.task.name, unit.encoder, base, split.train.x)
        start = time.perf_counter()
        advice = measure_advice(
            base,
            split.train,
            unit.threat,
            points=self.config.radius_points,
            attack_steps=self.config.attack.steps,
            seed=self.config.seed,
            features=features,
        )
        meta = advice.to_dict() | {Meta.SECONDS: time.perf_counter() - start}
        self.work.store.save(key, {}, meta)
        return meta

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
        x_train = split.train.x[: self.config.radius_points].to(self.work.runtime.device)
        if rule.rule is RadiusRule.CERTIFIED:
            certified, _ = self.work.certificates(
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
        shift = self.work.shift(StoreKind.TRAIN_SHIFT, task, variant, encoder, x_train, threat)
        radius = float(shift[Array.SHIFT].float().quantile(rule.quantile))
        how = f"quantile {rule.quantile:g} of the attacked shift"
        if rule.rule is RadiusRule.CERTIFIED:
            how += f" ({fallback})"
        return radius, how

    def get(self, split: Split, unit: Unit) -> Adapted:
        """The head (and fine-tuned encoder) of one adaptation, trained once and stored."""
        base, _ = self.encoders.get(unit.encoder)
        spec = self.config.adaptations[unit.adaptation]
        key = self.key(unit)
        device = self.work.runtime.device
        loaded = self.work.store.load(key)
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
        config = spec.config_for(radius, unit.threat)
        start = time.perf_counter()
        features = None
        if unit.task.kind is TaskKind.REGRESSION or spec.protocol is not AdaptProtocol.FINETUNE:
            features = self.work.train_features(unit.task.name, unit.encoder, base, split.train.x)
        if unit.task.kind is TaskKind.REGRESSION:
            if split.train.targets is None:
                raise ConfigError(f"task {unit.task.name!r} has no regression targets")
            assert features is not None
            head = train_regression_probe(
                features, split.train.targets, unit.task.loss or RegressionLoss.ABSOLUTE
            )
            encoder, metrics = base, {}
        else:
            progress = self.work.progress
            adapted = adapt(base, split.train, config, progress=progress, features=features)
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
        self.work.store.save(key, arrays, meta)
        return encoder.to(device).eval(), head.to(device).eval(), meta
