"""Expected robust accuracy of any linear head from one task-independent pass over the
encoder (``theory.md``, "Expected robust accuracy").

:func:`profile_encoder` does the label-free, head-free work once per encoder and set of
points: the features, and the encoder's Jacobian rows ``u^T J(x)`` for an orthonormal
set of feature directions ``u`` (all features by default; for wide encoders, only the
span of the heads' class-difference directions, extended per head as needed). A head's
margin to class ``j`` then drops, to first order, by the largest ``-g_j^T delta`` over
the threat set and the box, with ``g_j = J(x)^T (w_yhat - w_j)``: arithmetic on the
stored rows, exact per threat model (:mod:`robust_transfer.first_order`).

First order misses curvature: where the encoder bends, an attack moves the features
further than the linearisation says (a SimCLR encoder here), or less where they
saturate (large ``L2`` radii). The profile measures that once per threat, label- and
head-free: along the top principal directions of the features (where heads put their
weights), both signs, a short ascent of ``u^T f(x')`` started from the first-order
optimum gives the real gain, and the per-sample median of real over first-order gain
scales every head's first-order drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import first_order
from .attacks.common import ascend_in_batches, check_attack_args
from .attacks.engine import Objective
from .checks import check_images, check_labels, check_positive_int
from .errors import InputError, InputTypeError
from .features import extract_features
from .runtime import eval_mode, model_device
from .threat import ThreatModel

# Above this many stored Jacobian entries the profile starts from no directions and
# takes the span of each head's class-difference directions as heads arrive.
FULL_JACOBIAN_LIMIT = 2**28
# A direction whose residual against the stored span is below this share of its norm
# is taken as inside the span.
_SPAN_TOLERANCE = 1e-5


@dataclass(frozen=True)
class CurvatureSettings:
    """The once-per-threat curvature measurement: ``directions`` top principal
    directions of the features (each with both signs), ``steps`` ascent steps each."""

    directions: int = 2
    steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.directions, "curvature directions")
        check_positive_int(self.steps, "curvature steps")


@dataclass(frozen=True)
class HeadDrops:
    """A head on the profiled points: its prediction, and per class ``j`` the margin
    ``m_j`` (0 at the predicted class), its corrected first-order drop (0 there too) and
    ``w_yhat - w_j`` in the profile's orthonormal basis (N, C, r)."""

    prediction: Tensor
    margins: Tensor
    drops: Tensor
    coefficients: Tensor

    def directional_shift(self) -> Tensor:
        # The basis spans every class difference, so coefficient norms are the gaps.
        gaps = torch.linalg.vector_norm(self.coefficients, dim=2)
        return torch.where(gaps > 0, self.drops / gaps.clamp(min=1e-30), 0.0).amax(dim=1)


@dataclass
class EncoderProfile:
    """What :func:`profile_encoder` measured; heads and threats are given later.

    ``rows`` holds ``Q^T J(x)`` (N, r, d) for the orthonormal columns of ``basis``
    (k, r). ``curvature`` caches the per-sample factor of each threat measured so far;
    ``principal`` (m, k) are the feature directions it probes, by default the top
    principal directions of ``features``.
    """

    encoder: nn.Module
    x: Tensor
    features: Tensor
    basis: Tensor
    rows: Tensor
    settings: CurvatureSettings = CurvatureSettings()
    batch_size: int = 256
    curvature: dict[ThreatModel, Tensor] = field(default_factory=dict)
    backward_passes: int = 0
    principal: Tensor | None = None

    @property
    def flat_x(self) -> Tensor:
        return self.x.flatten(1)

    def jacobian_rows(self, directions: Tensor) -> Tensor:
        """``J(x)^T v`` (N, m, d) for feature directions ``v`` (m, k); directions outside
        the stored span cost one backward pass each, once."""
        self._extend(directions)
        coefficients = directions.to(self.basis) @ self.basis  # (m, r)
        return torch.einsum("mr,nrd->nmd", coefficients, self.rows)

    def _extend(self, directions: Tensor) -> None:
        k = self.basis.shape[0]
        if directions.dim() != 2 or directions.shape[1] != k:
            raise InputError(f"feature directions must be (m, {k}), got {tuple(directions.shape)}")
        new: list[Tensor] = []
        for v in directions.to(self.basis):
            norm = float(v.norm())
            if norm == 0.0:
                continue
            span = torch.cat([self.basis, *(u[:, None] for u in new)], dim=1)
            residual = v - span @ (span.T @ v)
            if float(residual.norm()) > _SPAN_TOLERANCE * norm:
                new.append(residual / residual.norm())
        if not new:
            return
        added = torch.stack(new, dim=1)
        self.rows = torch.cat([self.rows, _rows(self.encoder, self.x, added, self.batch_size)], 1)
        self.basis = torch.cat([self.basis, added], dim=1)
        self.backward_passes += added.shape[1]

    def head_drops(self, head: nn.Linear, threat: ThreatModel) -> HeadDrops:
        """Margins and corrected first-order drops of ``head`` on the profiled points."""
        if not isinstance(threat, ThreatModel):
            raise InputTypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        _check_head(head, self.features.shape[1])
        weight, bias = head.weight.detach().to(self.basis), head.bias.detach().to(self.basis)
        self._extend(weight[1:] - weight[:1])
        logits = self.features @ weight.T + bias
        prediction = logits.argmax(dim=1)
        margins = logits.gather(1, prediction[:, None]) - logits
        in_basis = weight @ self.basis
        coefficients = in_basis[prediction][:, None, :] - in_basis[None]
        drops = torch.empty_like(margins)
        chunk = max(1, 2**24 // max(1, coefficients.shape[1] * self.rows.shape[2]))
        for start in range(0, len(margins), chunk):
            part = slice(start, start + chunk)
            g = torch.einsum("ncr,nrd->ncd", coefficients[part], self.rows[part])
            drops[part] = first_order.drop(g, self.flat_x[part, None, :], threat)
        factor = self.curvature_factor(threat)[:, None]
        return HeadDrops(prediction, margins, drops * factor, coefficients)

    def directional_shift(self, head: nn.Linear, threat: ThreatModel) -> Tensor:
        """Per sample: the largest (corrected first-order) shift of the features along a
        unit class-difference direction ``(w_yhat - w_j) / ||w_yhat - w_j||`` of the head,
        the part of the total shift the head can feel."""
        return self.head_drops(head, threat).directional_shift()

    def expected_robust(
        self, head: nn.Linear, y: Tensor, threat: ThreatModel, *, check: bool = True
    ) -> Tensor:
        """Per sample: the head is expected to classify every point of ``B(x)`` as ``y``.

        With ``check`` (one forward pass of the encoder per call, no backward pass), each
        point expected robust is also tried at the first-order worst point for its most
        threatened class; a point misclassified there is not robust, whatever the
        estimate said (encoders whose features saturate fool first order most).
        """
        return self._expected(self.head_drops(head, threat), head, y, threat, check=check)

    def assess(self, head: nn.Linear, y: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
        """:meth:`expected_robust` (checked) and :meth:`directional_shift` from one pass
        over the head's drops."""
        drops = self.head_drops(head, threat)
        return self._expected(drops, head, y, threat, check=True), drops.directional_shift()

    def _expected(
        self, drops: HeadDrops, head: nn.Linear, y: Tensor, threat: ThreatModel, *, check: bool
    ) -> Tensor:
        margins, prediction = drops.margins, drops.prediction
        y = check_labels(y, len(margins), num_classes=margins.shape[1]).to(margins.device)
        own = nn.functional.one_hot(prediction, margins.shape[1]).bool()
        robust = (prediction == y) & ((margins > drops.drops) | own).all(dim=1)
        if check and bool(robust.any()):
            rows = robust.nonzero().flatten()
            slack = torch.where(own, torch.inf, margins - drops.drops)[rows]
            picked = drops.coefficients[rows, slack.argmin(dim=1)]  # (R, r)
            g = torch.einsum("nr,nrd->nd", picked, self.rows[rows])
            _, delta = first_order.optimum(g, self.flat_x[rows], threat)
            x_worst = (self.flat_x[rows] + delta).clamp(0.0, 1.0).view(-1, *self.x.shape[1:])
            features = extract_features(self.encoder, x_worst, batch_size=self.batch_size)
            with torch.no_grad():
                logits = head(features.to(head.weight.device))
            robust[rows] = logits.argmax(dim=1).to(y.device) == y[rows]
        return robust

    def curvature_factor(self, threat: ThreatModel) -> Tensor:
        """Per sample: the median over the probe directions of the real gain an ascent
        finds over the first-order gain (1 where first order predicts no gain)."""
        cached = self.curvature.get(threat)
        if cached is None:
            cached = self._measure_curvature(threat)
            self.curvature[threat] = cached
        return cached

    def _measure_curvature(self, threat: ThreatModel) -> Tensor:
        principal = self.principal
        if principal is None:
            principal = principal_directions(self.features, self.settings.directions)
        principal = principal.to(self.features)
        directions = torch.cat([principal, -principal])
        # The largest first-order rise of u^T f is the largest drop of -u^T f.
        drops, deltas = first_order.optimum(
            -self.jacobian_rows(directions), self.flat_x[:, None, :], threat
        )
        gains_linear, starts = drops, self.flat_x[:, None, :] + deltas
        n, m = len(self.x), len(directions)
        gains_real = _directional_gain(
            self.encoder,
            self.x.repeat(m, *([1] * (self.x.dim() - 1))),
            starts.transpose(0, 1).reshape(n * m, *self.x.shape[1:]),
            directions.repeat_interleave(n, dim=0),
            threat,
            self.settings,
            self.batch_size,
        ).view(m, n)
        ratios = torch.where(
            gains_linear.T > 0, gains_real / gains_linear.T.clamp(min=1e-30), torch.ones(())
        )
        return ratios.median(dim=0).values.clamp(min=0.0)


def principal_directions(features: Tensor, count: int) -> Tensor:
    """The top ``count`` principal directions (rows) of ``features`` (N, k)."""
    centred = features - features.mean(dim=0)
    rows: Tensor = torch.linalg.svd(centred, full_matrices=False).Vh
    return rows[: min(count, *centred.shape)]


def _check_head(head: object, features: int) -> None:
    if not isinstance(head, nn.Linear):
        raise InputTypeError(f"the head must be a torch.nn.Linear, got {type(head).__name__}")
    if head.in_features != features or head.bias is None:
        raise InputError(
            f"the head must map the encoder's {features} features with a bias, "
            f"got Linear({head.in_features}, {head.out_features}, bias={head.bias is not None})"
        )
    if head.out_features < 2:
        raise InputError("the head needs at least two classes")


def _rows(encoder: nn.Module, x: Tensor, directions: Tensor, batch_size: int) -> Tensor:
    """``J(x)^T u`` for each column ``u`` of ``directions`` (k, m): one forward pass per
    batch and one backward pass per direction (faster on CPU than batched gradients)."""
    device = model_device(encoder, x.device)
    parts = []
    with eval_mode(encoder, purpose="the Jacobian"):
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device).requires_grad_(True)
            features = encoder(xb).flatten(1)
            columns = directions.to(features)
            grads = []
            for i in range(columns.shape[1]):
                (grad,) = torch.autograd.grad(
                    features @ columns[:, i],
                    xb,
                    torch.ones(len(xb), device=device),
                    retain_graph=i < columns.shape[1] - 1,
                )
                grads.append(grad.flatten(1).to(x.device))
            parts.append(torch.stack(grads, dim=1))
    return torch.cat(parts).to(x.dtype)


def _directional_gain(
    encoder: nn.Module,
    x: Tensor,
    starts: Tensor,
    directions: Tensor,
    threat: ThreatModel,
    settings: CurvatureSettings,
    batch_size: int,
) -> Tensor:
    """``u^T (f(x') - f(x))`` at the best point of a short ascent from ``starts``."""
    args = check_attack_args(
        encoder,
        x,
        threat,
        steps=settings.steps,
        restarts=1,
        batch_size=batch_size,
        step_size=None,
        seed=settings.seed,
        sample_ids=None,
    )

    def gain(clean: Tensor, extra: tuple[Tensor, ...]) -> Objective:
        (u,) = extra
        clean = clean.flatten(1)

        def objective(x_adv: Tensor, rows: Tensor, restart: int) -> tuple[Tensor, None]:
            return ((encoder(x_adv).flatten(1) - clean[rows]) * u[rows]).sum(dim=1), None

        return objective

    best = ascend_in_batches(
        args,
        (directions,),
        gain,
        batch_size=batch_size,
        rerun_successful=True,
        progress=False,
        desc="curvature",
        purpose="the curvature measurement",
        starts=starts,
    )
    return ((best.outputs_adv - best.outputs).flatten(1) * directions).sum(dim=1)


def profile_encoder(
    encoder: nn.Module,
    x: Tensor,
    *,
    directions: Tensor | None = None,
    settings: CurvatureSettings | None = None,
    batch_size: int = 256,
    principal: Tensor | None = None,
) -> EncoderProfile:
    """The once-per-encoder, label-free and head-free pass of the expected robust accuracy.

    ``directions`` (m, k) restricts the stored Jacobian to the span of those feature
    directions (e.g. the rows of the heads to come); by default every feature is
    stored when that is at most :data:`FULL_JACOBIAN_LIMIT` numbers, else nothing is,
    and each head adds the span of its class-difference directions (at most one
    backward pass per class, once). ``principal`` (m, k) fixes the curvature's probe
    directions (e.g. from other points of the same data, so that profiling a data set
    in parts gives every part the same ones).
    """
    x = check_images(x)
    features = extract_features(encoder, x, batch_size=batch_size).to(x)
    k, d = features.shape[1], x[0].numel()
    profile = EncoderProfile(
        encoder,
        x,
        features,
        torch.zeros(k, 0, dtype=x.dtype, device=x.device),
        torch.zeros(len(x), 0, d, dtype=x.dtype, device=x.device),
        settings or CurvatureSettings(),
        batch_size,
        principal=principal,
    )
    if directions is not None:
        profile._extend(directions)
    elif len(x) * k * d <= FULL_JACOBIAN_LIMIT:
        profile._extend(torch.eye(k, dtype=x.dtype, device=x.device))
    return profile
