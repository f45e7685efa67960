"""Certifiers: per-sample upper bounds on the representation shift, by registered method.

``certified_shift(encoder, x, threat, method="best")`` is the one entry point;
:func:`certify_all` runs several methods at once and keeps their refusals. A new
certifier is registered with :func:`register_certifier`; a new layer type, for every
certifier at once, with :func:`register_layer`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..core.checks import check_images, check_per_sample
from ..core.errors import InputTypeError, RobustTransferError
from ..core.runtime import eval_mode, model_input
from ..theory.threat import ThreatModel
from .base import (
    BEST,
    Certificates,
    Certifier,
    Refusal,
    certifier_names,
    default_certifier_names,
    get_certifier,
    register_certifier,
)
from .crown import CROWNCertifier, Intermediate, margin_lower_bounds
from .ibp import IBPCertifier
from .layers import LayerReader, conv_op, linear_op, ops_of, register_layer, reshape_op, scale_op
from .lipschitz import LipschitzCertifier, lipschitz_shift

register_certifier(LipschitzCertifier())
register_certifier(IBPCertifier())
register_certifier(CROWNCertifier())
register_certifier(CROWNCertifier(intermediate="crown"))


# Head-specific certificates (CROWN on the encoder composed with a head's class
# differences), by the intermediate bounds they use. A study names them among its
# certifiers; one that names none of its certifiers gets ``head-crown``.
HEAD_CERTIFIERS: dict[str, Intermediate] = {"head-crown": "ibp", "head-crown-full": "crown"}
DEFAULT_HEAD_CERTIFIER = "head-crown"


def split_certifiers(
    names: Sequence[str] | None,
) -> tuple[tuple[str, ...] | None, str | None]:
    """The shift certifiers among ``names`` (None: the defaults) and the head
    certifier (the tightest named, none if none is; with None, ``head-crown``)."""
    if names is None:
        return None, DEFAULT_HEAD_CERTIFIER
    heads = [name for name in HEAD_CERTIFIERS if name in names]
    return tuple(n for n in names if n not in HEAD_CERTIFIERS), heads[-1] if heads else None


class NoCertificate(RobustTransferError, ValueError):
    """No requested certifier gives a bound for this encoder and threat model."""


def certify_all(
    encoder: nn.Module, x: Tensor, threat: ThreatModel, methods: Sequence[str] | None = None
) -> Certificates:
    """Run ``methods`` (default: every registered certifier run by default, see
    :func:`default_certifier_names`) on ``x``; each gives a bound per sample or a
    refusal. The encoder runs in eval mode."""
    if not isinstance(encoder, nn.Module):
        raise InputTypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    if not isinstance(threat, ThreatModel):
        raise InputTypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    x = model_input(encoder, check_images(x))
    names = default_certifier_names() if methods is None else tuple(methods)
    bounds: dict[str, Tensor] = {}
    refused: dict[str, str] = {}
    with eval_mode(encoder, purpose="certification"):
        for name in names:
            outcome = get_certifier(name).certify(encoder, x, threat)
            if isinstance(outcome, Refusal):
                refused[name] = outcome.reason
            else:
                where = f"certifier {name!r}'s bound"
                bounds[name] = check_per_sample(outcome.detach(), len(x), where).float()
    return Certificates(bounds, refused)


def certified_shift(
    encoder: nn.Module, x: Tensor, threat: ThreatModel, method: str = BEST
) -> Tensor:
    """Per-sample upper bound on ``||f(x') - f(x)||_2`` over ``B(x)`` by ``method`` (a
    registered certifier's name), or with ``"best"`` the tightest per sample of the
    default certifiers that apply. Raises :class:`NoCertificate` with every
    certifier's reason when none applies."""
    certificates = certify_all(encoder, x, threat, None if method == BEST else [method])
    tightest = certificates.tightest()
    if tightest is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in certificates.refused.items())
        raise NoCertificate(f"no certificate for this encoder under {threat}: {reasons}")
    return tightest


__all__ = [
    "BEST",
    "DEFAULT_HEAD_CERTIFIER",
    "HEAD_CERTIFIERS",
    "CROWNCertifier",
    "Certificates",
    "Certifier",
    "IBPCertifier",
    "LayerReader",
    "LipschitzCertifier",
    "NoCertificate",
    "Refusal",
    "certified_shift",
    "certifier_names",
    "certify_all",
    "conv_op",
    "default_certifier_names",
    "get_certifier",
    "linear_op",
    "lipschitz_shift",
    "margin_lower_bounds",
    "ops_of",
    "register_certifier",
    "register_layer",
    "reshape_op",
    "scale_op",
    "split_certifiers",
]
