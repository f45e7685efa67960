"""The plan of a study: its units of evaluation, the shards of points they are evaluated
on, the groups of work one process takes, and the store key of each piece of work."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.schema import Meta, StoreKind
from ..theory.threat import ThreatModel
from .spec import StudyConfig, TaskSpec


def threat_key(threat: ThreatModel) -> tuple[str, str]:
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
            *threat_key(self.threat),
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


def units(config: StudyConfig) -> Iterator[Unit]:
    for task in config.tasks:
        for encoder in task.encoders:
            for adaptation in task.adaptations:
                for threat in task.threats:
                    yield Unit(task, encoder, adaptation, threat)


def shards(config: StudyConfig, test_points: int) -> list[Shard]:
    """The shards of a task with ``test_points`` held-out points."""
    n, size = min(config.eval_points, test_points), config.shard_points
    return [
        Shard(index, start, min(start + size, n)) for index, start in enumerate(range(0, n, size))
    ]


def store_key(
    kind: StoreKind, task: str, variant: str, threat: ThreatModel, shard: Shard | None
) -> tuple[str, ...]:
    """Where a measurement of an encoder (shift, certificates) on points is stored."""
    return (kind, task, variant, *threat_key(threat), *([] if shard is None else [shard.key()]))


def shard_key(unit: Unit, shard: Shard) -> tuple[str, ...]:
    """Where a unit's evaluation of one shard is stored, until joined into the unit."""
    return (StoreKind.UNIT_SHARDS, *unit.key()[1:], shard.key())


def variant(unit: Unit, head_meta: dict[str, object]) -> str:
    """The name of the encoder a unit evaluates: its own when the head was put on the
    shared encoder, one per adaptation when that fine-tuned it."""
    return f"{unit.encoder}+{unit.adaptation}" if head_meta.get(Meta.FINE_TUNED) else unit.encoder
