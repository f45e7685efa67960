"""A whole study from a configuration: run (or resume) it, write ``results.json``, draw
the report. The one place above both :mod:`.study` and :mod:`.report`: the study never
imports the report, and the report reads nothing but ``results.json`` and the store."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

from .core.atomic import atomic_write_text
from .core.errors import InputError
from .core.runtime import Runtime
from .core.schema import RESULTS_FILE, FindingField, Key, Results, records_of
from .report.render import write_report
from .report.tables import text
from .study.folder import claimed, refuse_a_file
from .study.results import results
from .study.runner import StudyRun
from .study.spec import StudyConfig

_VERDICT = {True: "reproduced", False: "NOT reproduced", None: "not tested"}


def run_study(
    config: StudyConfig,
    out: str | Path,
    *,
    cache_dir: Path,
    runtime: Runtime | None = None,
    progress: bool = True,
) -> Results:
    """Run (or resume) ``config`` into ``out``: store, ``results.json`` and the reports.
    ``runtime`` defaults to :meth:`Runtime.detect`."""
    if not str(out).strip():
        # Path("") is the current folder: a study would write beside the user's files.
        raise InputError("the output folder is an empty path: name a folder")
    out = Path(out)
    refuse_a_file(out)
    runtime = runtime or Runtime.detect()
    lead = runtime.rank == 0
    # Under torchrun every process runs this; rank 0 alone claims the folder (the others
    # work inside its claim) and writes results.json and the report.
    run = StudyRun(
        config,
        out,
        cache_dir,
        runtime,
        progress=progress and lead,
        log=print if progress and lead else _quiet,
    )
    # Data no unit could use is refused before the folder is made.
    runtime.together(run.check_data)
    with ExitStack() as stack:
        claim = claimed(out, config, runtime.precision.value) if lead else nullcontext()
        runtime.together(lambda: stack.enter_context(claim))
        started = time.perf_counter()
        written = results(run, started)
        runtime.together(lambda: _write(written, out) if lead else None)
    if progress and lead:
        print(text(records_of(written)))
        for finding in written[Key.FINDINGS]:  # type: ignore[attr-defined]
            print(f"[{_VERDICT[finding[FindingField.HOLDS]]}] {finding[FindingField.CLAIM]}")
        print(f"results: {out / RESULTS_FILE}\nreport: {out / 'report.html'}")
    return written


def _write(written: Results, out: Path) -> None:
    atomic_write_text(out / RESULTS_FILE, json.dumps(written, indent=2, default=str) + "\n")
    write_report(written, out)


def _quiet(_: str) -> None:
    return None
