"""Linear heads as arrays: ``weight`` (K, m) and ``bias`` (K,), in the store or a file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..core.atomic import atomic_write_bytes
from ..core.errors import InputError, MissingFileError
from ..core.schema import Array


def head_arrays(head: nn.Linear) -> dict[str, Tensor]:
    weight = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else weight.new_zeros(len(weight))
    return {Array.WEIGHT: weight, Array.BIAS: bias}


def head_from_arrays(arrays: Mapping[str, Tensor], where: str) -> nn.Linear:
    """The head stored in ``arrays`` (frozen, eval mode); ``where`` names them in errors."""
    weight, bias = arrays.get(Array.WEIGHT), arrays.get(Array.BIAS)
    if (
        weight is None
        or bias is None
        or weight.dim() != 2
        or bias.shape != weight.shape[:1]
        or not weight.is_floating_point()
    ):
        raise InputError(
            f"{where} must hold '{Array.WEIGHT}' (K, m) and '{Array.BIAS}' (K,) float tensors"
        )
    if not bool(torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise InputError(f"{where}: the head holds NaN or infinite values")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.requires_grad_(False).eval()


def load_head(path: str | Path) -> nn.Linear:
    """A linear head from a safetensors file with ``weight`` (K, m) and ``bias`` (K,)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"head file not found: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise InputError(f"cannot read head {path}: {err}") from err
    return head_from_arrays(tensors, str(path))


def save_head(head: nn.Linear, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``head`` as :func:`load_head` reads it (atomically: a kill leaves the old
    file or the new one); ``metadata`` goes into the safetensors header."""
    arrays = {name: value.detach().cpu().contiguous() for name, value in head_arrays(head).items()}
    path = Path(path)
    atomic_write_bytes(path, save(arrays, metadata=dict(metadata or {})))
    return path
