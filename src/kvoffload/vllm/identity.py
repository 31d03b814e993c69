"""What both sides derive from vLLM's configuration, computed in one place so they always agree."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from kvoffload.config import ConfigError, Settings
from kvoffload.errors import UnsupportedModel
from kvoffload.keys import ModelFingerprint
from kvoffload.model_digest import UnreadableModel, digest_directory, resolve_local

logger = logging.getLogger("kvoffload")


def check_supported(vllm_config: Any, kv_cache_config: Any) -> None:
    """Refuse, at engine start and with the reason, a model whose KV cache kvoffload cannot offload.

    Both sides call it before anything else: without it a state-space model got as far as the fingerprint
    (``MambaSpec`` has no ``dtype``) and died with an ``AttributeError``. Several KV cache groups (vLLM's hybrid
    KV cache manager) are offloaded when every group is full or sliding-window attention or Mamba/linear-attention
    state, with one block size and page size (see :class:`SlotLayout`); other kinds of groups are refused by name.
    State is stored at chunk boundaries, which needs vLLM's align mode (:func:`_check_state_groups`)."""
    groups = kv_cache_config.kv_cache_groups
    kinds = [type(group.kv_cache_spec).__name__ for group in groups]
    if any(map(_is_state, groups)):
        _check_state_groups(vllm_config, kv_cache_config)
    if len(groups) > 1:
        odd = sorted({kind for kind in kinds if kind not in _FULL_SPECS + _SLIDING_SPECS + _STATE_SPECS})
        if odd:
            raise UnsupportedModel(f"kvoffload cannot offload this hybrid model: its KV cache groups include "
                                   f"{', '.join(odd)}, and kvoffload offloads only full and sliding-window attention "
                                   "and Mamba state groups; run it without --kv-transfer-config")
        shapes = {(group.kv_cache_spec.block_size, group.kv_cache_spec.page_size_bytes) for group in groups}
        if len(shapes) != 1:
            raise UnsupportedModel(f"kvoffload cannot offload this hybrid model: its KV cache groups have different "
                                   f"block or page sizes {sorted(shapes)}; run it without --kv-transfer-config, or "
                                   "with --disable-hybrid-kv-cache-manager")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise UnsupportedModel("kvoffload does not support pipeline parallelism yet; use tensor parallelism or run "
                               "without --kv-transfer-config")


def _check_state_groups(vllm_config: Any, kv_cache_config: Any) -> None:
    """Refuse a Mamba / Gated-DeltaNet model whose state kvoffload cannot store at chunk boundaries.

    A hit must resume the recurrent state of exactly its last token. vLLM keeps that state at block boundaries
    only in its align mode (``mamba_cache_mode="align"``, on with prefix caching), and names the block of each
    kept boundary to a connector only from 0.32 on (:data:`kvoffload.vllm.compat.STATE_HANDOFF`). A model of
    state layers only (no attention group) is refused too: its chunks would be the state alone, which is not
    tested."""
    from kvoffload.vllm import compat

    groups = kv_cache_config.kv_cache_groups
    state = [group.kv_cache_spec for group in groups if _is_state(group)]
    if len(state) == len(groups):
        raise UnsupportedModel("kvoffload cannot offload this model: it keeps only Mamba/linear-attention state "
                               "caches (a state-space model without attention layers); run it without "
                               "--kv-transfer-config")
    if not compat.STATE_HANDOFF:
        raise UnsupportedModel(f"kvoffload cannot offload this model on vLLM {compat.vllm.__version__}: it keeps "
                               "Mamba/linear-attention state caches, which kvoffload stores from vLLM 0.32 on (the "
                               "first release that names each boundary state's block); upgrade vLLM or run without "
                               "--kv-transfer-config")
    modes = sorted({getattr(spec, "mamba_cache_mode", "none") for spec in state})
    if modes != ["align"]:
        raise UnsupportedModel(f"kvoffload cannot offload this model with mamba_cache_mode {', '.join(modes)}: its "
                               "Mamba/linear-attention state is kept at chunk boundaries only in vLLM's 'align' "
                               "mode, which prefix caching turns on; drop --no-enable-prefix-caching (or set "
                               "--mamba-cache-mode align), or run without --kv-transfer-config")


@dataclass(frozen=True)
class StorageShare:
    """Which namespace of the disk and remote tiers a worker uses, and whether it writes there."""

    rank: int
    world_size: int
    writes: bool


def storage_share(vllm_config: Any, kv_cache_config: Any, rank: int) -> StorageShare:
    """Rank ``rank``'s share of the persistent tiers.

    With tensor parallelism each rank's KV cache is its own shard (its KV heads), so each rank stores its own
    chunks in a namespace of its own. An MLA model is the exception: its cache is one latent per token,
    computed from all-reduced hidden states, the same bytes on every rank. Storing it once per rank would
    divide what the disk and Redis hold by the TP size, so every rank names rank 0's namespace, rank 0 writes
    it and the others only read it (and report their write-outs done: rank 0's outcome decides). Decode context
    and prefill context parallelism split an MLA cache by token over the ranks: then each keeps its own namespace."""
    parallel = vllm_config.parallel_config
    world_size = parallel.world_size
    specs = {type(group.kv_cache_spec).__name__ for group in kv_cache_config.kv_cache_groups}
    split = parallel.decode_context_parallel_size * parallel.prefill_context_parallel_size
    if world_size > 1 and split == 1 and specs <= set(_MLA_SPECS):
        return StorageShare(rank=0, world_size=1, writes=rank == 0)
    return StorageShare(rank=rank, world_size=world_size, writes=True)


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
#: KV cache spec classes (by name, the same in every supported vLLM release) of full-attention groups, and of
#: sliding-window groups, which kvoffload offloads in a model of several groups. Subclasses with other freeing
#: rules (``RSWASpec`` evicts a middle gap, ``SinkFullAttentionSpec``, chunked-local and circular-buffer groups)
#: are not in either list and are refused: which of their blocks a load must fill is not what :class:`SlotLayout`
#: computes.
_FULL_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")
_SLIDING_SPECS = ("SlidingWindowSpec", "SlidingWindowMLASpec")
_MLA_SPECS = ("MLAAttentionSpec", "SlidingWindowMLASpec")  # one latent per token, the same on every TP rank
_STATE_SPECS = ("MambaSpec",)  # Mamba-1/2, Gated DeltaNet and other linear attention: one state per request


def _is_state(group: Any) -> bool:
    return type(group.kv_cache_spec).__name__ in _STATE_SPECS


@dataclass(frozen=True)
class GroupSlot:
    """Where one KV cache group's pages of a chunk live in a host slot."""

    group: int
    window: int | None  # sliding window in tokens (with vLLM's extra retained tokens); None: full attention
    first_page: int  # slot page of this group's first page
    num_pages: int  # slot pages this group has
    state: bool = False  # a Mamba/linear-attention state group: one page, the state at the chunk's end

    def stored_pages(self, chunk_pages: int, chunk_tokens: int, block_size: int) -> range:
        """The pages of a chunk (chunk page indexes) this group keeps in the slot.

        State: the chunk's last page, whose vLLM block (align mode) holds the state after the chunk's last token,
        when vLLM kept that boundary (the scheduler stores it only then, ``Entry.has_state``).
        Full attention: all of them. Sliding window: the pages holding the ``window`` tokens before the chunk's
        end boundary (``chunk_tokens`` into it), one token more than the window: a load that ends at that boundary
        reads the window of its next token, ``window - 1`` tokens, and a load of a whole prompt ends one token
        short of it (vLLM computes the last token). Those are the only pages of the group vLLM allocates for such a
        load (``SlidingWindowManager``: the blocks below the window are the null block), and the only ones still
        allocated when the chunk is stored: vLLM frees the blocks that left the window as the prefill advances. A
        load ending at a later boundary reads this chunk's pages that are in its own window, a subset of these."""
        if self.state:
            return range(chunk_pages - 1, chunk_pages)
        if self.window is None:
            return range(chunk_pages)
        return range(max(0, (chunk_tokens - self.window) // block_size), chunk_pages)

    def slot_page(self, chunk_pages: int, page: int) -> int:
        """The slot page of chunk page ``page``: a sliding group keeps the last ``num_pages`` pages of the chunk."""
        return self.first_page + page - max(0, chunk_pages - self.num_pages)


@dataclass(frozen=True)
class SlotLayout:
    """What a host slot holds for one chunk, computed alike by the scheduler and the workers.

    A slot is ``(num_layers, pages_per_slot, page_bytes)``: ``num_layers`` memory tensors of vLLM's KV cache
    (with the hybrid manager, the layers of all groups overlay the same tensors, a block id belonging to one
    group at a time, so a group's block is copied across every tensor like a one-group model's), and per group
    the pages it needs (:meth:`GroupSlot.stored_pages`), one group after the other. With one group this is
    exactly the one-group layout of earlier releases (``pages_per_chunk`` pages, bytes unchanged on disk).

    A sliding-window group takes ``min(pages_per_chunk, ceil(window / block) + 1)`` pages (the window at an
    unaligned end, a prompt's last chunk, spans one page more): less than a full group only when the window is
    shorter than a chunk (gpt-oss: 128 tokens, 16-token GPU blocks, 256-token chunks: 9 pages of 16). A model of
    several groups persists whole slots (``payload_pages``): a partial chunk's pages are no longer one prefix.

    Why not key each group's pages apart (as vLLM's native offloading does, a key per block hash and group): one
    key per chunk keeps one lookup, one pin and one disk file per chunk, and a chunk is loadable only when every
    group's pages of it are in, which is what a hit needs."""

    groups: tuple[GroupSlot, ...]
    pages_per_chunk: int
    block_size: int
    num_layers: int
    page_bytes: int

    @functools.cached_property
    def has_state(self) -> bool:
        """Whether a chunk also keeps Mamba/linear-attention state: a hit must then end where a state is stored."""
        return any(group.state for group in self.groups)

    @property
    def chunk_tokens(self) -> int:
        return self.pages_per_chunk * self.block_size

    @property
    def pages_per_slot(self) -> int:
        return sum(group.num_pages for group in self.groups)

    @property
    def slot_bytes(self) -> int:
        return self.num_layers * self.pages_per_slot * self.page_bytes

    @property
    def compact(self) -> bool:
        """Whether a chunk's pages are not simply the first pages of the slot (several groups, or a window
        shorter than a chunk): then a partial chunk is persisted as a whole slot."""
        return len(self.groups) > 1 or self.groups[0].num_pages != self.pages_per_chunk

    def payload_pages(self, chunk_pages: int) -> int:
        """Slot pages a persistent tier keeps for a chunk of ``chunk_pages`` pages."""
        return self.pages_per_slot if self.compact else chunk_pages

    def describe(self) -> str:
        """Per group what is offloaded and what a chunk costs in the host pool, for the start log line. A page is
        one vLLM block across the KV cache tensors; a state group's page is one recurrent state, so its size is
        given per state, not per token (vLLM's align mode makes the attention block as large as a state)."""
        token_bytes = self.num_layers * self.page_bytes / self.block_size
        parts = [f"group {g.group}: " + ("Mamba/linear-attention state" if g.state else "full attention"
                                         if g.window is None else f"sliding window {g.window}")
                 + f", {g.num_pages} pages per chunk" for g in self.groups]
        text = "; ".join(parts) + f"; {token_bytes:.0f} bytes per token and attention group"
        if self.has_state:
            text += f", {self.num_layers * self.page_bytes} bytes per state and state group"
        return text + f"; {self.slot_bytes / 1e6:.3g} MB per chunk slot"


def slot_layout(settings: Settings, kv_cache_config: Any) -> SlotLayout:
    """The :class:`SlotLayout` of this engine's KV cache (call :func:`check_supported` first)."""
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec
    per_chunk = pages_per_chunk(settings, kv_cache_config)
    slots: list[GroupSlot] = []
    first = 0
    for index, group in enumerate(groups):
        window = None
        if type(group.kv_cache_spec).__name__ in _SLIDING_SPECS:
            window = group.kv_cache_spec.sliding_window + getattr(group.kv_cache_spec, "extra_retained_tokens", 0)
        pages = 1 if _is_state(group) else per_chunk if window is None else \
            min(per_chunk, -(-window // spec.block_size) + 1)
        slots.append(GroupSlot(group=index, window=window, first_page=first, num_pages=pages,
                               state=_is_state(group)))
        first += pages
    # With the hybrid manager every group has as many layers as there are memory tensors (vLLM pads groups).
    num_layers = max(len(group.layer_names) for group in groups)
    return SlotLayout(groups=tuple(slots), pages_per_chunk=per_chunk, block_size=spec.block_size,
                      num_layers=num_layers, page_bytes=spec.page_size_bytes)


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
    """vLLM blocks per chunk; a chunk must be whole blocks, so ``chunk_size`` must be a multiple of them.

    Left at its default, a model with Mamba/linear-attention state gets one block per chunk: vLLM keeps a state at
    a few block boundaries only (the last one of each prompt, mostly), and a hit can end only at a chunk's end whose
    state is stored, so a chunk of several blocks would seldom end at one. Other models get the default rounded up
    to whole blocks. A ``chunk_size`` that was set must fit exactly."""
    groups = kv_cache_config.kv_cache_groups
    block_size = groups[0].kv_cache_spec.block_size
    if settings.sources.get("chunk_size", "default") == "default":
        if any(map(_is_state, groups)):
            return 1
        return -(-settings.chunk_size // block_size)
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
    # The first attention group (a Mamba hybrid may list a state group first; check_supported refuses state only).
    group = next(g for g in kv_cache_config.kv_cache_groups if not _is_state(g))
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

