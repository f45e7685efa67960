"""The sections of the study report, each (heading, Markdown text, figure names): the
answer first (expected robust accuracy), the findings, the reference evaluation, the
certificates, then each task's tables and figures."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..core.schema import Array, Field, FindingField, Key, Record, Results, records_of
from ..core.store import Store
from ..theory.threat import Norm
from . import plots, tables
from .answer import PROBE, answer_section
from .figures import Figures

CLASSIFICATION, REGRESSION = "classification", "regression"


def _of_kind(records: Sequence[Record], kind: str) -> list[Record]:
    return [r for r in records if r.get(Field.KIND) == kind]


def _tasks(records: Sequence[Record]) -> list[str]:
    return list(dict.fromkeys(str(r[Field.TASK]) for r in records))


def _scatter_panels(
    records: Sequence[Record], store: Store, task: str
) -> tuple[list[tuple[str, dict[str, Tensor]]], str] | None:
    """Per-sample margins and shifts of each encoder's probe at one threat: the middle eps
    of L2 (where certificates live) or else of the first threat model."""
    rows = [r for r in records if r[Field.TASK] == task and r[Field.ADAPTATION] == PROBE]
    if not rows:
        return None
    norms = sorted({str(r[Field.THREAT]) for r in rows})
    norm = Norm.L2.value if Norm.L2 in norms else norms[0]
    eps_values = sorted({float(r[Field.EPS]) for r in rows if r[Field.THREAT] == norm})  # type: ignore[arg-type]
    eps = eps_values[len(eps_values) // 2]
    panels = []
    for row in rows:
        if row[Field.THREAT] != norm or row[Field.EPS] != eps:
            continue
        key = row.get(Field.STORE_KEY)
        loaded = store.load(tuple(key)) if isinstance(key, list) and key else None
        if loaded is not None and Array.MARGIN in loaded[0]:
            panels.append((str(row[Field.ENCODER]), dict(loaded[0])))
    return (panels, f"{task}, {norm} eps={eps:.4g}, linear probe") if panels else None


def _curves(rows: Sequence[Record], store: Store) -> list[tuple[Record, Tensor]]:
    """The units that hold a robustness curve, with it (points x eps)."""
    found = []
    for row in rows:
        key = row.get(Field.STORE_KEY)
        loaded = store.load(tuple(key)) if isinstance(key, list) and key else None
        if loaded is not None and Array.CURVE_ROBUST in loaded[0]:
            found.append((row, loaded[0][Array.CURVE_ROBUST]))
    return found


def _expected_section(
    classification: Sequence[Record], figures: Figures
) -> tuple[str, str, list[str]] | None:
    """The answer first: each linear probe's expected robust accuracy, from one pass
    over its encoder, beside what attacks leave; then why the paper's criterion is loose."""
    rows = [r for r in classification if r.get(Field.EXPECTED_ROBUST_ACC) is not None]
    if not rows:
        return None
    errors = [abs(float(r[Field.EXPECTED_ERROR])) for r in rows]  # type: ignore[arg-type]
    criterion = [
        abs(float(r[Field.PREDICTED_ROBUST_ACC]) - float(r[Field.ATTACKED_ROBUST_ACC]))  # type: ignore[arg-type]
        for r in rows
    ]
    shares = sorted(float(r[Field.DIRECTIONAL_SHARE]) for r in rows)  # type: ignore[arg-type]
    probes = [r for r in rows if r[Field.ADAPTATION] == PROBE] or rows
    figures.add(
        "expected-vs-attacked",
        "Expected vs attacked robust accuracy, every classification unit",
        plots.expected_vs_attacked(rows, "Estimates vs attacks, every unit"),
    )
    text = (
        "The **expected** robust accuracy of a head comes from the encoder's profile "
        "(its Jacobian at each point, measured once; first order decides the points far "
        "from the boundary, a short attack from the first-order worst point those near "
        "it), **attacked** from PGD and the task-agnostic "
        "perturbation on the head. Over "
        f"{len(rows)} units the expected accuracy is off by {100 * sum(errors) / len(errors):.1f} "
        f"points on average (worst {100 * max(errors):.1f}); the paper's criterion with the "
        f"attacked shift by {100 * sum(criterion) / len(criterion):.1f} (worst "
        f"{100 * max(criterion):.1f}).\n\n"
        "Why the criterion is loose: it compares a point's normalised margin with the whole "
        "shift of its features, as if the shift could point along every class-difference "
        "direction of the head at once. Only the component along those directions moves a "
        "margin; here it is a median "
        f"{100 * shares[len(shares) // 2]:.0f}% of the attacked shift (the *directional "
        "share*; range "
        f"{100 * shares[0]:.0f}-{100 * shares[-1]:.0f}%). The raw shift depends on the "
        "feature scale; *shift / feature scale* divides it by the median distance between "
        "the features of two different inputs. The *curve area* is the mean expected robust "
        "accuracy over eps from 0 to the unit's eps, for the unit of the largest eps of each "
        "norm, whose curve each task's section draws beside the attacks and certificates at "
        "the other eps.\n\n"
        f"Linear probes:\n\n{tables.markdown(probes, tables.EXPECTED_COLUMNS)}"
    )
    return "Expected robust accuracy", text, ["expected-vs-attacked"]


# What each sanity check means when it trips (keys: the arrays of schema.SANITY_CHECKS).
SANITY_MEANINGS = {
    Array.ZERO_GRADIENT: "the gradient of the attacked margin (loss, for regression) is "
    "exactly zero at the clean point: gradient attacks cannot move it (masked or "
    "saturated gradients, non-differentiable layers)",
    Array.NONFINITE_GRADIENT: "that gradient holds a NaN or an infinity: the attacks' "
    "steps are undefined there",
    Array.RANDOM_OUTPUT: "two forward passes of the same point in eval mode disagree: "
    "the model is randomised, and a single attacked point proves little (AutoAttack's "
    "'rand' version and expectation over transformation are needed)",
    Array.SQUARE_ONLY: "Square, a black-box attack that reads only outputs, broke a "
    "point that PGD, APGD and FAB all left robust: the white-box attacks' gradients "
    "mislead them (gradient masking), and white-box robust accuracy is overstated",
}


def _reference_section(records: Sequence[Record]) -> tuple[str, str, list[str]]:
    """AutoAttack beside the study's PGD, and the sanity checks of every unit."""
    lines = []
    rows = [r for r in records if r.get(Field.AUTOATTACK_ROBUST_ACC) is not None]
    if rows:
        gaps = [float(r[Field.AUTOATTACK_GAP]) for r in rows]  # type: ignore[arg-type]
        lines += [
            'AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square) ran on the first points '
            "of the units below, only where the study's PGD left a point robust. "
            "*PGD - AutoAttack* is how much robust accuracy it took off PGD's on those "
            f"points: at most {100 * max(gaps):.1f} points over {len(rows)} units (mean "
            f"{100 * sum(gaps) / len(gaps):.1f}). A large gap means PGD's robust accuracy "
            "elsewhere in this report is too optimistic for that encoder.",
            "",
            tables.markdown(rows, tables.REFERENCE_COLUMNS),
            "",
        ]
    else:
        lines += ["AutoAttack did not run in this study (`attack.autoattack`).", ""]
    flagged = [r for r in records if r.get(Field.SANITY_FLAGS)]
    checks = "; ".join(f"*{name}*: {meaning}" for name, meaning in SANITY_MEANINGS.items())
    lines.append(f"Sanity checks on every unit, per point: {checks}.")
    if flagged:
        columns = (*tables.REFERENCE_COLUMNS[:5], (Field.SANITY_FLAGS, "points that tripped"))
        lines += ["", f"{len(flagged)} unit(s) flagged:", "", tables.markdown(flagged, columns)]
    else:
        lines += ["", f"No check tripped on any of the {len(records)} units."]
    return "Reference evaluation and sanity checks", "\n".join(lines), []


def _adaptation_section(
    classification: Sequence[Record], figures: Figures
) -> tuple[str, str, list[str]] | None:
    """Which adaptation keeps robustness: every head of each encoder, task and threat that
    was advised on, clean vs attacked robust accuracy and cost, the Pareto front marked,
    and the advice given before fine-tuning beside whether it held."""
    advised = [r for r in classification if r.get(Field.ADVICE_FIRST) is not None]
    if not advised:
        return None
    settings = {
        (r[Field.TASK], r[Field.ENCODER], r[Field.THREAT], r[Field.EPS]): r for r in advised
    }
    lines = [
        "Every head of each encoder, task and threat the study advised on. The advice was "
        "measured on held-out training points before any head was fine-tuned; *held*: a "
        "head of the advised recipe is on the Pareto front of clean accuracy, attacked "
        "robust accuracy and cost.",
        "",
        tables.markdown(list(settings.values()), tables.ADVICE_COLUMNS),
        "",
        tables.markdown(advised, tables.ADAPTATION_COLUMNS),
    ]
    names = []
    for task in _tasks(advised):
        slug = task.replace("/", "_")
        figures.add(
            f"pareto-{slug}",
            f"Adaptation protocols and their Pareto front ({task})",
            plots.adaptation_comparison(
                [r for r in advised if r[Field.TASK] == task],
                f"Adaptation: clean vs robust accuracy on {task} (ringed: Pareto front)",
            ),
        )
        names.append(f"pareto-{slug}")
    return "Which adaptation keeps robustness", "\n".join(lines), names


def _certificate_section(classification: Sequence[Record]) -> tuple[str, str, list[str]]:
    """Task-agnostic (a bound on the shift, for every head) against head-specific (CROWN
    on this head's margins) certified accuracy: what the paper's route gives up."""
    rows = [
        r
        for r in classification
        if r.get(Field.HEAD_CERTIFIED_ROBUST_ACC) is not None
        and r.get(Field.CERTIFIED_ROBUST_ACC) is not None
    ]
    if not rows:
        return (
            "Certificates",
            "No unit has both a task-agnostic and a head-specific certificate (no "
            "certifier reads these encoders).",
            [],
        )
    given_up = [
        float(r[Field.HEAD_CERTIFIED_ROBUST_ACC]) - float(r[Field.CERTIFIED_ROBUST_ACC])  # type: ignore[arg-type]
        for r in rows
    ]
    worst = max(range(len(rows)), key=given_up.__getitem__)
    useful = [
        r
        for r in rows
        if float(r[Field.HEAD_CERTIFIED_ROBUST_ACC]) > 0  # type: ignore[arg-type]
        or float(r[Field.CERTIFIED_ROBUST_ACC]) > 0  # type: ignore[arg-type]
    ]
    tight = sorted(
        float(r[Field.CERTIFIED_TIGHTNESS])  # type: ignore[arg-type]
        for r in rows
        if r.get(Field.CERTIFIED_TIGHTNESS) is not None
    )
    lines = [
        "A **task-agnostic** certificate bounds the shift of the features, so it holds for "
        "every head on the encoder (the paper's route); a **head-specific** one bounds this "
        "head's margins directly (CROWN on its class differences, or the task-agnostic one "
        "where that is tighter, so it is never looser). Over "
        f"{len(rows)} units the task-agnostic route certifies "
        f"{100 * sum(given_up) / len(given_up):.1f} points less on average, at most "
        f"{100 * given_up[worst]:.1f} ("
        + tables.escape(
            f"{rows[worst][Field.ENCODER]}, {rows[worst][Field.ADAPTATION]}, "
            f"{rows[worst][Field.THREAT]} {float(rows[worst][Field.EPS]):.4g}"  # type: ignore[arg-type]
        )
        + ").",
    ]
    if tight:
        lines.append(
            f"*cert./att. shift* is the median certified over attacked shift per point "
            f"(1 would be exact): {tight[0]:.3g} to {tight[-1]:.3g} over these units, "
            f"median {tight[len(tight) // 2]:.3g}."
        )
    lines.append(
        "*distance kept* is the median over pairs of evaluation inputs of feature distance "
        "over input distance: with a Lipschitz constant `L` a certificate needs feature "
        "margins `L eps`, so only an encoder that keeps close to `L` of the input's "
        "separation lets a probe be certified as widely as a classifier on the input."
    )
    lines.append(
        "Every certificate was checked against every attack of its unit: a certified shift "
        "below an attacked one, or a certified point an attack broke, stops the run."
    )
    if useful:
        lines += ["", tables.markdown(useful, tables.CERTIFICATE_COLUMNS)]
    else:
        lines.append("No unit has a point certified by either route.")
    return "Certificates: task-agnostic vs head-specific", "\n".join(lines), []


def sections(results: Results, store: Store, figures: Figures) -> list[tuple[str, str, list[str]]]:
    """(heading, Markdown text, figure names) for each section of the report."""
    records = records_of(results)
    classification = _of_kind(records, CLASSIFICATION)
    regression = _of_kind(records, REGRESSION)
    sections: list[tuple[str, str, list[str]]] = []
    answer = answer_section(classification)
    if answer is not None:
        sections.append(answer)
    protocols = _adaptation_section(classification, figures)
    if protocols is not None:
        sections.append(protocols)
    expected = _expected_section(classification, figures)
    if expected is not None:
        sections.append(expected)

    findings = results.get(Key.FINDINGS) or []
    lines = []
    for finding in findings:  # type: ignore[attr-defined]
        verdict = {True: "REPRODUCED", False: "NOT REPRODUCED", None: "NOT TESTED"}[
            finding[FindingField.HOLDS]
        ]
        claim, evidence = (
            tables.escape(str(finding[key])) for key in (FindingField.CLAIM, FindingField.EVIDENCE)
        )
        lines.append(f"- **{verdict}**: {claim}  \n  {evidence}")
    sections.append(("Findings", "\n".join(lines) or "No findings.", []))
    sections.append(_reference_section(records))
    sections.append(_certificate_section(classification))

    for task in _tasks(classification):
        probes = [
            r for r in classification if r[Field.TASK] == task and r[Field.ADAPTATION] == PROBE
        ]
        names = []
        slug = task.replace("/", "_")
        if probes:
            figures.add(
                f"vulnerability-{slug}",
                f"Representation vulnerability ({task})",
                plots.vulnerability(probes, task),
            )
            names.append(f"vulnerability-{slug}")
            for adaptation in dict.fromkeys(
                str(r[Field.ADAPTATION]) for r in classification if r[Field.TASK] == task
            ):
                rows = [
                    r
                    for r in classification
                    if r[Field.TASK] == task and r[Field.ADAPTATION] == adaptation
                ]
                if len({r[Field.EPS] for r in rows}) < 2:
                    continue
                figures.add(
                    f"accuracy-{slug}-{adaptation}",
                    f"Robust accuracy, {task}, {adaptation}",
                    plots.robust_accuracy(rows, f"Robust accuracy of {adaptation} heads on {task}"),
                )
                figures.add(
                    f"loss-{slug}-{adaptation}",
                    f"Loss bound vs measured loss, {task}, {adaptation}",
                    plots.loss_bounds(rows, f"Result 1 for {adaptation} heads on {task}"),
                )
                names += [f"accuracy-{slug}-{adaptation}", f"loss-{slug}-{adaptation}"]
            curves = _curves(probes, store)
            if curves:
                figures.add(
                    f"curves-{slug}",
                    f"Robustness curves of the linear probes ({task})",
                    plots.robustness_curves(
                        curves, probes, f"Expected robust accuracy over eps, linear probes, {task}"
                    ),
                )
                names.append(f"curves-{slug}")
            scatter = _scatter_panels(classification, store, task)
            if scatter is not None:
                panels, title = scatter
                figures.add(
                    f"criterion-{slug}",
                    f"Criterion: margin vs shift ({title})",
                    plots.margin_vs_shift(
                        panels,
                        f"Result 2: normalised margin vs shift, {title}",
                    ),
                )
                names.append(f"criterion-{slug}")
        adaptations = {r[Field.ADAPTATION] for r in classification if r[Field.TASK] == task}
        if len(adaptations) > 1:
            counts: dict[tuple[object, object], set[object]] = {}
            for r in classification:
                if r[Field.TASK] == task:
                    counts.setdefault((r[Field.THREAT], r[Field.EPS]), set()).add(
                        r[Field.ADAPTATION]
                    )
            shared = [
                r
                for r in classification
                if r[Field.TASK] == task and len(counts[(r[Field.THREAT], r[Field.EPS])]) > 2
            ]
            if shared:
                figures.add(
                    f"adaptation-{slug}",
                    f"Adaptation protocols ({task})",
                    plots.adaptation_comparison(
                        shared, f"Adaptation: clean vs robust accuracy on {task}"
                    ),
                )
                names.append(f"adaptation-{slug}")
        rows = [r for r in classification if r[Field.TASK] == task]
        sections.append((f"Task {tables.escape(task)}", tables.markdown(rows), names))

    for task in _tasks(regression):
        rows = [r for r in regression if r[Field.TASK] == task]
        slug = task.replace("/", "_")
        figures.add(
            f"regression-{slug}",
            f"Regression bounds ({task})",
            plots.regression_losses(rows, f"Regression heads on {task}"),
        )
        columns = (
            *tables.SUMMARY_COLUMNS[:6],
            (Field.LOSS, "loss"),
            (Field.CLEAN_LOSS, "clean loss"),
            (Field.ADV_LOSS, "adv loss"),
            (Field.LOSS_BOUND, "bound"),
            (Field.CERTIFIED_LOSS_BOUND, "cert. bound"),
            (Field.LOSS_BOUND_EXCEEDED, "exceeded"),
            (Field.MEAN_SHIFT, "shift"),
        )
        sections.append(
            (
                f"Regression task {tables.escape(task)}",
                tables.markdown(rows, columns),
                [f"regression-{slug}"],
            )
        )
    return sections
