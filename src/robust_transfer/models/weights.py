"""Reading weights users bring (zoo checkpoints, their own files) without running code.

safetensors files hold only tensors. Any other file is read as a pickle with
``torch.load(weights_only=True)``, which refuses every object that would need code to
rebuild; such a file is read in full only when the user says they trust it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..core.errors import CheckpointError, MissingFileError

TRUST_HINT = (
    "it is a pickle that needs code execution to load, which can run arbitrary code; "
    "convert it to safetensors, or, only if you trust its source, pass "
    "trust_checkpoint=True (--trust-checkpoint on the command line)"
)
# Keys a whole-model checkpoint often nests its weights under.
_NESTED = ("state_dict", "model_state_dict", "model", "net")


@contextlib.contextmanager
def unpickling(trust: bool) -> Iterator[None]:
    """Within the block every ``torch.load`` (ours, a zoo's, a factory's) unpickles
    weights only, whatever its caller asked, unless the user ``trust``s the files: a
    factory or zoo loader given a file path by a config must not run its pickle."""
    name = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" if trust else "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    except pickle.UnpicklingError as err:
        if trust or not _needs_code(err):
            raise CheckpointError(f"cannot unpickle weights: {_last_line(err)}") from err
        raise CheckpointError(f"a file the encoder loads was refused: {TRUST_HINT}") from err
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def read_weights(path: str | Path, *, trust_checkpoint: bool = False) -> object:
    """The object a weights file holds: a safetensors file's tensors, or what a
    weights-only ``torch.load`` returns (a full unpickling with ``trust_checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        if not trust_checkpoint and _needs_code(err):
            raise CheckpointError(f"{path}: refused: {TRUST_HINT}") from err
        raise CheckpointError(f"{path}: corrupted or not a torch file: {_last_line(err)}") from err
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: corrupted or not a torch file: {_last_line(err)}") from err


# The weights-only unpickler's words for a class or function it would have to run; torch
# has written them "Unsupported global" and "unsupported GLOBAL", so matched loosely.
_NEEDS_CODE = ("unsupported global",)


def _needs_code(err: BaseException) -> bool:
    message = str(err).lower()
    return any(words in message for words in _NEEDS_CODE)


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def state_dict_of(content: object, path: str | Path) -> dict[str, Tensor]:
    """The tensor mapping inside a checkpoint: the mapping itself, or under one of the
    usual keys (``state_dict``, ``model``, ...); ``module.`` prefixes (DataParallel) go."""
    for key in _NESTED:
        if isinstance(content, Mapping) and isinstance(content.get(key), Mapping):
            content = content[key]
            break
    if isinstance(content, nn.Module):
        content = content.state_dict()
    if not isinstance(content, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in content.items()
    ):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in content.items()}


def load_weights_into(
    module: nn.Module,
    path: str | Path,
    *,
    trust_checkpoint: bool = False,
    strip: tuple[str, ...] = (),
) -> list[str]:
    """Load the state dict of ``path`` into ``module``; every parameter and buffer of
    ``module`` must be in it. Keys starting with a prefix of ``strip`` lose it first (a
    whole CLIP model's ``visual.`` for its image tower). Returns the keys not used
    (e.g. a classifier's head when the module is its encoder)."""
    state = state_dict_of(read_weights(path, trust_checkpoint=trust_checkpoint), path)
    for prefix in strip:
        if any(key.startswith(prefix) for key in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return fit_weights(module, state, str(path), allow_unexpected=True)


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if keys[3:] else "")


def fit_weights(
    module: nn.Module, state: Mapping[str, Tensor], where: str, *, allow_unexpected: bool
) -> list[str]:
    """Load ``state`` into ``module`` (every parameter and buffer required), or fail with
    one line that counts what is missing, left over and of another shape, instead of
    torch's dump of every key. Returns the keys not used."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key}: file {list(state[key].shape)}, model {list(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{len(missing)} weights missing ({_listed(missing)})" if missing else "",
        f"{len(reshaped)} of another shape ({_listed(reshaped)})" if reshaped else "",
        f"{len(unexpected)} not in the model ({_listed(unexpected)})"
        if unexpected and not allow_unexpected
        else "",
    ]
    if any(problems):
        raise CheckpointError(
            f"{where}: the weights do not fit the {type(module).__name__} architecture: "
            f"{'; '.join(p for p in problems if p)} (a checkpoint of another architecture?)"
        )
    module.load_state_dict({key: state[key] for key in expected})
    return unexpected
