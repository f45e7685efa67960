"""Pages generated from the code, so they cannot drift from it: the command-line
reference from the parser, the glossary from the report's own entries."""

from __future__ import annotations

import argparse
from typing import Any

from robust_transfer.cli.parser import build_parser
from robust_transfer.report.glossary import GLOSSARY

_CLI_MARKER = "<!-- cli-reference -->"
_GLOSSARY_MARKER = "<!-- glossary -->"


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    parser = build_parser()
    parts = ["```text", parser.format_help().rstrip(), "```"]
    for name, command in _commands(parser).items():
        parts += [
            f"## `robust-transfer {name}`",
            "",
            "```text",
            command.format_help().rstrip(),
            "```",
            "",
        ]
    return "\n".join(parts)


def glossary() -> str:
    return "\n\n".join(
        f'<a id="{term.anchor}"></a>\n\n### {term.name}\n\n{term.text}'
        + (
            "\n\nReport columns: " + ", ".join(f"*{column}*" for column in term.columns)
            if term.columns
            else ""
        )
        for term in GLOSSARY
    )


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(_CLI_MARKER, cli_reference()).replace(_GLOSSARY_MARKER, glossary())
