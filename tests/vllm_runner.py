"""Run one real vLLM engine in its own process and print what it generated, as JSON.

Tests start this script with ``subprocess`` (one engine per process: vLLM engines hold process-wide
state) and read the last stdout line. Spec (JSON in argv[1], or ``@FILE`` naming a file of it):

    model, prompts (strings or token-id lists), rounds, or orders (prompt indexes per round; outputs
    are reported in prompt order), max_tokens, connector (null | "plugin" |
    "module" | a module path holding a test connector), extra_config, engine (extra LLM kwargs),
    between_rounds (shell commands, one per gap between rounds, null to skip one: run after round i
    finished, before round i + 1 starts; a failing command fails the run), kv_events_endpoint (publish KV
    cache events by ZMQ there), linger_s (seconds to keep the engine stepping after the last round, so that
    background write-outs complete and are reported)

Output: ``{"rounds": [[token ids per prompt], ...], "margins": [[top-2 logprob margin per token, per prompt],
...], "metrics": {name: value}}``. The margins let tests tell a near-tie from a real difference
(``tests/greedy.py``); asking for two logprobs does not change what greedy sampling picks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def main() -> None:
    arg = sys.argv[1]
    spec = json.loads(open(arg[1:]).read() if arg.startswith("@") else arg)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    engine = dict(model=spec["model"], gpu_memory_utilization=0.3, max_model_len=8192, max_num_batched_tokens=512,
                  enforce_eager=True, enable_prefix_caching=False, seed=0, disable_log_stats=False)
    engine.update(spec.get("engine", {}))
    connector = spec.get("connector")
    if connector:
        transfer = dict(kv_connector=spec.get("connector_name", "KVOffloadConnector"), kv_role="kv_both",
                        kv_connector_extra_config=spec.get("extra_config", {}))
        if connector != "plugin":
            transfer["kv_connector_module_path"] = (
                "kvoffload.vllm.connector" if connector == "module" else connector)
        engine["kv_transfer_config"] = KVTransferConfig(**transfer)
    if spec.get("kv_events_endpoint"):
        from vllm.config import KVEventsConfig
        engine["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                    endpoint=spec["kv_events_endpoint"])
    llm = LLM(**engine)
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in spec["prompts"]]
    params = SamplingParams(max_tokens=spec.get("max_tokens", 6), temperature=0, ignore_eos=True, logprobs=2)
    rounds, texts, margins = [], [], []
    orders = spec.get("orders") or [list(range(len(prompts)))] * spec.get("rounds", 1)
    hooks = spec.get("between_rounds") or []
    for number, order in enumerate(orders):
        if number and number - 1 < len(hooks) and hooks[number - 1]:
            subprocess.run(hooks[number - 1], shell=True, check=True)
        if number and spec.get("reset_prefix_cache"):  # vLLM's own cache only: a later round must load from ours
            assert llm.reset_prefix_cache(), "vLLM did not reset its prefix cache"
        outputs = llm.generate([prompts[i] for i in order], params, use_tqdm=False)
        by_prompt = dict(zip(order, outputs))
        rounds.append([list(by_prompt[i].outputs[0].token_ids) for i in sorted(by_prompt)])
        texts.append([by_prompt[i].outputs[0].text for i in sorted(by_prompt)])
        margins.append([top2_margins(by_prompt[i].outputs[0].logprobs) for i in sorted(by_prompt)])
    time.sleep(spec.get("linger_s", 0))
    metrics = {}
    for metric in llm.get_metrics():
        if metric.name.startswith(("kvoffload", "vllm:external_prefix_cache")):
            metrics[metric.name] = getattr(metric, "value", None)
        elif metric.name == "vllm:prompt_tokens_cached_by_source":  # one sample per source: keyed by it
            name = f"{metric.name}{{source={metric.labels.get('source')}}}"
            metrics[name] = metrics.get(name, 0) + metric.value
    # vLLM's reader only returns vllm:* metrics; the connector's own are read from the registry
    from prometheus_client import REGISTRY
    for family in REGISTRY.collect():
        if family.name.startswith("kvoffload"):
            for sample in family.samples:
                if sample.name.endswith("_total") or family.type == "gauge":
                    metrics[sample.name] = metrics.get(sample.name, 0) + sample.value
    print(json.dumps({"rounds": rounds, "texts": texts, "margins": margins, "metrics": metrics}), flush=True)


def top2_margins(logprobs) -> list[float]:
    """Per generated token: the best logprob minus the second best (large when only one was returned)."""
    out = []
    for position in logprobs or ():
        best = sorted((lp.logprob for lp in position.values()), reverse=True)
        out.append(best[0] - best[1] if len(best) > 1 else 1e9)
    return out


if __name__ == "__main__":
    main()
