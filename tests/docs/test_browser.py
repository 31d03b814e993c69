"""The built site in a real browser (Debian chromium via Playwright; never a downloaded browser).

Served from 127.0.0.1: every internal link and anchor resolves, the language switcher round-trips and
keeps the #anchor, the copy button copies commands without their prompt, the landing page shows its
figures, log blocks show their last column, search finds results in English and in Chinese, and no
page logs a console error or loads a missing file (the favicon included).
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

pytestmark = pytest.mark.docs
CHROMIUM = "/usr/bin/chromium"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site_url(built_site: Path):
    handler = functools.partial(_Quiet, directory=str(built_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(f"pageerror: {exc}"))
    # A failed resource shows up twice: as a console error without its URL and as a response; the
    # response handler below records it with the URL. Pages name their favicon, so none is a 404.
    page.on("console", lambda msg: page.errors.append(f"console: {msg.text}")
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.on("response", lambda r: page.errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
    yield page
    context.close()


def _html_pages(built_site: Path, lang: str) -> list[str]:
    root = built_site / lang
    return sorted(str(p.relative_to(built_site)) for p in root.rglob("*.html")
                  if "_static" not in p.parts and "_sources" not in p.parts)


def test_root_redirects_to_a_language(page, site_url):
    page.goto(site_url)
    page.wait_for_url("**/en/index.html")
    assert page.errors == []


@pytest.mark.parametrize("lang", ["en", "zh_CN"])
def test_internal_links_and_anchors_resolve(page, site_url, built_site, lang):
    failures, checked, cache = [], 0, {}
    for rel in _html_pages(built_site, lang):
        url = urljoin(site_url, rel)
        page.goto(url)
        hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
        for href in hrefs:
            if urlparse(href).netloc != urlparse(site_url).netloc:
                continue  # external links need the network; checked by linkcheck elsewhere
            target, fragment = urldefrag(href)
            if target not in cache:
                response = page.request.get(target)
                cache[target] = (response.status, response.text() if response.ok else "")
            status, body = cache[target]
            checked += 1
            if status != 200:
                failures.append(f"{rel}: {href} -> HTTP {status}")
            elif fragment and f'id="{fragment}"' not in body:
                failures.append(f"{rel}: {href} -> no anchor #{fragment}")
    assert checked > 50
    assert not failures, "\n".join(failures[:40])
    assert page.errors == [], page.errors


def test_language_switcher_round_trip(page, site_url):
    page.goto(urljoin(site_url, "en/quickstart.html"))
    assert page.locator("div.highlight pre").first.inner_text().strip(), "code blocks are not rendered"
    page.click(".lang-switcher a.lang-link[hreflang='zh-CN']")
    page.wait_for_url("**/zh_CN/quickstart.html")
    assert "卸载" in page.locator("h1").first.inner_text()
    assert page.locator("html").get_attribute("lang") == "zh-CN"
    page.click(".lang-switcher a.lang-link[hreflang='en']")
    page.wait_for_url("**/en/quickstart.html")
    assert "Quickstart" in page.locator("h1").first.inner_text()
    # Nested page: the switcher keeps the depth right.
    page.goto(urljoin(site_url, "zh_CN/notebooks/quickstart.html"))
    page.click(".lang-switcher a.lang-link[hreflang='en']")
    page.wait_for_url("**/en/notebooks/quickstart.html")
    assert page.errors == [], page.errors


def test_language_switcher_keeps_the_anchor(page, site_url):
    page.goto(urljoin(site_url, "en/installation.html#compatibility-matrix"))
    page.click(".lang-switcher a.lang-link[hreflang='zh-CN']")
    page.wait_for_url("**/zh_CN/installation.html#compatibility-matrix")
    assert page.locator("#compatibility-matrix").count() == 1
    page.goto(urljoin(site_url, "zh_CN/quickstart.html"))  # no anchor: none is added
    page.click(".lang-switcher a.lang-link[hreflang='en']")
    page.wait_for_url("**/en/quickstart.html")
    assert page.errors == [], page.errors


def _copy(page, block) -> str:
    block.hover()
    block.locator("button.copybtn").click()
    return page.evaluate("navigator.clipboard.readText()")


@pytest.mark.parametrize("path,prompt,command", [
    ("en/cli.html", "$ ", "KVOFFLOAD_MAX_LOCAL_CPU_SIZE=20 kvoffload config"),
    ("en/configuration.html", ">>> ", "from kvoffload.config import load_settings"),
])
def test_copy_button_copies_without_prompt(page, site_url, path, prompt, command):
    page.goto(urljoin(site_url, path))
    block = page.locator("div.highlight").filter(has_text=prompt + command).first
    assert prompt + command in block.inner_text()
    copied = _copy(page, block)
    assert copied.startswith(command), copied
    assert prompt not in copied, copied
    assert page.errors == [], page.errors


def test_landing_page_start_figure_and_diagram(page, site_url):
    page.goto(urljoin(site_url, "en/index.html"))
    start = page.locator("div.highlight").filter(has_text="pip install -e .").first
    assert _copy(page, start).count("\n") == 2, "three commands"
    headline = page.locator(".headline-figure")
    assert headline.is_visible() and "7.99x" in headline.inner_text() and "0.321 s" in headline.inner_text()
    for lang, svg in (("en", "architecture.svg"), ("zh_CN", "architecture.zh_CN.svg")):
        page.goto(urljoin(site_url, f"{lang}/index.html"))
        img = page.locator("#architecture-figure img")
        img.scroll_into_view_if_needed()
        assert img.is_visible() and img.get_attribute("src").endswith(svg)
        assert img.evaluate("i => i.complete && i.naturalWidth > 0"), f"{svg} did not load"
        assert img.bounding_box()["width"] > 400
    assert page.errors == [], page.errors


def test_log_blocks_show_the_hit_tokens_column(page, site_url):
    """vLLM's log lines are long; the block wraps them, so the hit count is on screen, not scrolled away."""
    page.goto(urljoin(site_url, "en/quickstart.html"))
    pre = page.locator("div.highlight pre").filter(has_text="kvoffload hit tokens:").first
    pre.scroll_into_view_if_needed()
    layout = pre.evaluate("""pre => {
        const walker = document.createTreeWalker(pre, NodeFilter.SHOW_TEXT);
        let node;
        while ((node = walker.nextNode()) && !node.data.includes("hit tokens"));
        const range = document.createRange();
        const start = node.data.indexOf("hit tokens");
        range.setStart(node, start);
        range.setEnd(node, start + "hit tokens".length);
        const text = range.getBoundingClientRect(), box = pre.getBoundingClientRect();
        return {overflow: pre.scrollWidth - pre.clientWidth, textRight: text.right, boxRight: box.right};
    }""")
    assert layout["overflow"] <= 1, layout
    assert layout["textRight"] <= layout["boxRight"], layout
    assert page.errors == [], page.errors


@pytest.mark.parametrize("lang,query,expect", [
    ("en", "offload", "quickstart"),
    ("en", "eviction", "backends"),
    ("zh_CN", "卸载", "quickstart"),
    ("zh_CN", "预填充", "overview"),
    ("zh_CN", "锁页内存", "backends"),
    ("zh_CN", "首token延迟", "quickstart"),  # issue 19: three queries that found nothing
    ("zh_CN", "多进程", "troubleshooting"),
    ("zh_CN", "监控", "monitoring"),
])
def test_search(page, site_url, lang, query, expect):
    page.goto(urljoin(site_url, f"{lang}/search.html?q={query}"))
    # Sphinx shows results one at a time and fills its summary ("Search finished, …") after the last one.
    page.wait_for_function("(document.querySelector('p.search-summary') || {}).innerText", timeout=15000)
    summary = page.locator("p.search-summary").inner_text()
    if lang == "zh_CN":  # the summary comes from locales/zh_CN/LC_MESSAGES/sphinx.js (scripts/theme_catalog.py)
        assert summary.startswith("搜索完成，找到 ") and "Search" not in summary, summary
    results = page.locator("#search-results li, ul.search li")
    hrefs = results.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    assert any(expect in (h or "") for h in hrefs), hrefs
    assert page.errors == [], page.errors
