"""How models are run: eval mode for the duration of a call, and the device to use."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


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


def default_device() -> torch.device:
    """CUDA when present, else the CPU: where the library puts models it builds itself."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
