"""Pretraining protocols that make encoders, and adaptation protocols that put heads on them."""

from .adapt import (
    AdaptConfig,
    Adapted,
    AdaptProtocol,
    adapt,
    train_certified_probe,
    train_regression_probe,
)
from .linear_probe import train_linear_probe
from .pretrain import (
    PretrainConfig,
    PretrainProtocol,
    PretrainResult,
    cached_pretrain,
    pretrain,
)

__all__ = [
    "AdaptConfig",
    "AdaptProtocol",
    "Adapted",
    "PretrainConfig",
    "PretrainProtocol",
    "PretrainResult",
    "adapt",
    "cached_pretrain",
    "pretrain",
    "train_certified_probe",
    "train_linear_probe",
    "train_regression_probe",
]
