"""The certifier contract and registry.

A certifier maps ``(encoder, x, threat)`` to a per-sample upper bound on
``sup_{x' in B(x)} ||f(x') - f(x)||_2``, or says why it cannot (:class:`Refusal`): an
encoder of layers it does not support, a norm it does not handle. Certifiers are looked
up by name; a study uses every registered certifier that applies unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..core.errors import InputError
from ..core.schema import METHOD_SEPARATOR
from ..theory.threat import ThreatModel


@dataclass(frozen=True)
class Refusal:
    """Why a certifier gives no bound for an encoder and threat model."""

    reason: str


class Certifier(Protocol):
    name: str
    by_default: bool  # run when no certifiers are named (False for the expensive ones)

    def certify(self, encoder: nn.Module, x: Tensor, threat: ThreatModel) -> Tensor | Refusal:
        """A ``(N,)`` float tensor of upper bounds on the shift of each row of ``x``,
        on ``x``'s device, or the reason there is none."""
        ...


_REGISTRY: dict[str, Certifier] = {}


def register_certifier(certifier: Certifier, *, replace: bool = False) -> None:
    """Make ``certifier`` available by its name to :func:`get_certifier` and studies."""
    name = certifier.name
    if not name or name == BEST or METHOD_SEPARATOR in name:
        raise InputError(
            f"a certifier name must be non-empty, not {BEST!r}, without {METHOD_SEPARATOR!r}"
        )
    if name in _REGISTRY and not replace:
        raise InputError(f"certifier {name!r} is already registered; pass replace=True")
    _REGISTRY[name] = certifier


def certifier_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def default_certifier_names() -> tuple[str, ...]:
    """The certifiers run when none are named: every registered one that is cheap."""
    return tuple(name for name, certifier in _REGISTRY.items() if certifier.by_default)


def get_certifier(name: str) -> Certifier:
    certifier = _REGISTRY.get(name)
    if certifier is None:
        known = ", ".join(repr(n) for n in (*_REGISTRY, BEST))
        raise InputError(f"unknown certifier {name!r}: expected one of {known}")
    return certifier


# The per-sample tightest of all certifiers that apply.
BEST = "best"


@dataclass(frozen=True)
class Certificates:
    """Every requested certifier's outcome for one encoder, threat and batch of inputs."""

    bounds: Mapping[str, Tensor]  # method -> (N,) certified shift
    refused: Mapping[str, str]  # method -> reason

    def tightest(self) -> Tensor | None:
        """Per sample, the smallest bound of any method; None when none applies."""
        if not self.bounds:
            return None
        return torch.stack(list(self.bounds.values())).amin(dim=0)
