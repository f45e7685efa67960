"""Joining a unit's shards into the unit that records and the report read: arrays
concatenated in point order, refusals merged, seconds summed, and the feature scale of
the unit's first points."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.schema import Array, Meta, StoreKind
from ..core.store import Store
from ..data.tasks import Split
from ..models.features import distance_ratio, median_distance
from .plan import Shard, Unit, shard_key, threat_key, variant

# The feature scale of a unit is the median distance among this many of its points.
_SCALE_POINTS = 1000


def _seconds(meta: dict[str, object]) -> float:
    value = meta.get(Meta.SECONDS, 0.0)
    return float(value) if isinstance(value, int | float) else 0.0


def join_unit(store: Store, unit: Unit, shards: list[Shard], split: Split) -> None:
    """Joins the stored shards of ``unit`` into the unit, stored under its key."""
    parts = []
    for shard in shards:
        loaded = store.load(shard_key(unit, shard))
        if loaded is None:
            raise RuntimeError(f"shard {shard_key(unit, shard)} is missing")
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
    evaluated = variant(unit, head if isinstance(head, dict) else {})
    features = _features(store, unit, shards, evaluated)
    # The first evaluation points, in the order their shards stored the features.
    inputs = split.test.x[: len(features)]
    meta = parts[0][1] | {
        Meta.REFUSED: refused,
        Meta.SECONDS: sum(_seconds(meta) for _, meta in parts),
        Meta.FEATURE_SCALE: median_distance(features),
        Meta.DISTANCE_RATIO: distance_ratio(inputs, features),
    }
    store.save(unit.key(), arrays, meta)


def _features(store: Store, unit: Unit, shards: list[Shard], name: str) -> Tensor:
    """The clean features of the unit's first evaluation points (at most
    ``_SCALE_POINTS``), as the representation attack stored them."""
    parts, count = [], 0
    for shard in shards:
        if count >= _SCALE_POINTS:
            break
        key = (StoreKind.SHIFT, unit.task.name, name, *threat_key(unit.threat))
        loaded = store.load((*key, shard.key()))
        if loaded is None:
            raise RuntimeError(f"shift {key} of {shard.key()} is missing")
        parts.append(loaded[0][Array.FEATURES])
        count += len(parts[-1])
    return torch.cat(parts)[:_SCALE_POINTS]
