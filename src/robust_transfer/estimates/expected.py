"""Expected robust accuracy of any linear head from one task-independent pass over the
encoder (``docs/theory.md``, "Expected robust accuracy").

:func:`profile_encoder` does the label-free, head-free work once per encoder and set of
points: the features, and the encoder's Jacobian rows ``u^T J(x)`` for an orthonormal
set of feature directions ``u`` (all features by default; for wide encoders, only the
span of the heads' class-difference directions, extended per head as needed). A head's
margin to class ``j`` then drops, to first order, by the largest ``-g_j^T delta`` over
the threat set and the box, with ``g_j = J(x)^T (w_yhat - w_j)``: arithmetic on the
stored rows, exact per threat model (:mod:`robust_transfer.theory.first_order`).

First order misses curvature: where the encoder bends, an attack moves the features
further than the linearisation says (a SimCLR encoder here, 8x8 digits at large radii),
or less where they saturate (large ``L2`` radii, normalisation layers). Per head and
threat, the points near the boundary by first order's account (a drop between 0.9 and
1.1 times the margin) are refined: a short PGD on the head's margin loss, started at the
first-order worst point of their most threatened class, decides them. The band widens
ring by ring on each side for as long as the refinement keeps changing answers there, so
an encoder that bends more is refined further out (:class:`RefineSettings`). Points far
from the boundary either way keep the first-order answer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attacks.classifier import attack_classifier
from ..attacks.common import check_step_scale
from ..core.checks import check_images, check_labels
from ..core.errors import InputError, InputTypeError
from ..core.runtime import eval_mode, model_device, model_input
from ..models.features import extract_features
from ..theory import first_order
from ..theory.threat import ThreatModel

# Above this many stored Jacobian entries, or this many features (one backward pass
# each: a ResNet-50's 2048 would cost hours on a CPU where its heads need a few), the
# profile starts from no directions and takes the span of each head's class-difference
# directions as heads arrive.
FULL_JACOBIAN_LIMIT = 2**28
FULL_JACOBIAN_FEATURES = 128
# A direction whose residual against the stored span is below this share of its norm
# is taken as inside the span.
_SPAN_TOLERANCE = 1e-5


@dataclass(frozen=True)
class RefineSettings:
    """Which points of a head are refined, and how. A point's *share* is its largest
    first-order drop over its margin, for the most threatened class (first order calls
    it robust below 1). The points with a share in ``band`` get ``steps`` PGD steps of
    the margin loss, annealed from ``2 * step_scale * eps`` (the start is already the
    first-order worst point: the search refines it rather than explores); then the band
    widens by ``widen`` on each side, ring by ring, for as long as the last ring on that
    side changed an answer (the encoder bends or saturates that far), up to ``limits``.
    ``steps=0`` trusts first order everywhere."""

    steps: int = 7
    step_scale: float = 0.5
    band: tuple[float, float] = (0.9, 1.1)
    widen: float = 0.1
    limits: tuple[float, float] = (0.0, 3.0)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise InputError(f"refine steps must be a non-negative integer, got {self.steps!r}")
        check_step_scale(self.step_scale, "refine step_scale")
        (low, high), (lowest, highest) = self.band, self.limits
        if not 0.0 <= lowest <= low <= 1.0 <= high <= highest:
            raise InputError(
                "the refine band must hold 1 and lie within the limits "
                f"(0 <= limits[0] <= band[0] <= 1 <= band[1] <= limits[1]), got band "
                f"{self.band!r} and limits {self.limits!r}"
            )
        if not self.widen > 0.0:
            raise InputError(f"refine widen must be positive, got {self.widen!r}")


@dataclass(frozen=True)
class HeadDrops:
    """A head on the profiled points: its prediction, and per class ``j`` the margin
    ``m_j`` (0 at the predicted class), its first-order drop (0 there too) and
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
    (k, r).
    """

    encoder: nn.Module
    x: Tensor
    features: Tensor
    basis: Tensor
    rows: Tensor
    refine: RefineSettings = RefineSettings()
    batch_size: int = 256
    backward_passes: int = 0
    # Points the refinement attacked, over every head and threat so far (what the plan's
    # pilot counts: :mod:`robust_transfer.study.pilot`).
    refined_points: int = 0

    @property
    def flat_x(self) -> Tensor:
        return self.x.flatten(1)

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
        """Margins and first-order drops of ``head`` on the profiled points."""
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
        return HeadDrops(prediction, margins, drops, coefficients)

    def directional_shift(self, head: nn.Linear, threat: ThreatModel) -> Tensor:
        """Per sample: the largest first-order shift of the features along a
        unit class-difference direction ``(w_yhat - w_j) / ||w_yhat - w_j||`` of the head,
        the part of the total shift the head can feel."""
        return self.head_drops(head, threat).directional_shift()

    def expected_robust(
        self, head: nn.Linear, y: Tensor, threat: ThreatModel, *, refine: bool = True
    ) -> Tensor:
        """Per sample: the head is expected to classify every point of ``B(x)`` as ``y``.

        With ``refine``, the points near the boundary by first order's account (see
        :class:`RefineSettings`) are attacked briefly from their first-order worst point
        and robust exactly when that attack fails. This costs a few forward and backward
        passes of those points only.
        """
        return self._expected(self.head_drops(head, threat), head, y, threat, refine=refine)

    def assess(self, head: nn.Linear, y: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
        """:meth:`expected_robust` (refined) and :meth:`directional_shift` from one pass
        over the head's drops."""
        drops = self.head_drops(head, threat)
        return self._expected(drops, head, y, threat, refine=True), drops.directional_shift()

    def _expected(
        self, drops: HeadDrops, head: nn.Linear, y: Tensor, threat: ThreatModel, *, refine: bool
    ) -> Tensor:
        margins, prediction = drops.margins, drops.prediction
        y = check_labels(y, len(margins), num_classes=margins.shape[1]).to(margins.device)
        own = nn.functional.one_hot(prediction, margins.shape[1]).bool()
        correct = prediction == y
        robust = correct & ((margins > drops.drops) | own).all(dim=1)
        if not refine or self.refine.steps == 0:
            return robust
        # The drop over the margin of the most threatened class (inf on a tie).
        share = torch.where(own, 0.0, drops.drops / margins.clamp(min=1e-30)).amax(dim=1)
        (lowest, highest), widen = self.refine.limits, self.refine.widen
        low, high = self.refine.band
        ring = correct & (share >= low) & (share <= high)
        if not bool(ring.any()):
            return robust
        device = model_device(self.encoder, self.x.device)
        model = nn.Sequential(self.encoder, copy.deepcopy(head).to(device)).eval()
        while bool(ring.any()):
            rows = ring.nonzero().flatten()
            self.refined_points += len(rows)
            first = robust[rows]
            robust[rows] = self._attack(model, drops, y, threat, rows)
            changed = robust[rows] != first
            # A side widens only while its last ring changed an answer: an attack broke a
            # point first order called robust (below 1), or failed to break one it did not.
            ring = torch.zeros_like(ring)
            if bool((changed & first).any()) and low > lowest:
                low, inner = max(lowest, low - widen), low
                ring |= correct & (share >= low) & (share < inner)
            if bool((changed & ~first).any()) and high < highest:
                high, inner = min(highest, high + widen), high
                ring |= correct & (share > inner) & (share <= high)
        return robust

    def _attack(
        self, model: nn.Module, drops: HeadDrops, y: Tensor, threat: ThreatModel, rows: Tensor
    ) -> Tensor:
        """Whether ``rows`` survive the refinement's PGD, started at the first-order
        worst point of their most threatened class."""
        own = nn.functional.one_hot(drops.prediction[rows], drops.margins.shape[1]).bool()
        slack = torch.where(own, torch.inf, drops.margins[rows] - drops.drops[rows])
        picked = drops.coefficients[rows, slack.argmin(dim=1)]  # (R, r)
        g = torch.einsum("nr,nrd->nd", picked, self.rows[rows])
        _, delta = first_order.optimum(g, self.flat_x[rows], threat)
        starts = (self.flat_x[rows] + delta).clamp(0.0, 1.0).view(-1, *self.x.shape[1:])
        attacked = attack_classifier(
            model,
            self.x[rows],
            y[rows],
            threat,
            loss="margin",
            steps=self.refine.steps,
            step_scale=self.refine.step_scale,
            batch_size=self.batch_size,
            starts=starts,
            stop_at_success=True,
        )
        return attacked.robust.to(y.device)


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
    if not all(bool(torch.isfinite(p).all()) for p in (head.weight, head.bias)):
        # A NaN margin compares false with every shift: no point would count as robust.
        raise InputError("the head's weight or bias holds NaN or infinite values")


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


def full_jacobian(points: int, features: int, input_numel: int) -> bool:
    """Whether a profile of ``points`` stores every feature's Jacobian row up front."""
    return features <= FULL_JACOBIAN_FEATURES and points * features * input_numel <= (
        FULL_JACOBIAN_LIMIT
    )


def profile_encoder(
    encoder: nn.Module,
    x: Tensor,
    *,
    directions: Tensor | None = None,
    refine: RefineSettings | None = None,
    batch_size: int = 256,
) -> EncoderProfile:
    """The once-per-encoder, label-free and head-free pass of the expected robust accuracy.

    ``directions`` (m, k) restricts the stored Jacobian to the span of those feature
    directions (e.g. the rows of the heads to come); by default every feature is
    stored when :func:`full_jacobian` says so (few features, few numbers), else nothing is,
    and each head adds the span of its class-difference directions (at most one
    backward pass per class, once). ``refine`` sets how each head's thin-margin points
    are refined (:class:`RefineSettings`).
    """
    x = model_input(encoder, check_images(x))
    features = extract_features(encoder, x, batch_size=batch_size).to(x)
    k, d = features.shape[1], x[0].numel()
    profile = EncoderProfile(
        encoder,
        x,
        features,
        torch.zeros(k, 0, dtype=x.dtype, device=x.device),
        torch.zeros(len(x), 0, d, dtype=x.dtype, device=x.device),
        refine or RefineSettings(),
        batch_size,
    )
    if directions is not None:
        profile._extend(directions)
    elif full_jacobian(len(x), k, d):
        profile._extend(torch.eye(k, dtype=x.dtype, device=x.device))
    return profile
