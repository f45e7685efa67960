"""What a study's work costs in images through an encoder, before any of it runs.

Every stage of a study runs its encoder forward on some images and, for attacks,
training and the Jacobian, backward from some of them. :class:`Passes` counts both per
point; the functions below give them for each stage as the code that does the stage
makes them (``tests/test_cost.py`` counts the real passes with hooks and compares).
Where a stage stops early (an attack's later restarts only re-attack the points still
robust, AutoAttack only runs on what PGD left), the count is the most it can make; the
refinement of the expected robust accuracy attacks only the points near the boundary,
a share the plan's pilot measures (:mod:`.pilot`) or, where it does not run, assumes
(:data:`REFINED_SHARE`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..attacks.representation import POLISH_STEPS
from ..attacks.settings import AttackSettings
from ..estimates.expected import RefineSettings
from ..training.advice import ADVICE_PROBE_STEPS
from ..training.pretrain import PretrainConfig, PretrainProtocol
from ..training.protocols import AdaptConfig, AdaptProtocol, Adversary

# The share of points the expected robust accuracy refines by attack where no pilot
# measured it (trained encoders: the points within 10% of their margin by first order's
# account), and the eps per refined point a curve attacks at then.
REFINED_SHARE = 0.1
CURVE_ATTACKS = 2
# AutoAttack "standard": its steps, targets at most, and Square's queries.
_AUTOATTACK_STEPS, _AUTOATTACK_TARGETS, _SQUARE_QUERIES = 100, 9, 5000


@dataclass(frozen=True)
class Passes:
    """Images through an encoder: forward passes (all of them, those a backward pass
    follows too) and backward passes."""

    forward: float = 0.0
    backward: float = 0.0

    def __add__(self, other: Passes) -> Passes:
        return Passes(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, times: float) -> Passes:
        return Passes(self.forward * times, self.backward * times)

    __rmul__ = __mul__


NONE = Passes()
# One forward pass of a point (its features, a prediction).
FORWARD = Passes(1.0, 0.0)
# The sanity checks: a gradient, and two forward passes to compare.
SANITY = Passes(3.0, 1.0)


def ascent(steps: int, restarts: int) -> Passes:
    """Projected gradient ascent: per restart, ``steps`` steps and a last look."""
    return Passes(restarts * (steps + 1.0), restarts * float(steps))


def attack(steps: int, restarts: int) -> Passes:
    """An attack of the engine (ascent and the clean and final outputs)."""
    return ascent(steps, restarts) + Passes(2.0, 0.0)


def representation(settings: AttackSettings) -> Passes:
    """The representation attack of ``settings`` per point."""
    one = ascent(settings.representation_steps, settings.representation_restarts)
    if settings.representation_method == "pgd+apgd":
        one = one * 2 + ascent(POLISH_STEPS, 1)
    return one + Passes(2.0, 0.0)


def study_pgd(settings: AttackSettings) -> Passes:
    """The study's PGD on a head: cross-entropy, then targeted margins (at most)."""
    return attack(settings.steps, settings.restarts) + attack(
        settings.steps, settings.targeted_restarts
    )


def profile(directions: int, extensions: int = 1) -> Passes:
    """The expected robust accuracy's profile: features, then a forward pass for each
    time it is extended (once for every feature, or once per head adding its class
    differences) and one backward pass per feature direction stored."""
    return Passes(1.0 + extensions, float(directions))


def refinement(refine: RefineSettings, attacks: float) -> Passes:
    """The attacks of the expected robust accuracy (and its curve), ``attacks`` of them
    per point (each on one point near the boundary), stopped at success."""
    return attack(refine.steps, 1) * attacks


def autoattack(classes: int) -> Passes:
    """AutoAttack "standard" per point, at most: APGD-CE, APGD-T and FAB-T (two passes
    a step) over the targets the classes allow, and Square's queries."""
    targets = min(_AUTOATTACK_TARGETS, classes - 1)
    gradient = _AUTOATTACK_STEPS * (1 + targets + 2 * targets)
    return Passes(gradient + _SQUARE_QUERIES, gradient)


def _adversarial_step(steps: int, adversary: Adversary, *, trains_encoder: bool) -> Passes:
    """Per point and epoch of training against an attack: the attack's steps, the
    clean and adversarial outputs, and (when the encoder trains) the loss's backward."""
    extra = (2.0 if adversary is Adversary.TRADES else 1.0) if trains_encoder else 0.0
    return Passes(steps + 4.0, steps + extra)


def adaptation(config: AdaptConfig, points: int, *, features_cached: bool) -> Passes:
    """Images through the encoder to train one head on ``points`` training points
    (features of a probe read from the study's store when ``features_cached``)."""
    protocol = config.protocol
    probes_first = protocol in (
        AdaptProtocol.LP_FT,
        AdaptProtocol.PARTIAL_FINETUNE,
        AdaptProtocol.BITFIT,
        AdaptProtocol.LORA,
        AdaptProtocol.ANCHORED_FINETUNE,
    )
    probes = protocol in (AdaptProtocol.LINEAR_PROBE, AdaptProtocol.CERTIFIED_PROBE)
    total = NONE
    if probes or probes_first:
        if not features_cached:
            total = total + FORWARD * points
        if (
            config.adversary is not Adversary.NONE
            and protocol is not AdaptProtocol.PARTIAL_FINETUNE
        ):
            probe = _adversarial_step(config.attack_steps, config.adversary, trains_encoder=False)
            total = total + probe * (config.probe_epochs * points)
    if probes:
        return total
    step = (
        Passes(1.0, 1.0)
        if config.adversary is Adversary.NONE
        else _adversarial_step(config.attack_steps, config.adversary, trains_encoder=True)
    )
    if protocol is AdaptProtocol.ANCHORED_FINETUNE:
        step = step + FORWARD  # the frozen anchor's features of the batch
    return total + step * (config.epochs * points)


def advice(points: int, held: int, steps: int) -> Passes:
    """The advice (:func:`~robust_transfer.training.advice.measure_advice`, features
    cached): a one-epoch PGD probe on ``points - held`` points, then both probes attacked
    on the ``held`` points."""
    fit = _adversarial_step(ADVICE_PROBE_STEPS, Adversary.PGD, trains_encoder=False)
    return fit * (points - held) + attack(steps, 1) * (2 * held)


_PRETRAIN_STEP = {
    PretrainProtocol.STANDARD: lambda c: Passes(1.0, 1.0),
    PretrainProtocol.ADVERSARIAL: lambda c: Passes(c.attack_steps + 4.0, c.attack_steps + 1.0),
    PretrainProtocol.TRADES: lambda c: Passes(c.attack_steps + 4.0, c.attack_steps + 2.0),
    PretrainProtocol.SIMCLR: lambda c: Passes(2.0, 2.0),
    PretrainProtocol.ADVERSARIAL_CONTRASTIVE: lambda c: Passes(
        c.attack_steps + 5.0, c.attack_steps + 2.0
    ),
    PretrainProtocol.LIPSCHITZ: lambda c: Passes(1.0, 1.0),
    PretrainProtocol.IBP: lambda c: Passes(3.0, 1.0),
    PretrainProtocol.CROWN_IBP: lambda c: Passes(4.0, 1.0),
    PretrainProtocol.RANDOM: lambda c: NONE,
}


def pretraining(config: PretrainConfig, points: int) -> Passes:
    """Images through the encoder to pretrain it on ``points`` images."""
    used = points if config.limit is None else min(points, config.limit)
    return _PRETRAIN_STEP[config.protocol](config) * (config.epochs * used)
