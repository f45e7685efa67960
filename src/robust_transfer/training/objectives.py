"""The training objectives of the pretraining protocols: each a loss of (model, inputs,
labels, generator), seeded through the generator so that a protocol's run is repeatable.
Certified objectives bound the margins with the certifiers' own ops (IBP, CROWN-IBP)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import attack_classifier
from ..attacks.engine import AscentSettings, maximize
from ..certify.base import Refusal
from ..certify.crown import crown_ibp_margins
from ..certify.layers import FLATTEN, ops_of
from ..certify.ops import Op, chain_interval
from ..core.errors import InputError, InputTypeError
from ..core.noise import SampleNoise
from ..models import Classifier, Encoder
from ..theory.bounds import worst_case_cross_entropy
from ..theory.threat import ThreatModel
from .augment import augment

if TYPE_CHECKING:
    from .pretrain import PretrainConfig

# (model, inputs, labels, generator) -> mean loss of the batch
ModelLoss = Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def protocol_threat(config: PretrainConfig) -> ThreatModel:
    if config.threat is None:
        raise InputError(f"protocol {config.protocol.value!r} needs a threat model")
    return config.threat


class EpsSchedule:
    """The threat of each training step: eps ramps linearly from 0 to the target over
    the first ``warmup`` share of ``steps`` and then holds (``warmup = 0``: the target
    from the first step). Fine-tuning a non-robust encoder adversarially at the full eps
    from the start can wreck its features before the head has learnt anything."""

    def __init__(self, threat: ThreatModel, steps: int = 1, warmup: float = 0.0) -> None:
        self.threat, self.steps, self.warmup = threat, max(1, steps), warmup
        self.done = 0
        self._last: ThreatModel | None = None
        self._repeat = False

    def next(self) -> ThreatModel | None:
        """The next step's threat; None while eps is still 0 (a clean step)."""
        if self._repeat:
            self._repeat = False
            return self._last
        ramp = self.warmup * self.steps
        share = 1.0 if ramp == 0 else min(1.0, self.done / ramp)
        self.done += 1
        self._last = self.threat.with_eps(share * self.threat.eps) if share > 0 else None
        return self._last

    def repeat(self) -> None:
        """The next call gives the last threat again: a second loss of the same step."""
        self._repeat = True


def adversarial_loss(schedule: EpsSchedule, steps: int) -> ModelLoss:
    """PGD adversarial training (Madry et al., 2018): cross-entropy at a PGD point of
    ``steps`` steps, the attack run with the model in eval mode."""

    def loss(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        threat = schedule.next()
        if threat is None:
            return F.cross_entropy(model(x), y)
        model.eval()
        attacked = attack_classifier(
            model,
            x,
            y,
            threat,
            steps=steps,
            step_size=2.5 * threat.eps / steps,
            seed=_seed_from(generator),
            batch_size=len(x),
        )
        model.train()
        return F.cross_entropy(model(attacked.x_adv), y)

    return loss


def trades_loss(schedule: EpsSchedule, steps: int, beta: float) -> ModelLoss:
    """TRADES (Zhang et al., 2019): cross-entropy plus ``beta`` times the KL divergence
    between the clean and the attacked prediction, at the point that maximises it."""

    def loss(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        threat = schedule.next()
        if threat is None:
            return F.cross_entropy(model(x), y)
        settings = AscentSettings(steps, 1, 2.5 * threat.eps / steps)
        model.eval()
        with torch.no_grad():
            clean_log_p = F.log_softmax(model(x), dim=1)

        def divergence(x_adv: Tensor, rows: Tensor, restart: int) -> tuple[Tensor, None]:
            log_q = F.log_softmax(model(x_adv), dim=1)
            kl = F.kl_div(log_q, clean_log_p[rows], log_target=True, reduction="none")
            return kl.sum(dim=1), None

        noise = SampleNoise.first(_seed_from(generator), len(x))
        x_adv = maximize(divergence, x, threat, settings, noise, rerun_successful=True).x_adv
        model.train()
        logits = model(x)
        kl = F.kl_div(
            F.log_softmax(model(x_adv), dim=1),
            F.log_softmax(logits, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return F.cross_entropy(logits, y) + beta * kl

    return loss


def nt_xent(anchors: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """Per-anchor NT-Xent (SimCLR) loss: each anchor's positive against all 2N - 2 others."""
    z = F.normalize(torch.cat([anchors, positives]), dim=1)
    n = len(anchors)
    similarity = z @ z.T / temperature
    similarity = similarity.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -1e9)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    per_view = F.cross_entropy(similarity, targets, reduction="none")
    return (per_view[:n] + per_view[n:]) / 2


class Contrastive(nn.Module):
    """Encoder plus the projection head SimCLR trains through and then throws away."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        dim = encoder.feature_dim
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 32))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.projection(self.encoder(x))
        return out


def simclr_loss(config: PretrainConfig) -> ModelLoss:
    def loss(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        first, second = augment(x, generator), augment(x, generator)
        return nt_xent(model(first), model(second), config.temperature).mean()

    return loss


def adversarial_contrastive_loss(config: PretrainConfig) -> ModelLoss:
    """RoCL-style: an instance-wise attack turns one view into the view that is hardest to
    match with the other; the adversarial view joins as an extra positive."""
    threat = protocol_threat(config)
    settings = AscentSettings(config.attack_steps, 1, 2.5 * threat.eps / config.attack_steps)

    def loss(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        first, second = augment(x, generator), augment(x, generator)
        model.eval()
        with torch.no_grad():
            target = F.normalize(model(second), dim=1)

        def mismatch(x_adv: Tensor, rows: Tensor, restart: int) -> tuple[Tensor, None]:
            z = F.normalize(model(x_adv), dim=1)
            logits = z @ target.T / config.temperature
            return F.cross_entropy(logits, rows, reduction="none"), None

        noise = SampleNoise.first(_seed_from(generator), len(x))
        adversarial = maximize(
            mismatch, first, threat, settings, noise, rerun_successful=True
        ).x_adv
        model.train()
        z_first, z_second, z_adv = model(first), model(second), model(adversarial)
        clean = nt_xent(z_first, z_second, config.temperature)
        robust = nt_xent(z_adv, z_second, config.temperature)
        return (clean + robust).mean() / 2

    return loss


def lipschitz_margin_loss(radius: float) -> ModelLoss:
    """Cross-entropy on the worst-case logits of the certified probe (docs/theory.md,
    Result 1), with the feature radius the encoder's Lipschitz constant guarantees for
    the threat model."""

    def loss(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        if not isinstance(model, Classifier):
            raise InputTypeError("the Lipschitz-margin loss trains a Classifier")
        return worst_case_cross_entropy(model(x), model.head.weight, y, radius)

    return loss


def _encoder_ops(model: Classifier) -> list[Op]:
    ops = ops_of(model.encoder)
    if isinstance(ops, Refusal):
        raise InputError(f"certified training cannot read the encoder: {ops.reason}")
    return [*ops, FLATTEN]


def ibp_margins(ops: list[Op], head: nn.Linear, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Per sample and class ``j``, the interval bound on ``z_j - z_y`` over the box
    ``[x - eps, x + eps] ∩ [0, 1]`` (which holds the threat set of either norm), through
    the encoder's ``ops`` and the head's class differences; 0 at ``j = y``.
    Differentiable."""
    lower, upper = chain_interval(ops, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    weight, bias = head.weight, head.bias
    differences = weight[None, :, :] - weight[y][:, None, :]  # (N, K, features): w_j - w_y
    return (
        torch.einsum("nkf,nf->nk", differences, centre)
        + torch.einsum("nkf,nf->nk", differences.abs(), radius)
        + (bias[None, :] - bias[y][:, None])
    )


def _certified_margins(
    model: Classifier, x: Tensor, y: Tensor, threat: ThreatModel, crown_weight: float
) -> Tensor:
    """IBP's bounds on ``z_j - z_y``, mixed with CROWN-IBP's (``crown_weight`` of them)."""
    ops = _encoder_ops(model)
    ibp = ibp_margins(ops, model.head, x, y, threat.eps)
    if crown_weight == 0.0:
        return ibp
    crown = crown_ibp_margins(ops, model.head, x, y, threat)
    return crown_weight * crown + (1.0 - crown_weight) * ibp


def tightest_margins(model: Classifier, x: Tensor, y: Tensor, config: PretrainConfig) -> Tensor:
    """The protocol's bounds on ``z_j - z_y`` at its radius, the smaller of IBP's and (for
    CROWN-IBP) CROWN-IBP's per entry: both hold."""
    ops, threat = _encoder_ops(model), protocol_threat(config)
    margins = ibp_margins(ops, model.head, x, y, threat.eps)
    if config.uses_crown:
        margins = torch.minimum(margins, crown_ibp_margins(ops, model.head, x, y, threat))
    return margins


def certified_loss(config: PretrainConfig, steps: int) -> ModelLoss:
    """IBP training (Gowal et al., 2018): ``k CE(z, y) + (1 - k) CE(ztilde, y)`` with
    ``ztilde`` certified upper bounds on ``z_j - z_y`` at radius ``e``: IBP's, or for
    CROWN-IBP (Zhang et al., 2020) ``b CROWN-IBP + (1 - b) IBP`` with ``b`` falling from 1
    to 0 (CROWN-IBP's tighter bounds steady the start, IBP's cheaper ones finish). As the
    bounds need to stay stable (they explode on an untrained network, and the head then
    collapses to a constant): the first quarter of the steps trains on clean inputs,
    the next half ramps ``e`` from 0 to eps, ``k`` from 1 to 1/2 and ``b`` from 1 to 0,
    the last quarter holds them. Short schedules still collapse: give it at least ten
    epochs of a few thousand images."""
    threat = protocol_threat(config)
    crown = config.uses_crown
    done = [0]

    def loss(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        if not isinstance(model, Classifier):
            raise InputTypeError("certified training trains a Classifier")
        ramp = min(1.0, max(0.0, (done[0] - steps / 4) / max(1.0, steps / 2)))
        done[0] += 1
        clean = F.cross_entropy(model(x), y)
        if ramp == 0.0:
            return clean
        radius = ThreatModel(threat.norm, ramp * threat.eps)
        worst = _certified_margins(model, x, y, radius, (1.0 - ramp) if crown else 0.0)
        kappa = 1.0 - ramp / 2
        return kappa * clean + (1 - kappa) * F.cross_entropy(worst, y)

    return loss
