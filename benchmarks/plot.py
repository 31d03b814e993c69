# SPDX-License-Identifier: Apache-2.0
"""Plot benchmark results for the documentation.

Reads ``benchmarks/results/*.json`` (falls back to the sample ``docs/_static/bench/sample-results.json``
so the docs always build) and writes into ``docs/_static/bench/``:

- ``ttft.png``: warm time to first token against prompt length, one line per system;
- ``speedup.png``: cold TTFT / warm TTFT against prompt length;
- ``results.md``: the same numbers as a Markdown table, included by docs/benchmarks.md.

Input format (one file per run; extra fields are kept but ignored)::

    {"machine": "...", "model": "...", "vllm": "...", "sample": false,
     "runs": [{"system": "kvoffload CPU", "prompt_tokens": 10240,
               "ttft_cold_s": 0.46, "ttft_warm_s": 0.07}, ...]}

    python benchmarks/plot.py [--results DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "docs" / "_static" / "bench" / "sample-results.json"


def load_results(results_dir: Path) -> tuple[list[dict], list[dict]]:
    """Return (files' metadata, runs). Uses the sample file when the directory has no JSON."""
    files = sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []
    if not files:
        files = [SAMPLE]
    metas, runs = [], []
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        meta = {k: v for k, v in data.items() if k != "runs"}
        meta["file"] = path.name
        metas.append(meta)
        for run in data.get("runs", []):
            runs.append({**run, "_sample": bool(data.get("sample"))})
    return metas, runs


def results_markdown(metas: list[dict], runs: list[dict]) -> str:
    sample = any(m.get("sample") for m in metas)
    lines = []
    if sample:
        lines += ["**SAMPLE DATA, NOT MEASURED.** Placeholder until the H100 results are committed to "
                  "`benchmarks/results/`.", ""]
    for meta in metas:
        lines.append(f"- `{meta['file']}`: machine {meta.get('machine', '?')}, model {meta.get('model', '?')}, "
                     f"vLLM {meta.get('vllm', '?')}")
    lines += ["", "| System | Prompt tokens | Cold TTFT (s) | Warm TTFT (s) | Speedup |", "|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["system"], r["prompt_tokens"])):
        speedup = r["ttft_cold_s"] / r["ttft_warm_s"] if r["ttft_warm_s"] else float("nan")
        lines.append(f"| {r['system']} | {r['prompt_tokens']} | {r['ttft_cold_s']:.3f} | "
                     f"{r['ttft_warm_s']:.3f} | {speedup:.1f}x |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], out: Path, sample: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_system: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_system[r["system"]].append(r)
    suffix = " (SAMPLE DATA)" if sample else ""
    written = []
    for name, ylabel, value in (
        ("ttft.png", "warm TTFT (s)", lambda r: r["ttft_warm_s"]),
        ("speedup.png", "cold TTFT / warm TTFT", lambda r: r["ttft_cold_s"] / r["ttft_warm_s"]),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for system, rows in sorted(by_system.items()):
            rows = sorted(rows, key=lambda r: r["prompt_tokens"])
            ax.plot([r["prompt_tokens"] for r in rows], [value(r) for r in rows], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel + suffix)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        # Fixed metadata keeps the PNG byte-identical between runs on the same data.
        fig.savefig(out / name, metadata={"Software": None})
        plt.close(fig)
        written.append(out / name)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static" / "bench")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    metas, runs = load_results(args.results)
    (args.out / "results.md").write_text(results_markdown(metas, runs), encoding="utf-8")
    for path in plot(runs, args.out, sample=any(m.get("sample") for m in metas)):
        print(path)
    print(args.out / "results.md")


if __name__ == "__main__":
    main()
