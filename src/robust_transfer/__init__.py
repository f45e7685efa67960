"""robust-transfer: how much adversarial robustness a pretrained representation passes on
to the linear heads put on it, measured, bounded and certified."""

from ._version import __version__
from .attacks import (
    AttackSettings,
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
    class_weight_gap,
    cross_entropy_increase,
    expected_cross_entropy_bound,
    normalized_margin,
    squared_error_bound,
    weight_gap,
)
from .certify import NoCertificate, certified_shift, certify_all, lipschitz_shift
from .errors import RobustTransferError
from .expected import EncoderProfile, RefineSettings, profile_encoder
from .features import extract_features
from .losses import RegressionLoss
from .measurement import HeadEvaluation, Measurement, RobustnessCurve, measure
from .models import load_encoder
from .runtime import Runtime
from .threat import Norm, ThreatModel, parse_eps
from .training import train_linear_probe

# isort: split
# Imported last on purpose: the subpackage robust_transfer.certify (certifiers) would
# otherwise replace this name, the criterion "margin > shift", on the package.
from .bounds import certify

__all__ = [
    "AttackSettings",
    "ClassifierAttackResult",
    "ClassifierLoss",
    "CrossEntropyIncrease",
    "EncoderProfile",
    "HeadEvaluation",
    "Measurement",
    "NoCertificate",
    "Norm",
    "RefineSettings",
    "RegressionAttackResult",
    "RegressionLoss",
    "RepresentationAttackResult",
    "RobustTransferError",
    "RobustnessCurve",
    "Runtime",
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
    "certify_all",
    "class_weight_gap",
    "cross_entropy_increase",
    "expected_cross_entropy_bound",
    "extract_features",
    "lipschitz_shift",
    "load_encoder",
    "measure",
    "normalized_margin",
    "parse_eps",
    "profile_encoder",
    "squared_error_bound",
    "train_linear_probe",
    "weight_gap",
]
