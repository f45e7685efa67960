"""Work done once per key: what is in the study's store is read, what is missing is
computed and stored atomically. Stored arrays come back bit for bit and laid out as
fresh ones (core/layout.py), so a resumed run computes what a fresh one does."""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..attacks.settings import AttackSettings
from ..core.runtime import Runtime
from ..core.schema import Array, Arrays, Meta, StoreKind
from ..core.store import Store
from ..estimates.evaluate import attacked_shift, certified_shifts
from ..models.features import extract_features
from ..theory.threat import ThreatModel
from .calibration import bounded_batch
from .plan import Shard, store_key
from .spec import StudyConfig


@dataclass
class StoredWork:
    """The study's store, and the encoder measurements every unit on the same points
    shares: the representation attack and the certificates."""

    store: Store
    config: StudyConfig
    runtime: Runtime
    progress: bool
    _batches: weakref.WeakKeyDictionary[nn.Module, int] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def settings(self, encoder: nn.Module, x: Tensor) -> AttackSettings:
        """The study's attack settings for ``encoder``, with a batch that keeps its
        backward passes' activations bounded (:func:`.calibration.bounded_batch`)."""
        if encoder not in self._batches:
            self._batches[encoder] = bounded_batch(encoder, x, self.config.attack.batch_size)
        return dataclasses.replace(self.config.attack, batch_size=self._batches[encoder])

    def get(
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

    def shift(
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
                    self.settings(encoder, x),
                    seed=self.config.seed,
                    sample_ids=None if shard is None else shard.ids(),
                    progress=self.progress,
                )
            return arrays, {}

        return self.get(store_key(kind, task, variant, threat, shard), compute)[0]

    def train_features(self, task: str, variant: str, encoder: nn.Module, x: Tensor) -> Tensor:
        """The encoder's features of a task's training points, once per (task, encoder,
        number of points): every probe on the encoder reads them."""

        def compute() -> tuple[Arrays, dict[str, object]]:
            features = extract_features(encoder, x, progress=self.progress)
            return {Array.FEATURES: features}, {}

        key = (StoreKind.TRAIN_FEATURES, task, variant, f"n{len(x)}")
        # On the CPU, beside the labels, as extract_features gives them: heads train there.
        return self.get(key, compute)[0][Array.FEATURES].cpu()

    def certificates(
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

        return self.get(store_key(kind, task, variant, threat, shard), compute)
