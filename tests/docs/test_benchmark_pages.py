"""The benchmark pages in Chinese: every table header and cell, figure caption and image text alternative of
the built zh_CN page is Chinese (or a name that stays as it is: kvoffload, vLLM, a model, a unit), including the
tables that benchmarks/plot.py generates (gettext cannot translate those; plot.py writes each language)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

#: The pages that show benchmark tables and figures.
PAGES = ["benchmark-results.html", "benchmarks.html"]
#: Words that are the same in both languages: names, units, metric labels.
KEEP = {"kvoffload", "vllm", "torch", "cuda", "gemm", "dma", "pcie", "memcpy", "qwen", "qwen3", "llama", "nvidia", "h100",
        "gb", "hbm3", "ms", "ttft", "p50", "p95", "bf16", "cu130", "kv", "gpu", "cpu", "amd", "epyc", "yes", "no"}
CJK = re.compile(r"[\u4e00-\u9fff]")


class _Cells(HTMLParser):
    """Text of every th/td, figcaption and img[alt] of a page's article."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str]] = []
        self._open: list[list] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("th", "td", "figcaption"):
            self._open.append([tag, ""])
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt is not None and (dict(attrs).get("src") or "").endswith(".png"):
                self.cells.append(("img alt", alt))

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            kind, text = self._open.pop()
            self.cells.append((kind, " ".join(text.split())))

    def handle_data(self, data):
        if self._open:
            self._open[-1][1] += data


def cells(path: Path) -> list[tuple[str, str]]:
    parser = _Cells()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.cells


def english_words(text: str) -> list[str]:
    """Words of two letters or more that are not names or units."""
    text = re.sub(r"`[^`]*`|\S+\.(?:json|png|md|py)\b", "", text)
    return [w for w in re.findall(r"[A-Za-z][A-Za-z-]+", text)
            if not any(part.lower() in KEEP for part in re.split(r"-", w) if part)
            and w.lower() not in KEEP]


def untranslated(english: list[tuple[str, str]], chinese: list[tuple[str, str]]) -> list[str]:
    """zh_CN texts that are an English text of the en page or have English words and no Chinese."""
    english_texts = {text for _, text in english if english_words(text)}
    return [f"{kind}: {text!r}" for kind, text in chinese
            if text in english_texts or (english_words(text) and not CJK.search(text))]


@pytest.mark.parametrize("page", PAGES)
def test_zh_benchmark_tables_and_captions_are_chinese(built_site: Path, page: str):
    en, zh = cells(built_site / "en" / page), cells(built_site / "zh_CN" / page)
    assert sum(kind == "th" for kind, _ in en) >= 10
    assert len(zh) == len(en), "the zh page has other tables or figures than the en page"
    bad = untranslated(en, zh)
    assert not bad, "English on the zh_CN page:\n" + "\n".join(bad[:40])


def test_results_page_has_every_figure_and_the_generated_tables(built_site: Path):
    """The results page shows every plot that plot.py makes, each with a caption, and the generated tables in
    the page's language (a header that only plot.py writes)."""
    from helpers import ROOT

    pngs = sorted(p.name for p in (ROOT / "docs" / "_static" / "bench").glob("*.png"))
    for lang, header in (("en", "Byte-exact"), ("zh_CN", "逐字节一致")):
        found = cells(built_site / lang / "benchmark-results.html")
        assert sum(kind == "figcaption" for kind, _ in found) == len(pngs) == 5
        assert sum(kind == "img alt" for kind, _ in found) == len(pngs)
        assert any(text == header for _, text in found), lang
    page = (ROOT / "docs" / "benchmark-results.md").read_text(encoding="utf-8")
    assert all(f"_static/bench/{name}" in page for name in pngs)


def test_check_catches_an_english_header():
    en = [("th", "Mode"), ("th", "kvoffload"), ("td", "2.566 s (7.08x)")]
    assert untranslated(en, [("th", "Mode"), ("th", "kvoffload"), ("td", "2.566 s (7.08x)")]) == ["th: 'Mode'"]
    assert untranslated(en, [("th", "模式"), ("figcaption", "Copy bandwidth of each copy path")]) == [
        "figcaption: 'Copy bandwidth of each copy path'"]
    assert untranslated(en, [("th", "模式"), ("td", "vLLM 原生"), ("th", "Qwen3-8B kvoffload")]) == []
