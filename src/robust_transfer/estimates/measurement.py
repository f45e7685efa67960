"""The main job in one call: measure an encoder once, then evaluate any number of heads.

:func:`measure` does the task-independent, label-free work on a set of points (the
features, the representation attack and the certificates per threat model, the
Jacobian profile); :meth:`Measurement.evaluate` gives a head's robustness per threat
model from it (expected, criterion, certified and head-specific certified robust
accuracy, the Result-1 bound; attacked and AutoAttack robust accuracy on request), and
:meth:`Measurement.curve` its expected robust accuracy over a whole range of eps. The
study evaluates its units with the same functions (:mod:`robust_transfer.estimates.evaluate`),
so the numbers agree with a study's for the same encoder, points, heads and settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..attacks.reference import refusal as autoattack_refusal
from ..attacks.settings import AttackSettings
from ..certify import split_certifiers
from ..core.checks import check_images, check_labels, check_seed
from ..core.errors import InputError, InputTypeError
from ..core.runtime import model_input
from ..core.schema import Array, Arrays, Field, Record
from ..report.tables import text
from ..theory.bounds import weight_gap
from ..theory.threat import Norm, ThreatModel
from .curves import RobustnessCurve, robustness_curve
from .evaluate import (
    attacked_shift,
    certified_shifts,
    classification_estimates,
    evaluate_classification,
)
from .expected import EncoderProfile, profile_encoder
from .records import aggregate, shift_summary

if TYPE_CHECKING:
    import pandas as pd

# The columns a summary prints, in this order, where computed.
_SUMMARY = (
    Field.THREAT,
    Field.EPS,
    Field.CLEAN_ACC,
    Field.EXPECTED_ROBUST_ACC,
    Field.PREDICTED_ROBUST_ACC,
    Field.CERTIFIED_ROBUST_ACC,
    Field.HEAD_CERTIFIED_ROBUST_ACC,
    Field.PGD_ROBUST_ACC,
    Field.ATTACKED_ROBUST_ACC,
    Field.AUTOATTACK_ROBUST_ACC,
    Field.LOSS_BOUND,
    Field.CERTIFIED_LOSS_BOUND,
    Field.MEAN_SHIFT,
    Field.WEIGHT_GAP,
)


def _threat(value: object) -> ThreatModel:
    """A threat model, or ``"NORM:EPS"`` (``"Linf:8/255"``, ``"L2:0.5"``)."""
    if isinstance(value, ThreatModel):
        return value
    if isinstance(value, str) and ":" in value:
        norm, eps = value.split(":", 1)
        return ThreatModel(norm, eps)
    raise InputError(f"expected a ThreatModel or 'NORM:EPS' such as 'Linf:8/255', got {value!r}")


@dataclass(frozen=True)
class HeadEvaluation:
    """One head on a :class:`Measurement`: a record per threat model (the fields of a
    study's record that do not need the task: accuracies as fractions, ``None`` where
    not computed) and the per-sample arrays they aggregate."""

    name: str
    records: tuple[Record, ...]
    arrays: dict[ThreatModel, Arrays] = field(repr=False)

    def __str__(self) -> str:
        columns = [
            (key, key) for key in _SUMMARY if any(r.get(key) is not None for r in self.records)
        ]
        return f"{self.name}\n{text(self.records, columns)}"

    def to_frame(self) -> pd.DataFrame:
        """The records as a pandas DataFrame, one row per threat model."""
        import pandas as pd  # a notebook's library: imported when asked for

        return pd.DataFrame([{"head": self.name, **r} for r in self.records])

    def to_json(self) -> str:
        return json.dumps({"head": self.name, "records": list(self.records)}, indent=2)


@dataclass
class Measurement:
    """An encoder measured once on points ``x``: per threat model the representation
    attack's and the certifiers' arrays (``shifts``, with the certifiers' refusals in
    ``refused``), and the Jacobian profile (:attr:`profile`, made when a head first
    needs it). Labels and heads come later."""

    encoder: nn.Module
    x: Tensor
    shifts: dict[ThreatModel, Arrays]
    refused: dict[ThreatModel, dict[str, str]]
    settings: AttackSettings
    seed: int
    certifiers: tuple[str, ...] | None = None
    _profile: EncoderProfile | None = field(default=None, repr=False)

    @property
    def threats(self) -> tuple[ThreatModel, ...]:
        return tuple(self.shifts)

    @property
    def profile(self) -> EncoderProfile:
        """The expected robust accuracy's profile of the encoder on ``x``."""
        if self._profile is None:
            self._profile = profile_encoder(
                self.encoder, self.x, batch_size=self.settings.batch_size
            )
        return self._profile

    @property
    def _head_certifier(self) -> str | None:
        return split_certifiers(self.certifiers)[1]

    def summary(self) -> tuple[Record, ...]:
        """Per threat model: the attacked shift's distribution and the certified shift."""
        return tuple(
            {Field.THREAT: t.norm.value, Field.EPS: t.eps} | shift_summary(arrays)
            for t, arrays in self.shifts.items()
        )

    def evaluate(
        self,
        head: nn.Linear,
        y: Tensor,
        *,
        attack: bool = False,
        autoattack: bool = False,
        name: str = "head",
    ) -> HeadEvaluation:
        """``head``'s robustness on the measured points with labels ``y``, per threat
        model: without ``attack`` from the measurement alone (no pass over the head
        but the refinement of the expected accuracy and head-specific certificates);
        with it, PGD (cross-entropy, then targeted margins) and the task-agnostic
        perturbation too, and with ``autoattack`` AutoAttack on the points PGD left."""
        head = _check_head(head, self.shifts[self.threats[0]][Array.FEATURES].shape[1])
        y = check_labels(y, len(self.x), num_classes=head.out_features).to(self.x.device)
        arrays: dict[ThreatModel, Arrays] = {}
        for threat in self.threats if autoattack else ():
            refused = autoattack_refusal(tuple(self.x.shape[1:]), head.out_features, threat)
            if refused is not None:
                raise InputError(f"at {threat}: {refused}")
        for threat, shift in self.shifts.items():
            if attack or autoattack:
                arrays[threat] = evaluate_classification(
                    self.encoder,
                    head,
                    self.x,
                    y,
                    threat,
                    shift,
                    self.settings,
                    seed=self.seed,
                    profile=self.profile,
                    autoattack_rows=torch.ones_like(y, dtype=torch.bool) if autoattack else None,
                    head_certifier=self._head_certifier,
                )
            else:
                arrays[threat] = classification_estimates(
                    self.encoder,
                    head,
                    self.x,
                    y,
                    threat,
                    shift,
                    profile=self.profile,
                    head_certifier=self._head_certifier,
                )
        gap = float(weight_gap(head))
        records = tuple(
            {Field.THREAT: t.norm.value, Field.EPS: t.eps, Field.WEIGHT_GAP: gap} | aggregate(a)
            for t, a in arrays.items()
        )
        return HeadEvaluation(name, records, arrays)

    def curve(
        self, head: nn.Linear, y: Tensor, norm: str | Norm, eps_max: float, *, points: int = 33
    ) -> RobustnessCurve:
        """``head``'s expected robust accuracy at ``points`` eps from 0 to ``eps_max``.

        First order gives every point the grid eps at which its prediction first
        changes; then a short attack from the first-order worst point checks the grid
        eps on each side of it, moving the bracket ring by ring while the attack
        disagrees with first order (as :meth:`EncoderProfile.expected_robust` does at
        one eps). Each point is attacked at a few eps near its own radius, not at every
        eps of the grid: the whole curve costs about what a few eps of the expected
        accuracy do."""
        head = _check_head(head, self.shifts[self.threats[0]][Array.FEATURES].shape[1])
        y = check_labels(y, len(self.x), num_classes=head.out_features).to(self.x.device)
        if isinstance(points, bool) or not isinstance(points, int) or points < 3:
            raise InputError(f"a curve needs at least 3 points, got {points!r}")
        grid = torch.linspace(0.0, ThreatModel(norm, eps_max).eps, points, dtype=torch.float64)
        return robustness_curve(self.profile, head, y, Norm.parse(norm), grid)


def _check_head(head: object, features: int) -> nn.Linear:
    if not isinstance(head, nn.Linear):
        raise InputTypeError(f"the head must be a torch.nn.Linear, got {type(head).__name__}")
    if head.in_features != features:
        raise InputError(
            f"the head takes {head.in_features} features, the encoder gives {features}"
        )
    return head


def measure(
    encoder: nn.Module,
    x: Tensor,
    threats: Iterable[ThreatModel | str],
    *,
    settings: AttackSettings | None = None,
    certifiers: Iterable[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Measurement:
    """Measure ``encoder`` on the inputs ``x`` (in [0, 1]) under each threat model
    (``ThreatModel`` or ``"Linf:8/255"``): the representation attack (``settings``:
    :class:`AttackSettings`, by default the library's), the certificates of
    ``certifiers`` (default: every certifier run by default) and the profile of the
    expected robust accuracy. Task independent and label free: any head is evaluated on
    it afterwards (:meth:`Measurement.evaluate`, :meth:`Measurement.curve`).

    A notebook's whole job::

        m = robust_transfer.measure(encoder, x, ["Linf:8/255", "L2:0.5"])
        result = m.evaluate(head, y, attack=True)
        print(result); result.to_frame()
        curve = m.curve(head, y, "Linf", 16 / 255)
    """
    if not isinstance(encoder, nn.Module):
        raise InputTypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    x = model_input(encoder, check_images(x))
    chosen = tuple(dict.fromkeys(_threat(t) for t in threats))
    if not chosen:
        raise InputError("give at least one threat model")
    settings = settings or AttackSettings()
    methods = None if certifiers is None else tuple(certifiers)
    shifts, refused = {}, {}
    for threat in chosen:
        shift = attacked_shift(
            encoder, x, threat, settings, seed=check_seed(seed), progress=progress
        )
        certified, refused[threat] = certified_shifts(encoder, x, threat, methods)
        shifts[threat] = shift | certified
    return Measurement(encoder, x, shifts, refused, settings, seed, methods)
