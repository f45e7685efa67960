"""How models are run: eval mode for the duration of a call, and the runtime (device,
precision, compilation, process rank) a run is given, with the steps that every process
of a ``torchrun`` launch takes together."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checks import parse_choice
from .errors import InputError, InputTypeError, RobustTransferError
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


def model_input(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` as ``model`` takes it: apart from the caller's autograd graph (results must
    not hold on to it), in the model's floating dtype (float64 images for a float32
    model are the same images)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return x.detach().to(tensor.dtype)
    return x.detach()


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer; ``fallback`` for a stateless model."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return fallback


class Precision(StrEnum):
    """Arithmetic of the attacks' search. ``bf16`` runs their forward and backward passes
    under autocast; what they report (features, shifts, logits at the points found) and
    every certificate and margin is computed in float32 all the same, so reduced precision
    can weaken an attack but never makes a reported number or a guarantee wrong."""

    FP32 = "fp32"
    BF16 = "bf16"


# The reduced precision the attacks' search runs in, set by Runtime.search_precision.
_SEARCH_DTYPE: ContextVar[torch.dtype | None] = ContextVar("search_dtype", default=None)


def search_autocast(device: torch.device) -> AbstractContextManager[object]:
    """The autocast an attack's forward passes run under while it searches: bfloat16
    inside :meth:`Runtime.search_precision` of a ``bf16`` runtime, none otherwise."""
    dtype = _SEARCH_DTYPE.get()
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class ProcessFailed(RobustTransferError, RuntimeError):
    """Another process of the run failed; its own error says why."""


# How long a process waits for the others at a shared step: rank 0 may be pretraining.
_GROUP_TIMEOUT = timedelta(hours=24)
T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: device, precision of the attacks' search, whether
    encoders are compiled (``torch.compile``) for attacks and feature extraction, and this
    process's place among ``world_size`` processes. Built once by the caller (the study,
    the CLI) and passed down. :meth:`detect` is the one place that picks a device;
    functions that build models fall back to it when given no runtime."""

    device: torch.device
    precision: Precision = Precision.FP32
    rank: int = 0
    world_size: int = 1
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.device, torch.device):
            raise InputTypeError(f"device must be a torch.device, got {self.device!r}")
        object.__setattr__(self, "precision", parse_choice(Precision, self.precision, "precision"))
        if not isinstance(self.compile, bool):
            raise InputTypeError(f"compile must be true or false, got {self.compile!r}")
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
    def detect(
        cls,
        device: str = "auto",
        *,
        precision: Precision | str = Precision.FP32,
        compile: bool = False,
        shared: bool = False,
    ) -> Runtime:
        """CUDA when present (``"auto"``), else the CPU; or the device named. Under
        ``torchrun`` (``WORLD_SIZE`` > 1) a run that shares its work (``shared``) joins
        the process group (nccl on CUDA, gloo on the CPU) and each process takes the GPU
        of its ``LOCAL_RANK``; any other work is refused there, as every process would
        repeat it whole."""
        world_size = _process_count("WORLD_SIZE", "1")
        if world_size > 1 and not shared:
            raise InputError(
                "this command does not share its work among processes: run it without "
                "torchrun (run, demo and transfer do share theirs)"
            )
        chosen, precision = _device(device), parse_choice(Precision, precision, "precision")
        if world_size == 1:
            return cls(chosen, precision, compile=compile)
        if "RANK" not in os.environ:
            raise InputError(f"WORLD_SIZE is {world_size} but RANK is missing: use torchrun")
        rank, local_rank = _process_count("RANK", "0"), _process_count("LOCAL_RANK", "0")
        if rank >= world_size:
            # The rendezvous would wait forever for the ranks below world_size.
            raise InputError(f"RANK {rank} is not below WORLD_SIZE {world_size}: use torchrun")
        if chosen.type == "cuda":
            chosen = torch.device("cuda", local_rank)
            if local_rank >= torch.cuda.device_count():
                raise InputError(
                    f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} GPU(s) here"
                )
            torch.cuda.set_device(chosen)
        if not dist.is_initialized():
            backend = "nccl" if chosen.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=_GROUP_TIMEOUT)
        return cls(chosen, precision, rank=rank, world_size=world_size, compile=compile)

    def together(self, step: Callable[[], T]) -> T:
        """Run ``step`` here, then wait for every process to finish its own; an error in
        any process is raised in all of them (none waits forever for a failed one)."""
        if self.world_size == 1:
            return step()
        error: BaseException | None = None
        try:
            value = step()
        except Exception as err:  # every process must reach the gather below
            error = err
        outcomes: list[str | None] = [None] * self.world_size
        text = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(outcomes, text)
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(outcomes) if text is not None]
        if failed:
            rank, text = failed[0]
            raise ProcessFailed(f"process {rank} of {self.world_size} failed: {text}")
        return value

    def mine(self, index: int) -> bool:
        """Whether the ``index``-th piece of shared work falls to this process."""
        return index % self.world_size == self.rank

    @contextmanager
    def search_precision(self) -> Iterator[None]:
        """Within this context the attacks search at the runtime's precision; nothing
        else changes (margins, certificates and reported outputs stay float32)."""
        dtype = torch.bfloat16 if self.precision is Precision.BF16 else None
        token = _SEARCH_DTYPE.set(dtype)
        try:
            yield
        finally:
            _SEARCH_DTYPE.reset(token)

    def prepared(self, encoder: nn.Module) -> nn.Module:
        """A compiled copy of ``encoder`` when compilation is asked for, else ``encoder``.
        The copy keeps its type and layers (``nn.Module.compile``), so certifiers still
        read it; only its forward pass runs compiled."""
        if not self.compile:
            return encoder
        compiled = copy.deepcopy(encoder)
        compiled.compile()
        return compiled

    def to_dict(self) -> dict[str, object]:
        return {
            RuntimeField.DEVICE: str(self.device),
            RuntimeField.PRECISION: self.precision.value,
            RuntimeField.COMPILE: self.compile,
            RuntimeField.RANK: self.rank,
            RuntimeField.WORLD_SIZE: self.world_size,
        }


def _process_count(name: str, default: str) -> int:
    """A ``torchrun`` variable: a non-negative integer (WORLD_SIZE at least 1)."""
    value = os.environ.get(name, default)
    lowest = 1 if name == "WORLD_SIZE" else 0
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not lowest <= number <= _MOST_PROCESSES:
        raise InputError(
            f"{name}={value!r} in the environment: expected an integer from {lowest} to "
            f"{_MOST_PROCESSES} (torchrun sets it)"
        )
    return number


# More processes than any cluster gives one job: past it, a typo.
_MOST_PROCESSES = 1 << 20


def release_processes() -> None:
    """Tear down the process group ``torchrun`` gave this process, if any. Left to the
    interpreter's exit, gloo's threads can abort a process whose work is done
    ("terminate called without an active exception", seen on a rerun that found every
    unit stored)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_COMPUTING_DEVICES = ("cpu", "cuda")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {device!r}: {err}") from err
    if chosen.type not in _COMPUTING_DEVICES:
        # 'meta' holds shapes without values; the others need a build of their own.
        raise InputError(
            f"device {device!r} cannot run the work: use auto, {', '.join(_COMPUTING_DEVICES)}"
        )
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) here")
    return chosen
