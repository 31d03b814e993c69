"""Where the time of a warm request goes: a timeline of the connector's calls around one request.

Runs kvoffload with a tracing subclass of the connector (every scheduler- and worker-side call is stamped
with ``time.perf_counter``, a system-wide monotonic clock on Linux, so the engine's process and this one
share it; stamps named ``gpu: …`` are CUDA events, placed when the GPU got there), then prints, relative to
the moment ``generate`` was called:

* ``twice``: the second of two identical 15,000-token prompts (the warm TTFT of the issue),
* ``paused``: the same with a second's pause in between, so the first one's stores are over,
* ``seed``: the second run of the seed script (10 prompts x 10,000 tokens, all loaded),
* ``seed_paused``: the same with a pause of two seconds after the first run, so its stores are over.

Usage (on the GPU machine): python benchmarks/profile_warm.py [--arch qwen3-8b] [--scenarios twice,seed]
[--graphs eager|default] (``enforce_eager``, the earlier traces, or vLLM's own compilation and CUDA graphs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvoffload.vllm.connector import KVOffloadConnector


def _stamp(event: str, detail: str = "", at: float | None = None) -> None:
    with open(os.environ["KVO_TRACE"], "a") as trace:
        trace.write(f"{time.perf_counter() if at is None else at:.6f}\t{event}\t{detail}\n")


class _GpuClock:
    """Stamps for moments on the GPU: a CUDA event recorded on a stream, put on the host clock once it has
    completed (its time after a reference event whose host time is known), so the trace shows when the GPU
    got there, not when the CPU queued it."""

    def __init__(self) -> None:
        import torch

        torch.cuda.synchronize()
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record()
        self.ref.synchronize()
        self.ref_host = time.perf_counter()
        self.pending: list[tuple[Any, str, str]] = []

    def mark(self, event: str, detail: str = "", stream: Any = None) -> None:
        import torch

        cuda_event = torch.cuda.Event(enable_timing=True)
        cuda_event.record(stream)
        self.pending.append((cuda_event, event, detail))

    def flush(self) -> None:
        while self.pending and self.pending[0][0].query():
            cuda_event, event, detail = self.pending.pop(0)
            _stamp(event, detail, self.ref_host + self.ref.elapsed_time(cuda_event) / 1e3)


class TracingConnector(KVOffloadConnector):
    """The real connector, each call stamped (only calls that carry work, to keep the trace readable)."""

    _gpu: _GpuClock | None = None

    def _gpu_mark(self, event: str, detail: str = "", stream: Any = None) -> None:
        if self._gpu is None:
            self._gpu = _GpuClock()
        self._gpu.mark(event, detail, stream)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        answer = super().get_num_new_matched_tokens(request, num_computed_tokens)
        _stamp("lookup", f"{request.request_id} -> {answer}")
        return answer

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        _stamp("alloc", f"{request.request_id} external={num_external_tokens}")

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        plan = super().build_connector_meta(scheduler_output)
        tokens = scheduler_output.total_num_scheduled_tokens
        if tokens or not plan.is_empty():
            _stamp("plan", f"tokens={tokens} loads={len(plan.loads)} stores={sum(len(s.chunks) for s in plan.stores)}")
        return plan

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = self._bound_plan()
        if plan is not None and plan.loads:
            _stamp("loads planned", f"{sum(len(c.chunks) for c in plan.loads)} chunks")
            self._gpu_mark("gpu: step inputs in")  # what vLLM queued on the compute stream before the loads
        super().start_load_kv(forward_context, **kwargs)
        if plan is not None and plan.loads:
            _stamp("loads issued", ",".join(c.req_id for c in plan.loads))
            backend = self._worker.backend if self._worker is not None else None
            load_stream = getattr(getattr(backend, "_load", None), "kernel", None)
            if load_stream is not None:  # the CUDA path: when the GPU is done with every load queued so far
                self._gpu_mark("gpu: loads in", ",".join(c.req_id for c in plan.loads), load_stream)

    def wait_for_layer_load(self, layer_name: str) -> None:
        super().wait_for_layer_load(layer_name)
        layers = self._worker._layer_index if self._worker is not None else {}
        if layers.get(layer_name) in (0, len(layers) - 1):  # when the CPU gets there, and the GPU
            _stamp("cpu: attention", f"layer {layers[layer_name]}")
            self._gpu_mark("gpu: attention", f"layer {layers[layer_name]}")

    def wait_for_save(self) -> None:
        plan = self._bound_plan()
        if plan is not None:
            _stamp("cpu: forward done")
            self._gpu_mark("gpu: forward done")
        super().wait_for_save()
        if plan is not None and plan.stores:
            _stamp("stores issued", f"{sum(len(s.chunks) for s in plan.stores)} chunks")

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = super().get_finished(finished_req_ids)
        if self._gpu is not None:
            self._gpu.flush()
        if sending or recving:
            _stamp("finished", f"sending={sorted(sending or ())} recving={sorted(recving or ())}")
        return sending, recving

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        _stamp("request finished", request.request_id)
        return super().request_finished(request, block_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3-8b")
    parser.add_argument("--scenarios", default="twice,paused,seed")
    parser.add_argument("--graphs", default="eager", choices=["eager", "default"])
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parent)
    sys.path.insert(0, here)
    os.environ["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")
    trace = Path(tempfile.mkdtemp()) / "trace.tsv"
    os.environ["KVO_TRACE"] = str(trace)

    import torch
    from e2e_gpu import memory_gib, seed_prompts, wait_until_serving, write_config
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    gpu_gib, pool_gib = memory_gib(args.arch)
    llm = LLM(model=write_config(args.arch), load_format="dummy", skip_tokenizer_init=True,
              enforce_eager=args.graphs == "eager",
              max_model_len=16384, enable_prefix_caching=False, gpu_memory_utilization=gpu_gib / total, seed=0,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="TracingConnector", kv_role="kv_both", kv_connector_module_path="profile_warm",
                  kv_connector_extra_config={"max_local_cpu_size": pool_gib * 2**30 / 1e9}))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def traced(name: str, prompts: list[list[int]]) -> None:
        trace.write_text("")
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        end = time.perf_counter()
        print(f"\n== {name}: {1e3 * (end - start):.1f} ms")
        for line in sorted(trace.read_text().splitlines()):  # GPU stamps are written once they completed
            stamp, event, detail = line.split("\t")
            print(f"{1e3 * (float(stamp) - start):8.1f} ms  {event:<16} {detail}")

    llm.generate([{"prompt_token_ids": [5, 6, 7, 8] * 64}], params, use_tqdm=False)
    wait_until_serving(llm, params)
    scenarios = args.scenarios.split(",")
    if "twice" in scenarios:
        prompt = [[4000 + (i % 5000) for i in range(15_000)]]
        traced("twice, cold", prompt)
        traced("twice, warm", prompt)
    if "paused" in scenarios:
        prompt = [[9000 + (i % 5000) for i in range(15_000)]]
        traced("paused, cold", prompt)
        time.sleep(1.0)
        traced("paused, warm", prompt)
    if "seed" in scenarios:  # twice: the first of an engine may pay one-time costs (kernels loaded on first use)
        for variant in (0, 2):
            prompts = seed_prompts(variant=variant)
            llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            traced(f"seed, run 2 (prompts {variant})", prompts)
    if "seed_paused" in scenarios:  # the same once run 1's stores are over
        prompts = seed_prompts(variant=1)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        time.sleep(2.0)
        traced("seed, run 2 after a pause", prompts)


if __name__ == "__main__":
    main()
