"""The report opened in headless Chromium, as a user would: images decode, the tables are there,
and nothing is fetched from anywhere (the page is self-contained).

Playwright drives the system's Chromium (`make browser` installs Debian's
chromium-headless-shell where it can; MGI_BROWSER names another binary). Without one the test
skips, saying why, unless MGI_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .test_report import make_results, render

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
            "headless_shell")


def _missing(reason: str):
    if os.environ.get("MGI_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (MGI_REQUIRE_BROWSER=1)")
    pytest.skip(f"{reason}; `make browser` installs Debian's chromium-headless-shell")


def browser_path() -> str:
    """The Chromium binary to drive, or skip (fail under MGI_REQUIRE_BROWSER=1) without one."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is not installed (envs/requirements-test.txt)")
    named = os.environ.get("MGI_BROWSER")
    found = named or next((p for p in map(shutil.which, BROWSERS) if p), None)
    if not found or not Path(found).exists():
        _missing(f"no Chromium found ({named or ', '.join(BROWSERS)})")
    return found


def open_report(html_path: Path) -> dict:
    """What a user's browser shows of the report, and every request the page made."""
    from playwright.sync_api import sync_playwright

    executable = browser_path()
    url = html_path.resolve().as_uri()
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page()

            def refuse(route):  # offline: anything but the page itself is refused, and noted
                if route.request.url != url:
                    requests.append(route.request.url)
                    route.abort()
                else:
                    route.continue_()

            page.route("**/*", refuse)
            page.on("request", lambda r: r.url.startswith("data:") or r.url == url
                    or requests.append(r.url))
            page.goto(url, wait_until="load")
            seen = page.evaluate("""() => ({
              images: Array.from(document.images).map(i => ({
                alt: i.alt, complete: i.complete, width: i.naturalWidth, src: i.src.slice(0, 22)})),
              variants: Array.from(document.querySelectorAll('#variants tr[data-variant]')).map(
                r => ({variant: r.dataset.variant, status: r.className,
                       cells: Array.from(r.cells).map(c => c.innerText.trim())})),
              overlays: Array.from(document.querySelectorAll('#overlays figure')).map(
                f => f.dataset.label),
              findings: Array.from(document.querySelectorAll('#findings li')).map(l => l.innerText),
              genes: document.querySelectorAll('#genes tr').length - 1,
              planted: document.querySelectorAll('#genes tr.planted').length,
              resources: performance.getEntriesByType('resource').map(e => e.name),
            })""")
        finally:
            browser.close()
    seen["requests"] = requests + [r for r in seen["resources"] if not r.startswith("data:")]
    return seen


def check_report(seen: dict, *, variants: list[str], failed: list[str] = ()) -> None:
    """The checks a user's eye would make: pictures, one row per variant, the failed ones as
    failed, best/median/worst overlays, and no request outside the page."""
    assert seen["images"], "no image in the report"
    broken = [i["alt"] for i in seen["images"] if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not decode: {broken}"
    assert all(i["src"].startswith("data:image/png") for i in seen["images"])
    rows = {r["variant"]: r for r in seen["variants"]}
    assert sorted(rows) == sorted(variants)
    for variant, row in rows.items():
        if variant in failed:
            assert row["status"] == "failed"
            assert row["cells"][1].startswith("failed: "), row
        else:
            assert row["status"] == "ok"
            dice, interval = row["cells"][1], row["cells"][2]
            assert 0.0 <= float(dice) <= 1.0, row
            low, high = (float(x) for x in interval.split("–"))
            assert low <= float(dice) <= high, row
    if len(failed) < len(variants):
        assert seen["overlays"] == ["best", "median", "worst"]
    assert seen["findings"], "the report states no finding"
    assert seen["genes"] > 0, "no gene attribution table"
    assert not seen["requests"], f"the page fetched {seen['requests']}"


def test_report_opens_in_headless_chromium_with_a_failed_variant(tmp_path):
    browser_path()  # skip before building anything
    variants = {"mgi": 0.7, "mgi_image_only": 0.65, "vit_scratch": 0.5, "unet_scratch": None}
    root = make_results(tmp_path / "results", variants)
    render(root, list(variants))
    seen = open_report(root / "report" / "report.html")
    check_report(seen, variants=list(variants), failed=["unet_scratch"])
    assert len(seen["images"]) == 8  # 5 figures, 3 overlays
    assert seen["planted"] == 3
    assert any(f.startswith("mgi − unet_scratch: not available") for f in seen["findings"])


def test_a_report_that_fetches_something_is_caught(tmp_path):
    """The network check itself: an external image is refused and reported."""
    browser_path()
    page = tmp_path / "leaky.html"
    page.write_text('<html><body><img alt="x" src="https://example.org/x.png">'
                    '<img alt="y" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAA'
                    'AfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="></body></html>')
    seen = open_report(page)
    assert "https://example.org/x.png" in seen["requests"]
    widths = {i["alt"]: i["width"] for i in seen["images"]}
    assert widths == {"x": 0, "y": 1}
