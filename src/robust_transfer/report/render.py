"""The study report: Markdown (figures beside it) and self-contained HTML (figures inline).

Built from ``results.json`` and the per-sample store only, so ``robust-transfer report``
can redraw it at any time without recomputing anything.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import jinja2
import matplotlib
from markdown_it import MarkdownIt

from ..core.atomic import atomic_write_text
from ..core.schema import (
    STORE_DIR,
    Key,
    Results,
    RuntimeField,
)
from ..core.store import Store
from . import glossary, tables
from .figures import Figures, file_name
from .sections import sections

# CommonMark with tables; raw HTML in the text is shown as text, never passed through.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


_INTRO = (
    "How much adversarial robustness linear heads (and light fine-tuning) keep on these "
    "pretrained encoders. *attacked* accuracies are upper bounds on robust accuracy (no "
    "attack finds every adversarial point), *certified* ones are guarantees, *expected* "
    "ones are estimates from one profile of each encoder. Accuracies are fractions; every "
    "column heading links to its entry in the [glossary](#glossary)."
)

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("robust_transfer.report", "templates"),
    autoescape=jinja2.select_autoescape(["html.j2"]),
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)


def write_report(results: Results, out: Path) -> tuple[Path, Path]:
    """Write ``report.md`` (with ``figures/``) and a self-contained ``report.html``."""
    store = Store(out / STORE_DIR)
    figures = Figures(out / "figures")
    # Names in titles are text: "$" must not start matplotlib's mathtext.
    with matplotlib.rc_context({"text.parse_math": False}):
        parts = sections(results, store, figures)
    by_name = {name: (caption, payload) for name, caption, payload in figures.items}
    title = f"robust-transfer study: {tables.escape(str(results.get(Key.NAME, 'study')))}"
    versions = results.get(Key.VERSIONS)
    version = versions.get("robust_transfer") if isinstance(versions, dict) else None
    runtime = results.get(Key.RUNTIME)
    device = runtime.get(RuntimeField.DEVICE) if isinstance(runtime, dict) else None
    seconds = results.get(Key.SECONDS, 0)
    meta = f"robust-transfer {version}, git {results.get(Key.GIT_REVISION)}, device {device}" + (
        f", {seconds:.0f} s" if isinstance(seconds, int | float) else ""
    )
    rendered = [
        {
            "heading": heading,
            "heading_html": _MARKDOWN.renderInline(heading),
            "markdown": body,
            "html": _MARKDOWN.render(body),
            "figures": [
                {
                    "caption": by_name[name][0],
                    "caption_md": tables.escape(by_name[name][0]),
                    "file": file_name(name),
                    "data": base64.b64encode(by_name[name][1]).decode(),
                }
                for name in names
            ],
        }
        for heading, body, names in parts
    ]
    md = _TEMPLATES.get_template("report.md.j2").render(
        title=title,
        meta=tables.escape(meta),
        intro=_INTRO,
        sections=rendered,
        glossary=glossary.markdown(),
    )
    page = _TEMPLATES.get_template("report.html.j2").render(
        title=_inline_text(title),
        meta=meta,
        intro=_MARKDOWN.render(_INTRO),
        sections=rendered,
        glossary=[
            {"name": term.name, "anchor": term.anchor, "html": _MARKDOWN.renderInline(term.text)}
            for term in glossary.GLOSSARY
        ],
    )
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, md)
    atomic_write_text(html_path, page)
    return md_path, html_path


def _inline_text(markdown: str) -> str:
    """The plain text of one line of Markdown (for the page's title)."""
    return html.unescape(re.sub(r"<[^>]*>", "", _MARKDOWN.renderInline(markdown)))
