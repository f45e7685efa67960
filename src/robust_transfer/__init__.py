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
from .certify import NoCertificate, certified_shift, certify_all, lipschitz_shift
from .core.errors import RobustTransferError
from .core.runtime import Runtime
from .estimates.curves import RobustnessCurve
from .estimates.expected import EncoderProfile, RefineSettings, profile_encoder
from .estimates.measurement import HeadEvaluation, Measurement, measure
from .models import load_encoder
from .models.features import extract_features
from .theory.bounds import (
    CrossEntropyIncrease,
    absolute_error_bound,
    adversarial_cross_entropy_bound,
    certified_accuracy,
    class_weight_gap,
    criterion_holds,
    cross_entropy_increase,
    expected_cross_entropy_bound,
    normalized_margin,
    squared_error_bound,
    weight_gap,
)
from .theory.losses import RegressionLoss
from .theory.threat import Norm, ThreatModel, parse_eps
from .training import train_linear_probe

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
    "certify_all",
    "class_weight_gap",
    "criterion_holds",
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
