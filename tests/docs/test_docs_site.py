"""The documentation: generated reference, catalogs, translations, both builds, example configs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from helpers import ROOT, example_env

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

pytestmark = pytest.mark.docs


def test_settings_table_covers_every_key():
    import kvoffload_docs
    from kvoffload import config

    table = kvoffload_docs.settings_table()
    for name, key in config.KEYS.items():
        assert f"`{name}`" in table and f"`KVOFFLOAD_{name.upper()}`" in table
        assert key.help in table and key.accepted.replace("|", "\\|") in table
    assert len(kvoffload_docs.settings_rows()) == len(config.KEYS)
    pages = "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for marker in kvoffload_docs.MARKERS:  # every generated block is used somewhere
        assert f"<!-- kvoffload:{marker} -->" in pages, marker


def test_translations_complete_fuzzy_counts_as_untranslated():
    from check_translations import coverage

    report = coverage("zh_CN")
    assert report, "no zh_CN catalogs"
    missing = {name: r["fuzzy"] + r["untranslated"] for name, r in report.items() if r["fuzzy"] or r["untranslated"]}
    assert not missing, f"untranslated or fuzzy zh_CN messages: {json.dumps(missing, ensure_ascii=False)[:3000]}"
    # Translations keep the roles and inline code of the English message (a dropped {doc} is a broken link).
    import polib
    for path in (ROOT / "locales" / "zh_CN" / "LC_MESSAGES").rglob("*.po"):
        for entry in polib.pofile(str(path)):
            for role in re.findall(r"\{(?:doc|ref|download)\}`[^`]+`", entry.msgid):
                assert role in entry.msgstr, f"{path.name}: {role} missing from the translation of {entry.msgid[:80]!r}"


def test_catalogs_in_sync_with_english_sources():
    """gettext + sphinx-intl update must leave locales/ unchanged (scripts/check_docs.sh)."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_docs.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_both_languages_build(built_site: Path):
    en = (built_site / "en" / "configuration.html").read_text(encoding="utf-8")
    zh = (built_site / "zh_CN" / "configuration.html").read_text(encoding="utf-8")
    assert ' lang="en"' in en.split(">")[1] and ' lang="zh-CN"' in zh.split(">")[1]
    assert "配置参考" in zh and "配置参考" not in en
    from kvoffload import config
    for name in config.KEYS:  # the generated table is in both languages
        assert name in en and name in zh
    # Chinese words (segmented by jieba) are in the zh search index.
    raw = (built_site / "zh_CN" / "searchindex.js").read_text(encoding="utf-8")
    terms = json.loads(raw[raw.index("(") + 1: raw.rindex(")")])["terms"]
    for word in ("卸载", "配置", "预填充", "锁页内存", "首token延迟", "多进程", "监控"):
        assert word in terms, word
    # Example code is the same, untranslated, on both pages.
    assert "KVOffloadConnector" in (built_site / "zh_CN" / "quickstart.html").read_text(encoding="utf-8")
    assert not (built_site / "jupyter_execute").exists()
    # The CLI page shows real `kvoffload config` runs: a valid setting (exit 0) and an invalid one (exit 2).
    cli = (built_site / "en" / "cli.html").read_text(encoding="utf-8")
    assert "env:KVOFFLOAD_MAX_LOCAL_CPU_SIZE" in cli and "expected a number of GB &gt; 0" in cli
    assert "$ kvoffload cache verify --help" in cli


def _example_config(path: Path):
    from kvoffload.config import load_settings

    return load_settings(environ={"KVOFFLOAD_CONFIG_FILE": str(path)})


def test_example_config_files_are_valid():
    cpu = _example_config(ROOT / "examples" / "kvoffload-cpu.yaml")
    assert cpu.max_local_cpu_size == 5.0 and cpu.local_cpu and cpu.chunk_size == 256
    tiers = _example_config(ROOT / "examples" / "kvoffload-tiers.yaml")
    assert tiers.local_disk and tiers.max_local_disk_size > 0 and tiers.remote_url.startswith("redis://")
    cluster = _example_config(ROOT / "examples" / "kvoffload-cluster.yaml")
    assert cluster.remote_url.startswith("redis+cluster://") and cluster.remote_url.count(",") == 2


@pytest.mark.parametrize("name", ["values-kvoffload.yaml", "values-kvoffload-shared.yaml"])
def test_production_stack_values(monkeypatch, name):
    """Each Helm values file parses, enables kvoffload, and its settings pass kvoffload's validation on the node
    it asks for (the pool is checked against the host's memory: here, the pod's requestMemory). The shared one
    points every replica at one Valkey server and publishes KV events."""
    from kvoffload import config
    from kvoffload.config import load_settings

    values = yaml.safe_load((ROOT / "examples" / "production-stack" / name).read_text())
    specs = values["servingEngineSpec"]["modelSpec"]
    assert len(specs) == 1
    spec = specs[0]
    assert spec["modelURL"] == "Qwen/Qwen3-8B"
    assert "lmcacheConfig" not in spec
    for key in ("name", "repository", "tag", "replicaCount", "requestCPU", "requestMemory", "requestGPU"):
        assert key in spec, key
    args = spec["vllmConfig"]["extraArgs"]
    assert all(isinstance(a, str) for a in args)
    ktc = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert ktc == {"kv_connector": "KVOffloadConnector", "kv_role": "kv_both"}
    monkeypatch.setattr(config, "host_memory_bytes",
                        lambda: int(float(spec["requestMemory"].removesuffix("Gi")) * 2**30))
    env = {e["name"]: e["value"] for e in spec["env"]}
    assert all(isinstance(v, str) for v in env.values()), "Kubernetes env values must be strings"
    settings = load_settings(environ=env)
    assert settings.max_local_cpu_size == float(env["KVOFFLOAD_MAX_LOCAL_CPU_SIZE"])
    request_gib = float(spec["requestMemory"].removesuffix("Gi"))
    assert request_gib * 2**30 > settings.cpu_pool_bytes, "requestMemory must cover the CPU pool"
    if name.endswith("-shared.yaml"):
        assert spec["replicaCount"] > 1 and settings.remote_url.startswith("valkey://")
        events = json.loads(args[args.index("--kv-events-config") + 1])
        assert events["enable_kv_cache_events"] and events["publisher"] == "zmq"


def _plot(results: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, env=example_env(), timeout=300)


def test_benchmark_plot_from_measured_results(tmp_path):
    """plot.py turns the committed GPU results into the page's plots and tables, without a GPU."""
    out = tmp_path / "bench"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")
    proc = _plot(ROOT / "benchmarks" / "results", out)
    assert proc.returncode == 0, proc.stderr
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {f"e2e_h100_{arch}-{plot}.png" for arch in ("qwen3-8b", "llama-3.1-8b")
                    for plot in ("seed", "ttft")} | {"copy_bandwidth_h100.png"}
    assert all((out / name).stat().st_size > 10_000 for name in pngs)
    text = (out / "results.md").read_text()
    assert "SAMPLE" not in text
    for fact in ("2026-11-25", "NVIDIA H100 80GB HBM3", "vLLM 0.26.0", "torch 2.11.0+cu130",
                 "| kvoffload | 2.566 | 0.321 | 8.0x | 0.453 | 0.046 |", "| vLLM native | 2.598 | 0.603 | 4.3x |",
                 "| kvoffload + disk | 2.545 | 0.382 | 6.7x | 0.456 | 0.080 |",
                 "| kvoffload | 0.054 | 0.074 | 17.55 | 0.056 | 0.087 | 17.48 |",
                 "| kvoffload | 2.481 | 0.291 | 8.5x | 0.431 | 0.031 |",
                 "| kvoffload | 2.566, 2.561, 2.577 | 0.353, 0.318, 0.321 | 0.453, 0.459, 0.452 | 0.036, 0.061, 0.046 |",
                 "| Qwen3-8B | load | 51.8 | 43.7 | 40.3 | 16.6 | 55.0 | 94.2% | yes |",
                 "Qwen3-8B 550 GB/s (byte-exact: yes)",
                 "vLLM native: yes, kvoffload: yes, kvoffload + disk: yes"):
        assert fact in text, fact
    # The same tables in Chinese, the numbers unchanged.
    zh = (out / "results.zh_CN.md").read_text()
    for fact in ("| 模式 | 重复批次，第一遍（秒） |", "| kvoffload | 2.566 | 0.321 | 8.0x | 0.453 | 0.046 |",
                 "| vLLM 原生 | 2.598 | 0.603 | 4.3x |", "| kvoffload + 磁盘 | 2.545 | 0.382 | 6.7x | 0.456 | 0.080 |",
                 "| Qwen3-8B | 加载 | 51.8 | 43.7 | 40.3 | 16.6 | 55.0 | 94.2% | 是 |", "vLLM 0.26.0"):
        assert fact in zh, fact
    assert [line.count("|") for line in zh.splitlines()] == [line.count("|") for line in text.splitlines()]
    # The committed page assets are what the script makes from the committed results.
    committed = ROOT / "docs" / "_static" / "bench"
    assert (committed / "results.md").read_text() == text
    assert (committed / "results.zh_CN.md").read_text() == zh
    assert {p.name for p in committed.glob("*.png")} == pngs
    page = (ROOT / "docs" / "benchmark-results.md").read_text()
    assert all(f"_static/bench/{name}" in page for name in pngs)


def test_benchmark_plot_without_results_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    for results in (tmp_path / "missing", tmp_path / "empty"):
        proc = _plot(results, tmp_path / "bench")
        assert proc.returncode == 1 and "plot.py:" in proc.stderr, proc.stderr
    assert not (tmp_path / "bench").exists()


class _Links(HTMLParser):
    """The ids of one page, and the targets of its a[href], link[href], img[src] and script[src]."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        url = attrs.get("src") if tag in ("img", "script") else attrs.get("href") if tag in ("a", "link") else None
        if url:
            self.targets.append(url)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.mark.parametrize("lang", ["en", "zh_CN"])
def test_internal_links_resolve_and_external_links_listed(built_site: Path, lang: str):
    """Offline link check: every relative link of the built pages names a file, and its #anchor an id there.

    ``sphinx-build -b linkcheck`` would need the network; external links are only listed, in
    build/html/<lang>/external-links.txt, for a check where the network is reachable.
    """
    root = built_site / lang
    pages = {p: _parse(p) for p in root.rglob("*.html") if "_static" not in p.parts}
    failures, external, checked = [], set(), 0
    for page, links in pages.items():
        for url in links.targets:
            parts = urlsplit(url)
            if parts.scheme in ("http", "https"):
                external.add(url)
                continue
            if parts.scheme or url.startswith("//"):  # mailto:, data:, javascript:
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            checked += 1
            if not target.is_file():
                failures.append(f"{page.relative_to(root)}: {url} -> no file")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    failures.append(f"{page.relative_to(root)}: {url} -> no id {parts.fragment!r}")
    (root / "external-links.txt").write_text("".join(f"{url}\n" for url in sorted(external)), encoding="utf-8")
    assert checked > 500 and external
    assert not failures, "\n".join(failures[:40])


def test_architecture_diagrams_fit_and_match():
    """The landing page's SVG in both languages: every box inside the drawing, the same shapes in each."""
    import xml.etree.ElementTree as ET

    ns = {"svg": "http://www.w3.org/2000/svg"}
    shapes = {}
    for name in ("architecture.svg", "architecture.zh_CN.svg"):
        svg = ET.parse(ROOT / "docs" / "_static" / name).getroot()
        _, _, width, height = (float(v) for v in svg.get("viewBox").split())
        rects = svg.findall("svg:rect", ns)
        assert len(rects) == 4, name  # GPU prefix cache, CPU pool, disk, Redis
        for rect in rects:
            assert float(rect.get("x")) + float(rect.get("width")) <= width, f"{name}: a box is cut off"
            assert float(rect.get("y")) + float(rect.get("height")) <= height, f"{name}: a box is cut off"
        shapes[name] = [(r.get("x"), r.get("y")) for r in rects]
    assert shapes["architecture.svg"] == shapes["architecture.zh_CN.svg"]


def test_theme_strings_are_chinese_on_zh_pages(built_site: Path):
    """furo's and the search page's own strings come from locales/zh_CN/LC_MESSAGES/sphinx.po (and sphinx.js)."""
    zh = (built_site / "zh_CN" / "limitations.html").read_text(encoding="utf-8")
    en = (built_site / "en" / "limitations.html").read_text(encoding="utf-8")
    for english, chinese in [("Back to top", "返回顶部"), (">Next<", ">下一页<"), (">Previous<", ">上一页<"),
                             ("Toggle Light / Dark / Auto color theme", "切换浅色 / 深色 / 自动配色"),
                             ("<title>Light mode</title>", "<title>浅色模式</title>"),
                             ("<title>Dark mode</title>", "<title>深色模式</title>"),
                             ("<title>Contents</title>", "<title>目录</title>"), ("Made with", "本站使用")]:
        assert english in en, english
        assert english not in zh and chinese in zh, (english, chinese)
    js = (built_site / "zh_CN" / "_static" / "translations.js").read_text(encoding="utf-8")
    assert "Search finished, found ${resultCount} pages" not in js  # a singular msgid keys plural entries
    assert '"Search finished, found one page matching the search query."' in js and "搜索完成" in js


def test_theme_template_overrides_are_furos_files():
    """docs/_templates/page.html and partials/icons.html only wrap furo's hard-coded strings in _(): after a
    furo upgrade they must be copied again (the test fails when furo's file changed)."""
    import furo

    theme = Path(furo.__file__).parent / "theme" / "furo"
    for rel in ("page.html", "partials/icons.html"):
        ours = (ROOT / "docs" / "_templates" / rel).read_text(encoding="utf-8")
        ours = re.sub(r"\A\{#-.*?-#\}\n", "", ours, flags=re.S)
        furos = (theme / rel).read_text(encoding="utf-8")
        furos = re.sub(r"<title>([^<{]+)</title>", r'<title>{{ _("\1") }}</title>', furos)
        furos = re.sub(r'aria-label="(Toggle [^"{]+)"', r'aria-label="{{ _("\1") }}"', furos)
        assert ours == furos, f"docs/_templates/{rel} is not furo's {rel} with its strings wrapped in _()"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "theme_catalog.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_hreflang_alternates_link_each_page_to_its_translation(built_site: Path):
    """Every page of both languages names itself and its translation (and x-default: English) with
    <link rel="alternate" hreflang>, and each link resolves to the same page in that language."""
    found = 0
    for lang in ("en", "zh_CN"):
        for page in (built_site / lang).rglob("*.html"):
            rel = page.relative_to(built_site / lang)
            if rel.parts[0] in ("_static", "_sources", "_images", "_downloads"):
                continue
            head = page.read_text(encoding="utf-8").split("</head>", 1)[0]
            links = dict(re.findall(r'<link rel="alternate" hreflang="([^"]+)" href="([^"]+)"', head))
            assert set(links) == {"en", "zh-CN", "x-default"}, (page, links)
            for tag, code in (("en", "en"), ("zh-CN", "zh_CN"), ("x-default", "en")):
                target = (page.parent / links[tag]).resolve()
                assert target == (built_site / code / rel).resolve() and target.is_file(), (page, tag, links[tag])
            found += 1
    assert found >= 2 * 16


def test_hreflang_absolute_with_a_site_url():
    import kvoffload_hreflang

    links = kvoffload_hreflang.alternate_links("notebooks/quickstart", ".html", "../", [("en", "English"),
                                               ("zh_CN", "简体中文")], "https://docs.example.org/kvoffload/")
    assert links == [("en", "https://docs.example.org/kvoffload/en/notebooks/quickstart.html"),
                     ("zh-CN", "https://docs.example.org/kvoffload/zh_CN/notebooks/quickstart.html"),
                     ("x-default", "https://docs.example.org/kvoffload/en/notebooks/quickstart.html")]


def test_benchmarks_page_is_user_facing():
    """The results read as results: no internal names ("seed script"), no bare issue numbers. The results page
    is short (headline figures, then the tables with date, hardware, versions and graph mode); the method, the
    targets and the history of how the figures came about are on the benchmarks page, history after method."""
    results = (ROOT / "docs" / "benchmark-results.md").read_text(encoding="utf-8")
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for text in (results, page):
        prose = re.sub(r"`[^`]*`|\([^)]*\.(?:png|json|log)\)", "", text)
        assert not re.search(r"\bseed\s+script|\bseed\s+run", prose, re.I)
        assert not re.search(r"(?<![\w/&])#\d+\b|\bissue\s+#?\d+", prose, re.I)
    order = [results.index(h) for h in ("# Benchmark results", "## Results with vLLM's default CUDA graphs",
                                        "## Results with `enforce_eager`")]
    assert order == sorted(order) and len(results.splitlines()) < 120
    for fact in ("2026-12-06", "vLLM 0.26.0", "torch 2.11.0+cu130", "NVIDIA H100 80GB", "CUDA graphs", "enforce_eager",
                 "<!-- kvoffload:bench-results -->"):
        assert fact in results, fact
    assert "## Method" not in results and "## Development history" not in results
    order = [page.index(h) for h in ("## Targets: met and missed", "## Method", "## Development history",
                                     "## Reproduce")]
    assert order == sorted(order)
    toctree = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert "\nbenchmark-results\nbenchmarks\n" in toctree
    for lang in ("", ".zh_CN"):
        generated = (ROOT / "docs" / "_static" / "bench" / f"results{lang}.md").read_text(encoding="utf-8")
        assert "Seed" not in generated and "seed script" not in generated
