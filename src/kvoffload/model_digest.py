"""Digests of what a model's (or LoRA adapter's) KV depends on, read from its files, not from its name.

A path or a hub id names a place, not weights: a directory whose weights were overwritten in place, or a
hub id served without a pinned revision, would otherwise share stored KV with the model it replaced. The
digest covers

* every JSON file of the directory but the tokenizer's (``config.json``, quantization configs,
  ``*.safetensors.index.json``, ``adapter_config.json``): their content, whole;
* every weight file: its size, and for safetensors its header (names, dtypes, shapes, offsets) and the
  first and last 4 KiB of every tensor's data; for other formats 64 KiB at 16 evenly spaced offsets.

Sampling keeps it cheap (an 8B model: ~800 small reads, from the page cache since vLLM just loaded the
same files) while any retrained, re-initialised or re-quantised tensor changes it: such a change rewrites
every element, and KV-cache scales are tensors of a few bytes, read whole. Two copies of the same files on
different machines give the same digest (nothing depends on paths, times or inodes), so a fleet shares KV.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path

from kvoffload.errors import UnreadableModel

logger = logging.getLogger("kvoffload")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")
#: JSON files that describe text, not weights: they do not change the KV of given token ids.
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "added_tokens.json", "generation_config.json", "chat_template.json",
                   "preprocessor_config.json"}
SAMPLE = 4096
OTHER_SAMPLES, OTHER_SAMPLE = 16, 64 * 1024


def resolve_local(name: str, revision: str | None = None) -> Path | None:
    """A local directory for ``name``: itself, or the hub cache's snapshot of it (no download)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # not a hub id, or not in the cache: the caller decides what that means
        return None


def digest_directory(path: str) -> str:
    """Hex SHA-256 over the directory's configs and sampled weights (see the module docstring)."""
    root = Path(path)
    start = time.perf_counter()
    h = hashlib.sha256(b"kvoffload-files\0")
    try:
        names = sorted(p.name for p in root.iterdir() if p.is_file())
        weights = 0
        for name in names:
            file = root / name
            if name.endswith(".json") and name not in TOKENIZER_FILES:
                h.update(b"\0json\0" + name.encode() + b"\0" + file.read_bytes())
            elif name.endswith(WEIGHT_SUFFIXES):
                weights += 1
                h.update(b"\0weights\0" + name.encode() + b"\0")
                _digest_weight_file(file, h)
    except OSError as exc:
        raise UnreadableModel(f"cannot read {root}: {exc}") from exc
    if weights == 0:
        raise UnreadableModel(f"no weight files in {root}")
    seconds = time.perf_counter() - start
    if seconds > 1.0:
        logger.info("kvoffload: identified the weights in %s in %.1f s", root, seconds)
    return h.hexdigest()


def _digest_weight_file(file: Path, h: "hashlib._Hash") -> None:
    with open(file, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        if file.suffix == ".safetensors":
            _digest_safetensors(fd, size, h)
            return
        for i in range(OTHER_SAMPLES):
            offset = max(size - OTHER_SAMPLE, 0) * i // (OTHER_SAMPLES - 1)
            h.update(os.pread(fd, OTHER_SAMPLE, offset))


def _digest_safetensors(fd: int, size: int, h: "hashlib._Hash") -> None:
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_len > size - 8:
        raise OSError(f"safetensors header of {header_len} bytes in a file of {size}")
    header = os.pread(fd, header_len, 8)
    h.update(header)
    base = 8 + header_len
    for name, tensor in sorted(json.loads(header).items()):
        if name == "__metadata__":
            continue
        begin, end = tensor["data_offsets"]
        h.update(os.pread(fd, min(SAMPLE, end - begin), base + begin))
        if end - begin > SAMPLE:
            tail = max(begin + SAMPLE, end - SAMPLE)
            h.update(os.pread(fd, end - tail, base + tail))
