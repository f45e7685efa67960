"""The report's figures, each drawn from records or stored per-sample arrays only.

Every figure carries its own title, axis labels and legend, so it reads without the text.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from ..core.schema import Array, Field, Record

# Inputs are images in [0, 1]: eps is the perturbation radius on that scale, in the
# threat's own norm.
_EPS_LABEL = "eps (input scale [0, 1], threat norm)"


def _subplots(
    rows: int, cols: int, figsize: tuple[float, float], **kwargs: Any
) -> tuple[Figure, Any]:
    """A figure without pyplot: no global state, no GUI backend, nothing to close."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, cols, squeeze=False, **kwargs)


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _values(rows: Sequence[Record], key: str) -> list[float]:
    return [float(v) if isinstance(v := r.get(key), int | float) else float("nan") for r in rows]


def _eps(rows: Sequence[Record]) -> list[float]:
    return _values(rows, Field.EPS)


def _sorted(rows: Sequence[Record]) -> list[Record]:
    return sorted(rows, key=lambda r: float(r[Field.EPS]))  # type: ignore[arg-type]


def _legend_entries(axes: list[list[Axes]]) -> tuple[list[Any], list[str]]:
    """Every series of any panel once: the first panel may lack one (no certificate)."""
    entries: dict[str, Any] = {}
    for row in axes:
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def _norms(rows: Sequence[Record]) -> list[str]:
    return sorted({str(r[Field.THREAT]) for r in rows})


def vulnerability(rows: Sequence[Record], task: str) -> Figure:
    """Mean representation shift vs eps per encoder (task independent up to the data)."""
    norms = _norms(rows)
    figure, axes = _subplots(1, len(norms), (5.2 * len(norms), 3.8))
    for ax, norm in zip(axes[0], norms, strict=True):
        for encoder in sorted({str(r[Field.ENCODER]) for r in rows}):
            mine = _sorted(
                [r for r in rows if r[Field.THREAT] == norm and r[Field.ENCODER] == encoder]
            )
            if mine:
                ax.plot(_eps(mine), _values(mine, Field.MEAN_SHIFT), marker="o", label=encoder)
        ax.set(
            title=f"Representation shift, {norm}",
            xlabel=_EPS_LABEL,
            ylabel="mean ||f(x') - f(x)||_2 (attacked)",
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Representation vulnerability on {task} evaluation points")
    return figure


# (record key, legend label, line style, colour)
Series = tuple[tuple[str, str, str, str], ...]

_ACCURACY_SERIES: Series = (
    (Field.CLEAN_ACC, "clean", "-", "grey"),
    (Field.ATTACKED_ROBUST_ACC, "attacked (PGD + task-agnostic)", "-", "C3"),
    (Field.EXPECTED_ROBUST_ACC, "expected (encoder profile, head not attacked)", "-", "C4"),
    (Field.PREDICTED_ROBUST_ACC, "predicted (criterion, attacked shift)", "--", "C0"),
    (Field.CERTIFIED_ROBUST_ACC, "certified (criterion, certified shift)", ":", "C2"),
    (Field.TASK_AGNOSTIC_ROBUST_ACC, "task-agnostic perturbations", "-.", "C1"),
)
_LOSS_SERIES: Series = (
    (Field.CLEAN_LOSS, "clean loss", "-", "grey"),
    (Field.ADV_LOSS, "measured adversarial loss", "-", "C3"),
    (Field.LOSS_BOUND, "bound, attacked shift (estimate)", "--", "C0"),
    (Field.CERTIFIED_LOSS_BOUND, "bound, certified shift (guarantee)", ":", "C2"),
)


def _small_multiples(
    rows: Sequence[Record], series: Series, title: str, ylabel: str, *, log: bool
) -> Figure:
    """One panel per (threat model, encoder), each series against eps."""
    norms, encoders = _norms(rows), sorted({str(r[Field.ENCODER]) for r in rows})
    figure, grid = _subplots(
        len(norms), len(encoders), (3.2 * len(encoders), 2.9 * len(norms)), sharey="row"
    )
    axes: list[list[Axes]] = [list(row) for row in grid]
    for i, norm in enumerate(norms):
        for j, encoder in enumerate(encoders):
            ax = axes[i][j]
            mine = _sorted(
                [r for r in rows if r[Field.THREAT] == norm and r[Field.ENCODER] == encoder]
            )
            for key, label, style, color in series:
                values = _values(mine, key)
                # NaN marks "not computed"; a log axis cannot show zero either.
                if any(v == v and (v > 0 or not log) for v in values):
                    ax.plot(_eps(mine), values, style, marker=".", color=color, label=label)
            if log:
                ax.set_yscale("log")
            else:
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{encoder}, {norm}", fontsize=9)
            ax.set_xlabel(_EPS_LABEL)
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel(ylabel)
    handles, labels = _legend_entries(axes)
    figure.legend(
        handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.06)
    )
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def robust_accuracy(rows: Sequence[Record], title: str) -> Figure:
    """Attacked, predicted and certified robust accuracy vs eps, one panel per encoder."""
    return _small_multiples(rows, _ACCURACY_SERIES, title, "accuracy", log=False)


def loss_bounds(rows: Sequence[Record], title: str) -> Figure:
    """Result 1: bounds vs the measured adversarial loss (log scale), per encoder."""
    return _small_multiples(rows, _LOSS_SERIES, title, "loss (mean over points)", log=True)


def expected_vs_attacked(rows: Sequence[Record], title: str) -> Figure:
    """Every classification unit: the expected robust accuracy (from the encoder's
    profile) and the paper's criterion against the attacked robust accuracy."""
    figure, axes = _subplots(1, 1, (5.0, 4.6))
    ax = axes[0][0]
    attacked = _values(rows, Field.ATTACKED_ROBUST_ACC)
    for key, label, marker, color in (
        (Field.PREDICTED_ROBUST_ACC, "criterion, attacked shift", "x", "C0"),
        (Field.TASK_AGNOSTIC_ROBUST_ACC, "task-agnostic perturbation", "+", "C1"),
        (Field.EXPECTED_ROBUST_ACC, "expected (profile)", "o", "C4"),
    ):
        ax.scatter(attacked, _values(rows, key), s=14, marker=marker, color=color, label=label)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="estimate = attacked")
    ax.set(
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        xlabel="attacked robust accuracy",
        ylabel="estimated robust accuracy",
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def margin_vs_shift(panels: Sequence[tuple[str, dict[str, Tensor]]], title: str) -> Figure:
    """Result 2's picture: each point is certified (above the diagonal) when its normalised
    margin exceeds its shift; colour says whether an attack broke it."""
    figure, axes = _subplots(1, len(panels), (3.4 * len(panels), 3.4))
    for ax, (label, arrays) in zip(axes[0], panels, strict=True):
        correct = arrays[Array.CORRECT]
        robust = arrays[Array.ROBUST_ATTACKED]
        shift = arrays[Array.SHIFT].float()
        margin = arrays[Array.MARGIN].float().clamp(max=1e6)
        for mask, name, color in (
            (robust, "robust to attacks", "C2"),
            (correct & ~robust, "broken by an attack", "C3"),
            (~correct, "misclassified", "grey"),
        ):
            ax.scatter(shift[mask], margin[mask], s=6, alpha=0.6, color=color, label=name)
        top = float(max(shift.max(), margin[correct].max() if correct.any() else 1.0))
        ax.plot([0, top], [0, top], "k--", linewidth=0.8, label="margin = shift")
        if Array.CERTIFIED_SHIFT in arrays:
            ax.axvline(
                float(arrays[Array.CERTIFIED_SHIFT].max()),
                color="C2",
                linestyle=":",
                label="certified shift",
            )
        ax.set(
            title=label, xlabel="attacked shift ||f(x')-f(x)||", ylabel="normalised margin rho(x)"
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def adaptation_comparison(rows: Sequence[Record], title: str) -> Figure:
    """Clean vs attacked robust accuracy per adaptation protocol, one marker per encoder."""
    settings = sorted({(str(r[Field.THREAT]), float(r[Field.EPS])) for r in rows})  # type: ignore[arg-type]
    figure, axes = _subplots(1, len(settings), (4.4 * len(settings), 4.0))
    adaptations = sorted({str(r[Field.ADAPTATION]) for r in rows})
    encoders = sorted({str(r[Field.ENCODER]) for r in rows})
    markers = "osD^v<>pP*X"
    for ax, (norm, eps) in zip(axes[0], settings, strict=True):
        for a, adaptation in enumerate(adaptations):
            for e, encoder in enumerate(encoders):
                mine = [
                    r
                    for r in rows
                    if r[Field.THREAT] == norm
                    and r[Field.EPS] == eps
                    and r[Field.ADAPTATION] == adaptation
                    and r[Field.ENCODER] == encoder
                ]
                if mine:
                    ax.scatter(
                        _values(mine, Field.CLEAN_ACC),
                        _values(mine, Field.ATTACKED_ROBUST_ACC),
                        color=f"C{a}",
                        marker=markers[e % len(markers)],
                        s=50,
                        label=f"{adaptation} / {encoder}",
                    )
                front = [r for r in mine if r.get(Field.PARETO)]
                if front:
                    ax.scatter(
                        _values(front, Field.CLEAN_ACC),
                        _values(front, Field.ATTACKED_ROBUST_ACC),
                        s=160,
                        facecolors="none",
                        edgecolors="black",
                        linewidths=1.2,
                    )
        ax.set(
            title=f"{norm} eps={eps:.4g}",
            xlabel="clean accuracy (fraction)",
            ylabel="attacked robust accuracy (fraction)",
        )
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def regression_losses(rows: Sequence[Record], title: str) -> Figure:
    """Regression heads: clean and adversarial loss next to their bounds."""
    labels = [
        f"{r[Field.ENCODER]}\n{r[Field.THREAT]} {float(r[Field.EPS]):.3g}"  # type: ignore[arg-type]
        for r in rows
    ]
    figure, axes = _subplots(1, 1, (max(5.0, 1.3 * len(rows)), 3.8))
    ax = axes[0][0]
    keys = (Field.CLEAN_LOSS, Field.ADV_LOSS, Field.LOSS_BOUND, Field.CERTIFIED_LOSS_BOUND)
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        values = _values(rows, key)
        ax.bar([i + k * width for i in range(len(rows))], values, width, label=key)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("loss (mean over points and targets)")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return figure


def robustness_curves(
    curves: Sequence[tuple[Record, Tensor]], rows: Sequence[Record], title: str
) -> Figure:
    """Per norm, each encoder's expected robust accuracy over eps (the curve of its unit
    of the largest eps), with what attacks left (crosses) and what was certified (dots)
    at each eps of the grid: the check of the curve against independent methods."""
    norms = sorted({str(record[Field.THREAT]) for record, _ in curves})
    figure, axes = _subplots(1, len(norms), (5.2 * len(norms), 3.8))
    for ax, norm in zip(axes[0], norms, strict=True):
        for index, (record, robust) in enumerate(c for c in curves if c[0][Field.THREAT] == norm):
            encoder, colour = str(record[Field.ENCODER]), f"C{index}"
            accuracy = robust.double().mean(dim=0)
            eps = [float(record[Field.EPS]) * i / (len(accuracy) - 1) for i in range(len(accuracy))]  # type: ignore[arg-type]
            ax.plot(eps, accuracy.tolist(), color=colour, label=f"{encoder} expected")
            mine = _sorted(
                [r for r in rows if r[Field.THREAT] == norm and r[Field.ENCODER] == encoder]
            )
            ax.plot(_eps(mine), _values(mine, Field.ATTACKED_ROBUST_ACC), "x", color=colour)
            ax.plot(_eps(mine), _values(mine, Field.CERTIFIED_ROBUST_ACC), ".", color=colour)
        ax.plot([], [], "kx", label="attacked (PGD and the representation attack)")
        ax.plot([], [], "k.", label="certified")
        ax.set(title=norm, xlabel=_EPS_LABEL, ylabel="robust accuracy (fraction)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    handles, labels = _legend_entries(axes)
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.suptitle(title)
    return figure
