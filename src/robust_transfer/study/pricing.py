"""Prices a study (:class:`~.forecast.Forecast`) without running it: the sizes of its
tasks, the passes of each stage (:mod:`.cost`) and a short calibration of each encoder
on this machine (:mod:`.calibration`).

Nothing is pretrained or stored: an encoder that a study would pretrain is timed as its
untrained architecture (what it costs does not depend on its weights), or read from the
cache when it is there, and then costs nothing to pretrain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attacks.reference import refusal as autoattack_refusal
from ..certify import BEST, default_certifier_names, split_certifiers
from ..certify.crown import CHUNK_ELEMENTS
from ..core.errors import DataError, MissingFileError, RobustTransferError
from ..core.runtime import Runtime
from ..core.schema import STORE_DIR
from ..core.store import Store
from ..data.tasks import Split, get_task
from ..data.torchvision_sets import SIZES
from ..estimates.curves import RINGS
from ..estimates.expected import RefineSettings, full_jacobian
from ..models import build_encoder, load_checkpoint, resolve_encoder
from ..theory.threat import ThreatModel
from ..training.adapt import MOVEMENT_POINTS
from ..training.pretrain import cache_path
from ..training.protocols import PROBES, AdaptProtocol
from . import cost
from .calibration import Calibration, calibrate, resident_bytes
from .cost import Passes
from .forecast import Forecast, Ledger, Stage
from .pilot import Pilot, maybe_pilot, note, prior_passes
from .plan import Unit, shards, units
from .runner import downstream_split
from .spec import EncoderSpec, RadiusRule, StudyConfig, TaskKind, TaskSpec

_FLOAT = 4
# Seconds per unit that no stage prices: reading and writing the store, joining shards,
# records and the report (measured on the default study: 61 s over 150 units).
_UNIT_OVERHEAD = 0.4
# Points of a task the calibration runs on.
_CALIBRATION_POINTS = 8


def _encoder(
    spec: EncoderSpec, config: StudyConfig, cache_dir: Path, stand_in: str | None
) -> tuple[nn.Module, Passes, int]:
    """The encoder to time, and the passes and points of its pretraining (none when
    cached or not pretrained here)."""
    if stand_in is not None:
        # The stand-in sees the inputs the encoder would: resized where it resizes.
        resize = {key: value for key, value in spec.options.items() if key == "resize"}
        return resolve_encoder(stand_in, seed=config.seed, **resize).module, cost.NONE, 0
    if spec.pretrain is None or spec.pretrain_task is None:
        return (
            resolve_encoder(str(spec.source), seed=config.seed, **spec.options).module,
            cost.NONE,
            0,
        )
    split = get_task(spec.pretrain_task).pretrain
    assert split is not None  # the config checks pretraining tasks
    path = cache_path(spec.pretrain, split.train, cache_dir)
    if path.is_file():
        return load_checkpoint(path, arch=spec.pretrain.architecture)[0], cost.NONE, 0
    sizes = {} if spec.pretrain.feature_dim is None else {"feature_dim": spec.pretrain.feature_dim}
    module = build_encoder(spec.pretrain.architecture, image_shape=split.train.image_shape, **sizes)
    points = len(split.train)
    return module, cost.pretraining(spec.pretrain, points), points


@dataclass(frozen=True)
class _Size:
    """What the plan needs of a task's data: its training points (after
    ``train_points``), its evaluation points, its classes and a few points to time."""

    train: int
    test: int
    classes: int
    sample: Tensor
    note: str = ""
    split: Split | None = None  # None: priced at a torchvision set's known sizes


def _sizes(config: StudyConfig, task: TaskSpec) -> _Size:
    """The task's sizes from its data or, where the data is not on this machine, from a
    torchvision set's known sizes (random points of its shape are timed)."""
    try:
        split = downstream_split(config, task)
    except (MissingFileError, DataError, OSError) as err:  # OSError: a download refused
        name = (task.data or "").removeprefix("torchvision:").split(":")[0]
        if not (task.data or "").startswith("torchvision:") or name not in SIZES:
            return _Size(0, 0, 0, torch.zeros(0), f"not priced: its data is not here ({err})")
        shape, train, test, classes = SIZES[name]
        train = min(train, config.train_points or train)
        sample = torch.rand(_CALIBRATION_POINTS, *shape, generator=torch.Generator().manual_seed(0))
        note = f"{name} is not here: priced at its sizes ({train} training, {test} test points)"
        return _Size(train, min(config.eval_points, test), classes, sample, note)
    return _Size(
        len(split.train),
        min(config.eval_points, len(split.test)),
        len(split.train.classes),
        split.test.x[:_CALIBRATION_POINTS],
        split=split,
    )


def _heads_of(config: StudyConfig, task: TaskSpec, adaptations: list[str]) -> int:
    return sum(len(task.threats) if config.adaptations[a].per_threat else 1 for a in adaptations)


@dataclass(frozen=True)
class _Work:
    """One encoder on one task: the sizes of the task, the units already stored and what
    the pilot measured of the expected robust accuracy's attacks (None: no pilot)."""

    task: TaskSpec
    encoder: str
    size: _Size
    done: frozenset[tuple[str, ...]]
    pilot: Pilot | None

    def pending(self, adaptations: list[str], threats: tuple[ThreatModel, ...]) -> bool:
        """Whether a unit of ``adaptations`` at ``threats`` is still to run."""
        return any(
            Unit(self.task, self.encoder, name, threat).key() not in self.done
            for name in adaptations
            for threat in threats
        )


def _task(ledger: Ledger, work: _Work) -> None:
    config, c = ledger.config, ledger.calibrations[work.encoder]
    task, encoder, train = work.task, work.encoder, work.size.train
    attack = config.attack
    specs = {name: config.adaptations[name] for name in task.adaptations}
    moving = [name for name, spec in specs.items() if spec.protocol not in PROBES]
    classification = task.kind is TaskKind.CLASSIFICATION
    advised = classification and any(
        s.protocol not in PROBES or s.adversarial for s in specs.values()
    )
    probes = any(s.protocol is not AdaptProtocol.FINETUNE for s in specs.values())
    if not classification or probes or advised:
        ledger.add("train features", encoder, train, cost.FORWARD, batch=256)
    radius_points = min(config.radius_points, train)
    for threat in task.threats:
        if advised and work.pending(list(specs), (threat,)):
            held = min(config.radius_points, train // 2)
            advice = cost.advice(train, held, attack.steps)
            ledger.add("advice", encoder, train, advice, total=True)
        for name, spec in specs.items():
            threats = (threat,) if spec.per_threat else task.threats
            if not (spec.per_threat or threat == task.threats[0]) or not work.pending(
                [name], threats
            ):
                continue
            rule = spec.radius
            if rule is not None and rule.rule is not RadiusRule.FIXED:
                lines = (
                    c.certifiers
                    if rule.method == BEST
                    else {k: v for k, v in c.certifiers.items() if k == rule.method}
                )
                certified = rule.rule is RadiusRule.CERTIFIED and bool(lines)
                key = ("radius", task.name, encoder, threat, certified)
                if certified:
                    seconds = sum(line(radius_points) for line in lines.values())
                    ledger.add(
                        "radius", encoder, radius_points, cost.NONE, extra_seconds=seconds, key=key
                    )
                else:
                    ledger.add(
                        "radius", encoder, radius_points, cost.representation(attack), key=key
                    )
            adapted = spec.config_for(0.0 if rule is not None else None, threat)
            passes = cost.adaptation(adapted, train, features_cached=True)
            memory = 4.0 * c.parameter_bytes if name in moving else 0.0
            # Every protocol but plain fine-tuning first fits a probe on the features; a
            # fine-tuned encoder's diagnostics then read the training points (its accuracy,
            # and how far some of them moved, through both encoders).
            fit = 0.0 if spec.protocol is AdaptProtocol.FINETUNE else c.probe * train
            if name in moving:
                passes = passes + cost.FORWARD * (train + 2 * min(train, MOVEMENT_POINTS))
            ledger.add(
                "heads",
                encoder,
                train,
                passes,
                total=True,
                batch=adapted.batch_size,
                extra_seconds=fit,
                extra_memory=memory,
            )
    _evaluation(ledger, work, moving)


def _evaluation(ledger: Ledger, work: _Work, moving: list[str]) -> None:
    config, c = ledger.config, ledger.calibrations[work.encoder]
    task, encoder, size = work.task, work.encoder, work.size
    attack = config.attack
    still = [name for name in task.adaptations if name not in moving]
    variants = ([still] if still else []) + [[name] for name in moving]
    chunk = 4.0 * CHUNK_ELEMENTS * _FLOAT
    crown = chunk if any(name.startswith("crown") for name in c.certifiers) else 0.0
    classification = task.kind is TaskKind.CLASSIFICATION
    numel = int(size.sample[0].numel())
    for shard in shards(config, size.test):
        n = shard.stop - shard.start
        for threat in task.threats:
            for members in variants:  # the encoder's own, and each fine-tuned one
                if not work.pending(members, (threat,)):
                    continue
                ledger.add("representation attack", encoder, n, cost.representation(attack))
                seconds = sum(line(n) for line in c.certifiers.values())
                ledger.add(
                    "certificates", encoder, n, cost.NONE, extra_seconds=seconds, extra_memory=crown
                )
            for name in task.adaptations:
                if not work.pending([name], (threat,)):
                    continue
                if not classification:
                    passes = cost.attack(attack.steps, attack.restarts) + cost.SANITY
                    ledger.add("PGD on heads", encoder, n, passes)
                    continue
                curve = config.curve_points_of(task, threat) is not None
                ledger.add("PGD on heads", encoder, n, cost.study_pgd(attack) + cost.SANITY)
                pilot = work.pilot
                ledger.add(
                    "refinement",
                    encoder,
                    n,
                    prior_passes(curve) if pilot is None else pilot.passes[threat],
                    # Every point refined, and on a curve checked at each of its rings.
                    most=cost.refinement(RefineSettings(), 1 + (RINGS if curve else 0)),
                )
                if c.head_certificate is not None:
                    seconds = c.head_certificate(n) * size.classes / c.head_classes
                    ledger.add(
                        "head certificates",
                        encoder,
                        n,
                        cost.NONE,
                        extra_seconds=seconds,
                        extra_memory=chunk,
                    )
                plan = attack.autoattack
                refused = autoattack_refusal(tuple(size.sample.shape[1:]), size.classes, threat)
                if (
                    plan is not None
                    and refused is None
                    and plan.covers(task.name, encoder, name, threat)
                ):
                    last = shard.stop if plan.points is None else min(plan.points, shard.stop)
                    if last > shard.start:
                        ledger.add(
                            "AutoAttack", encoder, last - shard.start, cost.autoattack(size.classes)
                        )
        if not classification:
            continue
        full = full_jacobian(n, c.features, numel)
        # The encoder's own profile, shared by its probes; one per fine-tuned head.
        profiles = [(_heads_of(config, task, still), still, task.threats)] if still else []
        profiles += [
            (1, [name], (threat,))
            for name in moving
            for threat in (
                task.threats if config.adaptations[name].per_threat else task.threats[:1]
            )
        ]
        for heads, members, threats in profiles:
            if not work.pending(members, threats if members != still else task.threats):
                continue
            directions = c.features if full else min(c.features, heads * (size.classes - 1))
            rows = n * directions * numel * _FLOAT
            passes = cost.profile(directions, 1 if full else heads)
            ledger.add("profile", encoder, n, passes, extra_memory=rows)


def forecast(
    config: StudyConfig,
    cache_dir: Path,
    runtime: Runtime,
    *,
    stand_ins: Mapping[str, str] | None = None,
    out: Path | None = None,
) -> Forecast:
    """Price ``config`` on this machine (``runtime``'s device) without running it;
    ``stand_ins`` maps an encoder's name to a spec timed in its place (an architecture
    whose weights cannot be had here). With ``out``, a study folder, what its store
    already holds is not priced (a resumed run does only the rest)."""
    stand_ins = dict(stand_ins or {})
    store = Store(Path(out) / STORE_DIR) if out is not None else None
    planned = list(units(config))
    done = frozenset(u.key() for u in planned if store is not None and store.has(u.key()))
    unknown = set(stand_ins) - set(config.encoders)
    if unknown:
        raise RobustTransferError(
            f"--stand-in names no encoder of the study: {', '.join(sorted(unknown))}"
        )
    sizes = {task.name: _sizes(config, task) for task in config.tasks}
    notes = [f"task {name}: {size.note}" for name, size in sizes.items() if size.note]
    tasks = [task for task in config.tasks if sizes[task.name].train]
    shift_names, head_name = split_certifiers(config.certifiers)
    certifiers = default_certifier_names() if shift_names is None else shift_names
    calibrations: dict[str, Calibration] = {}
    # The encoders whose weights are the study's (not a stand-in, not still to pretrain).
    pilots: dict[str, nn.Module] = {}
    ledger = Ledger(config, calibrations)
    for task in tasks:
        size = sizes[task.name]
        for name in task.encoders:
            if name in calibrations:
                continue
            module, pretraining, points = _encoder(
                config.encoders[name], config, cache_dir, stand_ins.get(name)
            )
            module = module.to(runtime.device).eval()
            if name not in stand_ins and not points:
                pilots[name] = module
            first = task.threats[0].norm
            widest = max((t for t in task.threats if t.norm is first), key=lambda t: t.eps)
            calibrations[name] = calibrate(
                module,
                size.sample,
                widest,
                batch_size=config.attack.batch_size,
                certifiers=certifiers,
                head_certifier=head_name,
                classes=size.classes,
            )
            for certifier, reason in calibrations[name].refused.items():
                notes.append(f"{name}: {certifier} refuses: {reason}")
            if points:
                spec = config.encoders[name].pretrain
                assert spec is not None
                ledger.add(
                    "pretraining",
                    name,
                    points,
                    pretraining,
                    total=True,
                    batch=spec.batch_size,
                    extra_memory=4.0 * calibrations[name].parameter_bytes,
                )
    unpiloted: dict[str, list[str]] = {}
    for task in tasks:
        for name in task.encoders:
            work = _Work(task, name, sizes[task.name], done, None)
            if not work.pending(list(task.adaptations), task.threats):
                continue
            if task.kind is TaskKind.CLASSIFICATION:
                pilot, why = maybe_pilot(
                    pilots.get(name),
                    calibrations[name],
                    config,
                    task,
                    sizes[task.name].split,
                    stand_in=name in stand_ins,
                )
                if pilot is None:
                    unpiloted.setdefault(why, []).append(f"{task.name}/{name}")
                else:
                    notes.append(note(task.name, name, pilot))
                work = replace(work, pilot=pilot)
            _task(ledger, work)
    for why, pairs in unpiloted.items():
        notes.append(
            f"refinement priced at {cost.REFINED_SHARE:.0%} of the points, no pilot ({why}): "
            + ", ".join(pairs)
        )
    baseline = resident_bytes()
    pending = len(planned) - len(done)
    if pending:
        overhead = pending * _UNIT_OVERHEAD
        ledger.stages.append(
            Stage("store, records, report", "all", pending, cost.NONE, overhead, 0.0, overhead)
        )
    if done:
        notes.append(f"{len(done)} of {len(planned)} units already stored in {out}: not priced")
    return Forecast(
        units=pending,
        stages=ledger.stages,
        calibrations=calibrations,
        baseline=baseline,
        device=str(runtime.device),
        notes=notes,
    )
