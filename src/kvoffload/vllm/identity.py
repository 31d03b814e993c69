"""What both sides derive from vLLM's configuration, computed in one place so they always agree."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from typing import Any

from kvoffload.config import ConfigError, Settings
from kvoffload.errors import UnsupportedModel
from kvoffload.keys import ModelFingerprint
from kvoffload.model_digest import UnreadableModel, digest_directory, resolve_local

logger = logging.getLogger("kvoffload")


def check_supported(vllm_config: Any, kv_cache_config: Any) -> None:
    """Refuse, at engine start and with the reason, a model whose KV cache kvoffload cannot offload.

    Both sides call it before anything else: without it a state-space model got as far as the fingerprint
    (``MambaSpec`` has no ``dtype``) and died with an ``AttributeError``, and a hybrid model with several KV
    cache groups would be offloaded as if it had one."""
    from vllm.v1.kv_cache_interface import MambaSpec

    groups = kv_cache_config.kv_cache_groups
    if any(isinstance(group.kv_cache_spec, MambaSpec) for group in groups):
        raise UnsupportedModel("kvoffload cannot offload this model: it keeps Mamba/linear-attention state caches "
                               "(state-space or Gated-DeltaNet layers), which kvoffload does not store yet; run it "
                               "without --kv-transfer-config")
    if len(groups) != 1:
        raise UnsupportedModel(f"kvoffload supports models with one KV cache group, this one has {len(groups)} "
                               "(hybrid attention); run it without --kv-transfer-config, or keep vLLM's hybrid KV "
                               "cache manager off (--disable-hybrid-kv-cache-manager) so that it has one group")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise UnsupportedModel("kvoffload does not support pipeline parallelism yet; use tensor parallelism or run "
                               "without --kv-transfer-config")


def full_graph_query_len(vllm_config: Any) -> float:
    """The most tokens one request of a step may compute for vLLM to replay a *full* CUDA graph for the step
    (0: never, ``inf``: in every step).

    A full graph replays the attention layers without calling the per-layer hooks (``wait_for_layer_load``,
    ``save_kv_layer``), so a load in such a step must be in before the forward starts and its stores go out
    after it. vLLM replays one, in its default mode (``FULL_AND_PIECEWISE``) and in ``FULL_DECODE_ONLY``, for a
    batch of uniform decodes: every request computes one token, plus its speculative tokens (0.32's V2 runner
    also takes mixes of 1 to that many); in mode ``FULL``, for any batch it captured. The answer is an upper
    bound, so a step it names may still run piecewise: the loads then only skip the overlap with the forward."""
    from vllm.config import CUDAGraphMode

    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is None or not mode.has_full_cudagraphs():
        return 0
    if mode.mixed_mode() == CUDAGraphMode.FULL:
        return math.inf
    speculative = vllm_config.speculative_config
    return 1 + (speculative.num_speculative_tokens if speculative is not None else 0)


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
    """The model's identity as far as KV is concerned: shapes, effective config and weight content.

    The path or hub id is kept for logs but proves nothing on its own: weights overwritten in place or an
    ``hf_overrides`` change (``rope_theta``) give the same name and other KV, so both the effective config
    and a digest of the weight files are part of it (``kvoffload.model_digest``)."""
    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    model = vllm_config.model_config
    return ModelFingerprint(
        model=str(model.model), revision=getattr(model, "revision", None), kv_dtype=str(spec.dtype),
        num_layers=len(group.layer_names), num_kv_heads=getattr(spec, "num_kv_heads", 0),
        head_size=getattr(spec, "head_size", 0), block_size=spec.block_size, page_bytes=spec.page_size_bytes,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        config=_config_digest(vllm_config), weights=_weights_digest(vllm_config),
    )


def _config_digest(vllm_config: Any) -> str:
    model = vllm_config.model_config
    cache = getattr(vllm_config, "cache_config", None)
    hf_config = getattr(model, "hf_config", None)
    overrides = getattr(model, "hf_overrides", None)
    parts = {
        # the config vLLM runs, after hf_overrides: covers config.json's content and every override
        "hf_config": _config_text(hf_config),
        # a callable override is identified by its name only: its effect is in hf_config above
        "hf_overrides": json.dumps(overrides, sort_keys=True, default=repr) if not callable(overrides)
        else getattr(overrides, "__qualname__", repr(overrides)),
        "dtype": str(getattr(model, "dtype", "")),
        "quantization": str(getattr(model, "quantization", "")),
        "cache_dtype": str(getattr(cache, "cache_dtype", "")),
        "calculate_kv_scales": str(getattr(cache, "calculate_kv_scales", "")),
        "load_format": str(_load_format(vllm_config)),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _config_text(hf_config: Any) -> str:
    """The effective config as JSON, without where it was read from or which transformers wrote it: the same
    model at another path (another machine of a fleet) has the same identity."""
    if not hasattr(hf_config, "to_dict"):
        return ""
    fields = {k: v for k, v in hf_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return json.dumps(fields, sort_keys=True, default=repr)


def _load_format(vllm_config: Any) -> str:
    return str(getattr(getattr(vllm_config, "load_config", None), "load_format", "auto"))


def _weights_digest(vllm_config: Any) -> str:
    """The weight files' digest, ``"dummy"`` for vLLM's dummy weights (fixed-seed random values given by the
    config), ``""`` when the files cannot be found or read (then nothing is kept beyond this engine)."""
    if _load_format(vllm_config) == "dummy":
        return "dummy"
    model = vllm_config.model_config
    name = str(getattr(model, "model_weights", "") or model.model)
    path = resolve_local(name, getattr(model, "revision", None))
    if path is None:
        _warn_unidentified(name, "no local directory or hub cache entry holds its files")
        return ""
    try:
        return _model_digest(str(path.resolve()))
    except UnreadableModel as exc:
        _warn_unidentified(name, str(exc))
        return ""


@functools.lru_cache(maxsize=None)
def _model_digest(path: str) -> str:
    return digest_directory(path)  # once per process: vLLM loads a model's weights once


@functools.lru_cache(maxsize=None)
def _warn_unidentified(name: str, why: str) -> None:
    logger.warning("kvoffload: cannot identify the weights of %s (%s): the disk and remote tiers are off for "
                   "this engine, since KV stored there could not be proven to be this model's; the host pool "
                   "still serves this engine", name, why)


def adapter_digest(lora_request: Any) -> str | None:
    """A LoRA adapter's content digest, or None if its files cannot be read (the request then bypasses
    kvoffload: its KV could not be told apart from another adapter's).

    Read once per adapter id and path, as vLLM loads an adapter once per id: a name that comes back with a
    new id or another path is read again, so a replaced adapter never shares the old one's KV."""
    return _adapter_digest(int(getattr(lora_request, "lora_int_id", 0)), str(getattr(lora_request, "lora_path", "")))


@functools.lru_cache(maxsize=256)
def _adapter_digest(lora_int_id: int, lora_path: str) -> str | None:
    path = resolve_local(lora_path) if lora_path else None
    if path is None:
        logger.warning("kvoffload: cannot read LoRA adapter %s: its requests bypass kvoffload", lora_path)
        return None
    try:
        return digest_directory(str(path.resolve()))
    except UnreadableModel as exc:
        logger.warning("kvoffload: %s: requests with this LoRA adapter bypass kvoffload", exc)
        return None

