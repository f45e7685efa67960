"""The modules and hooks adaptation trains through: the encoder joined to its head,
parts kept in eval mode while the rest trains, the images an adaptation passes through
the encoder, TWINS' two sets of batch-norm statistics, and LoRA adapters (peft)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor, nn

from ..core.errors import InputError
from .objectives import EpsSchedule, ModelLoss


class Joined(nn.Module):
    """Encoder then head: the model adversarial training attacks and trains."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.encoder(x).flatten(1))
        return out


class KeepEval(nn.Module):
    """``model`` whose ``frozen`` parts stay in eval mode when it trains: a frozen
    encoder's batch norm keeps its statistics, frozen statistics stay the pretrained."""

    def __init__(self, model: nn.Module, frozen: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self._frozen = frozen

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x)
        return out

    def train(self, mode: bool = True) -> KeepEval:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self


class Passes:
    """Images through the encoder, forward and backward: what an adaptation cost."""

    def __init__(self) -> None:
        self.forward = self.backward = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def watch(self, module: nn.Module) -> None:
        self._handles.append(module.register_forward_hook(self._seen))

    def _seen(self, module: nn.Module, inputs: object, output: object) -> None:
        if not isinstance(output, Tensor):
            return
        count = len(output)
        self.forward += count
        if output.requires_grad:
            output.register_hook(lambda grad: self._back(count))  # type: ignore[no-untyped-call]

    def _back(self, count: int) -> None:
        self.backward += count

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextlib.contextmanager
def no_grad_on(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters out of autograd for a while, their flags restored after:
    an attack through a frozen encoder leaves its ``.grad`` as it was."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


def twins(
    loss: ModelLoss,
    norms: list[nn.modules.batchnorm._BatchNorm],
    schedule: EpsSchedule | None = None,
) -> ModelLoss:
    """The mean of ``loss`` with the batch statistics (which the running ones follow)
    and with the pretrained running statistics, frozen: TWINS' two networks, one set of
    weights."""
    pretrained = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]  # type: ignore[union-attr]

    def both(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        adaptive = loss(model, x, y, generator)
        if schedule is not None:
            schedule.repeat()  # both losses of one step train at the step's eps
        moving = [(m.running_mean, m.running_var) for m in norms]
        try:
            for m, (mean, var) in zip(norms, pretrained, strict=True):
                m.running_mean, m.running_var = mean, var
            frozen_view = KeepEval(model, list(norms))
            frozen = loss(frozen_view.train(model.training), x, y, generator)
        finally:
            for m, (mean, var) in zip(norms, moving, strict=True):
                m.running_mean, m.running_var = mean, var
            model.train()
        return (adaptive + frozen) / 2

    return both


def peft_module() -> ModuleType:
    try:
        return importlib.import_module("peft")
    except ImportError as err:
        raise InputError("protocol 'lora' needs peft: pip install 'robust-transfer[peft]'") from err


class _Box(nn.Module):
    """A plain container for peft, which reads attributes such as ``config`` of the model
    it wraps as a Hugging Face configuration."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.encoder(x)
        return out


def with_lora(encoder: nn.Module, rank: int) -> nn.Module:
    """``encoder`` inside peft's LoRA model: every plain linear and convolution layer
    gets a rank-``rank`` adapter (zero at the start), the rest is frozen. Layers whose
    weights are parametrised (1-Lipschitz by construction) are left out: a low-rank
    update would undo the construction."""
    peft = peft_module()
    box = _Box(encoder)
    targets = [
        name
        for name, module in box.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
        and not nn.utils.parametrize.is_parametrized(module)
    ]
    if not targets:
        raise InputError("protocol 'lora' found no plain linear or convolution layer to adapt")
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    wrapped: nn.Module = peft.get_peft_model(box, config)
    return wrapped


def merged_lora(trained: nn.Module) -> nn.Module:
    """The encoder :func:`with_lora` wrapped, its adapters merged into plain layers."""
    merged = trained.merge_and_unload()  # type: ignore[operator]
    assert isinstance(merged, _Box)
    return merged.encoder
