"""CROWN (Zhang et al., 2018): linear bounds on every feature, propagated backwards.

For each feature ``f_j`` two linear functions of the input bound it from above and
below on the whole threat set: the backward pass starts from ``+e_j`` and ``-e_j`` at
the output and crosses each layer exactly (affine maps) or through a linear relaxation
(ReLU, and MaxMin written as ``max(a, b) = b + relu(a - b)``, ``min = a - relu(a - b)``),
using bounds of each relaxed layer's input: IBP's (``crown``), or CROWN's own, layer by
layer, for the units IBP leaves unstable (``crown-full``). The linear bounds are then maximised
over the threat set intersected with the box ``[0, 1]``: exactly over the box for Linf,
and as the smaller of the ball's and the box's maximum for L2. Per sample, the shift is
at most ``|| max(upper - f(x), f(x) - lower) ||_2``.

Far tighter than IBP alone on deep networks, and more expensive: one backward pass per
feature and sign, so a study runs it only when named (``certifiers = ["crown", ...]``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..core.errors import InputError
from ..theory import first_order
from ..theory.threat import Norm, ThreatModel
from .base import Refusal
from .layers import decompose
from .ops import (
    ROUNDING,
    Bounds,
    NotBoundable,
    Op,
    PairSort,
    ReLU,
    Residual,
    chain_backward,
    pair_gap,
    shift_bound,
)

# Rows of linear bounds (2 x features) times a sample's largest layer, per chunk of samples.
CHUNK_ELEMENTS = 20_000_000
# Multiply-adds per point past which CROWN refuses rather than run: each linear bound it
# carries back costs about one forward pass of a sample, so this is 20 s or more per
# point on a CPU, an hour or more for a shard. Per point, so that whether a certifier
# runs does not depend on how many points a call takes.
WORK_LIMIT = 1e12


def _multiply_adds(encoder: nn.Module, x: Tensor) -> tuple[int, int]:
    """One sample's multiply-adds in ``encoder``'s convolutions and linear layers, and
    its ReLU units (the intermediate bounds CROWN's own would tighten)."""
    counts = [0, 0]

    def seen(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kernel = module.weight[0].numel()
            counts[0] += output[0].numel() * kernel
        elif isinstance(module, nn.Linear):
            counts[0] += module.in_features * module.out_features
        elif isinstance(module, nn.ReLU):
            counts[1] += output[0].numel()

    handles = [module.register_forward_hook(seen) for module in encoder.modules()]
    try:
        with torch.no_grad():
            encoder(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return counts[0], counts[1]


def too_costly(
    encoder: nn.Module, x: Tensor, rows: int, intermediate: str, name: str
) -> Refusal | None:
    """Why CROWN with ``rows`` linear bounds per sample would not finish in reasonable
    time on points like ``x``, or None: its work per point is about rows (plus, for
    CROWN's own intermediate bounds, two per ReLU unit) times a point's multiply-adds."""
    multiply_adds, units = _multiply_adds(encoder, x)
    carried = rows + (2 * units if intermediate == "crown" else 0)
    work = float(carried) * multiply_adds
    if work <= WORK_LIMIT:
        return None
    return Refusal(
        f"{name} would carry {carried} linear bounds per point through "
        f"{multiply_adds / 1e9:.2g} G multiply-adds ({work:.2g} per point, over the limit "
        f"of {WORK_LIMIT:.0e}: hours for a shard here); name cheaper certifiers"
    )


def _input_bounds(
    ops: list[Op], lower: Tensor, upper: Tensor, store: Bounds
) -> tuple[Tensor, Tensor]:
    """IBP forward: every op's input interval (and a residual sum's) into ``store``."""
    for op in ops:
        store[id(op)] = (lower, upper)
        if isinstance(op, Residual):
            body = _input_bounds(op.body, lower, upper, store)
            short = _input_bounds(op.shortcut, lower, upper, store)
            lower, upper = body[0] + short[0], body[1] + short[1]
            store[("sum", id(op))] = (lower, upper)
            if op.after_relu:
                lower, upper = torch.relu(lower), torch.relu(upper)
        else:
            lower, upper = op.interval(lower, upper)
    return lower, upper


def _maximum(coef: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """``max <coef_r, x' - x>`` over the threat set ∩ the box, bounded from above."""
    # The box alone: the largest first-order drop of -coef, exact per pixel.
    box = first_order.linf_drop(-coef.flatten(2), x.flatten(1)[:, None], threat.eps)
    if threat.norm is Norm.LINF:
        return box
    return torch.minimum(box, threat.eps * coef.flatten(2).norm(dim=-1))


def _bound_rows(
    ops: list[Op], x: Tensor, threat: ThreatModel, rows: Tensor, store: Bounds
) -> Tensor:
    """Per sample and row ``r``, an upper bound on ``<rows_r, ops(x')>`` over the threat
    set ∩ the box, given every op's input interval in ``store``."""
    coef, const = chain_backward(ops, rows, torch.zeros(rows.shape[:2], device=x.device), store)
    # The linear bound at x itself, plus its largest change over the threat set.
    at_x = (coef * x.unsqueeze(1)).flatten(2).sum(-1) + const
    return at_x + _maximum(coef, x, threat)


def _widest(ops: list[Op], x: Tensor) -> int:
    """The most elements of one sample at any op's input or output."""
    probe: Bounds = {}
    with torch.no_grad():
        out = _input_bounds(ops, x[:1], x[:1], probe)[0]
    return max(x[0].numel(), out[0].numel(), *(b[0][0].numel() for b in probe.values()))


def _tighten(
    prefix: list[Op],
    interval: tuple[Tensor, Tensor],
    store: Bounds,
    x: Tensor,
    threat: ThreatModel,
    *,
    gap: bool = False,
) -> tuple[Tensor, Tensor]:
    """CROWN bounds on the output of ``prefix`` (or, with ``gap``, on MaxMin's ``a - b``)
    where ``interval`` (IBP's) leaves a ReLU unstable, intersected with ``interval``.
    Stable units keep IBP's interval: a tighter one would not change their relaxation."""
    lower, upper = pair_gap(*interval) if gap else interval
    # Flat copies to write into (whatever the layout, e.g. channels_last, of the input).
    shape, full = lower.shape, interval[0].shape[1:]
    lower, upper = lower.reshape(len(x), -1).clone(), upper.reshape(len(x), -1).clone()
    half = lower.shape[1]
    # Each unit needs two rows (both signs): chunks of units keep a chunk's rows, times
    # the widest layer they cross, within the budget.
    chunk = max(1, CHUNK_ELEMENTS // (2 * _widest(prefix, x)))
    for sample in range(len(x)):
        unstable = ((lower[sample] < 0) & (upper[sample] > 0)).nonzero().squeeze(1)
        if len(unstable) == 0:
            continue
        one = {
            key: (low[sample : sample + 1], up[sample : sample + 1])
            for key, (low, up) in store.items()
        }
        for units in torch.split(unstable, chunk):
            count = len(units)
            rows = torch.zeros(2 * count, full.numel(), dtype=x.dtype, device=x.device)
            span = torch.arange(count, device=x.device)
            rows[span, units] = 1.0
            rows[span + count, units] = -1.0
            if gap:  # a - b: b sits half the channels further on
                rows[span, units + half] = -1.0
                rows[span + count, units + half] = 1.0
            rows = rows.reshape(1, 2 * count, *full)
            top = _bound_rows(prefix, x[sample : sample + 1], threat, rows, one)[0]
            # Widened like the final bounds: a relaxation must hold for the float32 encoder.
            top = top + ROUNDING * (top.abs() + 1.0)
            upper[sample, units] = torch.minimum(upper[sample, units], top[:count])
            lower[sample, units] = torch.maximum(lower[sample, units], -top[count:])
    return lower.reshape(shape), upper.reshape(shape)


def _crown_intervals(
    ops: list[Op],
    prefix: list[Op],
    interval: tuple[Tensor, Tensor],
    store: Bounds,
    x: Tensor,
    threat: ThreatModel,
) -> tuple[Tensor, Tensor]:
    """Like :func:`_input_bounds`, with every ReLU's and MaxMin's input interval tightened
    by CROWN over the ops before it (``prefix`` and those of ``ops`` already passed)."""
    for op in ops:
        if isinstance(op, ReLU):
            interval = _tighten(prefix, interval, store, x, threat)
        elif isinstance(op, PairSort):
            store[("gap", id(op))] = _tighten(prefix, interval, store, x, threat, gap=True)
        store[id(op)] = interval
        if isinstance(op, Residual):
            body = _crown_intervals(op.body, prefix, interval, store, x, threat)
            short = _crown_intervals(op.shortcut, prefix, interval, store, x, threat)
            interval = (body[0] + short[0], body[1] + short[1])
            if op.after_relu:
                # The sum's bounds, by CROWN over the block without its final ReLU.
                plain = Residual(op.body, op.shortcut, after_relu=False)
                store[id(plain)] = store[id(op)]
                interval = _tighten([*prefix, plain], interval, store, x, threat)
                del store[id(plain)]
            store[("sum", id(op))] = interval
            if op.after_relu:
                interval = (torch.relu(interval[0]), torch.relu(interval[1]))
        else:
            interval = op.interval(*interval)
        prefix = [*prefix, op]
    return interval


def _linear_upper(
    ops: list[Op], x: Tensor, threat: ThreatModel, start: Tensor, intermediate: str
) -> Tensor:
    """Per sample and row ``r``, an upper bound on ``<start_r, f(x')>`` over the threat set
    ∩ the box, ``start`` of shape (N, R, features); in chunks of samples. Intermediate
    bounds by IBP or, with ``intermediate="crown"``, by CROWN itself. Differentiable in
    the ops' parameters (certified training); certifiers call it without gradients."""
    chunk = max(1, CHUNK_ELEMENTS // (start.shape[1] * max(_widest(ops, x), start.shape[2])))
    parts = []
    for first in range(0, len(x), chunk):
        part, rows = x[first : first + chunk], start[first : first + chunk]
        box = ((part - threat.eps).clamp(0, 1), (part + threat.eps).clamp(0, 1))
        store: Bounds = {}
        _input_bounds(ops, *box, store)
        top = _bound_rows(ops, part, threat, rows, store)
        if intermediate == "crown":
            store = {}
            _crown_intervals(ops, [], box, store, part, threat)
            # CROWN's adaptive lower slopes are not monotone in the intermediate
            # bounds: tighter ones can loosen a bound a little, so keep the better.
            top = torch.minimum(top, _bound_rows(ops, part, threat, rows, store))
        parts.append(top)
    return torch.cat(parts)


def crown_ibp_margins(
    ops: list[Op], head: nn.Linear, x: Tensor, y: Tensor, threat: ThreatModel
) -> Tensor:
    """Per sample and class ``j``, an upper bound on ``z_j - z_y`` over the threat set ∩
    the box (0 at ``j = y``) for the encoder ``ops`` (flat features) and ``head``: CROWN
    with IBP intermediate bounds, CROWN-IBP (Zhang et al., 2020). Differentiable, for
    certified training; raises :class:`InputError` on layers CROWN does not read."""
    weight = head.weight
    bias = head.bias if head.bias is not None else torch.zeros_like(weight[:, 0])
    differences = weight[None, :, :] - weight[y][:, None, :]  # (N, K, features): w_j - w_y
    try:
        top = _linear_upper(ops, x, threat, differences, "ibp")
    except NotBoundable as err:
        raise InputError(f"CROWN-IBP does not support {err}") from err
    return top + (bias[None, :] - bias[y][:, None])


Intermediate = Literal["ibp", "crown"]
_INTERMEDIATE: tuple[Intermediate, ...] = ("ibp", "crown")
# The certifier's name for each kind of intermediate bounds.
_NAMES: dict[str, str] = {"ibp": "crown", "crown": "crown-full"}


def _check_intermediate(intermediate: str) -> None:
    if intermediate not in _INTERMEDIATE:
        raise InputError(
            f"unknown intermediate bounds {intermediate!r}: expected one of {_INTERMEDIATE}"
        )


class CROWNCertifier:
    """Per-sample shift bounds from CROWN's linear bounds, with IBP intermediate bounds
    (``crown``) or CROWN's own (``crown-full``: tighter, a backward pass per unstable
    ReLU of every layer)."""

    by_default = False  # a backward pass per feature: run when a study names it

    def __init__(self, intermediate: Intermediate = "ibp") -> None:
        _check_intermediate(intermediate)
        self.intermediate = intermediate
        self.name = _NAMES[intermediate]

    def certify(self, encoder: nn.Module, x: Tensor, threat: ThreatModel) -> Tensor | Refusal:
        net = decompose(encoder, x)
        if isinstance(net, Refusal):
            return net
        ops, clean = net.ops, net.clean
        features = clean.shape[1]
        costly = too_costly(encoder, x, 2 * features, self.intermediate, self.name)
        if costly is not None:
            return costly
        eye = torch.eye(features, dtype=x.dtype, device=x.device)
        start = torch.cat([eye, -eye]).expand(len(x), -1, -1)
        try:
            with torch.no_grad():
                top = _linear_upper(ops, x, threat, start, self.intermediate)
        except NotBoundable as err:
            return Refusal(f"{self.name} does not support {err}")
        return shift_bound(clean, -top[:, features:], top[:, :features])


def margin_lower_bounds(
    encoder: nn.Module,
    head: nn.Linear,
    x: Tensor,
    threat: ThreatModel,
    intermediate: Intermediate = "ibp",
) -> Tensor | Refusal:
    """Head-specific: per sample and class ``j``, a lower bound on the margin
    ``(w_yhat - w_j)^T f(x') + b_yhat - b_j`` of the clean prediction ``yhat`` over the
    threat set ∩ the box, by CROWN on the encoder composed with the head's differences
    (``+inf`` at ``j = yhat``). All positive: no point of the set changes the prediction.
    One backward pass per class, not per feature: cheap enough for every head (with IBP
    intermediate bounds; ``intermediate="crown"`` is tighter and costs what ``crown-full``
    does)."""
    _check_intermediate(intermediate)
    net = decompose(encoder, x)
    if isinstance(net, Refusal):
        return net
    costly = too_costly(encoder, x, head.out_features, intermediate, f"head-{_NAMES[intermediate]}")
    if costly is not None:
        return costly
    ops = net.ops
    weight = head.weight.detach().to(x.dtype)
    bias = (
        head.bias.detach().to(x.dtype)
        if head.bias is not None
        else torch.zeros(len(weight), dtype=x.dtype, device=x.device)
    )
    with torch.no_grad():
        predicted = head(net.clean).argmax(dim=1)
    differences = weight[predicted][:, None, :] - weight[None, :, :]  # (N, K, features)
    try:
        with torch.no_grad():
            top = _linear_upper(ops, x, threat, -differences, intermediate)
    except NotBoundable as err:
        return Refusal(f"{_NAMES[intermediate]} does not support {err}")
    gaps = bias[predicted][:, None] - bias[None, :]
    # Widened by the rounding margin of the bound's size, like the shift bounds.
    margins = -top + gaps - ROUNDING * (top.abs() + gaps.abs() + 1.0)
    own = torch.nn.functional.one_hot(predicted, len(weight)).bool()
    return margins.masked_fill(own, torch.inf)
