"""Cached representations: run a frozen encoder once over a data set."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..core.checks import check_images, check_positive_int, checked_forward
from ..core.errors import InputError, InputTypeError
from ..core.runtime import eval_mode, model_device, model_input


def _first(item: object) -> object:
    return item[0] if isinstance(item, tuple | list) else item


def extract_features(
    encoder: nn.Module,
    data: Tensor | Dataset[object],
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """``f(x)`` for every input, flattened to ``(N, m)``, on the CPU.

    ``data`` is a tensor of inputs in [0, 1] or a map-style data set whose items are an
    input or a tuple starting with one (labels are left to the caller). The encoder
    runs in eval mode without gradients.
    """
    if not isinstance(encoder, nn.Module):
        raise InputTypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    check_positive_int(batch_size, "batch_size")
    chunks: Iterable[Tensor]
    if isinstance(data, Tensor):
        data = model_input(encoder, check_images(data))
        chunks = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
        total, points = len(chunks), len(data)
    elif isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate_inputs)
        # Items arrive a batch at a time: each batch is checked as it comes.
        chunks = (model_input(encoder, check_images(batch)) for batch in loader)
        total, points = len(loader), len(loader.dataset)  # type: ignore[arg-type]
    else:
        raise InputTypeError(f"data must be a tensor or a torch Dataset, got {type(data).__name__}")
    device = model_device(encoder, torch.device("cpu"))
    parts = []
    with eval_mode(encoder, purpose="feature extraction"), torch.no_grad():
        batches = tqdm(
            chunks,
            total=total,
            desc=f"features ({points} points)",
            disable=not progress,
            unit="batch",
            leave=False,
        )
        for chunk in batches:
            output = checked_forward(encoder, chunk.to(device), "the encoder")
            parts.append(output.flatten(1).cpu())
    if not parts:
        raise InputError("data is empty")
    features = torch.cat(parts)
    broken = int((~torch.isfinite(features)).any(dim=1).sum())
    if broken:
        # NaN features give NaN shifts and margins, which read as robust downstream.
        raise InputError(
            f"the encoder gives NaN or infinite features for {broken} of {len(features)} inputs"
        )
    return features


def _pair_distances(values: Tensor) -> Tensor:
    """The l2 distance of every pair ``i < j`` of rows, in float64."""
    values = values.flatten(1).double()
    distances = torch.cdist(values, values)
    pairs = torch.triu_indices(len(values), len(values), offset=1)
    return distances[pairs[0], pairs[1]]


def median_distance(features: Tensor) -> float:
    """The median distance between the representations of two different inputs: the
    scale of an encoder's feature geometry (shifts and radii far above it move any
    point anywhere)."""
    if len(features) < 2:
        raise InputError("the median distance needs at least two inputs")
    return float(_pair_distances(features).median())


def distance_ratio(inputs: Tensor, features: Tensor) -> float:
    """The median over pairs of distinct inputs of ``||f(x) - f(x')||_2 / ||x - x'||_2``:
    how much of the inputs' separation the features keep.

    With a proven l2 constant ``L`` it is at most ``L``, and ``ratio / L`` is the share of
    the input's separation a Lipschitz certificate keeps: a certified radius ``eps``
    needs feature margins ``L eps`` where a classifier on the input needs ``eps``, so a
    linear probe can be certified as widely as a linear classifier on the input itself
    only where this is near ``L``."""
    if len(inputs) != len(features):
        raise InputError(
            f"distance_ratio needs one feature row per input, got {len(inputs)} inputs "
            f"and {len(features)} rows"
        )
    apart = _pair_distances(inputs)
    distinct = apart > 0
    if not bool(distinct.any()):
        raise InputError("distance_ratio needs at least two distinct inputs")
    return float((_pair_distances(features)[distinct] / apart[distinct]).median())


def _collate_inputs(items: list[object]) -> Tensor:
    inputs = [_first(item) for item in items]
    if not all(isinstance(v, Tensor) for v in inputs):
        raise InputTypeError("data set items must be tensors or tuples starting with a tensor")
    return torch.stack(inputs)  # type: ignore[arg-type]
