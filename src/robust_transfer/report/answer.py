"""The report's opening table: per encoder, task and threat, how robust a linear probe
is and which adaptation kept the most robustness."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.schema import Field, Record
from . import tables

PROBE = "linear-probe"

_ANSWER_COLUMNS: tuple[tuple[str, str], ...] = (
    (Field.ENCODER, "encoder"),
    (Field.TASK, "task"),
    (Field.THREAT, "threat"),
    (Field.EPS, "eps"),
    ("probe_expected", "probe expected"),
    ("probe_attacked", "probe attacked"),
    ("probe_certified", "probe certified"),
    ("best", "best adaptation"),
    ("best_attacked", "best attacked"),
    ("best_clean", "best clean"),
)


def answer_section(classification: Sequence[Record]) -> tuple[str, str, list[str]] | None:
    """Per encoder, task and threat: how robust a linear probe will be, and which
    adaptation kept the most robust accuracy under attack."""
    groups: dict[tuple[object, ...], list[Record]] = {}
    for row in classification:
        key = tuple(row[k] for k in (Field.ENCODER, Field.TASK, Field.THREAT, Field.EPS))
        groups.setdefault(key, []).append(row)
    answers: list[Record] = []
    for rows in groups.values():
        probe = next((r for r in rows if r[Field.ADAPTATION] == PROBE), None)
        scored = [r for r in rows if r.get(Field.ATTACKED_ROBUST_ACC) is not None]
        best = (
            max(
                scored,
                key=lambda r: (
                    float(r[Field.ATTACKED_ROBUST_ACC]),  # type: ignore[arg-type]
                    float(r.get(Field.CLEAN_ACC) or 0.0),  # type: ignore[arg-type]
                ),
            )
            if len(scored) > 1
            else None
        )
        answers.append(
            {
                **{k: rows[0][k] for k in (Field.ENCODER, Field.TASK, Field.THREAT, Field.EPS)},
                "probe_expected": probe.get(Field.EXPECTED_ROBUST_ACC) if probe else None,
                "probe_attacked": probe.get(Field.ATTACKED_ROBUST_ACC) if probe else None,
                "probe_certified": probe.get(Field.CERTIFIED_ROBUST_ACC) if probe else None,
                "best": best[Field.ADAPTATION] if best else None,
                "best_attacked": best[Field.ATTACKED_ROBUST_ACC] if best else None,
                "best_clean": best.get(Field.CLEAN_ACC) if best else None,
            }
        )
    if not answers:
        return None
    text = (
        "Per encoder, task and threat: the robust accuracy a linear probe keeps (expected "
        "from the encoder's profile, attacked, certified) and the adaptation whose head "
        "kept the most robust accuracy under attack, with its clean accuracy.\n\n"
        + tables.markdown(answers, _ANSWER_COLUMNS)
    )
    return "The answer: how robust the heads are, and which adaptation keeps it", text, []
