"""What the attacks share: validating their arguments and walking the data in batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import check_images, check_positive_int
from ..threat import ThreatModel
from .engine import AscentSettings


def check_attack_args(
    model: object,
    x: object,
    threat: object,
    *,
    steps: int,
    restarts: int,
    batch_size: int,
    step_size: float | None,
) -> tuple[nn.Module, Tensor, ThreatModel, AscentSettings]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    x = check_images(x)
    check_positive_int(steps, "steps")
    check_positive_int(restarts, "restarts")
    check_positive_int(batch_size, "batch_size")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size!r}")
    return model, x, threat, AscentSettings(steps, restarts, step_size)


def batches(n: int, batch_size: int, *, progress: bool, desc: str) -> Iterator[slice]:
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch", leave=False):
        yield slice(start, min(start + batch_size, n))


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
