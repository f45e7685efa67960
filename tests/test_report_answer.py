"""The report's opening answer: per encoder, task and threat, the probe's robust accuracies
and the adaptation that kept the most under attack (ties: the higher clean accuracy)."""

from __future__ import annotations

from robust_transfer.core.schema import Record
from robust_transfer.report.answer import answer_section


def _record(adaptation: str, eps: float, attacked: float, clean: float) -> Record:
    return {
        "kind": "classification",
        "encoder": "enc",
        "task": "t",
        "threat": "Linf",
        "eps": eps,
        "adaptation": adaptation,
        "attacked_robust_acc": attacked,
        "clean_acc": clean,
        "expected_robust_acc": attacked + 0.01,
        "certified_robust_acc": attacked / 2,
    }


def test_the_best_adaptation_per_threat_and_its_numbers() -> None:
    records = [
        _record("linear-probe", 0.1, 0.40, 0.90),
        _record("finetune", 0.1, 0.60, 0.80),
        _record("lp-ft", 0.1, 0.60, 0.85),
        _record("linear-probe", 0.2, 0.30, 0.90),
        _record("finetune", 0.2, 0.10, 0.80),
    ]
    section = answer_section(records)
    assert section is not None
    heading, text, figures = section
    assert heading.startswith("The answer")
    assert figures == []
    rows = [line for line in text.splitlines() if line.startswith("| enc ")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    # encoder, task, threat, eps, probe expected, attacked, certified, best, its attacked, clean
    assert cells == [
        ["enc", "t", "Linf", "0.100", "0.410", "0.400", "0.200", "lp-ft", "0.600", "0.850"],
        ["enc", "t", "Linf", "0.200", "0.310", "0.300", "0.150", "linear-probe", "0.300", "0.900"],
    ]


def test_no_classification_records_no_answer() -> None:
    assert answer_section([]) is None
