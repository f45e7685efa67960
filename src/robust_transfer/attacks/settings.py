"""The attack budgets of a study: PGD on heads and the task-independent representation attack."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttackSettings:
    """Attack budgets: PGD on heads, and the (task-independent) representation attack."""

    steps: int = 20
    restarts: int = 1
    targeted_restarts: int = 2
    representation_steps: int = 30
    representation_restarts: int = 1
    batch_size: int = 250
    # AutoAttack "standard" on every head too: the reference, far slower than PGD.
    autoattack: bool = False
