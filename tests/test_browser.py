"""Browser tests on the built book: math is typeset and explorers respond with no kernel.

Run after ``make book`` (``make test`` does it in that order). They drive Debian's headless
Chromium through Playwright and skip, with the reason, when the browser is not installed.
Screenshots land in ``_build/screenshots/`` for people to look at.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# Pages with explorers: (page path, how many explorers at least).
EXPLORER_PAGES = [
    ("book/01_toy_simulator.html", 1),
    ("book/02_shared_features.html", 1),
    ("book/03_shared_bottom_mmoe_ple.html", 1),
    ("book/04_why_adaptive_transfer.html", 1),
    ("book/05_measuring_affinity.html", 1),
    ("book/06_select_and_regulate.html", 1),
    ("book/07_training_loop.html", 1),
]
# Pages whose math must be typeset (every chapter and the math appendix).
MATH_PAGES = [p for p, _ in EXPLORER_PAGES] + ["book/08_does_adatt_help.html", "book/appendix_math.html"]


@pytest.fixture(scope="module")
def site_url():
    if not (HTML / "index.html").exists():
        pytest.fail(f"the book is not built: {HTML / 'index.html'} missing (run `make book` first)")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); browser tests need it")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield b
        b.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    # a missing local file (a vendored script, font or figure) is a broken page too
    page.on("response", lambda r: external.append(f"{r.status} {r.url}") if r.status >= 400 and not r.url.endswith("favicon.ico") else None)
    page.goto(url, wait_until="networkidle")
    return page, external


def _visible_explorer_images(page, explorer) -> list[str]:
    """The src of each <img> inside ``explorer`` that is currently displayed."""
    return explorer.evaluate(
        """el => Array.from(el.querySelectorAll('img'))
              .filter(i => i.offsetParent !== null && i.getBoundingClientRect().width > 0)
              .map(i => i.src.slice(-200))"""
    )


@pytest.mark.parametrize("path", MATH_PAGES)
def test_math_is_typeset(browser, site_url, path):
    page, external = _open(browser, f"{site_url}/{path}")
    page.wait_for_selector("mjx-container", timeout=20000)
    # prose only: code listings (show_source) may legitimately contain TeX in docstrings
    text = page.evaluate(
        """() => { const a = document.querySelector('article').cloneNode(true);
                   a.querySelectorAll('pre, code, .highlight, script').forEach(e => e.remove());
                   return a.innerText; }"""
    )
    for raw in ("$$", "\\begin{", "\\frac"):
        assert raw not in text, f"raw TeX {raw!r} left in the text of {path}"
    assert page.locator("mjx-container").count() > 0, "no typeset math on the page"
    assert not external, f"{path} requested resources off this machine or missing ones: {external[:3]}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / (Path(path).stem + "-top.png")))
    page.close()


@pytest.mark.parametrize("path,n_explorers", EXPLORER_PAGES)
def test_explorer_slider_changes_figure(browser, site_url, path, n_explorers):
    page, _ = _open(browser, f"{site_url}/{path}")
    page.wait_for_selector(".jupyter-widgets .noUi-handle", timeout=30000)
    explorers = page.locator(".mtlbook-explorer")
    assert explorers.count() >= n_explorers, "explorer widgets are not displayed"
    SHOTS.mkdir(parents=True, exist_ok=True)
    for k in range(explorers.count()):
        explorer = explorers.nth(k)
        explorer.scroll_into_view_if_needed()
        handles = explorer.locator(".noUi-handle")
        for h in range(handles.count()):  # every slider of the explorer must switch the figure
            before = _visible_explorer_images(page, explorer)
            assert before, f"explorer {k} on {path} shows no figure"
            handle = handles.nth(h)
            value_before = handle.get_attribute("aria-valuenow")
            handle.focus()
            at_max = value_before == handle.get_attribute("aria-valuemax")
            for _ in range(2):
                page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
            page.wait_for_timeout(300)
            after = _visible_explorer_images(page, explorer)
            assert handle.get_attribute("aria-valuenow") != value_before, f"slider {h} did not move"
            assert after and after != before, (
                f"moving slider {h} of explorer {k} on {path} did not change the figure"
            )
        explorer.screenshot(path=str(SHOTS / f"{Path(path).stem}-explorer{k}.png"))
    page.close()
