"""How models are run: eval mode for the duration of a call, and the runtime (device,
precision, process rank) a run is given."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from .checks import parse_choice
from .errors import InputError, InputTypeError
from .schema import RuntimeField


@contextmanager
def eval_mode(model: nn.Module, *, purpose: str) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and give every submodule its own mode back afterwards.

    Attacks and certificates must see the deterministic model (BatchNorm statistics,
    no dropout); a model handed over in training mode is most likely a mistake, so say so.
    """
    modes = [(module, module.training) for module in model.modules()]
    if model.training:
        warnings.warn(
            f"{type(model).__name__} was in training mode; {purpose} runs it in eval mode "
            "and restores the mode afterwards",
            stacklevel=3,
        )
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer; ``fallback`` for a stateless model."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return fallback


class Precision(StrEnum):
    """Arithmetic of feature extraction and attacks. Only full float32 today: reduced
    precision changes attacked shifts and certificates and needs its own checks."""

    FP32 = "fp32"


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: device, precision, and this process's place among
    ``world_size`` processes. Built once by the caller (the study, the CLI) and passed
    down. :meth:`detect` is the one place that picks a device; functions that build
    models fall back to it when given no runtime."""

    device: torch.device
    precision: Precision = Precision.FP32
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.device, torch.device):
            raise InputTypeError(f"device must be a torch.device, got {self.device!r}")
        object.__setattr__(self, "precision", parse_choice(Precision, self.precision, "precision"))
        for name in ("rank", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputTypeError(f"{name} must be an integer, got {value!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise InputError(
                f"rank must lie in [0, world_size), got rank {self.rank}, "
                f"world_size {self.world_size}"
            )

    @classmethod
    def detect(cls, device: str = "auto") -> Runtime:
        """CUDA when present (``"auto"``), else the CPU; or the device named."""
        if device == "auto":
            return cls(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            chosen = torch.device(device)
        except RuntimeError as err:
            raise InputError(f"unknown device {device!r}: {err}") from err
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but CUDA is not available here")
        if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) here")
        return cls(chosen)

    def to_dict(self) -> dict[str, object]:
        return {
            RuntimeField.DEVICE: str(self.device),
            RuntimeField.PRECISION: self.precision.value,
            RuntimeField.RANK: self.rank,
            RuntimeField.WORLD_SIZE: self.world_size,
        }
