"""The task-independent representation attack: maximise ``||f(x') - f(x)||_2`` over ``B(x)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import InputError
from ..core.noise import SampleNoise
from ..theory.threat import ThreatModel
from .apgd import maximize_apgd
from .common import Engine, ascend_in_batches, check_attack_args
from .engine import AscentResult, AscentSettings, Objective, keep_better, maximize

# The polish: a short PGD with small annealed steps from each row's best point. Both
# ascents take large early steps (2 eps), which leave the best point near a local maximum
# rather than at it; against a 10-restart, 500-step reference the polish lifts the 5th
# percentile of shift / reference by 0.01-0.03 for about a quarter more time
# (benchmarks/results/bench_tail.md).
POLISH_STEPS = 10
_POLISH_STEP_SCALE = 0.25


def maximize_both(
    objective: Objective,
    x: Tensor,
    threat: ThreatModel,
    settings: AscentSettings,
    noise: SampleNoise,
    *,
    rerun_successful: bool,
    start: Tensor | None = None,
) -> AscentResult:
    """PGD and APGD, each with the whole budget, per row the larger objective, then the
    polish from it: PGD's annealed step and APGD's adaptive one get stuck at different
    points, so the pair lifts the tail of the shift over either alone
    (benchmarks/results/bench_tail.md: at the same cost, PGD with twice the restarts does
    about as well before the polish)."""
    found = keep_better(
        *(
            engine(
                objective,
                x,
                threat,
                settings,
                noise,
                rerun_successful=rerun_successful,
                start=start,
            )
            for engine in (maximize, maximize_apgd)
        )
    )
    polish = AscentSettings(POLISH_STEPS, 1, None, step_scale=_POLISH_STEP_SCALE)
    polished = maximize(
        objective, x, threat, polish, noise, rerun_successful=rerun_successful, start=found.x_adv
    )
    return keep_better(found, polished)


_ENGINES: dict[str, Engine] = {"pgd": maximize, "apgd": maximize_apgd, "pgd+apgd": maximize_both}
METHODS = tuple(_ENGINES)


@dataclass(frozen=True)
class RepresentationAttackResult:
    """Per-sample outcome; ``shift`` is a lower bound on ``sup_{x' in B(x)} ||f(x') - f(x)||_2``."""

    x_adv: Tensor
    delta: Tensor
    shift: Tensor
    features: Tensor
    features_adv: Tensor
    threat: ThreatModel


def attack_representation(
    encoder: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 20,
    restarts: int = 2,
    seed: int = 0,
    batch_size: int = 256,
    step_size: float | None = None,
    progress: bool = False,
    sample_ids: Tensor | None = None,
    method: str = "pgd+apgd",
) -> RepresentationAttackResult:
    """Find, for every input, the point of ``B(x)`` whose representation moves furthest.

    ``encoder`` maps a batch of inputs in [0, 1] to representations (flattened per
    sample). No labels and no head are involved: the result is reused by every
    downstream head. The encoder runs in eval mode; its parameters are not touched.
    ``sample_ids`` name the rows for their random starts (see :func:`check_attack_args`).
    ``method`` is ``"pgd"`` (a cosine-annealed step, or ``step_size``), ``"apgd"``
    (momentum and per-sample step halving, Croce & Hein 2020; ``step_size`` unused) or
    ``"pgd+apgd"`` (both, each with ``steps`` and ``restarts``; the larger shift per sample,
    then a 10-step PGD with small steps from it). The defaults are the library's one
    default attack, the one studies and :func:`~robust_transfer.measure` run
    (:class:`AttackSettings`): the strongest in the tail at its cost that was measured.
    """
    engine = _ENGINES.get(method)
    if engine is None:
        raise InputError(f"unknown representation attack {method!r}: one of {', '.join(_ENGINES)}")
    args = check_attack_args(
        encoder,
        x,
        threat,
        steps=steps,
        restarts=restarts,
        batch_size=batch_size,
        step_size=step_size,
        seed=seed,
        sample_ids=sample_ids,
    )
    model = args.model

    def squared_shift(clean: Tensor, _: tuple[Tensor, ...]) -> Objective:
        clean = clean.flatten(1)

        def objective(x_adv: Tensor, rows: Tensor, restart: int) -> tuple[Tensor, None]:
            # The squared distance has the same ascent direction as the distance
            # (normalised and sign steps ignore a positive per-sample factor) and,
            # unlike it, a gradient at zero.
            return (model(x_adv).flatten(1) - clean[rows]).pow(2).sum(dim=1), None

        return objective

    best = ascend_in_batches(
        args,
        (),
        squared_shift,
        batch_size=batch_size,
        rerun_successful=True,
        progress=progress,
        desc=f"representation attack {args.threat}",
        purpose="the representation attack",
        engine=engine,
    )
    features, features_adv = best.outputs.flatten(1), best.outputs_adv.flatten(1)
    return RepresentationAttackResult(
        x_adv=best.x_adv,
        delta=best.x_adv - args.x,
        shift=torch.linalg.vector_norm(features_adv - features, dim=1),
        features=features,
        features_adv=features_adv,
        threat=args.threat,
    )
