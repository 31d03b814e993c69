"""End-to-end benchmark on a GPU: no offloading vs vLLM native offloading vs kvoffload, one run.

Dummy weights of a real architecture (``load_format="dummy"``: timings are the real model's, the tokens
are meaningless), token-id prompts, ``--graphs eager`` (``enforce_eager``, the earlier runs) or ``default``
(vLLM's own compilation and CUDA-graph settings, what users run), 24 GB of GPU memory as in the seed script, vLLM's
own prefix cache off so a repeated prefix is either recomputed or loaded from the offload tier. Each
mode runs in its own process (one engine each); the parent prints a Markdown table and writes JSON.

Scenarios
  seed   the seed speedup script: 10 prompts x 10,000 tokens, max_tokens=1, run twice; medians of 3
         such pairs, each on new prompts
  twice  a 15,000-token prompt sent twice in a row (cold / warm time to first token), median of 3 prompts
  chat   multi-round chat: 12 users, a shared 1,000-token system prompt, 2,000-token private histories
         growing by 250 tokens a round, 4 rounds, users served in turn (TTFT p50/p95, requests/s)
  docqa  long-document QA: 6 documents of 8,000 tokens read once, then 3 questions each, interleaved
         (TTFT p50/p95 of the questions, requests/s)
  decode decode-heavy: 64 concurrent requests, 128-token prompts, 512 output tokens each, twice (output
         tokens/s of the faster pass; TPOT mean, p50 and p99 from vLLM's inter-token latency histogram)

Usage (on the GPU machine): python benchmarks/e2e_gpu.py --out results.json [--modes none,native,kvoffload]

A run longer than one sitting can be split by ``--modes``/``--scenarios`` and the parts joined, on any
machine: python benchmarks/e2e_gpu.py --merge part1.json part2.json --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = {
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=12288, vocab_size=151936, max_position_embeddings=40960,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16",
                     hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         torch_dtype="bfloat16", hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
    # A sliding-window hybrid: 5 sliding-window layers (1,024 tokens) to each full-attention layer.
    "gemma-3-12b": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=3840,
                        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                        intermediate_size=15360, vocab_size=262208, max_position_embeddings=131072,
                        sliding_window=1024, sliding_window_pattern=6,
                        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                     for i in range(48)],
                        rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        rope_scaling={"factor": 8.0, "rope_type": "linear"}, query_pre_attn_scalar=256,
                        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                        torch_dtype="bfloat16", bos_token_id=2, eos_token_id=1, pad_token_id=0),
}
SCENARIOS = ("seed", "twice", "chat", "docqa", "decode")
SEED_REPEATS = 3
TWICE_PAIRS = 3
POOL_GIB = 15.0  # the same host memory for vLLM native (GiB) and kvoffload (converted to GB)
GPU_GIB = 24.0  # the seed script's GPU memory for vLLM
#: (GPU GiB, pool GiB) where the seed script's do not fit: Gemma-3-12B has 24 GB of weights, and 10 prompts of
#: 10,000 tokens hold 39 GB of KV (384 KiB a token, every sliding-window layer's pages included).
MEMORY_GIB = {"gemma-3-12b": (40.0, 45.0)}


def memory_gib(arch: str) -> tuple[float, float]:
    """(GPU memory for vLLM, host pool of each offloading mode) in GiB for ``arch``."""
    return MEMORY_GIB.get(arch, (GPU_GIB, POOL_GIB))


def write_config(arch: str) -> str:
    path = Path(tempfile.gettempdir()) / f"kvoffload-bench-{arch}"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(ARCHS[arch]))
    return str(path)


def seed_prompts(num: int = 10, tokens: int = 10_000, variant: int = 0) -> list[list[int]]:
    """The seed script's prompts; another ``variant`` gives other prompts of the same shape."""
    hi = 13048  # any fixed id: the body is the same "Hi Hi Hi ..." for every prompt
    return [[1000 + 100 * variant + i, 2000 + i] + [hi] * tokens + [3000, 3001] for i in range(num)]


def run_mode(mode: str, arch: str, scenarios: list[str], graphs: str = "eager") -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    gpu_gib, pool_gib = memory_gib(arch)
    kwargs: dict = dict(model=write_config(arch), load_format="dummy", skip_tokenizer_init=True,
                        enforce_eager=graphs == "eager", max_model_len=16384, enable_prefix_caching=False,
                        gpu_memory_utilization=gpu_gib / total, seed=0, disable_log_stats="decode" not in scenarios)
    if mode == "native":
        kwargs.update(kv_offloading_size=pool_gib, kv_offloading_backend="native")
    elif mode.startswith("kvoffload"):
        extra = {"max_local_cpu_size": pool_gib * 2**30 / 1e9}
        if mode == "kvoffload_disk":
            extra.update(local_disk=tempfile.mkdtemp(prefix="kvoffload-disk-"), max_local_disk_size=40)
        kwargs["kv_transfer_config"] = KVTransferConfig(kv_connector="KVOffloadConnector", kv_role="kv_both",
                                                        kv_connector_module_path="kvoffload.vllm.connector",
                                                        kv_connector_extra_config=extra)
    start = time.perf_counter()
    llm = LLM(**kwargs)
    result: dict = {"mode": mode, "arch": arch, "graphs": graphs, "engine_start_s": time.perf_counter() - start}
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def timed(prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t, [list(o.outputs[0].token_ids) for o in outs]

    timed([[5, 6, 7, 8] * 64])  # warm-up: first-call overheads are nobody's offloading cost
    if mode != "none":
        result["tier_ready_s"] = wait_until_serving(llm, params) + result["engine_start_s"]
    if "seed" in scenarios:  # the script on fresh prompts each time (run 1 stores, run 2 loads): medians
        run1s, run2s, tokens = [], [], []
        for variant in range(SEED_REPEATS):
            prompts = seed_prompts(variant=variant)
            t1, out1 = timed(prompts)
            t2, out2 = timed(prompts)
            run1s.append(t1)
            run2s.append(t2)
            tokens += [out1, out2]
        run1, run2 = statistics.median(run1s), statistics.median(run2s)
        result["seed"] = {"run1_s": run1, "run2_s": run2, "speedup": run1 / run2, "run1_all_s": run1s,
                          "run2_all_s": run2s, "tokens": tokens}
    if "twice" in scenarios:  # three prompts, each sent twice in a row: the medians are reported
        colds, warms, tokens = [], [], []
        for pair in range(TWICE_PAIRS):
            prompt = [[3000 + pair] + [4000 + (i % 5000) for i in range(14_999)]]
            cold, first = timed(prompt)
            warm, second = timed(prompt)
            colds.append(cold)
            warms.append(warm)
            tokens += [first, second]
        result["twice"] = {"cold_s": statistics.median(colds), "warm_s": statistics.median(warms),
                           "cold_all_s": colds, "warm_all_s": warms, "tokens": tokens}
    if "chat" in scenarios:
        system = [9000 + i for i in range(1000)]
        histories = [[20_000 + 3000 * u + i for i in range(2000)] for u in range(12)]
        ttfts, tokens = [], []
        start = time.perf_counter()
        for round_ in range(4):
            for user, history in enumerate(histories):
                history.extend(60_000 + 1000 * user + 250 * round_ + i for i in range(250))
                seconds, out = timed([system + history])
                ttfts.append(seconds)
                tokens.append(out)
        result["chat"] = summary(ttfts, time.perf_counter() - start, tokens)
    if "docqa" in scenarios:
        docs = [[70_000 + 8000 * d + i for i in range(8000)] for d in range(6)]
        for doc in docs:
            timed([doc])
        ttfts, tokens = [], []
        start = time.perf_counter()
        for q in range(3):
            for d, doc in enumerate(docs):
                seconds, out = timed([doc + [120_000 + 64 * (3 * d + q) + i for i in range(64)]])
                ttfts.append(seconds)
                tokens.append(out)
        result["docqa"] = summary(ttfts, time.perf_counter() - start, tokens)
    if "decode" in scenarios:
        result["decode"] = decode_heavy(llm)
    return result


def decode_heavy(llm, requests: int = 64, prompt_tokens: int = 128, output_tokens: int = 512) -> dict:
    """Output tokens/s of many concurrent generating requests, and their time per output token."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    passes, tokens = [], []
    before = inter_token_histogram(llm)
    for round_ in range(2):
        prompts = [{"prompt_token_ids": [80_000 + 1000 * round_ + r] + [90_000 + i for i in range(prompt_tokens - 1)]}
                   for r in range(requests)]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        passes.append(time.perf_counter() - t)
        tokens.append([list(o.outputs[0].token_ids[:8]) for o in outs])
    counts, total, count = histogram_delta(before, inter_token_histogram(llm))
    return {"output_tokens_per_s": requests * output_tokens / min(passes), "pass_s": passes,
            "tpot_mean_s": total / count if count else float("nan"), "tpot_p50_s": quantile(counts, 0.5),
            "tpot_p99_s": quantile(counts, 0.99), "tokens": tokens}


def inter_token_histogram(llm) -> dict:
    """vLLM's inter-token latency histogram (cumulative bucket counts, sum, count), by either of its names."""
    for metric in llm.get_metrics():
        if metric.name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
            return {"buckets": dict(metric.buckets), "sum": metric.sum, "count": metric.count}
    return {"buckets": {}, "sum": 0.0, "count": 0}


def histogram_delta(before: dict, after: dict) -> tuple[list[tuple[float, int]], float, int]:
    counts = sorted((float(le), n - before["buckets"].get(le, 0)) for le, n in after["buckets"].items())
    return counts, after["sum"] - before["sum"], after["count"] - before["count"]


def quantile(cumulative: list[tuple[float, int]], q: float) -> float:
    """The upper bound of the first bucket holding the q-th observation (a histogram's resolution)."""
    if not cumulative or cumulative[-1][1] == 0:
        return float("nan")
    target = q * cumulative[-1][1]
    return next(le for le, n in cumulative if n >= target)


def summary(ttfts: list[float], total_s: float, tokens: list) -> dict:
    ordered = sorted(ttfts)
    return {"ttft_p50_s": ordered[len(ordered) // 2], "ttft_p95_s": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "requests_per_s": len(ttfts) / total_s, "tokens": tokens}


def wait_until_serving(llm, params, limit_s: float = 120.0) -> float:
    """Seconds until a repeated 512-token prompt hits the offload tier (the host pool pins in the background).

    Each probe uses a new prompt, sent twice; vLLM's prefix cache is off, so a cached-token count above zero
    on the second copy can only come from the offload tier.
    """
    start = time.perf_counter()
    probe = 0
    while time.perf_counter() - start < limit_s:
        prompt = {"prompt_token_ids": [50_000 + probe] + [7] * 511}
        llm.generate([prompt], params, use_tqdm=False)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        if (out.num_cached_tokens or 0) > 0:
            return time.perf_counter() - start
        probe += 1
        time.sleep(0.2)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="none,native,kvoffload")
    parser.add_argument("--arch", default="qwen3-8b", choices=sorted(ARCHS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--graphs", default="eager", choices=["eager", "default"],
                        help="eager: enforce_eager (earlier runs); default: vLLM's compilation and CUDA graphs")
    parser.add_argument("--out", default="e2e_gpu.json")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join result files of one arch instead of running")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge:
        meta, results = merge([json.loads(Path(p).read_text()) for p in args.merge])
        write(args.out, meta, results)
        return
    scenarios = args.scenarios.split(",")
    if args.child:
        print("RESULT " + json.dumps(run_mode(args.child, args.arch, scenarios, args.graphs)), flush=True)
        return
    meta = {"date": time.strftime("%Y-%m-%d"), "arch": args.arch, "graphs": args.graphs}
    try:
        import torch
        import vllm
        meta.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, vllm=vllm.__version__)
    except Exception:
        pass
    results = []
    for mode in args.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--arch", args.arch,
                               "--scenarios", args.scenarios, "--graphs", args.graphs], capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        log = proc.stdout + proc.stderr
        Path(args.out).with_suffix(f".{mode}.log").write_text(log)
        if not lines:
            print(f"{mode}: FAILED (exit {proc.returncode}); see the log", flush=True)
            continue
        result = json.loads(lines[-1][7:])
        # vLLM's own figures for its engine start, without process start and imports (those vary by 5 s between
        # runs), and of the torch.compile part in it (from 9 s with a warm compilation cache to 40 s without)
        init = re.findall(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
                          r"(?: \(compilation: ([\d.]+) s\))?", log)
        if init:
            result["engine_init_s"], result["engine_compile_s"] = float(init[-1][0]), float(init[-1][1] or 0)
        results.append(result)
        print(f"{mode}: done", flush=True)
        write(args.out, meta, results)  # after each mode: a run cut short keeps the modes it finished


def merge(parts: list[dict]) -> tuple[dict, list[dict]]:
    """Join runs split by mode or scenario: each mode's scenarios are gathered; engine start figures are
    those of the first part that ran the mode (a later engine of the same mode starts warmer)."""
    if len({part["meta"].get("arch") for part in parts}) != 1:
        raise SystemExit("--merge: the files are not all of one architecture")
    by_mode: dict[str, dict] = {}
    for part in parts:
        for result in part["results"]:
            merged = by_mode.setdefault(result["mode"], {})
            for key, value in result.items():
                merged.setdefault(key, value)
    return parts[0]["meta"], list(by_mode.values())


def identical_to_none(results: list[dict]) -> dict[str, bool]:
    """For each offloading mode: are its greedy token ids those of no offloading in every shared scenario?"""
    base = {r["mode"]: r for r in results}.get("none")
    if base is None:
        return {}
    return {r["mode"]: all(r[s]["tokens"] == base[s]["tokens"] for s in SCENARIOS if s in r and s in base)
            for r in results if r is not base}


def write(out: str, meta: dict, results: list[dict]) -> None:
    Path(out).write_text(json.dumps({"meta": meta, "results": results,
                                     "tokens_identical_to_none": identical_to_none(results)}, indent=1))
    print(table(meta, results))


def table(meta: dict, results: list[dict]) -> str:
    same = identical_to_none(results)
    rows = [f"{meta}", "", "| mode | engine start s | vLLM init s | tier ready s | seed run1 s | seed run2 s | speedup | "
            "twice cold s | twice warm s | tokens = none |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        seed, twice = r.get("seed", {}), r.get("twice", {})
        rows.append(f"| {r['mode']} | {r['engine_start_s']:.1f} | {r.get('engine_init_s', 0):.1f} | "
                    f"{r.get('tier_ready_s', 0):.1f} | "
                    f"{seed.get('run1_s', 0):.3f} | "
                    f"{seed.get('run2_s', 0):.3f} | {seed.get('speedup', 0):.2f}x | {twice.get('cold_s', 0):.3f} | "
                    f"{twice.get('warm_s', 0):.3f} | {same.get(r['mode'], '-')} |")
    rows += ["", "| mode | chat TTFT p50 s | chat TTFT p95 s | chat req/s | docqa TTFT p50 s | docqa TTFT p95 s | "
             "docqa req/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        chat, qa = r.get("chat", {}), r.get("docqa", {})
        rows.append(f"| {r['mode']} | {chat.get('ttft_p50_s', 0):.3f} | {chat.get('ttft_p95_s', 0):.3f} | "
                    f"{chat.get('requests_per_s', 0):.2f} | {qa.get('ttft_p50_s', 0):.3f} | "
                    f"{qa.get('ttft_p95_s', 0):.3f} | {qa.get('requests_per_s', 0):.2f} |")
    rows += ["", "| mode | decode output tok/s | TPOT mean ms | TPOT p50 ms (bucket) | TPOT p99 ms (bucket) |",
             "|---|---|---|---|---|"]
    for r in results:
        dec = r.get("decode", {})
        rows.append(f"| {r['mode']} | {dec.get('output_tokens_per_s', 0):.0f} | {1e3 * dec.get('tpot_mean_s', 0):.2f} | "
                    f"{1e3 * dec.get('tpot_p50_s', 0):.1f} | {1e3 * dec.get('tpot_p99_s', 0):.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
