"""A short measurement of one encoder on this machine: what an image forward, an image
backward and a point's certificate cost, in seconds and bytes. The plan multiplies the
passes of each stage (:mod:`.cost`) by them.

The batch grows from a few images until a batch of forward and backward passes takes
:data:`_ENOUGH` seconds or reaches the study's batch size, so a small encoder is timed at
the batch size it will run at and a big one in a second or two.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..attacks.representation import attack_representation
from ..certify import HEAD_CERTIFIERS, Certifier, Refusal, get_certifier, margin_lower_bounds
from ..core.runtime import eval_mode, model_device
from ..models.features import extract_features
from ..theory.threat import ThreatModel

# A batch that takes this long is timed; smaller ones double first.
_ENOUGH = 0.3
_STEPS = 2
# Certifiers are timed on one point and on this many (their cost is a line in the points).
_CERTIFIER_POINTS = 8


@dataclass(frozen=True)
class Calibration:
    """One encoder on this machine: seconds per image of a forward and of a backward
    pass (an attack step's projection included), the bytes a backward pass keeps per
    image and per batch, the parameters' bytes, and per certifier the cost of a call or
    why it refused."""

    features: int
    input_numel: int
    batch: int
    forward: float
    backward: float
    activation_bytes: float
    batch_bytes: float
    parameter_bytes: int
    certifiers: dict[str, CallCost] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    head_certificate: CallCost | None = None  # on a head of the task's classes

    def seconds(self, forward: float, backward: float) -> float:
        return forward * self.forward + backward * self.backward


@dataclass(frozen=True)
class CallCost:
    """Seconds of one call on ``n`` points: ``fixed + per_point * n``."""

    fixed: float
    per_point: float

    def __call__(self, points: int) -> float:
        return self.fixed + self.per_point * points


def _timed(run: Callable[[], object]) -> float:
    """The fastest of a few runs after a warm-up (first calls allocate and pick kernels):
    three while they are quick, one when a run takes :data:`_ENOUGH` seconds."""
    run()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        if best >= _ENOUGH:
            break
    return best


def _call_cost(run: Callable[[Tensor], object], x: Tensor) -> CallCost | Refusal:
    """A certifier's cost line from calls on one point and on all of ``x``."""
    outcome = run(x[:1])
    if isinstance(outcome, Refusal):
        return outcome
    one, many = _timed(lambda: run(x[:1])), _timed(lambda: run(x))
    per_point = max(0.0, (many - one) / max(1, len(x) - 1))
    return CallCost(max(0.0, one - per_point), per_point)


def _saved_bytes(encoder: nn.Module, x: Tensor) -> float:
    """Bytes autograd keeps for the backward pass of ``x`` through ``encoder``."""
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        encoder(x.requires_grad_(True)).flatten(1).sum().backward()
    return float(total)


def _time_batch(encoder: nn.Module, xb: Tensor, threat: ThreatModel) -> tuple[float, float]:
    """Seconds per image of a forward pass, and seconds of a short attack on ``xb``."""
    batch = len(xb)
    forward = _timed(lambda: extract_features(encoder, xb, batch_size=batch)) / batch
    whole = _timed(
        lambda: attack_representation(
            encoder, xb, threat, steps=_STEPS, restarts=1, method="pgd", batch_size=batch
        )
    )
    return forward, whole


def _certifying(
    certifier: Certifier, encoder: nn.Module, threat: ThreatModel
) -> Callable[[Tensor], object]:
    return lambda xs: certifier.certify(encoder, xs, threat)


def calibrate(
    encoder: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    *,
    batch_size: int,
    certifiers: Sequence[str] = (),
    head_certifier: str | None = None,
    classes: int = 2,
) -> Calibration:
    """Time ``encoder`` on (repeats of) the points ``x`` under ``threat``: passes, the
    shift ``certifiers`` and the ``head_certifier`` on a head of ``classes``."""
    device = model_device(encoder, torch.device("cpu"))
    batch = max(1, min(4, batch_size))
    while True:
        xb = x[torch.arange(batch) % len(x)].to(device)
        forward, whole = _time_batch(encoder, xb, threat)
        if whole >= _ENOUGH or batch >= batch_size:
            break
        batch = min(batch_size, batch * 2)
    # The attack made (steps + 3) forward and ``steps`` backward passes per image.
    backward = max(0.0, whole / batch - (_STEPS + 3) * forward) / _STEPS
    with eval_mode(encoder, purpose="the calibration"):
        features = int(encoder(xb[:1]).flatten(1).shape[1])
        # On one and on two images: what a layer keeps once per batch (a parametrised
        # weight) is not kept per image.
        one, two = (_saved_bytes(encoder, x[torch.arange(n) % len(x)].to(device)) for n in (1, 2))
    parameters = sum(p.numel() * p.element_size() for p in encoder.parameters())
    timed: dict[str, CallCost] = {}
    refused: dict[str, str] = {}
    points = x[torch.arange(_CERTIFIER_POINTS) % len(x)].to(device)
    with eval_mode(encoder, purpose="certification"):
        for name in certifiers:
            line = _call_cost(_certifying(get_certifier(name), encoder, threat), points)
            if isinstance(line, Refusal):
                refused[name] = line.reason
            else:
                timed[name] = line
        head_cost: CallCost | None = None
        if head_certifier is not None:
            head = nn.Linear(features, classes).to(device)
            intermediate = HEAD_CERTIFIERS[head_certifier]
            line = _call_cost(
                lambda xs: margin_lower_bounds(encoder, head, xs, threat, intermediate), points
            )
            if isinstance(line, Refusal):
                refused[head_certifier] = line.reason
            else:
                head_cost = line
    return Calibration(
        features=features,
        input_numel=x[0].numel(),
        batch=batch,
        forward=forward,
        backward=backward,
        activation_bytes=max(0.0, two - one),
        batch_bytes=max(0.0, 2 * one - two),
        parameter_bytes=parameters,
        certifiers=timed,
        refused=refused,
        head_certificate=head_cost,
    )
