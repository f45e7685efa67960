"""robust-transfer: how much adversarial robustness a pretrained representation passes on
to the linear heads put on it, measured, bounded and certified."""

from ._version import __version__
from .attacks import (
    ClassifierAttackResult,
    ClassifierLoss,
    RepresentationAttackResult,
    attack_classifier,
    attack_representation,
)
from .attacks.regression import RegressionAttackResult, attack_regression
from .bounds import (
    CrossEntropyIncrease,
    absolute_error_bound,
    adversarial_cross_entropy_bound,
    certified_accuracy,
    certify,
    class_weight_gap,
    cross_entropy_increase,
    expected_cross_entropy_bound,
    normalized_margin,
    squared_error_bound,
    weight_gap,
)
from .certificates import certified_shift, lipschitz_shift
from .features import extract_features
from .losses import RegressionLoss
from .threat import Norm, ThreatModel, parse_eps
from .training import train_linear_probe

__all__ = [
    "ClassifierAttackResult",
    "ClassifierLoss",
    "CrossEntropyIncrease",
    "Norm",
    "RegressionAttackResult",
    "RegressionLoss",
    "RepresentationAttackResult",
    "ThreatModel",
    "__version__",
    "absolute_error_bound",
    "adversarial_cross_entropy_bound",
    "attack_classifier",
    "attack_regression",
    "attack_representation",
    "certified_accuracy",
    "certified_shift",
    "certify",
    "class_weight_gap",
    "cross_entropy_increase",
    "expected_cross_entropy_bound",
    "extract_features",
    "lipschitz_shift",
    "normalized_margin",
    "parse_eps",
    "squared_error_bound",
    "train_linear_probe",
    "weight_gap",
]
