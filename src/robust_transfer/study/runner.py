"""Runs a study: encoders -> heads -> attacks, certificates and bounds -> per-sample store.

Resumable: every unit of work (a measured shift, a certificate, a trained head, an
evaluation of one shard of points) lands in the store atomically as soon as it is done,
and a rerun skips what is there. Random starts are drawn per sample from the study's
seed, so the order of work, the batch size, the number of processes and any
interruption leave the results unchanged.

Evaluation streams: points are taken ``shard_points`` at a time, so memory follows the
shard, not the number of points. Under ``torchrun`` the process of rank 0 builds the
encoders and trains the heads, the shards are shared out among all processes, and rank 0
joins them into units. The pieces: :mod:`.plan` (units, shards, keys), :mod:`.encoders`,
:mod:`.heads`, :mod:`.stored` (work done once per key), :mod:`.shard` (one evaluation)
and :mod:`.join`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..core.checks import check_two_classes
from ..core.errors import ConfigError
from ..core.runtime import Runtime
from ..core.schema import ENCODERS_DIR, STORE_DIR, Arrays
from ..core.store import Store
from ..data.sources import load_split
from ..data.tasks import Split, get_task, stratified_sample
from . import plan
from .encoders import Encoders
from .heads import Heads
from .join import join_unit
from .plan import Shard, Unit
from .shard import ShardEvaluator
from .spec import StudyConfig, TaskKind, TaskSpec
from .stored import StoredWork

Log = Callable[[str], None]


def _silent(_: str) -> None:
    return None


def downstream_split(config: StudyConfig, task: TaskSpec) -> Split:
    """The task's training and held-out points, the training part cut to the study's
    ``train_points`` (a stratified sample)."""
    if task.data is None:
        split = get_task(task.name).downstream
    else:
        split = load_split(task.data, task.test_data, **task.data_options)
    limit = config.train_points
    if limit is not None and limit < len(split.train):
        split = Split(stratified_sample(split.train, limit), split.test)
    return split


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
        log = self.log if self.runtime.rank == 0 else _silent
        self.encoders = Encoders(
            self.config,
            self.cache_dir,
            self.out / ENCODERS_DIR,
            self.runtime,
            self.progress,
            log,
        )
        work = StoredWork(self.store, self.config, self.runtime, self.progress)
        self.heads = Heads(self.config, work, self.encoders)
        self.evaluator = ShardEvaluator(self.heads, log)
        self._splits: dict[str, Split] = {}

    def units(self) -> Iterator[Unit]:
        return plan.units(self.config)

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
            split = downstream_split(self.config, task)
            self._splits[task.name] = split
            if len(split.test) < self.config.eval_points and self.runtime.rank == 0:
                self.log(
                    f"task {task.name}: {len(split.test)} held-out points, fewer "
                    f"than eval_points = {self.config.eval_points}: evaluating all"
                )
        return self._splits[task.name]

    def _shards(self, task: TaskSpec) -> list[Shard]:
        return plan.shards(self.config, len(self._split(task).test))

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
            if not self.store.has(plan.shard_key(unit, shard))
        ]

    def _prepare(self, todo: list[Unit]) -> None:
        """Rank 0 builds the encoders (pretraining into the cache), advises on each
        encoder and threat that a head will fine-tune or train adversarially on, and then
        trains the heads that every process reads: the advice never sees them."""
        if self.runtime.rank != 0:
            return
        advised = {self.heads.advice_key(u): u for u in todo if self.heads.needs_advice(u)}
        for unit in tqdm(advised.values(), desc="advice", unit="unit", disable=not self.progress):
            self.heads.advise(self._split(unit.task), unit)
        for unit in tqdm(todo, desc="heads", unit="unit", disable=not self.progress):
            self.heads.get(self._split(unit.task), unit)

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
                join_unit(self.store, unit, self._shards(unit.task), self._split(unit.task))

    def _evaluate(self, unit: Unit, shard: Shard) -> None:
        self.evaluator.evaluate(unit, shard, self._split(unit.task))
