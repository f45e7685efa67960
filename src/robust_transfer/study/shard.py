"""The evaluation of one unit on one shard of points: the encoder's measurements of those
points (shared by the shard's units), the head's estimates, certificates and attacks, and
the soundness check before anything is stored."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..attacks.reference import refusal as autoattack_refusal
from ..certify import split_certifiers
from ..core.errors import ConfigError, SoundnessError
from ..core.schema import Meta, StoreKind
from ..data.tasks import Split
from ..estimates.evaluate import evaluate_classification, evaluate_regression
from ..estimates.expected import EncoderProfile, profile_encoder
from ..estimates.records import soundness_violations
from ..theory.bounds import weight_gap
from ..theory.losses import RegressionLoss
from .heads import Adapted, Heads
from .plan import Shard, Unit, shard_key, variant
from .spec import TaskKind

Log = Callable[[str], None]


@dataclass
class ShardEvaluator:
    """Evaluates (unit, shard) pairs in the order of the plan's groups (task, encoder,
    shard): what a group's units share (the profile, the adapted models) is kept until
    the group changes."""

    heads: Heads
    log: Log
    _group: tuple[str, str, int] | None = None
    _profiles: dict[str, EncoderProfile] = field(default_factory=dict)
    _models: dict[tuple[str, ...], Adapted] = field(default_factory=dict)
    _prepared: dict[str, nn.Module] = field(default_factory=dict)

    def evaluate(self, unit: Unit, shard: Shard, split: Split) -> None:
        group = (unit.task.name, unit.encoder, shard.index)
        if self._group is None or group[:2] != self._group[:2]:
            # Another encoder or task: its models are not needed again.
            self._models, self._prepared = {}, {}
        if group != self._group:
            self._group, self._profiles = group, {}
        test, part, device = (
            split.test,
            slice(shard.start, shard.stop),
            self.heads.work.runtime.device,
        )
        x, y = test.x[part].to(device), test.y[part].to(device)
        targets = None if test.targets is None else test.targets[part].to(device)
        work = self.heads.work
        encoder, head, head_meta = self._model(unit, split)
        name = variant(unit, head_meta)
        task, threat = unit.task, unit.threat
        shift = work.shift(StoreKind.SHIFT, task.name, name, encoder, x, threat, shard)
        certified, certified_meta = work.certificates(
            StoreKind.CERTIFICATES, task.name, name, encoder, x, threat, shard
        )
        shift |= certified
        start = time.perf_counter()
        config = self.heads.config
        settings, seed, ids = work.settings(encoder, x), config.seed, shard.ids()
        if task.kind is TaskKind.REGRESSION:
            if targets is None:
                raise ConfigError(f"task {task.name!r} has no regression targets")
            loss = task.loss or RegressionLoss.ABSOLUTE
            with work.runtime.search_precision():
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
            # A head trained per threat model fine-tuned an encoder per threat model: the
            # profile belongs to the head's key, not to the variant's name.
            fine_tuned = bool(head_meta.get(Meta.FINE_TUNED))
            profile = self._profile(
                "/".join(self.heads.key(unit)) if fine_tuned else name, encoder, x
            )
            with work.runtime.search_precision():
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
                    autoattack_rows=self._autoattack_rows(unit, split, ids, y),
                    curve_points=config.curve_points_of(task, threat),
                    head_certifier=split_certifiers(config.certifiers)[1],
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
        work.store.save(shard_key(unit, shard), arrays, meta)

    def _profile(self, key: str, encoder: nn.Module, x: Tensor) -> EncoderProfile:
        """The encoder's profile on the shard's points, shared by the units of the shard
        on that encoder (recomputed per run: its Jacobian costs one backward pass per
        feature)."""
        if key not in self._profiles:
            batch = self.heads.work.settings(encoder, x).batch_size
            self._profiles[key] = profile_encoder(encoder, x, batch_size=batch)
        return self._profiles[key]

    def _model(self, unit: Unit, split: Split) -> Adapted:
        """The unit's encoder (prepared by the runtime: compiled when asked), head and
        the head's metadata, read from the store once per run."""
        key = self.heads.key(unit)
        if key not in self._models:
            encoder, head, meta = self.heads.get(split, unit)
            if meta.get(Meta.FINE_TUNED):
                encoder = self.heads.work.runtime.prepared(encoder)
            else:
                if unit.encoder not in self._prepared:
                    self._prepared[unit.encoder] = self.heads.work.runtime.prepared(encoder)
                encoder = self._prepared[unit.encoder]
            self._models[key] = encoder, head, meta
        return self._models[key]

    def _autoattack_rows(self, unit: Unit, split: Split, ids: Tensor, y: Tensor) -> Tensor | None:
        """The points of the unit's AutoAttack subset, if the plan covers it and its head
        has the classes AutoAttack's targeted attacks need."""
        plan = self.heads.config.attack.autoattack
        if plan is None or not plan.covers(
            unit.task.name, unit.encoder, unit.adaptation, unit.threat
        ):
            return None
        test = split.test
        refused = autoattack_refusal(test.image_shape, len(test.classes), unit.threat)
        if refused is not None:
            self.log(f"{unit.task.name} at {unit.threat}: {refused}; not run")
            return None
        return plan.rows(ids).to(y.device)
