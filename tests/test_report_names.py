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

from robust_transfer.core.schema import RESULTS_FORMAT
from robust_transfer.report.render import write_report

# What the report's own Markdown and HTML use; a tag beyond these came from a name.
_OWN_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "em", "strong",
    "ul", "li", "br", "table", "thead", "tbody", "tr", "th", "td", "code", "figure", "img",
    "figcaption", "a", "section", "dl", "dt", "dd",
}  # fmt: skip
_PERMISSIVE = MarkdownIt("commonmark", {"html": True}).enable("table")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.links: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "a":
            self.links |= {value or "" for key, value in attrs if key == "href"}

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _read(page: str) -> tuple[set[str], str]:
    parser = _Page()
    parser.feed(page)
    # The report's own links go to its glossary; a link anywhere else came from a name.
    assert all(link.startswith("#") for link in parser.links), parser.links
    return parser.tags, _collapsed("".join(parser.text))


def _collapsed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _results(name: str, *, full: bool) -> dict[str, object]:
    """Records named ``name``; ``full``: at two eps, with every number the report's
    sections and figures draw (expected, certificates, plots), as a linear probe."""
    base = {
        "kind": "classification",
        "encoder": name,
        "pretraining": name,
        "task": name,
        "adaptation": "linear-probe" if full else name,
        "threat": "L2",
        "clean_acc": 0.9,
        "pgd_robust_acc": 0.5,
    }
    numbers = {
        "attacked_robust_acc": 0.4,
        "expected_robust_acc": 0.45,
        "expected_error": 0.05,
        "predicted_robust_acc": 0.2,
        "certified_robust_acc": 0.1,
        "head_certified_robust_acc": 0.2,
        "directional_share": 0.5,
        "mean_shift": 1.0,
        "relative_shift": 0.2,
        "loss_bound": 2.0,
        "certified_loss_bound": 3.0,
        "adv_loss": 1.0,
        "certified_tightness": 2.0,
    }
    records = [
        base | {"eps": eps} | (numbers if full else {}) for eps in ((0.5, 1.0) if full else (0.5,))
    ]
    finding = {"claim": name, "evidence": name, "holds": None}
    return {"format": RESULTS_FORMAT, "name": name, "records": records, "findings": [finding]}


def _check(name: str, *, full: bool = False) -> None:
    with tempfile.TemporaryDirectory() as folder:
        results = _results(name, full=full)
        md_path, html_path = write_report(results, Path(folder))  # type: ignore[arg-type]
        # Figures stay in the folder's figures/, whatever the names.
        outside = [
            p
            for p in Path(folder).rglob("*")
            if p.parent.name not in (Path(folder).name, "figures")
        ]
        assert not outside, outside
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
    "$\\frac{1}{0}$ ../../../OUTSIDE",
    "..",
    "escape \x1b[31m and tab\t",
]


def test_hostile_names_render_as_text() -> None:
    for name in _HOSTILE:
        _check(name, full=True)


@seed(20261206)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.text(
        # Printable: no control characters (CommonMark itself turns NUL into U+FFFD).
        st.characters(max_codepoint=0x2FFF, exclude_categories=("Cs", "Cc")),
        max_size=40,
    )
)
def test_any_printable_name_renders_as_text(name: str) -> None:
    _check(name)
