"""Chunk keys: which stored bytes belong to which tokens, provably.

A key is a chained SHA-256: ``key[i] = sha256(key[i-1] || tokens of chunk i)``, seeded by a namespace
that hashes the model fingerprint and the request's ``cache_salt`` and LoRA adapter. Two requests get the
same key for chunk *i* only if their first *i+1* chunks hold the same tokens under the same model, KV
layout and adapter. The hash never depends on ``PYTHONHASHSEED``, the process or the vLLM version's own
block hash, so keys are stable across processes and restarts: the disk tier relies on that.

The last, partial chunk of a prompt gets a key too; its length is part of the hashed bytes, so it can
never be confused with a whole chunk or with a partial chunk of another length.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

#: Bumped whenever the bytes a key stands for change meaning (page layout, header, hashing, identity).
FORMAT_VERSION = 2
KEY_BYTES = 32


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything that decides whether KV bytes computed elsewhere are valid here."""

    model: str
    revision: str | None
    kv_dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    page_bytes: int
    tp_size: int
    #: Digest of the effective model config (``hf_overrides`` applied), dtype, quantization, KV-cache dtype and
    #: scales, load format: whatever changes the KV of the same tokens with the same weights.
    config: str = ""
    #: Digest of the weight files' content (``kvoffload.model_digest``); ``""`` when unidentified.
    weights: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def identified(self) -> bool:
        """Whether the weights were identified by content; only then may KV be kept beyond this engine."""
        return bool(self.weights)

    def digest(self) -> bytes:
        fields = sorted(asdict(self).items())
        text = ";".join(f"{k}={v}" for k, v in fields)
        return hashlib.sha256(b"kvoffload-model\0" + text.encode()).digest()

    def short(self) -> str:
        """A 16-hex-digit name for directories and logs."""
        return self.digest().hex()[:16]


def request_namespace(model: ModelFingerprint, cache_salt: str | None = None, adapter: str | None = None) -> bytes:
    """The seed of a request's key chain: the model plus anything that changes KV for the same tokens.

    ``adapter`` is the LoRA adapter's content digest (``kvoffload.model_digest``), never its name: a name
    can point to other weights after a reload or a restart."""
    h = hashlib.sha256(b"kvoffload-ns\0")
    h.update(model.digest())
    h.update(b"\0salt\0" + (cache_salt or "").encode())
    h.update(b"\0lora\0" + (adapter or "").encode())
    return h.digest()


def chunk_keys(namespace: bytes, token_ids: Sequence[int], chunk_size: int, start_key: bytes | None = None,
               start_chunk: int = 0, include_partial: bool = True) -> list[bytes]:
    """Keys of the chunks of ``token_ids``: whole chunks, then the trailing partial one if asked.

    ``start_chunk``/``start_key`` continue a chain already computed for the first ``start_chunk`` chunks,
    so a growing request hashes each token once.
    """
    tokens = np.asarray(token_ids, dtype=np.int64)
    n_whole = len(tokens) // chunk_size
    keys: list[bytes] = []
    parent = start_key if start_key is not None else namespace
    for i in range(start_chunk, n_whole):
        parent = _link(parent, tokens[i * chunk_size:(i + 1) * chunk_size])
        keys.append(parent)
    rest = len(tokens) - n_whole * chunk_size
    if include_partial and rest and start_chunk <= n_whole:
        keys.append(_link(parent, tokens[n_whole * chunk_size:]))
    return keys


def with_state_key(key: bytes) -> bytes:
    """The key under which the persistent tiers keep chunk ``key`` together with the recurrent state after its last
    token (a model with Mamba/linear-attention state groups).

    vLLM keeps such a state only at a few boundaries, so one chunk has two payloads: with a valid state page and
    without. Two keys let a tier stay a plain key -> bytes store, and tell a lookup from existence alone which
    chunks on disk or in Redis may end a hit (``kvoffload.vllm.persistent``)."""
    return hashlib.sha256(b"kvoffload-state\0" + key).digest()


def _link(parent: bytes, chunk: np.ndarray) -> bytes:
    h = hashlib.sha256(parent)
    h.update(len(chunk).to_bytes(4, "little"))
    h.update(chunk.astype("<i8", copy=False).tobytes())
    return h.digest()
