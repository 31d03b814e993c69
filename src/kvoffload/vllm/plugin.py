"""vLLM plugin entry point (``vllm.general_plugins``): makes ``"kv_connector": "KVOffloadConnector"`` work.

vLLM calls :func:`register` once in each of its processes (front-end, EngineCore, workers, the model
inspection subprocess). It must be cheap and touch no device: a CUDA call here would force vLLM to
spawn its workers. Registering lazily by module path keeps the import light; a second registration in
the same process is a no-op.
"""

from __future__ import annotations

from kvoffload import CONNECTOR_NAME


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvoffload.vllm.connector", CONNECTOR_NAME)
