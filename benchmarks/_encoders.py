"""The built-in encoders the benchmarks measure, pretrained as the default study does
and cached beside the benchmarks (so a second run trains nothing)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from robust_transfer.data.tasks import get_task
from robust_transfer.study.config import default_config
from robust_transfer.training.pretrain import cached_pretrain

CACHE = Path(__file__).resolve().parent / ".cache"


def encoder_named(name: str) -> nn.Module:
    """The default study's encoder ``name``, in eval mode."""
    spec = default_config().encoders[name]
    assert spec.pretrain is not None
    assert spec.pretrain_task is not None
    pretrain = get_task(spec.pretrain_task).pretrain
    assert pretrain is not None
    return cached_pretrain(spec.pretrain, pretrain.train, CACHE).encoder.eval()
