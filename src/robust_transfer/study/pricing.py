"""Prices a study (:class:`~.forecast.Forecast`) without running it: the sizes of its
tasks, the passes of each stage (:mod:`.cost`) and a short calibration of each encoder
on this machine (:mod:`.calibration`).

Nothing is pretrained or stored: an encoder that a study would pretrain is timed as its
untrained architecture (what it costs does not depend on its weights), or read from the
cache when it is there, and then costs nothing to pretrain.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..certify import default_certifier_names, split_certifiers
from ..certify.crown import CHUNK_ELEMENTS
from ..core.errors import DataError, MissingFileError, RobustTransferError
from ..core.runtime import Runtime
from ..data.tasks import get_task
from ..data.torchvision_sets import SIZES
from ..estimates.expected import RefineSettings, full_jacobian
from ..models import build_encoder, load_checkpoint, resolve_encoder
from ..training.pretrain import cache_path
from ..training.protocols import PROBES, AdaptProtocol
from . import cost
from .calibration import Calibration, calibrate
from .cost import Passes
from .forecast import Forecast, Stage
from .plan import shards, units
from .runner import downstream_split
from .spec import EncoderSpec, RadiusRule, StudyConfig, TaskKind, TaskSpec

_FLOAT = 4
# Points of a task the calibration runs on.
_CALIBRATION_POINTS = 8


def _encoder(
    spec: EncoderSpec, config: StudyConfig, cache_dir: Path, stand_in: str | None
) -> tuple[nn.Module, Passes, int]:
    """The encoder to time, and the passes and points of its pretraining (none when
    cached or not pretrained here)."""
    if stand_in is not None:
        return resolve_encoder(stand_in, seed=config.seed).module, cost.NONE, 0
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


def _sizes(config: StudyConfig, task: TaskSpec) -> _Size:
    """The task's sizes from its data or, where the data is not on this machine, from a
    torchvision set's known sizes (random points of its shape are timed)."""
    try:
        split = downstream_split(config, task)
    except (MissingFileError, DataError) as err:
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
    )


@dataclass
class _Ledger:
    config: StudyConfig
    calibrations: dict[str, Calibration]
    stages: list[Stage] = field(default_factory=list)
    seen: set[tuple[object, ...]] = field(default_factory=set)

    def add(
        self,
        name: str,
        encoder: str,
        points: int,
        passes: Passes,
        *,
        batch: int | None = None,
        extra_seconds: float = 0.0,
        extra_memory: float = 0.0,
        key: tuple[object, ...] | None = None,
    ) -> None:
        """A stage, once per ``key`` (work the study stores and shares)."""
        if key is not None:
            if key in self.seen:
                return
            self.seen.add(key)
        c = self.calibrations[encoder]
        batch = min(points, batch or self.config.attack.batch_size)
        seconds = points * c.seconds(passes.forward, passes.backward) + extra_seconds
        memory = c.batch_bytes + batch * c.activation_bytes + extra_memory
        self.stages.append(Stage(name, encoder, points, passes, seconds, memory))


def _heads_of(config: StudyConfig, task: TaskSpec, adaptations: list[str]) -> int:
    return sum(len(task.threats) if config.adaptations[a].per_threat else 1 for a in adaptations)


def _task(
    ledger: _Ledger, task: TaskSpec, encoder: str, train: int, test: int, classes: int
) -> None:
    config, c = ledger.config, ledger.calibrations[encoder]
    attack = config.attack
    specs = {name: config.adaptations[name] for name in task.adaptations}
    moving = [name for name, spec in specs.items() if spec.protocol not in PROBES]
    still = [name for name in specs if name not in moving]
    classification = task.kind is TaskKind.CLASSIFICATION
    if not classification or any(s.protocol is not AdaptProtocol.FINETUNE for s in specs.values()):
        ledger.add("train features", encoder, train, cost.FORWARD, batch=256)
    radius_points = min(config.radius_points, train)
    for threat in task.threats:
        if classification and any(
            s.protocol not in PROBES or s.adversarial for s in specs.values()
        ):
            held = min(config.radius_points, train // 2)
            ledger.add(
                "advice", encoder, train, cost.advice(train, held, attack.steps) * (1 / train)
            )
        for name, spec in specs.items():
            rule = spec.radius
            if rule is not None and rule.rule is not RadiusRule.FIXED:
                certified = rule.rule is RadiusRule.CERTIFIED and c.certifiers
                key = ("radius", task.name, encoder, threat, bool(certified))
                if certified:
                    seconds = sum(line(radius_points) for line in c.certifiers.values())
                    ledger.add(
                        "radius", encoder, radius_points, cost.NONE, extra_seconds=seconds, key=key
                    )
                else:
                    ledger.add(
                        "radius", encoder, radius_points, cost.representation(attack), key=key
                    )
            if spec.per_threat or threat == task.threats[0]:
                adapted = spec.config_for(0.0 if rule is not None else None, threat)
                passes = cost.adaptation(adapted, train, features_cached=True)
                memory = 4.0 * c.parameter_bytes if name in moving else 0.0
                ledger.add(
                    "heads",
                    encoder,
                    train,
                    passes * (1 / train),
                    batch=adapted.batch_size,
                    extra_memory=memory,
                )
    _evaluation(ledger, task, encoder, test, classes, moving, still)


def _evaluation(
    ledger: _Ledger,
    task: TaskSpec,
    encoder: str,
    test: int,
    classes: int,
    moving: list[str],
    still: list[str],
) -> None:
    config, c = ledger.config, ledger.calibrations[encoder]
    attack = config.attack
    variants = ([encoder] if still else []) + [f"{encoder}+{name}" for name in moving]
    crown = any(name.startswith("crown") for name in c.certifiers)
    certify_memory = 4.0 * CHUNK_ELEMENTS * _FLOAT if crown else 0.0
    classification = task.kind is TaskKind.CLASSIFICATION
    for shard in shards(config, test):
        n = shard.stop - shard.start
        for threat in task.threats:
            for _ in variants:
                ledger.add("representation attack", encoder, n, cost.representation(attack))
                seconds = sum(line(n) for line in c.certifiers.values())
                ledger.add(
                    "certificates",
                    encoder,
                    n,
                    cost.NONE,
                    extra_seconds=seconds,
                    extra_memory=certify_memory,
                )
            for name in task.adaptations:
                if not classification:
                    ledger.add(
                        "PGD on heads",
                        encoder,
                        n,
                        cost.attack(attack.steps, attack.restarts) + cost.SANITY,
                    )
                    continue
                curve = config.curve_points_of(task, threat) is not None
                ledger.add("PGD on heads", encoder, n, cost.study_pgd(attack) + cost.SANITY)
                ledger.add("refinement", encoder, n, cost.refinement(RefineSettings(), curve))
                if c.head_certificate is not None:
                    seconds = c.head_certificate(n)
                    ledger.add(
                        "head certificates",
                        encoder,
                        n,
                        cost.NONE,
                        extra_seconds=seconds,
                        extra_memory=certify_memory,
                    )
                plan = attack.autoattack
                if plan is not None and plan.covers(task.name, encoder, name, threat):
                    covered = (
                        n
                        if plan.points is None
                        else max(0, min(plan.points, shard.stop) - shard.start)
                    )
                    if covered:
                        ledger.add("AutoAttack", encoder, covered, cost.autoattack())
        if not classification:
            continue
        full = full_jacobian(n, c.features, c.input_numel)
        heads = [(_heads_of(config, task, still), still)] if still else []
        heads += [
            (1, [name])
            for name in moving
            for _ in (task.threats if config.adaptations[name].per_threat else task.threats[:1])
        ]
        for count, _ in heads:
            directions = c.features if full else count * (classes - 1)
            rows = n * directions * c.input_numel * _FLOAT
            ledger.add("profile", encoder, n, cost.profile(directions), extra_memory=rows)


def _resident_bytes() -> float:
    """This process's resident memory now (data and encoders loaded): what the study
    holds before its first stage."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return float(pages * resource.getpagesize())
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def forecast(
    config: StudyConfig,
    cache_dir: Path,
    runtime: Runtime,
    *,
    stand_ins: Mapping[str, str] | None = None,
) -> Forecast:
    """Price ``config`` on this machine (``runtime``'s device) without running it;
    ``stand_ins`` maps an encoder's name to a spec timed in its place (an architecture
    whose weights cannot be had here)."""
    stand_ins = dict(stand_ins or {})
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
    ledger = _Ledger(config, calibrations)
    for task in tasks:
        size = sizes[task.name]
        for name in task.encoders:
            if name in calibrations:
                continue
            module, pretraining, points = _encoder(
                config.encoders[name], config, cache_dir, stand_ins.get(name)
            )
            module = module.to(runtime.device).eval()
            calibrations[name] = calibrate(
                module,
                size.sample,
                task.threats[0],
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
                    pretraining * (1 / points),
                    batch=spec.batch_size,
                    extra_memory=4.0 * calibrations[name].parameter_bytes,
                )
    for task in tasks:
        size = sizes[task.name]
        for name in task.encoders:
            _task(ledger, task, name, size.train, size.test, size.classes)
    baseline = _resident_bytes()
    return Forecast(
        units=sum(1 for _ in units(config)),
        stages=ledger.stages,
        calibrations=calibrations,
        baseline=baseline,
        device=str(runtime.device),
        notes=notes,
    )
