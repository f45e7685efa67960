"""Per-sample regression losses shared by the regression probe, attack and bounds."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from torch import Tensor

from ..core.checks import parse_choice


class RegressionLoss(StrEnum):
    ABSOLUTE = "absolute"
    SQUARED = "squared"

    @classmethod
    def parse(cls, value: str | RegressionLoss) -> RegressionLoss:
        return parse_choice(cls, value, "regression loss")


def _absolute(predictions: Tensor, targets: Tensor) -> Tensor:
    return (predictions - targets).abs()


def _squared(predictions: Tensor, targets: Tensor) -> Tensor:
    return (predictions - targets).pow(2)


_ELEMENTWISE: dict[RegressionLoss, Callable[[Tensor, Tensor], Tensor]] = {
    RegressionLoss.ABSOLUTE: _absolute,
    RegressionLoss.SQUARED: _squared,
}


def regression_loss(predictions: Tensor, targets: Tensor, loss: RegressionLoss) -> Tensor:
    """Per-sample loss, averaged over the outputs of (N, K) predictions and targets."""
    return _ELEMENTWISE[loss](predictions, targets).reshape(len(targets), -1).mean(dim=1)
