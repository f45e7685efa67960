"""Attacks: the task-independent representation attack and PGD on classifiers."""

from .classifier import ClassifierAttackResult, ClassifierLoss, attack_classifier
from .representation import RepresentationAttackResult, attack_representation

__all__ = [
    "ClassifierAttackResult",
    "ClassifierLoss",
    "RepresentationAttackResult",
    "attack_classifier",
    "attack_representation",
]
