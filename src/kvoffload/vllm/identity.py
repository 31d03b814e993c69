"""The model fingerprint of a running vLLM engine, computed the same way on both sides."""

from __future__ import annotations

from typing import Any

from kvoffload.keys import ModelFingerprint


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
