"""kvoffload: offload vLLM's KV cache to pinned CPU memory, local disk and Redis/Valkey."""

from kvoffload.config import ConfigError, Settings, load_settings

__version__ = "0.1.0"
CONNECTOR_NAME = "KVOffloadConnector"

__all__ = ["CONNECTOR_NAME", "ConfigError", "Settings", "__version__", "load_settings"]
