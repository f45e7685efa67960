"""The task-independent representation attack: maximise ``||f(x') - f(x)||_2`` over ``B(x)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..runtime import eval_mode, model_device
from ..threat import ThreatModel
from .common import batches, check_attack_args, seeded_generator
from .engine import maximize


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
    steps: int = 50,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    step_size: float | None = None,
    progress: bool = False,
) -> RepresentationAttackResult:
    """Find, for every input, the point of ``B(x)`` whose representation moves furthest.

    ``encoder`` maps a batch of inputs in [0, 1] to representations (flattened per
    sample). No labels and no head are involved: the result is reused by every
    downstream head. The encoder runs in eval mode; its parameters are not touched.
    """
    encoder, x, threat, settings = check_attack_args(
        encoder,
        x,
        threat,
        steps=steps,
        restarts=restarts,
        batch_size=batch_size,
        step_size=step_size,
    )
    device = model_device(encoder, x.device)
    generator = seeded_generator(seed, device)
    x_adv_parts, feature_parts, adv_feature_parts = [], [], []
    with eval_mode(encoder, purpose="the representation attack"):
        for part in batches(
            x.shape[0], batch_size, progress=progress, desc=f"representation attack {threat}"
        ):
            xb = x[part].to(device)
            with torch.no_grad():
                clean = encoder(xb).flatten(1)

            def squared_shift(
                x_adv: Tensor, rows: Tensor, restart: int, clean: Tensor = clean
            ) -> tuple[Tensor, None]:
                # The squared distance has the same ascent direction as the distance
                # (normalised and sign steps ignore a positive per-sample factor) and,
                # unlike it, a gradient at zero.
                return (encoder(x_adv).flatten(1) - clean[rows]).pow(2).sum(dim=1), None

            best = maximize(squared_shift, xb, threat, settings, generator, rerun_successful=True)
            with torch.no_grad():
                adv = encoder(best.x_adv).flatten(1)
            x_adv_parts.append(best.x_adv.to(x.device))
            feature_parts.append(clean.to(x.device))
            adv_feature_parts.append(adv.to(x.device))
    x_adv = torch.cat(x_adv_parts)
    features = torch.cat(feature_parts)
    features_adv = torch.cat(adv_feature_parts)
    return RepresentationAttackResult(
        x_adv=x_adv,
        delta=x_adv - x,
        shift=torch.linalg.vector_norm(features_adv - features, dim=1),
        features=features,
        features_adv=features_adv,
        threat=threat,
    )
