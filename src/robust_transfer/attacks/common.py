"""What the attacks share: validating their arguments and one batching skeleton that
runs the ascent engine over the data batch by batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.checks import (
    RESTARTS,
    STEPS,
    check_images,
    check_positive_int,
    check_sample_ids,
    check_seed,
    checked_forward,
)
from ..core.errors import InputError, InputTypeError
from ..core.noise import SampleNoise
from ..core.runtime import eval_mode, model_device, model_input
from ..theory.threat import ThreatModel
from .engine import AscentResult, AscentSettings, Objective, maximize


@dataclass(frozen=True)
class AttackArgs:
    model: nn.Module
    x: Tensor
    threat: ThreatModel
    settings: AscentSettings
    noise: SampleNoise


def check_step_scale(step_scale: object, name: str = "step_scale") -> None:
    """A finite positive number: it scales the annealed step (not a constant step_size)."""
    if (
        isinstance(step_scale, bool)
        or not isinstance(step_scale, int | float)
        or not math.isfinite(step_scale)
        or not step_scale > 0
    ):
        raise InputError(f"{name} must be a finite positive number, got {step_scale!r}")


def check_attack_args(
    model: object,
    x: object,
    threat: object,
    *,
    steps: int,
    restarts: int,
    batch_size: int,
    step_size: float | None,
    seed: int,
    sample_ids: Tensor | None,
    stop_at_success: bool = False,
    step_scale: float = 1.0,
) -> AttackArgs:
    """Validated arguments. ``sample_ids`` (default ``0 .. N-1``) name the rows of ``x``:
    a sample's random starts depend on the seed and its id only, so attacking a data set
    in parts with their ids gives the same result as attacking it whole."""
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(threat, ThreatModel):
        raise InputTypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    x = model_input(model, check_images(x))
    check_positive_int(steps, "steps", STEPS)
    check_positive_int(restarts, "restarts", RESTARTS)
    check_positive_int(batch_size, "batch_size")
    if step_size is not None and not step_size > 0:
        raise InputError(f"step_size must be positive, got {step_size!r}")
    check_step_scale(step_scale)
    ids = torch.arange(x.shape[0]) if sample_ids is None else check_sample_ids(sample_ids, len(x))
    noise = SampleNoise(check_seed(seed), ids.cpu())
    return AttackArgs(
        model,
        x,
        threat,
        AscentSettings(steps, restarts, step_size, stop_at_success, step_scale),
        noise,
    )


def batches(n: int, batch_size: int, *, progress: bool, desc: str) -> Iterator[slice]:
    starts = range(0, n, batch_size)
    # The bar names the work and its size: every stage shows how many points it takes.
    label = f"{desc} ({n} points)"
    for start in tqdm(starts, desc=label, disable=not progress, unit="batch", leave=False):
        yield slice(start, min(start + batch_size, n))


# maximize or maximize_apgd: (objective, x, threat, settings, noise, rerun_successful=,
# start=) -> the best iterate per row
Engine = Callable[..., AscentResult]

# (clean outputs of the batch, the batch's rows of each extra tensor) -> the objective
ObjectiveFactory = Callable[[Tensor, tuple[Tensor, ...]], Objective]


@dataclass(frozen=True)
class BatchedAscent:
    """Per sample: the best point found, and the model's outputs on the clean and that point."""

    x_adv: Tensor
    outputs: Tensor
    outputs_adv: Tensor


def ascend_in_batches(
    args: AttackArgs,
    extras: tuple[Tensor, ...],
    make_objective: ObjectiveFactory,
    *,
    batch_size: int,
    rerun_successful: bool,
    progress: bool,
    desc: str,
    purpose: str,
    starts: Tensor | None = None,
    engine: Engine = maximize,
) -> BatchedAscent:
    """Run ``engine`` (PGD's :func:`~.engine.maximize` by default) over ``args.x`` in
    batches on the model's device, in eval mode; ``extras`` (labels, targets) and
    ``starts`` (first-restart points, instead of random ones) are cut into the same
    batches. Results come back on ``x``'s device."""
    model, x = args.model, args.x
    device = model_device(model, x.device)
    x_adv_parts, output_parts, adv_output_parts = [], [], []
    with eval_mode(model, purpose=purpose):
        for part in batches(x.shape[0], batch_size, progress=progress, desc=desc):
            xb = x[part].to(device)
            extra = tuple(tensor[part].to(device) for tensor in extras)
            with torch.no_grad():
                clean = checked_forward(model, xb, "the model")
            if not bool(torch.isfinite(clean).all()):
                # A NaN output makes every objective NaN: no point could ever be broken.
                raise InputError(
                    f"{purpose}: the model's output is NaN or infinite on clean points"
                )
            rows = torch.arange(part.start, part.stop)
            best = engine(
                make_objective(clean, extra),
                xb,
                args.threat,
                args.settings,
                args.noise.subset(rows),
                rerun_successful=rerun_successful,
                start=None if starts is None else starts[part].to(device),
            )
            with torch.no_grad():
                adv = model(best.x_adv)
            x_adv_parts.append(best.x_adv.to(x.device))
            output_parts.append(clean.to(x.device))
            adv_output_parts.append(adv.to(x.device))
    return BatchedAscent(
        torch.cat(x_adv_parts), torch.cat(output_parts), torch.cat(adv_output_parts)
    )
