"""Sanity checks of a model under attack, in the spirit of AutoAttack's own: where a
model hides its gradient or answers at random, gradient attacks fail for reasons that
have nothing to do with robustness, and every attacked robust accuracy overestimates.

Per sample: the gradient of a score is exactly zero or not finite at the clean input,
and two forward passes of the same batch disagree. The third of AutoAttack's signs,
Square (black-box) breaking points the white-box attacks left robust, comes from
:func:`~robust_transfer.attacks.reference.attack_autoattack`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.runtime import eval_mode, model_device
from ..core.schema import Array, Arrays
from .classifier import margin_loss
from .common import batches

# Two forwards of one batch may differ by float reordering on some devices, never by this
# much relative to the output.
_RELATIVE_TOLERANCE = 1e-4

# (outputs of the model on a batch, the batch's rows) -> a per-sample score whose gradient
# an attack follows
Score = Callable[[Tensor, Tensor], Tensor]


def margin_score(y: Tensor) -> Score:
    """The best other logit minus the true one: its gradient vanishes only where the
    model's does (cross-entropy's also vanishes where softmax saturates)."""

    def score(logits: Tensor, rows: Tensor) -> Tensor:
        return margin_loss(logits, y[rows].to(logits.device))

    return score


def sanity_arrays(model: nn.Module, x: Tensor, score: Score, *, batch_size: int) -> Arrays:
    """``zero_gradient``, ``nonfinite_gradient`` and ``random_output`` per sample of ``x``."""
    device = model_device(model, x.device)
    zero, nonfinite, random = [], [], []
    with eval_mode(model, purpose="the sanity checks"):
        for part in batches(len(x), batch_size, progress=False, desc="sanity"):
            xb = x[part].to(device).requires_grad_(True)
            with torch.enable_grad():
                outputs = model(xb)
                (grad,) = torch.autograd.grad(
                    score(outputs, torch.arange(part.start, part.stop)).sum(), xb
                )
            with torch.no_grad():
                # Both without autograd: the same kernels, so only randomness differs.
                first, second = (model(xb.detach()).flatten(1) for _ in range(2))
            grad = grad.flatten(1)
            zero.append((grad == 0).all(dim=1).cpu())
            nonfinite.append((~torch.isfinite(grad)).any(dim=1).cpu())
            gap = torch.linalg.vector_norm(first - second, dim=1)
            size = torch.linalg.vector_norm(first, dim=1).clamp_min(1.0)
            random.append((gap > _RELATIVE_TOLERANCE * size).cpu())
    return {
        Array.ZERO_GRADIENT: torch.cat(zero).to(x.device),
        Array.NONFINITE_GRADIENT: torch.cat(nonfinite).to(x.device),
        Array.RANDOM_OUTPUT: torch.cat(random).to(x.device),
    }
