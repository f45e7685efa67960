"""Records: one row per (encoder, pretraining, task, adaptation, threat, eps), aggregated
from the per-sample arrays of the store and nothing else."""

from __future__ import annotations

import torch

from ..core.schema import (
    SANITY_CHECKS,
    Array,
    Arrays,
    Field,
    Record,
    certificate_key,
    methods_in,
    per_method,
)
from .curves import curve_area

# Float tolerance when comparing a measured loss with a bound computed from it.
_TOLERANCE = 1e-4


def _mean(arrays: Arrays, name: str) -> float | None:
    return float(arrays[name].float().mean()) if name in arrays else None


def _exceeded(arrays: Arrays, bound: str) -> float | None:
    if bound not in arrays or Array.ADV_LOSS not in arrays:
        return None
    return float((arrays[Array.ADV_LOSS] > arrays[bound] + _TOLERANCE).float().mean())


def shift_summary(arrays: Arrays) -> Record:
    """The attacked shift's distribution and the mean tightest certified shift."""
    shift = arrays[Array.SHIFT].float()
    return {
        Field.N: len(shift),
        Field.MEAN_SHIFT: float(shift.mean()),
        Field.MEDIAN_SHIFT: float(shift.median()),
        Field.Q90_SHIFT: float(shift.quantile(0.9)),
        Field.MAX_SHIFT: float(shift.max()),
        Field.CERTIFIED_SHIFT: _mean(arrays, Array.CERTIFIED_SHIFT),
    }


def _certified(arrays: Arrays, method: str | None) -> Record:
    """The certificate fields of the tightest certificate (``method=None``) or of one."""

    def array(name: Array) -> str:
        return certificate_key(name, method)

    def field(name: Field) -> str:
        return certificate_key(name, method)

    record: Record = {
        field(Field.CERTIFIED_SHIFT): _mean(arrays, array(Array.CERTIFIED_SHIFT)),
        field(Field.CERTIFIED_ROBUST_ACC): _mean(arrays, array(Array.CERTIFIED_ROBUST)),
        field(Field.CERTIFIED_LOSS_BOUND): _mean(arrays, array(Array.CERTIFIED_LOSS_BOUND)),
        field(Field.CERTIFIED_LOSS_BOUND_EXCEEDED): _exceeded(
            arrays, array(Array.CERTIFIED_LOSS_BOUND)
        ),
    }
    tightness = _median_share(arrays, array(Array.CERTIFIED_SHIFT))
    if tightness is not None:
        record[field(Field.CERTIFIED_TIGHTNESS)] = tightness
    broken = _certified_but_broken(arrays, array(Array.CERTIFIED_ROBUST))
    if broken is not None:
        record[field(Field.CERTIFIED_BUT_BROKEN)] = broken
    return record


def _median_share(arrays: Arrays, name: str) -> float | None:
    """The per-sample median of ``arrays[name]`` over the attacked shift."""
    if name not in arrays:
        return None
    share = arrays[name].double() / arrays[Array.SHIFT].double().clamp_min(1e-12)
    return float(share.median())


def _certified_but_broken(arrays: Arrays, certified: str) -> int | None:
    """Points a certificate calls robust that an attack broke: must be 0."""
    if certified not in arrays or Array.ROBUST_ATTACKED not in arrays:
        return None
    return int((arrays[certified] & ~arrays[Array.ROBUST_ATTACKED]).sum())


def soundness_violations(arrays: Arrays) -> list[str]:
    """What one unit's arrays prove wrong with its certificates, one phrase each: a
    certified shift below the attacked shift of the same point (beyond float rounding),
    or a point certified robust, task-agnostically or for its head, that an attack broke."""
    found = []
    shift = arrays[Array.SHIFT].double()
    for method in methods_in(arrays, Array.CERTIFIED_SHIFT):
        bound = arrays[per_method(Array.CERTIFIED_SHIFT, method)].double()
        below = shift > bound * (1 + _TOLERANCE) + _TOLERANCE
        if below.any():
            row = int(below.nonzero()[0, 0])
            found.append(
                f"{method}'s certified shift is below the attacked shift on "
                f"{int(below.sum())} point(s) (the shard's row {row}: {float(bound[row]):.6g} < "
                f"{float(shift[row]):.6g})"
            )
    certified = [
        per_method(Array.CERTIFIED_ROBUST, method)
        for method in methods_in(arrays, Array.CERTIFIED_ROBUST)
    ]
    for name in (Array.CERTIFIED_ROBUST, *certified, Array.HEAD_CERTIFIED_ROBUST):
        broken = _certified_but_broken(arrays, name)
        if broken:
            found.append(f"{broken} point(s) of {name} were broken by an attack")
    return found


def _collapsed(arrays: Arrays) -> bool | None:
    """A classification head that predicts one class for every point of a task with
    several: its "robust" and "certified" accuracies are only the majority share."""
    if Array.PREDICTION not in arrays or Array.LABEL not in arrays:
        return None
    predictions, labels = arrays[Array.PREDICTION], arrays[Array.LABEL]
    one_class = bool((predictions == predictions[0]).all())
    return one_class and not bool((labels == labels[0]).all())


# PGD's robust accuracy more than this above AutoAttack's on the same points flags the
# head: its robust accuracy elsewhere is not to be trusted.
AUTOATTACK_TOLERANCE = 0.03


def _autoattack(arrays: Arrays) -> Record:
    """AutoAttack's robust accuracy on its subset, how much it took off PGD's there, and
    whether that is more than ``AUTOATTACK_TOLERANCE``."""
    none: Record = {
        Field.AUTOATTACK_ROBUST_ACC: None,
        Field.AUTOATTACK_GAP: None,
        Field.AUTOATTACK_FLAG: None,
    }
    if Array.AUTOATTACKED not in arrays:
        return {Field.AUTOATTACK_POINTS: None} | none
    subset = arrays[Array.AUTOATTACKED]
    points = int(subset.sum())
    if points == 0:
        return {Field.AUTOATTACK_POINTS: 0} | none
    robust = float(arrays[Array.ROBUST_AUTOATTACK][subset].float().mean())
    pgd = float(arrays[Array.ROBUST_PGD][subset].float().mean())
    return {
        Field.AUTOATTACK_POINTS: points,
        Field.AUTOATTACK_ROBUST_ACC: robust,
        Field.AUTOATTACK_GAP: pgd - robust,
        Field.AUTOATTACK_FLAG: pgd - robust > AUTOATTACK_TOLERANCE,
    }


def _sanity(arrays: Arrays) -> dict[str, int]:
    """The checks any point tripped, with how many points tripped each."""
    counts = {str(name): int(arrays[name].sum()) for name in SANITY_CHECKS if name in arrays}
    return {name: count for name, count in counts.items() if count}


def _curve_area(arrays: Arrays) -> float | None:
    if Array.CURVE_ROBUST not in arrays:
        return None
    accuracy = arrays[Array.CURVE_ROBUST].double().mean(dim=0)
    return curve_area(accuracy, torch.linspace(0.0, 1.0, len(accuracy), dtype=torch.float64))


def aggregate(arrays: Arrays) -> Record:
    """The metrics of one evaluation unit (accuracies as fractions, None where not computed).

    ``loss_bound`` is Result 1 with the attacked shift (an estimate: the share of points
    whose measured adversarial loss exceeds it is ``loss_bound_exceeded``);
    ``certified_loss_bound`` uses the tightest certified shift (a guarantee), and
    ``certified_*@METHOD`` each certifier's. ``certified_but_broken`` counts points
    certified yet broken by an attack: it must be 0, anything else is a bug.
    ``autoattack_robust_acc`` is over the AutoAttack subset only (``autoattack_points``),
    ``autoattack_gap`` PGD's robust accuracy there minus it; ``sanity_flags`` names the
    sanity checks some point tripped.
    """
    methods = methods_in(arrays, Array.CERTIFIED_SHIFT)
    record: Record = {
        **shift_summary(arrays),
        Field.CLEAN_ACC: _mean(arrays, Array.CORRECT),
        Field.PGD_ROBUST_ACC: _mean(arrays, Array.ROBUST_PGD),
        Field.ATTACKED_ROBUST_ACC: _mean(arrays, Array.ROBUST_ATTACKED),
        **_autoattack(arrays),
        Field.SANITY_FLAGS: _sanity(arrays),
        Field.TASK_AGNOSTIC_ROBUST_ACC: _mean(arrays, Array.ROBUST_TASK_AGNOSTIC),
        Field.PREDICTED_ROBUST_ACC: _mean(arrays, Array.PREDICTED_ROBUST),
        Field.CLEAN_LOSS: _mean(arrays, Array.CLEAN_LOSS),
        Field.ADV_LOSS: _mean(arrays, Array.ADV_LOSS),
        Field.LOSS_BOUND: _mean(arrays, Array.LOSS_BOUND),
        Field.LOSS_BOUND_EXCEEDED: _exceeded(arrays, Array.LOSS_BOUND),
        Field.COLLAPSED_HEAD: _collapsed(arrays),
        Field.HEAD_CERTIFIED_ROBUST_ACC: _mean(arrays, Array.HEAD_CERTIFIED_ROBUST),
        Field.EXPECTED_ROBUST_ACC: _mean(arrays, Array.EXPECTED_ROBUST),
        # The share of the attacked shift along one of the head's class differences: why
        # the criterion, which compares margins with the whole shift, predicts so little.
        Field.DIRECTIONAL_SHARE: _median_share(arrays, Array.DIRECTIONAL_SHIFT),
        Field.CURVE_AREA: _curve_area(arrays),
        Field.MEDIAN_MARGIN: (
            float(arrays[Array.MARGIN].median()) if Array.MARGIN in arrays else None
        ),
        **_certified(arrays, None),
        Field.CERTIFIERS: sorted(
            methods,
            key=lambda m: float(arrays[per_method(Array.CERTIFIED_SHIFT, m)].double().mean()),
        ),
    }
    for method in methods:
        record |= _certified(arrays, method)
    expected, attacked = record[Field.EXPECTED_ROBUST_ACC], record[Field.ATTACKED_ROBUST_ACC]
    if isinstance(expected, float) and isinstance(attacked, float):
        record[Field.EXPECTED_ERROR] = expected - attacked
    broken = _certified_but_broken(arrays, Array.HEAD_CERTIFIED_ROBUST)
    if broken is not None:
        record[Field.HEAD_CERTIFIED_BUT_BROKEN] = broken
    return record
