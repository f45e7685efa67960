"""Attacks: the task-independent representation attack and PGD on classifiers."""

from .classifier import ClassifierAttackResult, ClassifierLoss, attack_classifier
from .representation import RepresentationAttackResult, attack_representation
from .settings import AttackSettings

__all__ = [
    "AttackSettings",
    "ClassifierAttackResult",
    "ClassifierLoss",
    "RepresentationAttackResult",
    "attack_classifier",
    "attack_representation",
]
