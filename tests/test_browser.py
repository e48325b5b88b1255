"""Browser tests on the built book: navigation at every width, no console errors, math is
typeset and explorers respond with no kernel.

Run after ``make book`` (``make test`` does it in that order). They drive Debian's headless
Chromium through Playwright and skip, with the reason, when the browser is not installed.
Screenshots land in ``_build/html/_screenshots/`` (part of the build output) for people to look
at: every chapter at 390 and 1280 px, the first screen and the whole page.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = HTML / "_screenshots"
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
# Every executed chapter (the pages with figures).
CHAPTER_PAGES = sorted(f"book/{nb.stem}.html" for nb in (ROOT / "book").glob("*.ipynb"))
# Pages whose explorers need a running kernel (mtlbook.viz.live_explorer).
LIVE_EXPLORER_PAGES = ["book/01_toy_simulator.html", "book/06_select_and_regulate.html"]
# Smallest displayed scale of a figure at 1280 px (mtlbook.viz.style.MIN_SCALE).
MIN_FIGURE_SCALE = 0.75


def _toc_pages() -> list[str]:
    """Every page of the table of contents (root, chapters and their sections), as HTML paths."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [f"{f}.html" for f in files]


ALL_PAGES = _toc_pages()


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


def _open(browser, url: str, width: int = 1280, errors: list[str] | None = None):
    """Open ``url`` in a fresh page ``width`` px wide; returns the page and the list of
    requests that left this machine or failed. Console errors and uncaught exceptions are
    appended to ``errors`` when it is given."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    # a missing local file (a vendored script, font, figure or the favicon) is a broken page too
    page.on("response", lambda r: external.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    if errors is not None:
        page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text[:300]}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"uncaught: {str(e)[:300]}"))
    page.goto(url, wait_until="networkidle")
    return page, external


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


@pytest.mark.parametrize("path", ALL_PAGES)
def test_no_console_errors(browser, site_url, path):
    """Every page loads, renders its widgets and typesets its math without a JavaScript error."""
    errors: list[str] = []
    page, external = _open(browser, f"{site_url}/{path}", errors=errors)
    if page.locator("script[type='application/vnd.jupyter.widget-view+json']").count():
        page.wait_for_selector(".jupyter-widgets", timeout=30000)
    if page.locator("div.math, span.math").count():
        page.wait_for_selector("mjx-container", timeout=20000)
    page.wait_for_timeout(1000)  # labels are typeset after the widgets render
    assert not errors, f"{path} logged errors: {errors[:5]}"
    assert not external, f"{path} requested resources off this machine or missing ones: {external[:3]}"
    page.close()


CHAPTER_1 = "book/01_toy_simulator.html"
CHAPTER_2_TITLE = re.compile(r"Consequences for shared features")


@pytest.mark.parametrize("width", [390, 768])
def test_toc_opens_and_navigates_on_narrow_screens(browser, site_url, width):
    """Phones and tablets: the one visible hamburger opens the table of contents, and a link
    in it goes to its chapter."""
    page, _ = _open(browser, f"{site_url}/{CHAPTER_1}", width=width)
    toggles = page.locator(".primary-toggle")
    assert toggles.count() == 1, "more than one primary toggle: the theme script binds the first one"
    toggle = toggles.first
    assert toggle.is_visible(), "no visible button opens the table of contents"
    dialog = page.locator("#pst-primary-sidebar-modal")
    sidebar_link = page.locator("#pst-primary-sidebar").get_by_role("link", name=CHAPTER_2_TITLE)
    assert not sidebar_link.is_visible(), f"the table of contents is already open at {width} px"
    toggle.click()
    page.wait_for_function("document.querySelector('#pst-primary-sidebar-modal').open", timeout=5000)
    link = dialog.get_by_role("link", name=CHAPTER_2_TITLE)
    link.wait_for(state="visible", timeout=5000)
    _shot(page, f"toc-open-{width}")
    link.click()
    page.wait_for_url("**/book/02_shared_features.html", timeout=10000)
    assert CHAPTER_2_TITLE.search(page.locator("h1").first.inner_text())
    page.close()


def test_sidebar_collapses_and_restores_on_wide_screens(browser, site_url):
    """Desktop: the visible toggle hides the sidebar (the article widens) and brings it back;
    no separate top bar sits above the article header."""
    page, _ = _open(browser, f"{site_url}/{CHAPTER_1}", width=1280)
    assert page.locator(".primary-toggle").count() == 1
    header = page.locator("#pst-header")
    assert header.count() == 0 or header.bounding_box() is None or header.bounding_box()["height"] < 1, (
        "the pydata top bar (a second search box) takes vertical space above the article"
    )
    sidebar_link = page.locator("#pst-primary-sidebar").get_by_role("link", name=CHAPTER_2_TITLE)
    article = page.locator("article.bd-article")
    assert sidebar_link.is_visible(), "the sidebar is not shown at 1280 px"
    width_open = article.bounding_box()["width"]
    toggle = page.locator(".primary-toggle")
    toggle.click()
    sidebar_link.wait_for(state="hidden", timeout=5000)
    page.wait_for_timeout(500)  # the collapse is animated
    width_closed = article.bounding_box()["width"]
    assert width_closed > width_open + 100, f"the article did not widen ({width_open} -> {width_closed} px)"
    assert not page.locator("#pst-primary-sidebar-modal").evaluate("d => d.open"), "a drawer opened instead"
    _shot(page, "sidebar-collapsed-1280")
    toggle.click()
    sidebar_link.wait_for(state="visible", timeout=5000)
    page.wait_for_timeout(500)
    assert abs(article.bounding_box()["width"] - width_open) < 2, "the sidebar did not come back"
    page.close()


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


# Every explorer inside the article column: its right edge, its frames' and its readouts'.
_EXPLORER_FIT_JS = """el => {
  const right = document.querySelector('article.bd-article').getBoundingClientRect().right + 1;
  const parts = [el, ...el.querySelectorAll('img, .widget-readout, .noUi-target')];
  return parts.filter(p => p.getBoundingClientRect().width > 0 && p.getBoundingClientRect().right > right)
              .map(p => `${p.className || p.tagName} ${Math.round(p.getBoundingClientRect().right)} > ${Math.round(right)}`);
}"""


@pytest.mark.parametrize("width", [1280, 390])
@pytest.mark.parametrize("path,n_explorers", EXPLORER_PAGES)
def test_explorer_slider_changes_figure(browser, site_url, path, n_explorers, width):
    """Every slider of every static explorer switches the frame, at 1280 px and on a phone,
    and the explorer (frames and readouts) fits the column."""
    page, _ = _open(browser, f"{site_url}/{path}", width=width)
    page.wait_for_selector(".jupyter-widgets .noUi-handle", timeout=30000)
    explorers = page.locator(".mtlbook-explorer")
    assert explorers.count() >= n_explorers, "explorer widgets are not displayed"
    SHOTS.mkdir(parents=True, exist_ok=True)
    for k in range(explorers.count()):
        explorer = explorers.nth(k)
        explorer.scroll_into_view_if_needed()
        sticking = explorer.evaluate(_EXPLORER_FIT_JS)
        assert not sticking, f"explorer {k} on {path} does not fit the column at {width} px: {sticking[:3]}"
        readouts = explorer.locator(".widget-readout")
        for r in range(readouts.count()):
            box = readouts.nth(r).bounding_box()
            assert box and box["width"] > 0 and box["x"] + box["width"] <= width, (
                f"readout {r} of explorer {k} on {path} is off screen at {width} px")
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
        explorer.screenshot(path=str(SHOTS / f"{Path(path).stem}-explorer{k}-{width}.png"))
    page.close()


@pytest.mark.parametrize("path", LIVE_EXPLORER_PAGES)
def test_live_explorers_say_they_need_a_kernel(browser, site_url, path):
    """In the static page a live explorer's picture never changes: it says so, visibly, above
    its controls (also on a phone)."""
    page, _ = _open(browser, f"{site_url}/{path}", width=390)
    page.wait_for_selector(".jupyter-widgets", timeout=30000)
    live = page.locator(".mtlbook-live-explorer")
    assert live.count() >= 1, f"no live explorer on {path}"
    for k in range(live.count()):
        note = live.nth(k).locator(".mtlbook-live-note")
        note.scroll_into_view_if_needed()
        assert note.is_visible() and "running Python kernel" in note.inner_text()
        assert not live.nth(k).evaluate(_EXPLORER_FIT_JS), f"live explorer {k} on {path} sticks out at 390 px"
    page.close()


# Displayed scale (CSS width / pixel width) and alt text of every figure in the article.
_FIGURES_JS = """() => [...document.querySelectorAll('article.bd-article img')]
  .filter(i => i.naturalWidth > 0 && i.getBoundingClientRect().width > 0)
  .map(i => ({src: i.src.split('/').pop().slice(0, 60), natural: i.naturalWidth,
              shown: i.getBoundingClientRect().width, alt: i.alt || '',
              caption: !!i.closest('figure') && !!i.closest('figure').querySelector('figcaption'),
              explorer: !!i.closest('.jupyter-widgets')}))"""


@pytest.mark.parametrize("path", CHAPTER_PAGES)
def test_figures_display_at_a_readable_scale(browser, site_url, path):
    """At 1280 px no figure is shrunk below MIN_FIGURE_SCALE (its text would be too small to
    read); every figure outside an explorer is numbered with a caption and has alt text that
    describes it (not a file name)."""
    page, _ = _open(browser, f"{site_url}/{path}")
    page.evaluate("() => Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
    figures = page.evaluate(_FIGURES_JS)
    assert figures, f"no figure on {path}"
    small = [f"{f['src']} {f['shown'] / f['natural']:.2f}x" for f in figures if f["shown"] / f["natural"] < MIN_FIGURE_SCALE]
    print(f"{path}: min scale {min(f['shown'] / f['natural'] for f in figures):.2f} over {len(figures)} images")
    assert not small, f"figures displayed below {MIN_FIGURE_SCALE}x at 1280 px on {path}: {small}"
    static = [f for f in figures if not f["explorer"]]
    uncaptioned = [f["src"] for f in static if not f["caption"]]
    assert not uncaptioned, f"figures without a numbered caption on {path}: {uncaptioned}"
    bad_alt = [f["src"] for f in static if len(f["alt"]) < 20 or re.search(r"\.(png|svg|jpe?g)$", f["alt"])]
    assert not bad_alt, f"figures whose alt text is missing or a file name on {path}: {bad_alt}"
    page.close()


@pytest.mark.parametrize("width", [390, 1280])
@pytest.mark.parametrize("path", CHAPTER_PAGES)
def test_screenshots_of_every_chapter(browser, site_url, path, width):
    """The first screen and the whole page of every chapter at a phone's and a desktop's
    width, written into the build output (_build/html/_screenshots/) for people to look at."""
    page, _ = _open(browser, f"{site_url}/{path}", width=width)
    if page.locator("div.math, span.math").count():
        page.wait_for_selector("mjx-container", timeout=20000)
    if page.locator("script[type='application/vnd.jupyter.widget-view+json']").count():
        page.wait_for_selector(".jupyter-widgets", timeout=30000)
    page.wait_for_timeout(500)
    SHOTS.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(path).stem}-{width}"
    page.screenshot(path=str(SHOTS / f"{stem}-top.png"))
    height = page.evaluate("document.documentElement.scrollHeight")
    # one JPEG holds at most 65,535 px; a longer page is also too long to read on a phone
    assert height < 65_000, f"{path} is {height} px tall at {width} px: fold long outputs (hide-cell)"
    page.screenshot(path=str(SHOTS / f"{stem}-full.jpg"), full_page=True, type="jpeg", quality=55)
    assert (SHOTS / f"{stem}-full.jpg").stat().st_size > 10_000
    page.close()


# Anything that sticks out of the article on a phone, outside a box that scrolls or clips it
# (code blocks, tables and display equations scroll inside their own box).
_OVERFLOW_JS = """() => {
  const article = document.querySelector('article.bd-article');
  const right = article.getBoundingClientRect().right + 1;
  const out = [];
  for (const el of article.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= right) continue;
    let p = el.parentElement, contained = false;
    while (p && p !== article) {
      const ox = getComputedStyle(p).overflowX;
      if (ox !== 'visible' && p.getBoundingClientRect().right <= right) { contained = true; break; }
      p = p.parentElement;
    }
    if (!contained) out.push(`${el.tagName.toLowerCase()} ${Math.round(r.right)}px: ${(el.textContent || '').trim().slice(0, 60)}`);
  }
  return {pageWidth: document.documentElement.scrollWidth, sticking: out};
}"""


@pytest.mark.parametrize("path", ALL_PAGES)
def test_no_horizontal_overflow_on_a_phone(browser, site_url, path):
    """At 390 px the page never scrolls sideways: text, signatures, equations and widgets fit
    the column or scroll inside their own box."""
    page, _ = _open(browser, f"{site_url}/{path}", width=390)
    if page.locator("div.math, span.math").count():
        page.wait_for_selector("mjx-container", timeout=20000)
    if page.locator("script[type='application/vnd.jupyter.widget-view+json']").count():
        page.wait_for_selector(".jupyter-widgets", timeout=30000)
    page.wait_for_timeout(500)
    result = page.evaluate(_OVERFLOW_JS)
    assert result["pageWidth"] <= 390, f"{path} is {result['pageWidth']} px wide at 390 px: {result['sticking'][:3]}"
    assert not result["sticking"], f"{path}: elements stick out of the column: {result['sticking'][:3]}"
    page.close()


API_PAGES = [p for p in ALL_PAGES if Path(p).name.startswith("api")]
# raw Python reprs and PyTorch's own docstrings have no place in the API reference
_API_NOISE = ("<factory>", "<function ", "<class '", " object at 0x", "Define the computation performed at every call")


def test_api_reference_is_split_into_module_pages():
    assert len(API_PAGES) > 10, "the API reference is expected as one page per module"


@pytest.mark.parametrize("path", API_PAGES)
def test_api_pages_have_no_raw_reprs_or_torch_docstrings(browser, site_url, path):
    page, _ = _open(browser, f"{site_url}/{path}")
    text = page.locator("article").inner_text()
    found = [noise for noise in _API_NOISE if noise in text]
    assert not found, f"{path} shows {found}"
    page.close()


def test_citations_in_the_text_match_the_bibliography_labels(browser, site_url):
    """Every citation link reads exactly like the label of the entry it points to
    ([Crawshaw, 2020] in the text and in the bibliography)."""
    page, _ = _open(browser, f"{site_url}/book/bibliography.html")
    labels = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('div.citation')].map(
              c => [c.id, c.querySelector('span.label').innerText.replace(/^\\[|\\]$/g, '')]))"""
    )
    page.close()
    assert labels, "the bibliography has no entries"
    checked, wrong = 0, []
    for path in ALL_PAGES:
        page, _ = _open(browser, f"{site_url}/{path}")
        for href, text in page.evaluate(
            """() => [...document.querySelectorAll('article a[href*="bibliography.html#"]')]
                  .map(a => [a.getAttribute('href').split('#')[1], a.innerText])"""
        ):
            checked += 1
            if " ".join(text.split()) != " ".join(labels.get(href, "?").split()):
                wrong.append(f"{path}: {text!r} -> [{labels.get(href)}]")
        page.close()
    assert checked > 20, f"only {checked} citation links found"
    assert not wrong, f"citations that differ from their bibliography label: {wrong[:5]}"


def test_launch_buttons_use_the_repository_url_of_config(browser, site_url):
    """Colab, Binder and the repository button all point at the one URL set in _config.yml,
    and the download menu has no print-dialog ".pdf" entry."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url, branch = config["repository"]["url"].rstrip("/"), config["repository"].get("branch", "main")
    slug = url.removeprefix("https://github.com/")
    page, _ = _open(browser, f"{site_url}/{CHAPTER_1}")
    links = page.evaluate("() => [...document.querySelectorAll('.article-header-buttons a')].map(a => a.href)")
    assert f"https://colab.research.google.com/github/{slug}/blob/{branch}/book/01_toy_simulator.ipynb" in links
    assert f"https://mybinder.org/v2/gh/{slug}/{branch}?urlpath=tree/book/01_toy_simulator.ipynb" in links
    assert url in links
    outside = [a for a in links if a.startswith("http") and "127.0.0.1" not in a and slug not in a]
    assert not outside, f"header links that do not use the configured repository: {outside}"
    assert page.locator(".download-pdf-button, [onclick*='window.print']").count() == 0
    page.close()

