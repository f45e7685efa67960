"""Record tables, as Markdown for the report and as aligned text for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

Record = dict[str, object]

# (record key, column heading)
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("encoder", "encoder"),
    ("pretraining", "pretraining"),
    ("task", "task"),
    ("adaptation", "adaptation"),
    ("threat", "threat"),
    ("eps", "eps"),
    ("clean_acc", "clean"),
    ("pgd_robust_acc", "PGD"),
    ("attacked_robust_acc", "attacked"),
    ("predicted_robust_acc", "predicted"),
    ("certified_robust_acc", "certified"),
    ("task_agnostic_robust_acc", "task-agn."),
    ("adv_loss", "adv loss"),
    ("loss_bound", "bound"),
    ("certified_loss_bound", "cert. bound"),
    ("mean_shift", "shift"),
    ("weight_gap", "D(W)"),
)


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 10 or value == 0 else f"{value:.3f}"
    return str(value)


def markdown(rows: Sequence[Record], columns: Sequence[tuple[str, str]] = SUMMARY_COLUMNS) -> str:
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
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
