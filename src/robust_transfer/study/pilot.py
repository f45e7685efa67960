"""How many points the expected robust accuracy will refine, measured before any head
exists.

The refinement attacks the points a head's first-order margin calls close, and widens
its band for as long as the attacks change answers there: a share that depends on the
encoder, the task and the radius (a tenth on trained encoders, a quarter on a random
WideResNet's thin-margin binary heads). The plan's pilot runs the estimator itself on a
few of the points the study evaluates, under a linear probe fit on a few of its training
points, and counts the points refined.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..data.tasks import Split, stratified_sample
from ..estimates.expected import profile_encoder
from ..models.features import extract_features
from ..theory.threat import ThreatModel
from ..training.linear_probe import train_linear_probe
from ..training.protocols import AdaptProtocol
from .spec import StudyConfig, TaskSpec

# Training points of the pilot's probe, and evaluation points it refines: a share
# measured on 32 points is within about 0.08 of the study's (a binomial's deviation at
# a quarter).
PILOT_TRAIN = 256
PILOT_POINTS = 32
# The probe's penalty where the task has no plain linear probe (train_linear_probe's).
PENALTY = 1e-4


def refined_share(
    encoder: nn.Module,
    split: Split,
    threats: Sequence[ThreatModel],
    *,
    eval_points: int,
    weight_decay: float,
    batch_size: int,
) -> tuple[float, int]:
    """The share of evaluation points refined per threat, and the points it was
    measured on: the first of the ``eval_points`` the study evaluates, under a probe fit
    on a stratified sample of the training points (as the study's probes are; all of
    them where they are few)."""
    # The study's own points where they are few: its probe is then the pilot's.
    train = split.train
    if len(train) > PILOT_TRAIN:
        train = stratified_sample(train, PILOT_TRAIN)
    points = min(PILOT_POINTS, eval_points, len(split.test))
    features = extract_features(encoder, train.x, batch_size=batch_size)
    head = train_linear_probe(
        features, train.y, num_classes=len(split.train.classes), weight_decay=weight_decay
    )
    x, y = split.test.x[:points], split.test.y[:points]
    profile = profile_encoder(encoder, x, batch_size=batch_size)
    for threat in threats:
        profile.expected_robust(head.to(profile.features), y, threat)
    return profile.refined_points / (points * len(threats)), points


def task_share(
    encoder: nn.Module, name: str, config: StudyConfig, task: TaskSpec, split: Split, batch: int
) -> tuple[float, str]:
    """:func:`refined_share` of encoder ``name`` on ``task`` (its probe's penalty that of
    the task's first linear probe), and the plan's note saying so."""
    penalties = [
        config.adaptations[a].config_for(None, task.threats[0]).weight_decay
        for a in task.adaptations
        if config.adaptations[a].protocol is AdaptProtocol.LINEAR_PROBE
    ]
    share, points = refined_share(
        encoder,
        split,
        task.threats,
        eval_points=config.eval_points,
        weight_decay=penalties[0] if penalties else PENALTY,
        batch_size=batch,
    )
    note = (
        f"task {task.name}, {name}: a pilot probe's refinement attacked {share:.0%} of "
        f"{points} points a threat"
    )
    return share, note
