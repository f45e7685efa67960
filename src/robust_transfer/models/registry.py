"""Encoder architectures by name, so checkpoints and configs can name them."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ..core.errors import InputError
from .encoders import Encoder, ResNet18, SmallCNN
from .lipschitz import LipschitzCNN, SLLNet

ARCHITECTURES: Mapping[str, type[Encoder]] = MappingProxyType(
    {cls.arch: cls for cls in (SmallCNN, LipschitzCNN, SLLNet, ResNet18)}
)


def build_encoder(arch: str, **config: object) -> Encoder:
    """An encoder by registry name, with the keyword arguments of its ``config()``."""
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        valid = ", ".join(ARCHITECTURES)
        raise InputError(f"unknown encoder architecture {arch!r}: expected one of {valid}")
    try:
        return cls(**config)  # type: ignore[arg-type]
    except TypeError as err:
        raise InputError(f"bad arguments for {arch!r}: {err}") from err
