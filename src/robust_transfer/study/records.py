"""Records: one row per (encoder, pretraining, task, adaptation, threat, eps), aggregated
from the per-sample arrays of the store and nothing else."""

from __future__ import annotations

from torch import Tensor

Arrays = dict[str, Tensor]
Record = dict[str, object]

# Float tolerance when comparing a measured loss with a bound computed from it.
_TOLERANCE = 1e-4


def _mean(arrays: Arrays, name: str) -> float | None:
    return float(arrays[name].float().mean()) if name in arrays else None


def _exceeded(arrays: Arrays, bound: str) -> float | None:
    if bound not in arrays:
        return None
    return float((arrays["adv_loss"] > arrays[bound] + _TOLERANCE).float().mean())


def aggregate(arrays: Arrays) -> Record:
    """The metrics of one evaluation unit (accuracies as fractions, None where not computed).

    ``loss_bound`` is Result 1 with the attacked shift (an estimate: the share of points
    whose measured adversarial loss exceeds it is ``loss_bound_exceeded``);
    ``certified_loss_bound`` uses the certified shift (a guarantee).
    ``certified_but_broken`` counts points certified yet broken by an attack: it must be
    0, anything else is a bug.
    """
    shift = arrays["shift"].float()
    record: Record = {
        "n": len(shift),
        "clean_acc": _mean(arrays, "correct"),
        "pgd_robust_acc": _mean(arrays, "robust_pgd"),
        "attacked_robust_acc": _mean(arrays, "robust_attacked"),
        "autoattack_robust_acc": _mean(arrays, "robust_autoattack"),
        "task_agnostic_robust_acc": _mean(arrays, "robust_task_agnostic"),
        "predicted_robust_acc": _mean(arrays, "predicted_robust"),
        "certified_robust_acc": _mean(arrays, "certified_robust"),
        "clean_loss": _mean(arrays, "clean_loss"),
        "adv_loss": _mean(arrays, "adv_loss"),
        "loss_bound": _mean(arrays, "loss_bound"),
        "certified_loss_bound": _mean(arrays, "certified_loss_bound"),
        "loss_bound_exceeded": _exceeded(arrays, "loss_bound"),
        "certified_loss_bound_exceeded": _exceeded(arrays, "certified_loss_bound"),
        "mean_shift": float(shift.mean()),
        "median_shift": float(shift.median()),
        "max_shift": float(shift.max()),
        "certified_shift": _mean(arrays, "certified_shift"),
        "median_margin": float(arrays["margin"].median()) if "margin" in arrays else None,
    }
    if "certified_robust" in arrays:
        broken = arrays["certified_robust"] & ~arrays["robust_attacked"]
        record["certified_but_broken"] = int(broken.sum())
    return record
