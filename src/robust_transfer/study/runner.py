"""Runs a study: encoders -> heads -> attacks and bounds -> per-sample store -> records.

Resumable: every unit of work (a measured shift, a trained head, an evaluation) lands in
the store atomically as soon as it is done, and a rerun skips what is there. Seeds are
fixed per unit, so the order of work and any interruption leave the results unchanged.
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
from ..bounds import weight_gap
from ..certificates import certified_shift
from ..data.sources import load_dataset
from ..data.tasks import Split, get_task, stratified_split
from ..features import extract_features
from ..losses import RegressionLoss
from ..models import load_checkpoint, load_encoder
from ..runtime import default_device
from ..store import Store
from ..threat import ThreatModel
from ..training.adapt import AdaptProtocol, adapt, train_regression_probe
from ..training.pretrain import cached_pretrain
from .config import AdaptationSpec, EncoderSpec, StudyConfig, TaskKind, TaskSpec
from .evaluate import Arrays, evaluate_classification, evaluate_regression, measure_shift

Log = Callable[[str], None]


def _threat_key(threat: ThreatModel) -> tuple[str, str]:
    return threat.norm.value, f"{threat.eps:.8g}"


@dataclass
class _Encoders:
    """Encoders built on first use, then kept for the rest of the run."""

    config: StudyConfig
    cache_dir: Path
    info_dir: Path
    device: torch.device
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
        info: dict[str, object] = {"pretraining": spec.pretraining}
        if spec.pretrain is not None and spec.pretrain_task is not None:
            self.log(f"encoder {spec.name}: {spec.pretrain.protocol.value} pretraining")
            pretrain = get_task(spec.pretrain_task).pretrain
            if pretrain is None:
                raise ValueError(f"task {spec.pretrain_task!r} has no pretraining split")
            result = cached_pretrain(
                spec.pretrain, pretrain.train, self.cache_dir, progress=self.progress
            )
            encoder: nn.Module = result.encoder
            info |= {
                "pretrain_task": spec.pretrain_task,
                "pretrain_config": spec.pretrain.to_dict(),
                "pretrain_metrics": result.metrics,
                "pretrain_seconds": result.seconds,
            }
        elif spec.checkpoint is not None:
            encoder, sidecar = load_checkpoint(spec.checkpoint)
            info |= {"checkpoint": str(spec.checkpoint), "sidecar": sidecar}
        else:
            encoder = load_encoder(str(spec.factory))
            info["factory"] = spec.factory
        constant = getattr(encoder, "lipschitz_l2", None)
        info["lipschitz_l2"] = None if constant is None else float(constant)
        return encoder.to(self.device).eval(), info


def _downstream(task: TaskSpec) -> Split:
    if task.data is not None:
        return stratified_split(load_dataset(task.data))
    return get_task(task.name).downstream


def _head_arrays(head: nn.Linear) -> Arrays:
    return {"weight": head.weight.detach(), "bias": head.bias.detach()}


def _head_from(arrays: Arrays) -> nn.Linear:
    weight = arrays["weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(arrays["bias"])
    return head.requires_grad_(False).eval()


@dataclass
class StudyRun:
    """One run of a study into ``out``; :meth:`run` returns the records."""

    config: StudyConfig
    out: Path
    cache_dir: Path
    progress: bool = True
    log: Log = print

    def __post_init__(self) -> None:
        self.store = Store(self.out / "store")
        self.device = default_device()
        self.encoders = _Encoders(
            self.config, self.cache_dir, self.out / "encoders", self.device, self.progress, self.log
        )

    def units(self) -> Iterator[tuple[TaskSpec, str, str, ThreatModel]]:
        for task in self.config.tasks:
            for encoder in task.encoders:
                for adaptation in task.adaptations:
                    for threat in task.threats:
                        yield task, encoder, adaptation, threat

    def unit_key(
        self, task: TaskSpec, encoder: str, adaptation: str, threat: ThreatModel
    ) -> tuple[str, ...]:
        return ("units", task.name, encoder, adaptation, *_threat_key(threat))

    def run(self) -> list[tuple[TaskSpec, str, str, ThreatModel, Arrays, dict[str, object]]]:
        todo = [unit for unit in self.units() if not self.store.has(self.unit_key(*unit))]
        total = sum(1 for _ in self.units())
        self.log(f"{total} evaluation units, {total - len(todo)} already in {self.store.root}")
        splits: dict[str, Split] = {}
        with tqdm(total=len(todo), desc="study", unit="unit", disable=not self.progress) as bar:
            for task, encoder, adaptation, threat in todo:
                if task.name not in splits:
                    splits[task.name] = _downstream(task)
                bar.set_postfix_str(f"{task.name} {encoder} {adaptation} {threat}")
                self._evaluate(splits[task.name], task, encoder, adaptation, threat)
                bar.update()
        results = []
        for unit in self.units():
            loaded = self.store.load(self.unit_key(*unit))
            if loaded is None:
                raise RuntimeError(f"unit {self.unit_key(*unit)} is missing after the run")
            results.append((*unit, *loaded))
        return results

    def encoder_info(self) -> dict[str, dict[str, object]]:
        used = dict.fromkeys(name for task in self.config.tasks for name in task.encoders)
        return {name: self.encoders.info(name) for name in used}

    def _eval_points(self, split: Split) -> tuple[Tensor, Tensor, Tensor | None]:
        test = split.test
        n = min(self.config.eval_points, len(test))
        targets = None if test.targets is None else test.targets[:n].to(self.device)
        return test.x[:n].to(self.device), test.y[:n].to(self.device), targets

    def _shift(
        self, key: tuple[str, ...], encoder: nn.Module, x: Tensor, threat: ThreatModel
    ) -> Arrays:
        loaded = self.store.load(key)
        if loaded is not None:
            return {name: value.to(self.device) for name, value in loaded[0].items()}
        start = time.perf_counter()
        arrays = measure_shift(
            encoder, x, threat, self.config.attack, seed=self.config.seed, progress=self.progress
        )
        self.store.save(key, arrays, {"seconds": time.perf_counter() - start})
        return arrays

    def _radius(
        self,
        spec: AdaptationSpec,
        task: TaskSpec,
        encoder_name: str,
        encoder: nn.Module,
        split: Split,
        threat: ThreatModel,
    ) -> float:
        """The certified probe's feature radius for ``threat``: the encoder's certified
        shift where it proves one, else a quantile of the attacked shift on training
        points (never on the evaluation points)."""
        x_train = split.train.x[: self.config.radius_points].to(self.device)
        certified = certified_shift(encoder, threat, x_train)
        if certified is not None:
            return float(certified.max())
        key = ("train-shift", task.name, encoder_name, *_threat_key(threat))
        shift = self._shift(key, encoder, x_train, threat)
        quantile = 0.5 if spec.radius_quantile is None else spec.radius_quantile
        return float(shift["shift"].float().quantile(quantile))

    def _adapted(
        self,
        split: Split,
        task: TaskSpec,
        encoder_name: str,
        adaptation: str,
        threat: ThreatModel,
    ) -> tuple[nn.Module, nn.Linear, dict[str, object]]:
        """The head (and fine-tuned encoder) of one adaptation, trained once and stored."""
        base, _ = self.encoders.get(encoder_name)
        spec = self.config.adaptations[adaptation]
        config = spec.config
        per_threat = config.protocol is AdaptProtocol.CERTIFIED_PROBE and (
            spec.radius_quantile is not None
        )
        key: tuple[str, ...] = ("heads", task.name, encoder_name, adaptation)
        if per_threat:
            key = (*key, *_threat_key(threat))
        loaded = self.store.load(key)
        if loaded is not None:
            arrays, stored_meta = loaded
            head = _head_from(arrays)
            encoder = base
            if stored_meta.get("fine_tuned"):
                encoder = copy.deepcopy(base)
                prefix = "encoder."
                state = {
                    k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)
                }
                encoder.load_state_dict(state)
            return encoder.to(self.device).eval(), head.to(self.device), stored_meta
        meta: dict[str, object] = {}
        if per_threat:
            radius = self._radius(spec, task, encoder_name, base, split, threat)
            config = dataclasses.replace(config, radius=radius)
            meta["radius"] = radius
        start = time.perf_counter()
        if task.kind is TaskKind.REGRESSION:
            if split.train.targets is None:
                raise ValueError(f"task {task.name!r} has no regression targets")
            features = extract_features(base, split.train.x, progress=self.progress)
            head = train_regression_probe(
                features, split.train.targets, task.loss or RegressionLoss.ABSOLUTE
            )
            encoder, metrics = base, {}
        else:
            adapted = adapt(base, split.train, config, progress=self.progress)
            head, encoder, metrics = adapted.head, adapted.encoder, dict(adapted.metrics)
        meta |= {
            "metrics": metrics,
            "seconds": time.perf_counter() - start,
            "fine_tuned": encoder is not base,
            "config": config.to_dict(),
        }
        arrays = _head_arrays(head)
        if encoder is not base:
            arrays |= {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
        self.store.save(key, arrays, meta)
        return encoder.to(self.device).eval(), head.to(self.device).eval(), meta

    def _evaluate(
        self,
        split: Split,
        task: TaskSpec,
        encoder_name: str,
        adaptation: str,
        threat: ThreatModel,
    ) -> None:
        x, y, targets = self._eval_points(split)
        encoder, head, head_meta = self._adapted(split, task, encoder_name, adaptation, threat)
        variant = (
            encoder_name if not head_meta.get("fine_tuned") else f"{encoder_name}+{adaptation}"
        )
        shift = self._shift(("shift", task.name, variant, *_threat_key(threat)), encoder, x, threat)
        start = time.perf_counter()
        settings = self.config.attack
        if task.kind is TaskKind.REGRESSION:
            if targets is None:
                raise ValueError(f"task {task.name!r} has no regression targets")
            arrays = evaluate_regression(
                encoder,
                head,
                x,
                targets,
                task.loss or RegressionLoss.ABSOLUTE,
                threat,
                shift,
                settings,
                seed=self.config.seed,
            )
        else:
            arrays = evaluate_classification(
                encoder, head, x, y, threat, shift, settings, seed=self.config.seed
            )
        meta = {
            "seconds": time.perf_counter() - start,
            "weight_gap": float(weight_gap(head)),
            "head": {k: v for k, v in head_meta.items() if k != "config"},
            "adaptation_config": head_meta.get("config"),
        }
        self.store.save(self.unit_key(task, encoder_name, adaptation, threat), arrays, meta)
