"""What both sides derive from vLLM's configuration, computed in one place so they always agree."""

from __future__ import annotations

from typing import Any

from kvoffload.config import ConfigError, Settings
from kvoffload.keys import ModelFingerprint


def slots_per_worker(settings: Settings, world_size: int, slot_bytes: int) -> int:
    """Chunk slots in each worker's share of the host pool; a pool smaller than one chunk is a config error."""
    slots = (settings.cpu_pool_bytes // world_size) // slot_bytes
    if slots == 0:
        raise ConfigError(
            f"invalid value {settings.max_local_cpu_size!r} for 'max_local_cpu_size' "
            f"(from {settings.sources.get('max_local_cpu_size')}): one chunk of this model takes "
            f"{slot_bytes * world_size / 1e9:.3f} GB; expected at least that"
        )
    return slots


def pages_per_chunk(settings: Settings, kv_cache_config: Any) -> int:
    """vLLM blocks per chunk; a chunk must be whole blocks, so ``chunk_size`` must be a multiple of them."""
    block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    if settings.chunk_size % block_size:
        raise ConfigError(
            f"invalid value {settings.chunk_size!r} for 'chunk_size' (from {settings.sources.get('chunk_size')}): "
            f"expected a multiple of this engine's KV block size {block_size}"
        )
    return settings.chunk_size // block_size


def model_fingerprint(vllm_config: Any, kv_cache_config: Any) -> ModelFingerprint:
    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    model = vllm_config.model_config
    return ModelFingerprint(
        model=str(model.model), revision=getattr(model, "revision", None), kv_dtype=str(spec.dtype),
        num_layers=len(group.layer_names), num_kv_heads=getattr(spec, "num_kv_heads", 0),
        head_size=getattr(spec, "head_size", 0), block_size=spec.block_size, page_bytes=spec.page_size_bytes,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
    )

