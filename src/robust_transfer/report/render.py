"""The study report: Markdown (figures beside it) and self-contained HTML (figures inline).

Built from ``results.json`` and the per-sample store only, so ``robust-transfer report``
can redraw it at any time without recomputing anything.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

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
from . import tables
from .figures import Figures, file_name
from .sections import sections

# CommonMark with tables; raw HTML in the text is shown as text, never passed through.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


_INTRO = (
    "Robustness of linear heads (and light fine-tuning) on pretrained encoders. "
    "*attacked*: share of points no attack broke (PGD with cross-entropy and targeted "
    "margins, plus the task-agnostic perturbations of the representation attack), an upper "
    "bound on true robust accuracy. *predicted*: the criterion rho(x) > shift(x) with the "
    "attacked shift (an estimate). *certified*: the criterion with a certified shift, a "
    "guarantee (the tightest per sample of the certifiers run: layer-wise Lipschitz "
    "constant, IBP, CROWN when named), valid for every head; *head cert.*: CROWN bounds "
    "on this head's own margins (or the former where tighter); *cert./att. shift*: the "
    "median ratio of the certified to the attacked shift, how far the guarantee is from "
    "what attacks reach. "
    "*bound*: Result 1, E[CE + max_j ||w_y - w_j|| shift], with the attacked shift "
    "(estimate) or certified shift (guarantee). *collapsed*: the head predicts one class "
    "everywhere, so its robust and certified accuracies are only the majority share. "
    "Accuracies are fractions."
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
    meta = tables.escape(
        f"robust-transfer {version}, git {results.get(Key.GIT_REVISION)}, device {device}, "
        + (f"{seconds:.0f} s" if isinstance(seconds, int | float) else "")
    )
    md = [f"# {title}", "", meta, "", _INTRO, ""]
    page = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{_inline_text(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>",
        _MARKDOWN.render("\n\n".join(md)),
    ]
    for heading, body, names in parts:
        md += [f"## {heading}", ""]
        page.append(_MARKDOWN.render(f"## {heading}"))
        for name in names:
            caption, payload = by_name[name]
            md += [f"![{tables.escape(caption)}](figures/{file_name(name)})", ""]
            encoded = base64.b64encode(payload).decode()
            page.append(
                f"<figure><img alt='{html.escape(caption, quote=True)}' "
                f"src='data:image/png;base64,{encoded}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        md += [body, ""]
        page.append(_MARKDOWN.render(body))
    page.append("</body></html>")
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_text(html_path, "\n".join(page))
    return md_path, html_path


def _inline_text(markdown: str) -> str:
    """The plain text of one line of Markdown, HTML-escaped (for the page's title)."""
    rendered = _MARKDOWN.renderInline(markdown)
    return html.escape(html.unescape(re.sub(r"<[^>]*>", "", rendered)))
