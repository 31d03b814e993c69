"""Every error kvoffload raises on purpose, in one hierarchy.

A user (or a framework embedding vLLM) can catch :class:`KVOffloadError` to tell kvoffload's refusals from
anything else. Each class also derives from the built-in exception its callers expected before this module
existed (``ValueError`` for bad input, ``RuntimeError`` for an environment that cannot run), so existing
``except ValueError`` code keeps working. Each message says what is wrong and what to do; none of them is an
internal failure to report, except where the message says so.
"""

from __future__ import annotations


class KVOffloadError(Exception):
    """Base class of kvoffload's own errors."""


class ConfigError(KVOffloadError, ValueError):
    """A setting is wrong. The message names the key, the value, its source and the accepted form."""


class UnsupportedVLLM(KVOffloadError, RuntimeError):
    """The installed vLLM is a release kvoffload does not know; it refuses to run rather than half-work."""


class UnsupportedModel(KVOffloadError, ValueError):
    """The model's KV cache is of a kind kvoffload cannot offload (state caches, several groups, pipeline
    parallel); the message says which and that the model runs without the connector."""


class UnsupportedLayout(UnsupportedModel):
    """The KV cache tensor is not made of contiguous per-block pages; kvoffload cannot copy it safely."""


class ExtensionUnavailable(KVOffloadError, RuntimeError):
    """The CUDA extension is neither installed nor buildable here; ``make_copy_backend`` falls back to torch."""


class UnreadableModel(KVOffloadError):
    """The files behind a model or adapter cannot be found or read: its KV cannot be identified."""


class BadEntry(KVOffloadError, ValueError):
    """A stored entry that must not be served; the message says why (for logs and ``cache verify``)."""
