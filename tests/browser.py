"""A report page as headless Chromium renders it: what a reader sees, not the HTML source.

Chromium comes from the system packages (the Makefile installs Debian's `chromium`);
Playwright drives it. ``RT_CHROMIUM`` names another binary."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

# Without the networking flags Chromium keeps trying to reach Google's hosts, which a
# closed network refuses, many times a second.
_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class RenderedPage:
    text: str  # the body's visible text
    tables: int
    images: int
    broken_images: list[str]
    console_errors: list[str]
    dead_links: list[str]  # in-page links whose target does not exist
    unexplained_columns: list[str]  # column headings that link to no glossary entry
    headings: list[str]


def chromium() -> str:
    found = os.environ.get("RT_CHROMIUM") or shutil.which("chromium")
    if found is None:
        pytest.fail("no Chromium: `make install` installs Debian's chromium (or set RT_CHROMIUM)")
    return found


def render(page_file: Path, screenshot: Path | None = None) -> RenderedPage:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            rendered = RenderedPage(
                text=page.inner_text("body"),
                tables=page.locator("table").count(),
                images=page.locator("img").count(),
                broken_images=page.evaluate(
                    "Array.from(document.images)"
                    ".filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"
                ),
                console_errors=errors,
                dead_links=page.evaluate(
                    "Array.from(document.querySelectorAll('a[href^=\"#\"]'))"
                    ".map(a => a.getAttribute('href'))"
                    ".filter(h => !document.getElementById(h.slice(1)))"
                ),
                unexplained_columns=page.evaluate(
                    "Array.from(document.querySelectorAll('th'))"
                    ".filter(th => !th.querySelector('a[href^=\"#g-\"]')).map(th => th.innerText)"
                ),
                headings=page.locator("h2").all_inner_texts(),
            )
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
            return rendered
        finally:
            browser.close()
