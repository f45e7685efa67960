"""The documentation: the site builds with no warnings, and every code block of the README
and the docs runs (Python), parses (TOML; every robust-transfer command line, by the CLI's
own parser) or is valid shell. A block after ``<!-- docs-test: syntax-only (why) -->``
(one that needs weights or a GPU) is compiled, not run."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from robust_transfer.certify import base as certify_base
from robust_transfer.certify import layers as certify_layers
from robust_transfer.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^(<!-- docs-test: syntax-only[^>]*-->\n)?```(\w*)\n(.*?)^```", re.M | re.S)
_SHELL_OPERATORS = {">", ">>", "|", "&&", "||", ";", "2>&1", "&"}
_SNIPPET = "--8<--"  # an example file pulled in whole: tests/test_examples.py runs those


def _blocks(page: Path) -> list[tuple[str, str, bool]]:
    """(language, code, syntax only) of each fenced block."""
    return [
        (language, code, bool(marker))
        for marker, language, code in _FENCE.findall(page.read_text())
        if _SNIPPET not in code
    ]


def _ids(pages: list[Path]) -> list[str]:
    return [str(page.relative_to(ROOT)) for page in pages]


def test_the_site_builds_without_warnings(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "robust_transfer.estimates.measurement.measure" in api  # docstrings rendered
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "robust-transfer transfer" in cli
    assert "--train-points" in cli
    glossary = (tmp_path / "site" / "glossary" / "index.html").read_text()
    assert 'id="g-normalised-margin"' in glossary


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 200
    first_screen = "\n".join(readme[:40])
    # Your own encoder on your own data, within the first screen.
    assert "robust-transfer transfer --encoder my_package" in first_screen
    assert "--data folder:" in first_screen


_PYTHON_PAGES = [p for p in PAGES if any(lang == "python" for lang, _, _ in _blocks(p))]


@pytest.mark.parametrize("page", _PYTHON_PAGES, ids=_ids(_PYTHON_PAGES))
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's Python blocks run in order in one namespace; a ``text`` block right after
    one is what it prints (up to where a line is cut with "...")."""
    monkeypatch.chdir(tmp_path)  # what a block writes lands here
    # What a page registers (certifiers, layer readers) ends with the page.
    monkeypatch.setattr(certify_base, "_REGISTRY", dict(certify_base._REGISTRY))
    monkeypatch.setattr(certify_layers, "_READERS", dict(certify_layers._READERS))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    printed: str | None = None
    for language, code, syntax_only in _blocks(page):
        if language == "text" and printed is not None:
            shown = [" ".join(line.split()) for line in printed.splitlines()]
            for line in code.splitlines():
                expected = " ".join(line.split("...")[0].split())
                assert any(s.startswith(expected) for s in shown), (expected, printed[-2000:])
        printed = None
        if language != "python":
            continue
        compiled = compile(code, str(page), "exec")
        if syntax_only:
            continue
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
            exec(compiled, namespace)
        printed = output.getvalue()


def _commands(code: str, console: bool) -> list[str]:
    """The logical command lines of a shell block (continuations joined, prompts and
    output dropped for a console transcript)."""
    text = code.replace("\\\n", " ")
    lines = text.splitlines()
    if console:
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_shell_and_toml_blocks_parse(page: Path) -> None:
    parser = build_parser()
    for language, code, _ in _blocks(page):
        if language == "toml":
            tomllib.loads(code)
        if language not in ("sh", "console"):
            continue
        commands = _commands(code, language == "console")
        script = "\n".join(commands)
        checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert checked.returncode == 0, (script, checked.stderr)
        for command in commands:
            words = shlex.split(command, comments=True)
            if "robust-transfer" not in words:
                continue
            arguments = words[words.index("robust-transfer") + 1 :]
            # What the shell does with the output is not the command's.
            ends = [i for i, word in enumerate(arguments) if word in _SHELL_OPERATORS]
            arguments = arguments[: ends[0]] if ends else arguments
            try:
                parser.parse_args(arguments)
            except SystemExit as exit:
                if exit.code not in (0, None):  # --help exits 0
                    pytest.fail(f"{page.name}: the parser refuses `{command}`")
