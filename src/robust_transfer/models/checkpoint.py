"""Encoder checkpoints: safetensors weights plus a JSON sidecar that says what they are.

The sidecar records the architecture and its arguments, the Lipschitz constant, a
SHA-256 of the weights file and free metadata (protocol, data, threat model, seed,
metrics, versions). Both files are written atomically, weights first and sidecar last,
so a half-written checkpoint never passes for a complete one; loading re-checks the hash.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..core.atomic import atomic_write, atomic_write_text
from ..core.errors import CheckpointError, InputError, InputTypeError
from .encoders import Encoder
from .registry import build_encoder
from .weights import fit_weights

FORMAT = 1


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, encoder: Encoder, metadata: Mapping[str, object]) -> None:
    """Write ``path`` (.safetensors) and its sidecar ``path.with_suffix('.json')``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"a checkpoint path must end in .safetensors, got {path}")
    if not isinstance(encoder, Encoder):
        raise InputTypeError(
            f"only built-in encoders are checkpointed, got {type(encoder).__name__}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(path, lambda temp: save_file(state, temp))
    sidecar = {
        "format": FORMAT,
        "arch": encoder.arch,
        "config": encoder.config(),
        "lipschitz_l2": encoder.lipschitz_l2,
        "sha256": _sha256(path),
        "metadata": dict(metadata),
        "versions": {
            "robust_transfer": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    text = json.dumps(sidecar, indent=2, sort_keys=True, default=str)
    atomic_write_text(sidecar_path(path), text)


def load_checkpoint(
    path: str | Path, *, arch: str | None = None, map_location: str | torch.device = "cpu"
) -> tuple[Encoder, dict[str, object]]:
    """The encoder stored at ``path`` (in eval mode) and its sidecar."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: its sidecar {side.name} is missing (half-written?)")
    try:
        sidecar = json.loads(side.read_bytes())
        stored_arch, config, digest = sidecar["arch"], sidecar["config"], sidecar["sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: unreadable sidecar {side.name}: {err}") from err
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: sidecar {side.name} lacks {err}") from err
    for key, value, kind in (("arch", stored_arch, str), ("config", config, dict)):
        if not isinstance(value, kind):
            raise CheckpointError(
                f"{path}: sidecar {side.name}: {key} must be a {kind.__name__}, got "
                f"{type(value).__name__}"
            )
    if not isinstance(digest, str):
        raise CheckpointError(f"{path}: sidecar {side.name}: sha256 must be a string")
    if arch is not None and stored_arch != arch:
        raise CheckpointError(f"{path}: holds a {stored_arch!r} encoder, expected {arch!r}")
    if _sha256(path) != digest:
        raise CheckpointError(
            f"{path}: weights do not match the sidecar's SHA-256 (corrupted or half-written)"
        )
    try:
        encoder = build_encoder(stored_arch, **config)
        state = load_file(path, device=str(map_location))
    except (SafetensorError, ValueError, TypeError, RuntimeError, MemoryError) as err:
        raise CheckpointError(f"{path}: cannot load weights: {err}") from err
    fit_weights(encoder, state, str(path), allow_unexpected=False)
    return encoder.eval(), sidecar
