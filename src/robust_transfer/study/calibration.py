"""A short measurement of one encoder on this machine: what an image forward, an image
backward and a point's certificate cost, in seconds and bytes. The plan multiplies the
passes of each stage (:mod:`.cost`) by them.

Everything is timed at the batch size the study will run at: the study's, or fewer
images where a batch of backward passes would keep more than :data:`ACTIVATION_BUDGET`
bytes (:func:`bounded_batch`, which the study uses too).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attacks.representation import attack_representation
from ..certify import HEAD_CERTIFIERS, Certifier, Refusal, get_certifier, margin_lower_bounds
from ..core.runtime import eval_mode, model_device
from ..models.features import extract_features
from ..theory.threat import ThreatModel

# A timed run this long is not repeated.
_ENOUGH = 0.3
_STEPS = 5
_REPEATS = 5
# Random features a probe's loss is timed on, and the evaluations of a fit: L-BFGS's
# default max_eval (1.25 x its 200 iterations, training.linear_probe).
_PROBE_POINTS = 256
_PROBE_EVALUATIONS = 250
# Bytes of activations a batch of backward passes may keep (:func:`bounded_batch`).
ACTIVATION_BUDGET = 2 * 2**30
# Certifiers are timed on one point and on this many (their cost is a line in the points).
_CERTIFIER_POINTS = 8


@dataclass(frozen=True)
class Calibration:
    """One encoder on this machine: seconds per image of a forward and of a backward
    pass (an attack step's projection included), the bytes a backward pass keeps per
    image and per batch, those a forward pass alone needs per image (its largest layer's
    input and output), the parameters' bytes, and per certifier the cost of a call or
    why it refused."""

    features: int
    input_numel: int
    batch: int
    forward: float
    backward: float
    activation_bytes: float
    batch_bytes: float
    forward_bytes: float
    parameter_bytes: int
    certifiers: dict[str, CallCost] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    head_certificate: CallCost | None = None  # on a head of ``head_classes`` classes
    head_classes: int = 2
    probe: float = 0.0  # seconds per training point to fit a probe on the features

    def seconds(self, forward: float, backward: float) -> float:
        return forward * self.forward + backward * self.backward


@dataclass(frozen=True)
class CallCost:
    """Seconds of one call on ``n`` points: ``fixed + per_point * n``."""

    fixed: float
    per_point: float

    def __call__(self, points: int) -> float:
        return self.fixed + self.per_point * points


def _synchronized(run: Callable[[], object]) -> float:
    """Seconds of ``run``, to the end of its kernels on a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _timed(run: Callable[[], object], *, warm: bool = False) -> float:
    """The fastest of a few runs after a warm-up (first calls allocate and pick kernels;
    ``warm``: it ran already): up to :data:`_REPEATS` while they take less than
    :data:`_ENOUGH` seconds in all."""
    if not warm:
        run()
    best, spent = float("inf"), 0.0
    for _ in range(_REPEATS):
        took = _synchronized(run)
        best, spent = min(best, took), spent + took
        if spent >= _ENOUGH:
            break
    return best


def _call_cost(run: Callable[[Tensor], object], x: Tensor) -> CallCost | Refusal:
    """A certifier's cost line from calls on one point and on all of ``x`` (a refusal
    of either is the certifier's answer)."""
    for outcome in (run(x[:1]), run(x)):
        if isinstance(outcome, Refusal):
            return outcome
    one = _timed(lambda: run(x[:1]), warm=True)
    many = _timed(lambda: run(x), warm=True)
    per_point = max(0.0, (many - one) / max(1, len(x) - 1))
    return CallCost(max(0.0, one - per_point), per_point)


def _saved_bytes(encoder: nn.Module, x: Tensor) -> tuple[float, float]:
    """Bytes autograd keeps for a backward pass of ``x`` through ``encoder``, and the
    largest activation among them per image (a tensor with a row per image; the weights
    it keeps, plain or computed from a parametrisation, are not activations)."""
    total, largest = 0, 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total, largest
        size = tensor.numel() * tensor.element_size()
        total += size
        if tensor.dim() > 0 and tensor.shape[0] == len(x):
            largest = max(largest, size // len(x))
        return tensor

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        # The input's gradient only: the encoder's parameters keep their .grad.
        torch.autograd.grad(encoder(x).flatten(1).sum(), x)
    return float(total), float(largest)


def activations(encoder: nn.Module, x: Tensor) -> tuple[float, float, float]:
    """Bytes a backward pass through ``encoder`` keeps per image and once per batch (a
    parametrised weight), from one and three of the points ``x`` (a weight's rows
    rarely number three), and the largest activation of one image (what a forward pass
    alone needs about twice of)."""
    device = model_device(encoder, torch.device("cpu"))
    with eval_mode(encoder, purpose="measuring activations"):
        (one, _), (three, largest) = (
            _saved_bytes(encoder, x[torch.arange(n) % len(x)].to(device)) for n in (1, 3)
        )
    per_image = max(0.0, (three - one) / 2)
    return per_image, max(0.0, one - per_image), largest


def bounded_batch(encoder: nn.Module, x: Tensor, batch_size: int) -> int:
    """``batch_size``, or fewer images where a batch of backward passes would keep more
    than :data:`ACTIVATION_BUDGET` bytes (a ResNet-50 at 224 x 224 keeps about 0.1 GB per
    image): attacks and the profile then take batches of this many, so their memory
    stays bounded whatever the batch size asked for (per-sample random starts make the
    results the same)."""
    per_image, _, _ = activations(encoder, x)
    return max(1, min(batch_size, int(ACTIVATION_BUDGET // max(per_image, 1.0))))


def _time_batch(encoder: nn.Module, xb: Tensor, threat: ThreatModel) -> tuple[float, float]:
    """Seconds per image of a forward pass and of an attack step (a forward and a
    backward pass and the projection) on the batch ``xb``: the step from the difference
    of attacks of :data:`_STEPS` and one step, which cancels what every attack does once
    (its clean and final outputs). Each is warmed up first at the same batch (the first
    calls allocate and pick kernels)."""
    batch = len(xb)

    def attack(steps: int) -> Callable[[], object]:
        return lambda: attack_representation(
            encoder, xb, threat, steps=steps, restarts=1, method="pgd", batch_size=batch
        )

    forward = _timed(lambda: extract_features(encoder, xb, batch_size=batch)) / batch
    one, many = _timed(attack(1)), _timed(attack(_STEPS), warm=True)
    return forward, max(0.0, many - one) / (_STEPS - 1) / batch


def _certifying(
    certifier: Certifier, encoder: nn.Module, threat: ThreatModel
) -> Callable[[Tensor], object]:
    return lambda xs: certifier.certify(encoder, xs, threat)


def _probe_seconds(features: int, classes: int) -> float:
    """Seconds per training point to fit a linear probe on the features (what every
    probe and every protocol that starts from one does): full-batch L-BFGS runs at most
    :data:`_PROBE_EVALUATIONS` loss-and-gradient evaluations, and features of a real
    encoder are ill-conditioned enough to use them, so one evaluation on random
    features of the encoder's width is timed and multiplied."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(_PROBE_POINTS, features, generator=generator)
    y = torch.arange(_PROBE_POINTS) % classes
    head = nn.Linear(features, classes)

    def evaluation() -> None:
        loss = nn.functional.cross_entropy(head(z), y) + 1e-4 * head.weight.square().sum()
        torch.autograd.grad(loss, list(head.parameters()))

    return _timed(evaluation) * _PROBE_EVALUATIONS / _PROBE_POINTS


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
    per_image, per_batch, largest = activations(encoder, x)
    # Timed at the batch the study will run: per-image costs change with the batch (a
    # big one allocates gigabytes per step).
    batch = bounded_batch(encoder, x, batch_size)
    xb = x[torch.arange(batch) % len(x)].to(device)
    forward, step = _time_batch(encoder, xb, threat)
    # A step is one forward and one backward pass in the plan's counts.
    backward = max(0.0, step - forward)
    with eval_mode(encoder, purpose="the calibration"):
        features = int(encoder(xb[:1]).flatten(1).shape[1])
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
        probe=_probe_seconds(features, classes),
        features=features,
        input_numel=x[0].numel(),
        batch=batch,
        forward=forward,
        backward=backward,
        activation_bytes=per_image,
        batch_bytes=per_batch,
        forward_bytes=2.0 * largest,
        parameter_bytes=parameters,
        certifiers=timed,
        refused=refused,
        head_certificate=head_cost,
        head_classes=classes,
    )


def resident_bytes() -> float:
    """This process's resident memory now (data and encoders loaded): what the study
    holds before its first stage."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return float(pages * resource.getpagesize())
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
