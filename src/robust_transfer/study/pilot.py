"""How many points the expected robust accuracy will attack, measured before any head
exists.

The refinement attacks the points a head's first-order margin calls close, and widens
its band for as long as the attacks change answers there; a robustness curve attacks
each point that breaks on its grid near its own radius, one grid eps after another. How
many that is depends on the encoder, the task and the radius (a tenth of the points on
the default study's trained encoders, a quarter on a random WideResNet's thin-margin
binary heads). The plan's pilot runs the estimator itself on a few of the points the
study evaluates, under a linear probe fit on a few of its training points, and counts
the point-attacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.tasks import Split, stratified_sample
from ..estimates.curves import robust_on_grid
from ..estimates.expected import RefineSettings, full_jacobian, profile_encoder
from ..models.features import extract_features
from ..theory.threat import ThreatModel
from ..training.linear_probe import train_linear_probe
from ..training.protocols import AdaptConfig, AdaptProtocol
from ..training.wrappers import Passes
from . import cost
from .calibration import Calibration
from .forecast import duration
from .spec import StudyConfig, TaskSpec

# Training points of the pilot's probe, and evaluation points it attacks: a share
# measured on 32 points is within about 0.08 of the study's (a binomial's deviation at
# a quarter).
PILOT_TRAIN = 256
PILOT_POINTS = 32
# A pilot priced above this many seconds, or whose profile would keep more bytes, is
# not run: the plan assumes the prior share and says so.
PILOT_SECONDS = 120.0
PILOT_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Pilot:
    """Per threat, the share of evaluation points the refinement attacked, the curve's
    point-attacks per point (threats that draw one), and the passes through the encoder
    both made per point (attacks stop at success: fewer than their steps allow),
    measured on ``points`` points."""

    points: int
    refined: dict[ThreatModel, float]
    curve: dict[ThreatModel, float]
    passes: dict[ThreatModel, cost.Passes]


def prior_passes(curve: bool) -> cost.Passes:
    """Passes per point where no pilot ran: :data:`cost.REFINED_SHARE` of the points
    attacked, each once more per curve eps it checks (:data:`cost.CURVE_ATTACKS`)."""
    attacks = cost.REFINED_SHARE * (1 + (cost.CURVE_ATTACKS if curve else 0))
    return cost.refinement(RefineSettings(), attacks)


def _penalty(config: StudyConfig, task: TaskSpec) -> float:
    """The penalty of the task's first plain linear probe (a default one's without)."""
    for name in task.adaptations:
        spec = config.adaptations[name]
        if spec.protocol is AdaptProtocol.LINEAR_PROBE:
            return spec.config_for(None, task.threats[0]).weight_decay
    return AdaptConfig(AdaptProtocol.LINEAR_PROBE).weight_decay


def pilot_price(c: Calibration, config: StudyConfig, task: TaskSpec, split: Split) -> float:
    """The pilot's seconds at the prior share, or ``inf`` where its profile would keep
    more than :data:`PILOT_BYTES`."""
    points = min(PILOT_POINTS, config.eval_points, len(split.test))
    classes = len(split.train.classes)
    full = full_jacobian(points, c.features, c.input_numel)
    directions = c.features if full else min(c.features, classes - 1)
    if points * directions * c.input_numel * 4 > PILOT_BYTES:
        return float("inf")
    passes = cost.FORWARD * min(PILOT_TRAIN, len(split.train)) + cost.profile(directions) * points
    for threat in task.threats:
        passes = passes + prior_passes(config.curve_points_of(task, threat) is not None) * points
    return c.seconds(passes.forward, passes.backward) + c.probe * min(PILOT_TRAIN, len(split.train))


def run_pilot(
    encoder: nn.Module, config: StudyConfig, task: TaskSpec, split: Split, *, batch_size: int
) -> Pilot | None:
    """The point-attacks of the refinement and the curves per threat of ``task``, on up
    to :data:`PILOT_POINTS` of the points the study evaluates (evenly spread, all of them
    where there are fewer), under a probe fit on a stratified sample of its training
    points (all of them where there are fewer: the study's own probe). None without
    evaluation points."""
    n = min(config.eval_points, len(split.test))
    if n == 0:
        return None
    train = split.train
    if len(train) > PILOT_TRAIN:
        train = stratified_sample(train, PILOT_TRAIN)
    features = extract_features(encoder, train.x, batch_size=batch_size)
    head = train_linear_probe(
        features, train.y, num_classes=len(split.train.classes), weight_decay=_penalty(config, task)
    )
    # Evenly spread over the points the study evaluates (a step of one or more: distinct).
    rows = torch.linspace(0, n - 1, min(PILOT_POINTS, n)).round().long()
    x, y = split.test.x[rows], split.test.y[rows]
    profile = profile_encoder(encoder, x, batch_size=batch_size)
    head = head.to(profile.features)
    refined: dict[ThreatModel, float] = {}
    curve: dict[ThreatModel, float] = {}
    passes: dict[ThreatModel, cost.Passes] = {}
    # The head's profile directions (the same at every threat) first: not its attacks.
    profile.head_drops(head, task.threats[0])
    for threat in task.threats:
        before, counter = profile.refined_points, Passes()
        counter.watch(encoder)
        try:
            expected, _ = profile.assess(head, y, threat)
            refined[threat] = (profile.refined_points - before) / len(rows)
            steps = config.curve_points_of(task, threat)
            if steps:
                grid = torch.linspace(0.0, threat.eps, steps, dtype=torch.float64)
                found = robust_on_grid(profile, head, y, threat.norm, grid, expected)
                curve[threat] = found.attacked_points / len(rows)
        finally:
            counter.close()
        passes[threat] = cost.Passes(counter.forward, counter.backward) * (1 / len(rows))
    return Pilot(len(rows), refined, curve, passes)


def maybe_pilot(
    encoder: nn.Module | None,
    c: Calibration,
    config: StudyConfig,
    task: TaskSpec,
    split: Split | None,
    *,
    stand_in: bool,
) -> tuple[Pilot | None, str]:
    """The pilot of an encoder on a classification task, or why there is none: its
    weights are not the study's (``encoder`` None: a ``stand_in``, or the run pretrains
    it), its data is not here, or it would take over :data:`PILOT_SECONDS`."""
    if split is None:
        return None, "its data is not here"
    if encoder is None:
        return None, "timed on a stand-in" if stand_in else "the run pretrains it"
    price = pilot_price(c, config, task, split)
    if price > PILOT_SECONDS:
        return None, f"it would take {duration(price)}"
    return run_pilot(encoder, config, task, split, batch_size=c.batch), ""


def note(task: str, encoder: str, pilot: Pilot) -> str:
    """What the pilot found, for the plan's notes."""
    found = ", ".join(
        f"{threat} {pilot.refined[threat]:.0%}"
        + (f" (curve {pilot.curve[threat]:.2f} attacks a point)" if threat in pilot.curve else "")
        for threat in pilot.refined
    )
    return f"task {task}, {encoder}: a pilot probe's refinement on {pilot.points} points: {found}"
