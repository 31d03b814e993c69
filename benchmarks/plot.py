# SPDX-License-Identifier: Apache-2.0
"""Plot the measured benchmark results for the documentation.

Reads the JSON files in ``benchmarks/results/`` (committed measurements; no GPU needed here) and writes
into ``docs/_static/bench/``:

- for each end-to-end file ``e2e_*.json`` (``benchmarks/e2e_gpu.py``):
  ``<name>-seed.png`` (the repeated batch, run 1 and run 2 per mode, with the PCIe floor of run 2 when a
  copy-bandwidth file of the same model exists) and ``<name>-ttft.png`` (time to first token per
  scenario per mode);
- for each copy-bandwidth file ``copy_bandwidth_*.json`` (``benchmarks/copy_bandwidth.py``):
  ``<name>.png`` (GB/s of each copy path against a bulk pinned copy);
- ``results.md``: every number as Markdown tables, with date, hardware and versions, and the same tables in
  Chinese in ``results.zh_CN.md`` (the text is in :data:`ZH_CN`); the docs include the one of the page's
  language (``<!-- kvoffload:bench-results -->``, docs/_ext/kvoffload_docs.py).

PNG files of earlier runs that are no longer produced are removed from the output directory. The output
is byte-identical between runs on the same data, so the docs build leaves the checkout clean.

    python benchmarks/plot.py [--results DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Display order, label and colour of the end-to-end modes; unknown modes follow, in file order.
MODES = {"none": ("no offloading", "#9e9e9e"), "native": ("vLLM native", "#4c72b0"),
         "kvoffload": ("kvoffload", "#dd8452"), "kvoffload_disk": ("kvoffload + disk", "#c44e52")}
COPY_PATHS = {"kernel": ("kvoffload CUDA kernel", "#dd8452"), "torch": ("torch fallback", "#8172b3"),
              "per-page": ("one memcpy per page", "#9e9e9e"), "bulk": ("bulk pinned copy (ceiling)", "#4c72b0")}
#: Tokens the seed script's second run loads: 10 prompts, 39 full 256-token chunks each (10,004 tokens).
SEED_LOADED_TOKENS = 10 * (10_004 // 256) * 256


class ResultsError(Exception):
    pass


def load_results(results_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Return ({name: end-to-end data}, {name: copy-bandwidth data}), names being the file stems."""
    if not results_dir.is_dir():
        raise ResultsError(f"{results_dir}: no such directory")
    e2e, copy = {}, {}
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if "meta" in data and isinstance(data.get("results"), list):
            e2e[path.stem] = data
        elif "device" in data and isinstance(data.get("results"), list):
            copy[path.stem] = data
        else:
            raise ResultsError(f"{path}: neither an e2e_gpu.py nor a copy_bandwidth.py result file")
    if not e2e and not copy:
        raise ResultsError(f"{results_dir}: no result files (run benchmarks/e2e_gpu.py or "
                           "benchmarks/run_gpu_checks.sh on a GPU machine and commit the JSON)")
    return e2e, copy


def ordered_modes(data: dict) -> list[dict]:
    rank = {mode: i for i, mode in enumerate(MODES)}
    return sorted(data["results"], key=lambda r: rank.get(r["mode"], len(rank)))


def label(mode: str) -> str:
    return MODES.get(mode, (mode, None))[0]


def colour(mode: str, index: int) -> str:
    return MODES.get(mode, (None, f"C{index}"))[1]


def bytes_per_token(copy: dict[str, dict], arch: str) -> tuple[float, float] | None:
    """(KV bytes per token, kernel load GB/s) of the model ``arch`` from a copy-bandwidth file, if any."""
    for data in copy.values():
        for row in data["results"]:
            if row["model"].lower() == arch.lower():
                tokens = data["chunks"] * 256
                return row["bytes_per_copy"] / tokens, row["gbps"]["load"]["kernel"]
    return None


def seed_floor_s(data: dict, copy: dict[str, dict]) -> float | None:
    """Seconds the seed script's second run needs at the measured load rate: its lower bound."""
    found = bytes_per_token(copy, data["meta"].get("arch", ""))
    if found is None:
        return None
    per_token, load_gbps = found
    return SEED_LOADED_TOKENS * per_token / (load_gbps * 1e9)


def fmt(value, spec: str = ".3f", unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


#: The languages of the generated tables: ``results.md`` (English) and ``results.<lang>.md``. gettext cannot
#: translate a generated file, so the Chinese text of the tables is here, next to the English it translates
#: (glossary of docs/contributing-docs.md: 首token延迟, 复制, 数据块, KV 块).
LANGS = ("en", "zh_CN")
ZH_CN = {
    "no offloading": "不卸载", "vLLM native": "vLLM 原生", "kvoffload": "kvoffload",
    "kvoffload + disk": "kvoffload + 磁盘", "yes": "是", "NO": "否", "store": "存储", "load": "加载",
    "{date}, {gpu}, vLLM {vllm}, torch {torch}, architecture `{arch}`":
        "{date}，{gpu}，vLLM {vllm}，torch {torch}，`{arch}` 架构",
    "**End to end** (`benchmarks/results/{name}.json`): {meta}.": "**端到端**（`benchmarks/results/{name}.json`）：{meta}。",
    "Greedy token ids identical to no offloading in every scenario: {verdict}.":
        "每个场景的贪心解码 token id 都与不卸载时相同：{verdict}。",
    "Mode": "模式", "Repeated batch, run 1 (s)": "重复批次，第一遍（秒）", "Repeated batch, run 2 (s)": "重复批次，第二遍（秒）",
    "Run 1 / run 2": "第一遍 / 第二遍", "Query twice, cold (s)": "同一查询两次，冷请求（秒）",
    "Query twice, warm (s)": "同一查询两次，热请求（秒）",
    "Each repeated-batch and query-twice figure is the median of three runs (the repeated batch on three prompt "
    "sets, three prompts each sent twice); every run:":
        "重复批次和同一查询两次的每个数字都是三次运行的中位数（重复批次用三组提示词，同一查询两次用三个各发送两次的提示词）；"
        "每次运行：",
    "Lower bound of the repeated batch's run 2 (its {tokens} stored tokens loaded at the kernel's measured load rate): "
    "{floor} s.": "重复批次第二遍的下限（以内核实测的加载速率加载其 {tokens} 个已存储的 token）：{floor} 秒。",
    "Chat TTFT p50 (s)": "多轮对话首token延迟 p50（秒）", "Chat TTFT p95 (s)": "多轮对话首token延迟 p95（秒）",
    "Chat requests/s": "多轮对话每秒请求数", "Doc QA TTFT p50 (s)": "长文档问答首token延迟 p50（秒）",
    "Doc QA TTFT p95 (s)": "长文档问答首token延迟 p95（秒）", "Doc QA requests/s": "长文档问答每秒请求数",
    "Engine start (s)": "引擎启动（秒）",
    "Offload tier serving hits (s since engine creation)": "卸载层开始提供命中（自创建引擎起的秒数）",
    "**Copy path** (`benchmarks/results/{name}.json`): {device}, {chunks} chunks of 256 tokens per copy (about "
    "{tokens} tokens), bf16.": "**复制路径**（`benchmarks/results/{name}.json`）：{device}，每次复制 {chunks} 个 "
                               "256 token 的数据块（约 {tokens} 个 token），bf16。",
    "Model": "模型", "Direction": "方向", "CUDA kernel (GB/s)": "CUDA 内核（GB/s）",
    "Layer by layer (GB/s)": "逐层（GB/s）", "torch (GB/s)": "torch（GB/s）",
    "One memcpy per page (GB/s)": "每页一次 memcpy（GB/s）", "Bulk pinned copy (GB/s)": "批量锁页复制（GB/s）",
    "Kernel / bulk": "内核 / 批量", "Byte-exact": "逐字节一致",
    "A chunk still in a finished request's GPU blocks, copied within the KV cache instead of loaded from the host: "
    "{rows}.": "仍在已完成请求的 GPU KV 块中的数据块，在 KV Cache 内复制而不是从主机加载：{rows}。",
    "{model} {gbps} GB/s (byte-exact: {ok})": "{model} {gbps} GB/s（逐字节一致：{ok}）",
    "GEMM alone (ms)": "仅 GEMM（毫秒）", "+ kernel store": "+ 内核存储", "+ torch store": "+ torch 存储",
    "+ bulk DMA": "+ 批量 DMA", "{ms} (spread {spread})": "{ms}（波动 {spread}）",
}
CATALOGS = {"zh_CN": ZH_CN}


def _(text: str, lang: str, **fields) -> str:
    """``text`` in ``lang`` (the English text is the key), with ``fields`` filled in."""
    text = text if lang == "en" else CATALOGS[lang][text]
    return text.format(**fields) if fields else text


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str], lang: str) -> list[str]:
    return [_row([_(c, lang) for c in cells]), "|" + "---|" * len(cells)]


def meta_line(meta: dict, lang: str = "en") -> str:
    return _("{date}, {gpu}, vLLM {vllm}, torch {torch}, architecture `{arch}`", lang,
             **{k: meta.get(k, "?") for k in ("date", "gpu", "vllm", "torch", "arch")})


def e2e_markdown(name: str, data: dict, copy: dict[str, dict], lang: str = "en") -> list[str]:
    rows = ordered_modes(data)
    same = data.get("tokens_identical_to_none", {})
    mode = lambda m: _(label(m), lang) if label(m) in ZH_CN else label(m)  # noqa: E731 - unknown modes as named
    sep = ", " if lang == "en" else "，"
    lines = [_("**End to end** (`benchmarks/results/{name}.json`): {meta}.", lang, name=name,
               meta=meta_line(data["meta"], lang)), ""]
    if same:
        colon = ": " if lang == "en" else "："
        verdict = sep.join(f"{mode(m)}{colon}{_('yes' if ok else 'NO', lang)}" for m, ok in same.items())
        lines += [_("Greedy token ids identical to no offloading in every scenario: {verdict}.", lang,
                    verdict=verdict), ""]
    lines += _header(["Mode", "Repeated batch, run 1 (s)", "Repeated batch, run 2 (s)", "Run 1 / run 2",
                      "Query twice, cold (s)", "Query twice, warm (s)"], lang)
    for r in rows:
        seed, twice = r.get("seed", {}), r.get("twice", {})
        lines.append(_row([mode(r["mode"]), fmt(seed.get("run1_s")), fmt(seed.get("run2_s")),
                           fmt(seed.get("speedup"), ".1f", "x"), fmt(twice.get("cold_s")), fmt(twice.get("warm_s"))]))
    repeated = [r for r in rows if "run1_all_s" in r.get("seed", {}) and "warm_all_s" in r.get("twice", {})]
    if repeated:
        lines += ["", _("Each repeated-batch and query-twice figure is the median of three runs (the repeated batch "
                        "on three prompt sets, three prompts each sent twice); every run:", lang), ""]
        lines += _header(["Mode", "Repeated batch, run 1 (s)", "Repeated batch, run 2 (s)", "Query twice, cold (s)",
                          "Query twice, warm (s)"], lang)
        for r in repeated:
            runs = [r["seed"]["run1_all_s"], r["seed"]["run2_all_s"], r["twice"]["cold_all_s"], r["twice"]["warm_all_s"]]
            lines.append(_row([mode(r["mode"])] + [", ".join(fmt(v) for v in values) for values in runs]))
    floor = seed_floor_s(data, copy)
    if floor is not None:
        lines += ["", _("Lower bound of the repeated batch's run 2 (its {tokens} stored tokens loaded at the "
                        "kernel's measured load rate): {floor} s.", lang, tokens=f"{SEED_LOADED_TOKENS:,}",
                        floor=f"{floor:.3f}")]
    lines += [""] + _header(["Mode", "Chat TTFT p50 (s)", "Chat TTFT p95 (s)", "Chat requests/s",
                             "Doc QA TTFT p50 (s)", "Doc QA TTFT p95 (s)", "Doc QA requests/s"], lang)
    for r in rows:
        chat, docqa = r.get("chat", {}), r.get("docqa", {})
        lines.append(_row([mode(r["mode"]), fmt(chat.get("ttft_p50_s")), fmt(chat.get("ttft_p95_s")),
                           fmt(chat.get("requests_per_s"), ".2f"), fmt(docqa.get("ttft_p50_s")),
                           fmt(docqa.get("ttft_p95_s")), fmt(docqa.get("requests_per_s"), ".2f")]))
    lines += [""] + _header(["Mode", "Engine start (s)", "Offload tier serving hits (s since engine creation)"], lang)
    for r in rows:
        lines.append(_row([mode(r["mode"]), fmt(r.get("engine_start_s"), ".1f"), fmt(r.get("tier_ready_s"), ".1f")]))
    return lines + [""]


def copy_markdown(name: str, data: dict, lang: str = "en") -> list[str]:
    lines = [_("**Copy path** (`benchmarks/results/{name}.json`): {device}, {chunks} chunks of 256 tokens per copy "
               "(about {tokens} tokens), bf16.", lang, name=name, device=data["device"], chunks=data["chunks"],
               tokens=f"{data['chunks'] * 256:,}"), ""]
    lines += _header(["Model", "Direction", "CUDA kernel (GB/s)", "Layer by layer (GB/s)", "torch (GB/s)",
                      "One memcpy per page (GB/s)", "Bulk pinned copy (GB/s)", "Kernel / bulk", "Byte-exact"], lang)
    for row in data["results"]:
        for direction in ("store", "load"):
            g = row["gbps"][direction]
            lines.append(_row([row["model"], _(direction, lang), f"{g['kernel']:.1f}", fmt(g.get("layer-wise"), ".1f"),
                               f"{g['torch']:.1f}", f"{g['per-page']:.1f}", f"{g['bulk']:.1f}",
                               f"{100 * g['kernel'] / g['bulk']:.1f}%",
                               _("yes" if row["verified"][direction] else "NO", lang)]))
    within = [row for row in data["results"] if "within_cache_gbps" in row]
    if within:
        sep = ", " if lang == "en" else "，"
        rows = sep.join(_("{model} {gbps} GB/s (byte-exact: {ok})", lang, model=row["model"],
                          gbps=f"{row['within_cache_gbps']:.0f}", ok=_("yes" if row["verified"]["within"] else "NO", lang))
                        for row in within)
        lines += ["", _("A chunk still in a finished request's GPU blocks, copied within the KV cache instead of loaded "
                        "from the host: {rows}.", lang, rows=rows)]
    lines += [""] + _header(["Model", "GEMM alone (ms)", "+ kernel store", "+ torch store", "+ bulk DMA"], lang)
    for row in data["results"]:
        ms = row["gemm_ms"]
        cells = [f"{ms[k]:.3f} ({100 * (ms[k] / ms['alone'] - 1):+.1f}%)" for k in ("kernel", "torch", "bulk")]
        alone = _("{ms} (spread {spread})", lang, ms=f"{ms['alone']:.3f}", spread=f"{ms['alone_spread']:.3f}")
        lines.append(_row([row["model"], alone] + cells))
    return lines + [""]


def results_markdown(e2e: dict[str, dict], copy: dict[str, dict], lang: str = "en") -> str:
    lines = ["<!-- generated by benchmarks/plot.py from benchmarks/results/*.json; do not edit -->", ""]
    for name, data in e2e.items():
        lines += e2e_markdown(name, data, copy, lang)
    for name, data in copy.items():
        lines += copy_markdown(name, data, lang)
    return "\n".join(lines).rstrip() + "\n"


def results_filename(lang: str) -> str:
    """``results.md`` for English, ``results.<lang>.md`` for a translation (the docs pick the page's language)."""
    return "results.md" if lang == "en" else f"results.{lang}.md"


def _bars(ax, groups: list[str], series: list[tuple[str, str, list[float | None]]], fmt_spec: str) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series (label, colour, values)."""
    width = 0.8 / len(series)
    for i, (name, col, values) in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        present = [(x, v) for x, v in zip(xs, values) if v is not None]
        bars = ax.bar([x for x, _ in present], [v for _, v in present], width * 0.92, label=name, color=col)
        ax.bar_label(bars, labels=[f"{v:{fmt_spec}}" for _, v in present], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_e2e(name: str, data: dict, copy: dict[str, dict], out: Path, plt) -> list[Path]:
    rows = ordered_modes(data)
    meta = data["meta"]
    title = f"{meta.get('gpu', '?')}, vLLM {meta.get('vllm', '?')}, {meta.get('arch', '?')}"
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    _bars(ax, [label(r["mode"]) for r in rows],
          [("run 1 (cold)", "#bdbdbd", [r.get("seed", {}).get("run1_s") for r in rows]),
           ("run 2 (same prompts again)", "#dd8452", [r.get("seed", {}).get("run2_s") for r in rows])], ".3f")
    floor = seed_floor_s(data, copy)
    if floor is not None:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1,
                   label=f"run 2 lower bound: loads at measured rate ({floor:.2f} s)")
    ax.set_ylabel("seconds (10 prompts x 10,000 tokens)")
    ax.set_title(f"Repeated batch, lower is better\n{title}", fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=7, loc="upper center", ncols=2)
    written.append(_save(fig, out / f"{name}-seed.png", plt))

    scenarios = [("twice", "warm_s", "query twice\n(warm request)"), ("chat", "ttft_p50_s", "multi-round chat\n(p50)"),
                 ("docqa", "ttft_p50_s", "long-document QA\n(p50)")]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    _bars(ax, [s[2] for s in scenarios],
          [(label(r["mode"]), colour(r["mode"], i), [r.get(key, {}).get(field) for key, field, _ in scenarios])
           for i, r in enumerate(rows)], ".3f")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"Time to first token, lower is better\n{title}", fontsize=9)
    ax.margins(y=0.12)
    ax.legend(fontsize=7)
    written.append(_save(fig, out / f"{name}-ttft.png", plt))
    return written


def plot_copy(name: str, data: dict, out: Path, plt) -> Path:
    groups = [(row, d) for row in data["results"] for d in ("store", "load")]
    fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=110)
    _bars(ax, [f"{row['model']}\n{d}" for row, d in groups],
          [(lab, col, [row["gbps"][d][path] for row, d in groups]) for path, (lab, col) in COPY_PATHS.items()],
          ".1f")
    ax.set_ylabel("GB/s")
    ax.set_title(f"Host <-> GPU copy of ~{data['chunks'] * 256:,} tokens of KV cache, higher is better\n"
                 f"{data['device']}", fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
    ax.legend(fontsize=7, ncols=2, loc="upper center")
    return _save(fig, out / f"{name}.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    # No software/date metadata: the PNG is byte-identical between runs on the same data.
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static" / "bench")
    args = parser.parse_args(argv)
    try:
        e2e, copy = load_results(args.results)
    except ResultsError as exc:
        print(f"plot.py: {exc}", file=sys.stderr)
        return 1

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in e2e.items():
        written += plot_e2e(name, data, copy, args.out, plt)
    for name, data in copy.items():
        written.append(plot_copy(name, data, args.out, plt))
    for stale in sorted(set(args.out.glob("*.png")) - set(written)):
        stale.unlink()
    tables = []
    for lang in LANGS:
        tables.append(args.out / results_filename(lang))
        tables[-1].write_text(results_markdown(e2e, copy, lang), encoding="utf-8")
    for path in written + tables:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
