"""Any name that reaches a report (a hand-edited results.json may hold anything) is shown
as the text it is, in report.html and in report.md opened by a viewer that passes raw
HTML through: no tag comes from a name, and the name's text is all there."""

from __future__ import annotations

import re
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from hypothesis import given, seed, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from robust_transfer.report.render import write_report
from robust_transfer.schema import RESULTS_FORMAT

# What the report's own Markdown and HTML use; a tag beyond these came from a name.
_OWN_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "em", "strong",
    "ul", "li", "br", "table", "thead", "tbody", "tr", "th", "td", "code", "figure", "img",
    "figcaption",
}  # fmt: skip
_PERMISSIVE = MarkdownIt("commonmark", {"html": True}).enable("table")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _read(page: str) -> tuple[set[str], str]:
    parser = _Page()
    parser.feed(page)
    return parser.tags, _collapsed("".join(parser.text))


def _collapsed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _results(name: str) -> dict[str, object]:
    record = {
        "kind": "classification",
        "encoder": name,
        "task": name,
        "adaptation": name,
        "threat": "L2",
        "eps": 0.5,
        "clean_acc": 0.9,
        "pgd_robust_acc": 0.5,
    }
    finding = {"claim": name, "evidence": name, "holds": None}
    return {"format": RESULTS_FORMAT, "name": name, "records": [record], "findings": [finding]}


def _check(name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        md_path, html_path = write_report(_results(name), Path(folder))  # type: ignore[arg-type]
        pages = (html_path.read_text(), _PERMISSIVE.render(md_path.read_text()))
    for page in pages:
        tags, text = _read(page)
        assert tags <= _OWN_TAGS, (name, tags - _OWN_TAGS)
        assert _collapsed(name) in text, (name, text[:300])


_HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "**bold** _it_ `code` | pipe | [link](javascript:alert(1))",
    "# heading\n\n- item\n<b>x</b>",
    "&lt;script&gt; &amp; \\<i\\>",
    "<!-- comment --> ]]> <![CDATA[x]]>",
]


def test_hostile_names_render_as_text() -> None:
    for name in _HOSTILE:
        _check(name)


@seed(20261206)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.text(
        st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs", "Cc")),
        max_size=40,
    )
)
def test_any_printable_name_renders_as_text(name: str) -> None:
    _check(name)
