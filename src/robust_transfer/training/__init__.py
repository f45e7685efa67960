"""Pretraining protocols that make encoders, and adaptation protocols that put heads on them."""

from .adapt import Adapted, adapt
from .advice import Advice, advise, measure_advice
from .linear_probe import train_certified_probe, train_linear_probe, train_regression_probe
from .pretrain import (
    PretrainConfig,
    PretrainProtocol,
    PretrainResult,
    cached_pretrain,
    pretrain,
)
from .protocols import AdaptConfig, AdaptProtocol, Adversary, NormStats, Recipe

__all__ = [
    "AdaptConfig",
    "AdaptProtocol",
    "Adapted",
    "Adversary",
    "Advice",
    "NormStats",
    "PretrainConfig",
    "PretrainProtocol",
    "PretrainResult",
    "Recipe",
    "adapt",
    "advise",
    "cached_pretrain",
    "measure_advice",
    "pretrain",
    "train_certified_probe",
    "train_linear_probe",
    "train_regression_probe",
]
