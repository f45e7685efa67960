"""Input validation shared by the attacks, the bounds and the probes.

Every public entry point validates its tensors here so that a bad input fails
loudly, with the argument's name, before any work is done.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import torch
from torch import Tensor

from .errors import InputError, InputTypeError

Choice = TypeVar("Choice", bound=StrEnum)


def check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_output(output: object, what: str) -> Tensor:
    """What a model returned: one tensor (a tuple or a dict of outputs has no single
    meaning as features or logits)."""
    if not isinstance(output, Tensor):
        raise InputTypeError(
            f"{what} returned a {type(output).__name__}, not a tensor: wrap the model so that "
            "its forward returns one tensor (its features, or its logits)"
        )
    return output


# What torch says when a layer meets inputs of a shape it was not made for.
_SHAPE_ERROR = re.compile(
    r"shapes cannot be multiplied|size mismatch|must match the size|Sizes of tensors must "
    r"match|Given groups=|Calculated padded input size|is invalid for input of size|"
    r"Expected (\d+D|\S+ input|input|size)|expected input|to have \d+ channels"
)


def checked_forward(model: Callable[[Tensor], object], x: Tensor, what: str) -> Tensor:
    """``model(x)``, one tensor, or an :class:`InputError` where the model cannot read
    inputs of this shape (a layer sized for other data): one line, not a traceback from
    inside the model. Running out of memory stays what it is."""
    try:
        output = model(x)
    except RuntimeError as err:
        if not _SHAPE_ERROR.search(str(err)):
            raise  # out of memory, a compiler's or a device's failure: not the data's shape
        reason = str(err).strip().splitlines()[0]
        raise InputError(
            f"{what} fails on inputs of shape {tuple(x.shape[1:])}: {reason} (is it made for "
            "this data's image size and channels? --resize fits images to a zoo model)"
        ) from err
    return check_output(output, what)


def check_finite(value: Tensor, name: str) -> None:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise InputError(f"{name} contains NaN or infinite values")


def check_images(x: object, name: str = "x") -> Tensor:
    """A batch of inputs: floating point, at least 2-D (batch first), finite, in [0, 1]."""
    x = check_tensor(x, name)
    if not x.is_floating_point():
        raise InputTypeError(f"{name} must be a floating point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise InputError(
            f"{name} must have a batch dimension and at least one more, got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InputError(f"{name} is empty")
    check_finite(x, name)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"{name} must lie in [0, 1] (normalisation belongs inside the model), "
            f"got values in [{lo:.4g}, {hi:.4g}]"
        )
    # Results never hold on to the caller's autograd graph.
    return x.detach()


def check_features(features: object, name: str = "features") -> Tensor:
    features = check_tensor(features, name)
    if not features.is_floating_point():
        raise InputTypeError(f"{name} must be a floating point tensor, got {features.dtype}")
    if features.dim() != 2:
        raise InputError(f"{name} must have shape (N, m), got {tuple(features.shape)}")
    check_finite(features, name)
    largest = float(features.abs().max()) if features.numel() else 0.0
    if largest > _LARGEST_FEATURE:
        raise InputError(
            f"{name} reach {largest:.3g}: squared distances between them overflow float32 "
            "(about 3.4e38); scale the encoder's output down"
        )
    return features.detach()


# Squares of larger values overflow float32 before a norm or a margin is taken.
_LARGEST_FEATURE = 1e18


def check_labels(
    labels: object, n: int, name: str = "labels", num_classes: int | None = None
) -> Tensor:
    labels = check_tensor(labels, name)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InputTypeError(
            f"{name} must be an integer tensor of class indices, got {labels.dtype}"
        )
    if labels.shape != (n,):
        raise InputError(
            f"{name} must have shape ({n},) to match the inputs, got {tuple(labels.shape)}"
        )
    if n and int(labels.min()) < 0:
        raise InputError(f"{name} must be non-negative class indices")
    if n and int(labels.max()) >= CLASSES.most:
        # Before anything is sized by them: a head of a billion classes.
        raise InputError(f"{name} has class index {int(labels.max())}, beyond {CLASSES.what}")
    if num_classes is not None and n and int(labels.max()) >= num_classes:
        raise InputError(
            f"{name} has class index {int(labels.max())} but the head has {num_classes} classes"
        )
    return labels.long()


def check_two_classes(labels: Tensor, name: str) -> None:
    """Training labels of a classifier: at least two classes present. On one class any
    head is always right, and every accuracy measured after it reads 1.0."""
    present = torch.unique(labels)
    if len(present) < 2:
        only = "no points" if len(present) == 0 else f"only class {int(present[0])}"
        raise InputError(
            f"{name} hold {only}: a classifier needs training points of at least two classes"
        )


def check_per_sample(values: object, n: int, name: str) -> Tensor:
    """A non-negative, finite per-sample quantity such as a shift or radius."""
    values = check_tensor(values, name)
    if values.shape != (n,):
        raise InputError(
            f"{name} must have shape ({n},), one value per sample, got {tuple(values.shape)}"
        )
    if not values.is_floating_point():
        raise InputTypeError(f"{name} must be a floating point tensor, got {values.dtype}")
    check_finite(values, name)
    if n and float(values.min()) < 0.0:
        raise InputError(f"{name} must be non-negative")
    return values.detach()


@dataclass(frozen=True)
class Limit:
    """The largest value a count may take, and what it counts. Each lies far beyond any
    sensible run: past it a typo (an extra digit, int64 max) would run for days, or size
    a tensor by it, before anything else could object."""

    most: int
    what: str


STEPS = Limit(10_000, "gradient steps (AutoAttack's APGD takes 100)")
RESTARTS = Limit(100, "restarts per point")
EPOCHS = Limit(10_000, "passes over the training data")
POINTS = Limit(100_000_000, "points or a batch of them")
FEATURES = Limit(65_536, "feature dimensions of a built-in encoder")
# Heads compare every pair of classes (C^2 x features numbers): 10,000 classes is past
# ImageNet's 1,000 and still fits in memory with small features.
CLASSES = Limit(10_000, "classes, so labels run from 0 to 9999")
# numpy's legacy generators and scikit-learn take 32-bit seeds; torch 64-bit ones.
SEED = Limit(2**32 - 1, "a 32-bit seed")


def check_positive_int(value: object, name: str, limit: Limit = POINTS) -> int:
    """A positive integer, at most ``limit.most``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    if value > limit.most:
        raise InputError(f"{name} {value} exceeds {limit.most:,}, the most {limit.what}")
    return value


def check_number(
    value: object,
    name: str,
    *,
    low: float = 0.0,
    inclusive: bool = False,
    most: float = 1e15,
) -> float:
    """A finite real number above ``low`` (or at least ``low``, ``inclusive``) and at most
    ``most`` (by default 1e15: squares of larger ones leave float32's range of 3.4e38
    once multiplied by features or weights)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < low or (number == low and not inclusive):
        bound = f"at least {low:g}" if inclusive else f"above {low:g}"
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    if number > most:
        raise InputError(f"{name} {value!r} exceeds {most:g}, the most it may be")
    return number


def parse_choice(kind: type[Choice], value: object, what: str) -> Choice:
    """``value`` as a member of the string enum ``kind``, or an error listing the choices."""
    valid = ", ".join(repr(member.value) for member in kind)
    if not isinstance(value, str):
        raise InputError(f"unknown {what} {value!r}: expected one of {valid}")
    try:
        return kind(value)
    except ValueError as err:
        raise InputError(f"unknown {what} {value!r}: expected one of {valid}") from err


def check_seed(value: object, name: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED.most:
        raise InputError(
            f"{name} must be an integer from 0 to {SEED.most} ({SEED.what}), got {value!r}"
        )
    return value


def check_sample_ids(values: object, n: int, name: str = "sample_ids") -> Tensor:
    """One non-negative integer id per sample, no id twice."""
    ids = check_tensor(values, name)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype is torch.bool:
        raise InputTypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.shape != (n,):
        raise InputError(
            f"{name} must have shape ({n},), one id per sample, got {tuple(ids.shape)}"
        )
    if n and int(ids.min()) < 0:
        raise InputError(f"{name} must be non-negative")
    if len(torch.unique(ids)) != n:
        raise InputError(f"{name} must not repeat an id")
    return ids.long()
