"""Record tables, as Markdown for the report and as aligned text for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.schema import Field, Record
from .glossary import term_of_column

# (record key, column heading)
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    (Field.ENCODER, "encoder"),
    (Field.PRETRAINING, "pretraining"),
    (Field.TASK, "task"),
    (Field.ADAPTATION, "adaptation"),
    (Field.THREAT, "threat"),
    (Field.EPS, "eps"),
    (Field.CLEAN_ACC, "clean"),
    (Field.PGD_ROBUST_ACC, "PGD"),
    (Field.ATTACKED_ROBUST_ACC, "attacked"),
    (Field.EXPECTED_ROBUST_ACC, "expected"),
    (Field.PREDICTED_ROBUST_ACC, "predicted"),
    (Field.CERTIFIED_ROBUST_ACC, "certified"),
    (Field.HEAD_CERTIFIED_ROBUST_ACC, "head cert."),
    (Field.TASK_AGNOSTIC_ROBUST_ACC, "task-agn."),
    (Field.ADV_LOSS, "adv loss"),
    (Field.LOSS_BOUND, "bound"),
    (Field.CERTIFIED_LOSS_BOUND, "cert. bound"),
    (Field.MEAN_SHIFT, "shift"),
    (Field.CERTIFIED_TIGHTNESS, "cert./att. shift"),
    (Field.WEIGHT_GAP, "D(W)"),
    (Field.COLLAPSED_HEAD, "collapsed"),
)


# The report's opening table: what a user came for, per encoder and threat.
EXPECTED_COLUMNS: tuple[tuple[str, str], ...] = (
    (Field.ENCODER, "encoder"),
    (Field.TASK, "task"),
    (Field.ADAPTATION, "adaptation"),
    (Field.THREAT, "threat"),
    (Field.EPS, "eps"),
    (Field.CLEAN_ACC, "clean"),
    (Field.EXPECTED_ROBUST_ACC, "expected"),
    (Field.ATTACKED_ROBUST_ACC, "attacked"),
    (Field.EXPECTED_ERROR, "expected - attacked"),
    (Field.CURVE_AREA, "curve area"),
    (Field.PREDICTED_ROBUST_ACC, "criterion"),
    (Field.CERTIFIED_ROBUST_ACC, "certified"),
    (Field.DIRECTIONAL_SHARE, "directional share"),
    (Field.MEAN_SHIFT, "shift"),
    (Field.RELATIVE_SHIFT, "shift / feature scale"),
)


# The two kinds of certificate side by side, with what attacks leave and how tight.
CERTIFICATE_COLUMNS: tuple[tuple[str, str], ...] = (
    (Field.ENCODER, "encoder"),
    (Field.TASK, "task"),
    (Field.ADAPTATION, "adaptation"),
    (Field.THREAT, "threat"),
    (Field.EPS, "eps"),
    (Field.CLEAN_ACC, "clean"),
    (Field.CERTIFIED_ROBUST_ACC, "task-agnostic cert."),
    (Field.HEAD_CERTIFIED_ROBUST_ACC, "head-specific cert."),
    (Field.ATTACKED_ROBUST_ACC, "attacked"),
    (Field.CERTIFIED_TIGHTNESS, "cert./att. shift"),
    (Field.DISTANCE_RATIO, "distance kept"),
    (Field.CERTIFIERS, "certifiers"),
    (Field.COLLAPSED_HEAD, "collapsed"),
)


# The reference evaluation: AutoAttack on the points PGD left robust, per unit.
REFERENCE_COLUMNS: tuple[tuple[str, str], ...] = (
    (Field.ENCODER, "encoder"),
    (Field.TASK, "task"),
    (Field.ADAPTATION, "adaptation"),
    (Field.THREAT, "threat"),
    (Field.EPS, "eps"),
    (Field.AUTOATTACK_POINTS, "points"),
    (Field.AUTOATTACK_ROBUST_ACC, "AutoAttack"),
    (Field.AUTOATTACK_GAP, "PGD - AutoAttack"),
    (Field.AUTOATTACK_FLAG, "AA flag"),
    (Field.PGD_ROBUST_ACC, "PGD (all points)"),
)

ADAPTATION_COLUMNS: tuple[tuple[str, str], ...] = (
    (Field.ENCODER, "encoder"),
    (Field.TASK, "task"),
    (Field.THREAT, "threat"),
    (Field.EPS, "eps"),
    (Field.ADAPTATION, "adaptation"),
    (Field.RECIPE, "recipe"),
    (Field.TRAINED_AGAINST, "trained against"),
    (Field.CLEAN_ACC, "clean"),
    (Field.ATTACKED_ROBUST_ACC, "attacked"),
    (Field.AUTOATTACK_FLAG, "AA flag"),
    (Field.COST, "cost (images)"),
    (Field.TRAIN_SECONDS, "train s"),
    (Field.PARETO, "Pareto"),
)

ADVICE_COLUMNS: tuple[tuple[str, str], ...] = (
    (Field.ENCODER, "encoder"),
    (Field.TASK, "task"),
    (Field.THREAT, "threat"),
    (Field.EPS, "eps"),
    (Field.ADVICE_REACH, "linear reach"),
    (Field.ADVICE_FINETUNING, "fine-tuning"),
    (Field.ADVICE_FIRST, "advised"),
    (Field.ADVICE_HELD, "held"),
)


# Characters that Markdown reads as markup, and the HTML it passes through: a name that
# reaches a report (hand-edited results may hold any) is shown as the text it is.
_MARKUP = str.maketrans(
    {char: f"\\{char}" for char in "\\`*_[]{}()#+!|~"}
    | {"<": "&lt;", ">": "&gt;", "&": "&amp;", "\n": " ", "\r": " "}
)


def escape(text: str) -> str:
    """``text`` as literal Markdown text (one line)."""
    return text.translate(_MARKUP)


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {cell(count)}" for key, count in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(cell(item) for item in value) or "none"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 10 or value == 0 else f"{value:.3f}"
    return str(value)


def heading(title: str) -> str:
    """A column heading as Markdown, linked to the glossary entry that explains it."""
    term = term_of_column(title)
    return f"[{escape(title)}](#{term.anchor})" if term is not None else escape(title)


def markdown(rows: Sequence[Record], columns: Sequence[tuple[str, str]] = SUMMARY_COLUMNS) -> str:
    header = "| " + " | ".join(heading(title) for _, title in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = [
        "| " + " | ".join(escape(cell(row.get(key))) for key, _ in columns) + " |" for row in rows
    ]
    return "\n".join([header, rule, *body])


def text(rows: Sequence[Record], columns: Sequence[tuple[str, str]] = SUMMARY_COLUMNS) -> str:
    table = [[title for _, title in columns]]
    table += [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [
        "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True))
        for line in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
