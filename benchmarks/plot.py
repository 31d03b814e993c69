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
- ``results.md``: every number as Markdown tables, with date, hardware and versions; included by
  docs/benchmarks.md.

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


def meta_line(meta: dict) -> str:
    return (f"{meta.get('date', '?')}, {meta.get('gpu', '?')}, vLLM {meta.get('vllm', '?')}, "
            f"torch {meta.get('torch', '?')}, architecture `{meta.get('arch', '?')}`")


def e2e_markdown(name: str, data: dict, copy: dict[str, dict]) -> list[str]:
    rows = ordered_modes(data)
    same = data.get("tokens_identical_to_none", {})
    lines = [f"**End to end** (`benchmarks/results/{name}.json`): {meta_line(data['meta'])}.", ""]
    if same:
        verdict = ", ".join(f"{label(m)}: {'yes' if ok else 'NO'}" for m, ok in same.items())
        lines += [f"Greedy token ids identical to no offloading in every scenario: {verdict}.", ""]
    lines += ["| Mode | Repeated batch, run 1 (s) | Repeated batch, run 2 (s) | Run 1 / run 2 | Query twice, cold (s) | "
              "Query twice, warm (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        seed, twice = r.get("seed", {}), r.get("twice", {})
        lines.append(f"| {label(r['mode'])} | {fmt(seed.get('run1_s'))} | {fmt(seed.get('run2_s'))} | "
                     f"{fmt(seed.get('speedup'), '.1f', 'x')} | {fmt(twice.get('cold_s'))} | "
                     f"{fmt(twice.get('warm_s'))} |")
    repeated = [r for r in rows if "run1_all_s" in r.get("seed", {}) and "warm_all_s" in r.get("twice", {})]
    if repeated:
        lines += ["", "Each repeated-batch and query-twice figure is the median of three runs (the repeated batch on three prompt "
                      "sets, three prompts each sent twice); every run:", "",
                  "| Mode | Repeated batch, run 1 (s) | Repeated batch, run 2 (s) | Query twice, cold (s) | Query twice, warm (s) |",
                  "|---|---|---|---|---|"]
        for r in repeated:
            runs = [r["seed"]["run1_all_s"], r["seed"]["run2_all_s"], r["twice"]["cold_all_s"], r["twice"]["warm_all_s"]]
            lines.append(f"| {label(r['mode'])} | " + " | ".join(", ".join(fmt(v) for v in values) for values in runs)
                         + " |")
    floor = seed_floor_s(data, copy)
    if floor is not None:
        lines += ["", f"Lower bound of the repeated batch's run 2 (its {SEED_LOADED_TOKENS:,} stored tokens loaded at the "
                      f"kernel's measured load rate): {floor:.3f} s."]
    lines += ["", "| Mode | Chat TTFT p50 (s) | Chat TTFT p95 (s) | Chat requests/s | "
                  "Doc QA TTFT p50 (s) | Doc QA TTFT p95 (s) | Doc QA requests/s |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        chat, docqa = r.get("chat", {}), r.get("docqa", {})
        lines.append(f"| {label(r['mode'])} | {fmt(chat.get('ttft_p50_s'))} | {fmt(chat.get('ttft_p95_s'))} | "
                     f"{fmt(chat.get('requests_per_s'), '.2f')} | {fmt(docqa.get('ttft_p50_s'))} | "
                     f"{fmt(docqa.get('ttft_p95_s'))} | {fmt(docqa.get('requests_per_s'), '.2f')} |")
    lines += ["", "| Mode | Engine start (s) | Offload tier serving hits (s since engine creation) |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {label(r['mode'])} | {fmt(r.get('engine_start_s'), '.1f')} | "
                     f"{fmt(r.get('tier_ready_s'), '.1f')} |")
    return lines + [""]


def copy_markdown(name: str, data: dict) -> list[str]:
    lines = [f"**Copy path** (`benchmarks/results/{name}.json`): {data['device']}, {data['chunks']} chunks of "
             f"256 tokens per copy (about {data['chunks'] * 256:,} tokens), bf16.", "",
             "| Model | Direction | CUDA kernel (GB/s) | Layer by layer (GB/s) | torch (GB/s) | "
             "One memcpy per page (GB/s) | Bulk pinned copy (GB/s) | Kernel / bulk | Byte-exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in data["results"]:
        for direction in ("store", "load"):
            g = row["gbps"][direction]
            lines.append(f"| {row['model']} | {direction} | {g['kernel']:.1f} | {fmt(g.get('layer-wise'), '.1f')} | "
                         f"{g['torch']:.1f} | "
                         f"{g['per-page']:.1f} | {g['bulk']:.1f} | {100 * g['kernel'] / g['bulk']:.1f}% | "
                         f"{'yes' if row['verified'][direction] else 'NO'} |")
    within = [row for row in data["results"] if "within_cache_gbps" in row]
    if within:
        lines += ["", "A chunk still in a finished request's GPU blocks, copied within the KV cache instead of loaded "
                      "from the host: " + ", ".join(f"{row['model']} {row['within_cache_gbps']:.0f} GB/s (byte-exact: "
                                                     f"{'yes' if row['verified']['within'] else 'NO'})" for row in within)
                  + "."]
    lines += ["", "| Model | GEMM alone (ms) | + kernel store | + torch store | + bulk DMA |", "|---|---|---|---|---|"]
    for row in data["results"]:
        ms = row["gemm_ms"]
        cells = [f"{ms[k]:.3f} ({100 * (ms[k] / ms['alone'] - 1):+.1f}%)" for k in ("kernel", "torch", "bulk")]
        lines.append(f"| {row['model']} | {ms['alone']:.3f} (spread {ms['alone_spread']:.3f}) | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def results_markdown(e2e: dict[str, dict], copy: dict[str, dict]) -> str:
    lines = ["<!-- generated by benchmarks/plot.py from benchmarks/results/*.json; do not edit -->", ""]
    for name, data in e2e.items():
        lines += e2e_markdown(name, data, copy)
    for name, data in copy.items():
        lines += copy_markdown(name, data)
    return "\n".join(lines).rstrip() + "\n"


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
    (args.out / "results.md").write_text(results_markdown(e2e, copy), encoding="utf-8")
    for path in written + [args.out / "results.md"]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
