"""The shape of every result: per-sample arrays, store keys, records and ``results.json``.

Names live here and nowhere else: the study writes them, the report, findings, plots,
tables and the CLI read them. Every member is a ``str`` (``StrEnum``), so records stay
plain JSON. Certificates are keyed by method: ``certified_shift@lipschitz`` beside
``certified_shift@crown``, and the unsuffixed ``certified_*`` entry is the tightest
(per sample, the smallest certified shift of any method).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum

from torch import Tensor

from .errors import ResultsFormatError

# The history of the format is in CHANGELOG.md.
RESULTS_FORMAT = 5
RESULTS_FILE = "results.json"
ENCODERS_DIR = "encoders"  # what is known of each encoder of a study, as JSON
LOCK_FILE = ".lock"  # the pid and host of the run writing into a study folder
STUDY_MARKER = "study.json"  # marks a folder as one study's: its fingerprint and format
STORE_DIR = "store"

Arrays = dict[str, Tensor]
Record = dict[str, object]
Results = dict[str, object]

METHOD_SEPARATOR = "@"


class Array(StrEnum):
    """Per-sample arrays of the store: the source of truth of every number reported."""

    LABEL = "label"  # class index y
    PREDICTION = "prediction"  # argmax of the head on the clean representation
    CORRECT = "correct"  # prediction == label
    CLEAN_LOSS = "clean_loss"  # loss at the clean input
    ADV_LOSS = "adv_loss"  # the largest loss at any attacked point (and the clean one)
    MARGIN = "margin"  # normalised margin rho(x) of Result 2
    SHIFT = "shift"  # attacked ||f(x') - f(x)||_2: a lower bound on the worst shift
    FEATURES = "features"  # f(x)
    FEATURES_ADV = "features_adv"  # f at the representation attack's point
    LOSS_BOUND = "loss_bound"  # Result 1 with the attacked shift (an estimate)
    ROBUST_PGD = "robust_pgd"  # no PGD attack broke the point
    ROBUST_TASK_AGNOSTIC = "robust_task_agnostic"  # the representation attack's point did not
    ROBUST_ATTACKED = "robust_attacked"  # no attack at all broke it
    ROBUST_AUTOATTACK = "robust_autoattack"  # in the AutoAttack subset; PGD and it failed
    PREDICTED_ROBUST = "predicted_robust"  # the criterion with the attacked shift
    CERTIFIED_SHIFT = "certified_shift"  # an upper bound on the worst shift
    CERTIFIED_LOSS_BOUND = "certified_loss_bound"  # Result 1 with a certified shift
    CERTIFIED_ROBUST = "certified_robust"  # the criterion with a certified shift
    HEAD_CERTIFIED_ROBUST = "head_certified_robust"  # CROWN on this head's margins, or the above
    EXPECTED_ROBUST = "expected_robust"  # the first-order estimate from the encoder's profile
    DIRECTIONAL_SHIFT = "directional_shift"  # its largest shift along a class difference
    # (N, k): expected robust at each of k eps evenly from 0 to the unit's eps (the curve)
    CURVE_ROBUST = "curve_robust"
    AUTOATTACKED = "autoattacked"  # in the unit's AutoAttack subset
    ZERO_GRADIENT = "zero_gradient"  # the attacked score's gradient is exactly zero
    NONFINITE_GRADIENT = "nonfinite_gradient"  # ... or has a NaN or infinity
    RANDOM_OUTPUT = "random_output"  # two forward passes of the point disagree
    SQUARE_ONLY = "square_only"  # only Square, the black-box attack, broke it
    WEIGHT = "weight"  # a stored head's (K, m) weight
    BIAS = "bias"  # a stored head's (K,) bias


class Field(StrEnum):
    """Fields of a record: one row per (encoder, task, adaptation, threat, eps)."""

    ENCODER = "encoder"
    PRETRAINING = "pretraining"
    TASK = "task"
    ADAPTATION = "adaptation"
    THREAT = "threat"  # the norm, "Linf" or "L2"
    EPS = "eps"
    KIND = "kind"  # classification or regression
    LOSS = "loss"  # the regression loss, None for classification
    WEIGHT_GAP = "weight_gap"  # D(W) of the head
    LIPSCHITZ_L2 = "lipschitz_l2"  # the encoder's proven l2 Lipschitz constant, if any
    N = "n"
    CLEAN_ACC = "clean_acc"
    PGD_ROBUST_ACC = "pgd_robust_acc"
    ATTACKED_ROBUST_ACC = "attacked_robust_acc"
    AUTOATTACK_ROBUST_ACC = "autoattack_robust_acc"  # PGD, then AutoAttack, on the subset
    AUTOATTACK_POINTS = "autoattack_points"  # the size of that subset
    AUTOATTACK_GAP = "autoattack_gap"  # PGD's robust accuracy on the subset minus the above
    AUTOATTACK_FLAG = "autoattack_flag"  # the gap exceeds AUTOATTACK_TOLERANCE
    RECIPE = "recipe"  # the adversarial recipe the adaptation is (training.adapt.Recipe)
    TRAINED_AGAINST = "trained_against"  # the adversary, threat, steps and eps warm-up
    TRAIN_SECONDS = "train_seconds"  # what training the head (and encoder) took
    ENCODER_FORWARDS = "encoder_forwards"  # ... in images through the encoder
    ENCODER_BACKWARDS = "encoder_backwards"
    ADVICE_FIRST = "advice_first"  # the recipe advised before fine-tuning
    ADVICE_FINETUNING = "advice_finetuning"  # fine-tuning predicted to "add" or "destroy"
    ADVICE_REACH = "advice_reach"  # the robust accuracy a linear head reached then
    ADVICE_REASON = "advice_reason"
    COST = "cost"  # encoder forwards + backwards, in images: the Pareto front's third axis
    PARETO = "pareto"  # on the front of clean vs robust accuracy vs cost among its setting's
    ADVICE_HELD = "advice_held"  # an adaptation of the advised recipe is on that front
    TASK_AGNOSTIC_ROBUST_ACC = "task_agnostic_robust_acc"
    PREDICTED_ROBUST_ACC = "predicted_robust_acc"
    CERTIFIED_ROBUST_ACC = "certified_robust_acc"  # the tightest certificate's
    CLEAN_LOSS = "clean_loss"
    ADV_LOSS = "adv_loss"
    LOSS_BOUND = "loss_bound"
    CERTIFIED_LOSS_BOUND = "certified_loss_bound"
    LOSS_BOUND_EXCEEDED = "loss_bound_exceeded"  # share of points above the estimate
    CERTIFIED_LOSS_BOUND_EXCEEDED = "certified_loss_bound_exceeded"  # must be 0
    MEAN_SHIFT = "mean_shift"
    MEDIAN_SHIFT = "median_shift"
    Q90_SHIFT = "q90_shift"
    MAX_SHIFT = "max_shift"
    CERTIFIED_SHIFT = "certified_shift"  # mean of the tightest certified shift
    MEDIAN_MARGIN = "median_margin"
    CERTIFIED_BUT_BROKEN = "certified_but_broken"  # points certified yet broken: must be 0
    CERTIFIED_TIGHTNESS = "certified_tightness"  # median certified / attacked shift (>= 1)
    COLLAPSED_HEAD = "collapsed_head"  # the head predicts one class for every point
    HEAD_CERTIFIED_ROBUST_ACC = "head_certified_robust_acc"  # head-specific certificate
    HEAD_CERTIFIED_BUT_BROKEN = "head_certified_but_broken"  # must be 0
    EXPECTED_ROBUST_ACC = "expected_robust_acc"  # from the profile, no attack on the head
    EXPECTED_ERROR = "expected_error"  # expected minus attacked robust accuracy
    DIRECTIONAL_SHARE = "directional_share"  # median directional / attacked shift
    CURVE_AREA = "curve_area"  # mean expected robust accuracy over eps in [0, eps]
    FEATURE_SCALE = "feature_scale"  # median distance between two inputs' features
    RELATIVE_SHIFT = "relative_shift"  # mean shift / feature scale: scale free
    DISTANCE_RATIO = "distance_ratio"  # median ||f(x) - f(x')|| / ||x - x'|| over pairs
    CERTIFIERS = "certifiers"  # the methods that certified this unit, tightest first
    REFUSED = "refused"  # certifier -> why it gave no bound for this encoder
    RADIUS = "radius"  # a certified probe's feature radius
    RADIUS_RULE = "radius_rule"  # ... and how its rule set it
    SANITY_FLAGS = "sanity_flags"  # sanity check -> points that tripped it (none: {})
    STORE_KEY = "store_key"
    ATTACK = "attack"  # the command line's attack rows: which attack ran
    ROBUST_ACC = "robust_acc"  # ... and the robust accuracy it left


# The per-sample arrays of the sanity checks: a unit whose points trip one is flagged.
SANITY_CHECKS = (
    Array.ZERO_GRADIENT,
    Array.NONFINITE_GRADIENT,
    Array.RANDOM_OUTPUT,
    Array.SQUARE_ONLY,
)


def per_method(name: Array | Field, method: str) -> str:
    """The array or record key of ``name`` for one certifier, e.g. ``certified_shift@ibp``."""
    return f"{name}{METHOD_SEPARATOR}{method}"


def certificate_key(name: Array | Field, method: str | None) -> str:
    """``name`` for the tightest certificate (``method=None``) or for one certifier."""
    return str(name) if method is None else per_method(name, method)


def methods_in(keys: Iterable[str], name: Array | Field) -> list[str]:
    """The certifiers that have a per-method ``name`` among ``keys``, in their order."""
    prefix = per_method(name, "")
    return [key.removeprefix(prefix) for key in keys if key.startswith(prefix)]


class Meta(StrEnum):
    """Metadata stored with a unit, a head or a shift, and an encoder's info."""

    SECONDS = "seconds"
    WEIGHT_GAP = "weight_gap"
    HEAD = "head"
    ADAPTATION_CONFIG = "adaptation_config"
    CONFIG = "config"
    METRICS = "metrics"
    FINE_TUNED = "fine_tuned"
    RADIUS = "radius"
    RADIUS_RULE = "radius_rule"
    REFUSED = "refused"  # certifier name -> why it could not certify
    PRETRAINING = "pretraining"
    PRETRAIN_TASK = "pretrain_task"
    PRETRAIN_CONFIG = "pretrain_config"
    PRETRAIN_METRICS = "pretrain_metrics"
    PRETRAIN_SECONDS = "pretrain_seconds"
    SOURCE = "source"  # the encoder spec it was loaded from
    CHECKPOINT = "checkpoint"  # ... the checkpoint file
    SIDECAR = "sidecar"  # ... and its sidecar
    FACTORY = "factory"  # ... or the factory
    ZOO = "zoo"  # ... or the model zoo (torchvision, timm, robustbench, open_clip)
    INPUT_SIZE = "input_size"  # the (C, H, W) a zoo encoder takes
    LAYER = "layer"  # the layer its features are cut at
    FEATURE_SCALE = "feature_scale"  # median distance between two inputs' features
    DISTANCE_RATIO = "distance_ratio"  # median feature / input distance over pairs


class StoreKind(StrEnum):
    """The first part of every store key: what kind of unit of work it holds."""

    UNITS = "units"  # the per-sample evaluation of one (task, encoder, adaptation, threat)
    UNIT_SHARDS = "unit-shards"  # ... of one shard of its points, before they are joined
    SHIFT = "shift"  # the representation attack on the evaluation points
    TRAIN_SHIFT = "train-shift"  # ... on training points (for a certified-probe radius)
    CERTIFICATES = "certificates"  # every certifier's bound on the evaluation points
    TRAIN_CERTIFICATES = "train-certificates"  # ... on training points
    HEADS = "heads"  # a trained head (and a fine-tuned encoder's weights)
    TRAIN_FEATURES = "train-features"  # an encoder's features of a task's training points
    ADVICE = "advice"  # what the frozen encoder showed, and the advice, before fine-tuning


class Key(StrEnum):
    """Top-level keys of ``results.json`` (and of the study marker)."""

    FORMAT = "format"
    NAME = "name"
    CONFIG = "config"
    SEED = "seed"
    VERSIONS = "versions"
    GIT_REVISION = "git_revision"
    RUNTIME = "runtime"
    SECONDS = "seconds"
    ENCODERS = "encoders"
    RECORDS = "records"
    FINDINGS = "findings"
    FINGERPRINT = "fingerprint"  # the marker's hash of the configuration


class RuntimeField(StrEnum):
    """Keys of ``results.json``'s ``runtime``."""

    DEVICE = "device"
    PRECISION = "precision"
    COMPILE = "compile"
    RANK = "rank"
    WORLD_SIZE = "world_size"


class FindingField(StrEnum):
    CLAIM = "claim"
    HOLDS = "holds"  # True, False, or None when the study has no data for the claim
    EVIDENCE = "evidence"


def check_results(results: object, where: str) -> Results:
    """``results.json``'s content if it is of this version's format; a clear error if not."""
    if not isinstance(results, dict):
        raise ResultsFormatError(f"{where}: not a results object")
    found = results.get(Key.FORMAT)
    if found != RESULTS_FORMAT:
        raise ResultsFormatError(
            f"{where}: results format {found!r}, but this robust-transfer reads format "
            f"{RESULTS_FORMAT}; rerun the study into a new folder"
        )
    records = results.get(Key.RECORDS)
    if not isinstance(records, list):
        raise ResultsFormatError(f"{where}: results have no {Key.RECORDS!s} list")
    for index, record in enumerate(records):
        _check_record(record, f"{where}: {Key.RECORDS!s}[{index}]")
    _check_findings(results.get(Key.FINDINGS), where)
    return results


# Encoder, adaptation and task names become file and folder names under --out.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,79}")
# What every record holds, and what a record of each kind holds besides: a report drawn
# from a record without them would show it as the other kind, or as nothing.
_NAMES = (Field.ENCODER, Field.TASK, Field.ADAPTATION)
_MEASURED = {"classification": (Field.CLEAN_ACC,), "regression": (Field.CLEAN_LOSS,)}
# Fields that are not numbers (or None); every other field of a record is one.
_TEXT = {
    Field.PRETRAINING,
    Field.LOSS,
    Field.RADIUS_RULE,
    Field.ATTACK,
    Field.THREAT,
    Field.RECIPE,
    Field.TRAINED_AGAINST,
    Field.ADVICE_FIRST,
    Field.ADVICE_FINETUNING,
    Field.ADVICE_REASON,
}
_STRUCTURED = {
    Field.CERTIFIERS: list,
    Field.REFUSED: dict,
    Field.SANITY_FLAGS: dict,
    Field.STORE_KEY: list,
    Field.COLLAPSED_HEAD: bool,
    Field.AUTOATTACK_FLAG: bool,
    Field.PARETO: bool,
    Field.ADVICE_HELD: bool,
}


def _check_record(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise ResultsFormatError(f"{where} is not a record (a JSON object)")
    kind = record.get(Field.KIND)
    if kind not in _MEASURED:
        raise ResultsFormatError(
            f"{where}: {Field.KIND!s} is {kind!r}, not one of {', '.join(_MEASURED)}"
        )
    for name in _NAMES:
        value = record.get(name)
        if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
            raise ResultsFormatError(
                f"{where}: {name!s} {value!r} is not a name a study writes (letters, digits "
                "and . _ + = -, at most 80)"
            )
    if record.get(Field.THREAT) not in ("Linf", "L2"):
        raise ResultsFormatError(f"{where}: threat must be Linf or L2")
    for name in (Field.EPS, *_MEASURED[kind]):
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ResultsFormatError(
                f"{where}: a {kind} record needs a number for {name!s}, got {value!r}"
            )
    for key, value in record.items():
        if value is None or key in _NAMES or key == Field.KIND:
            continue
        expected: type | tuple[type, ...] = _STRUCTURED.get(key, str if key in _TEXT else ())
        if expected == ():
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected)
        if key == Field.STORE_KEY:
            ok = ok and bool(value) and all(isinstance(part, str) for part in value)
        if not ok:
            raise ResultsFormatError(f"{where}: {key} has an unexpected value {value!r}")


def _check_findings(findings: object, where: str) -> None:
    if findings is None:
        return
    if not isinstance(findings, list):
        raise ResultsFormatError(f"{where}: findings must be a list")
    for index, finding in enumerate(findings):
        if (
            not isinstance(finding, dict)
            or not isinstance(finding.get(FindingField.CLAIM), str)
            or not isinstance(finding.get(FindingField.EVIDENCE), str)
            or finding.get(FindingField.HOLDS) not in (True, False, None)
        ):
            raise ResultsFormatError(
                f"{where}: findings[{index}] must hold a claim, evidence and holds"
            )


def records_of(results: Mapping[str, object]) -> list[Record]:
    records = results.get(Key.RECORDS)
    if not isinstance(records, list):
        raise ResultsFormatError(f"results have no {Key.RECORDS!s} list")
    return records
