"""The Grafana dashboard in examples/grafana queries only metrics that kvoffload exports, and shows the key ones.

The exported names come from the code: :class:`KVOffloadPromMetrics` is built on a private Prometheus registry and
the names are read back from its samples (``_total`` for counters, as Prometheus exposes them).
"""

import functools
import json
import re
import types
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvoffload.vllm.stats import KVOffloadPromMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana" / "kvoffload.json"
KEY_METRICS = {"kvoffload:hit_tokens_total", "kvoffload:lookup_tokens_total", "kvoffload:loaded_bytes_total",
               "kvoffload:load_seconds_total", "kvoffload:pool_used_bytes", "kvoffload:pool_bytes",
               "kvoffload:evictions_total", "kvoffload:persist_failures_total"}


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    types_ = {cls: functools.partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    KVOffloadPromMetrics(types.SimpleNamespace(kv_transfer_config=None), types_, ["model_name", "engine"],
                         {0: ["model", "0"]})
    return {s.name for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


def dashboard_metrics() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs
    return {m for e in exprs for m in re.findall(r"kvoffload:[A-Za-z0-9_]+", e)}


def test_dashboard_queries_only_exported_metrics():
    unknown = dashboard_metrics() - exported_names()
    assert not unknown, f"dashboard queries metrics kvoffload does not export: {sorted(unknown)}"


def test_dashboard_shows_key_metrics():
    assert KEY_METRICS <= exported_names()
    assert KEY_METRICS <= dashboard_metrics()


def page_metrics() -> set[str]:
    """Metric names in docs/monitoring.md's table, ``{a,b}`` groups expanded."""
    text = (DASHBOARD.parents[2] / "docs" / "monitoring.md").read_text()
    names: set[str] = set()
    for cell in re.findall(r"`(kvoffload:[^`]+)`", text):
        expanded = [cell]
        while any("{" in n for n in expanded):
            expanded = [n[:n.index("{")] + alt + n[n.index("}") + 1:]
                        for n in expanded for alt in n[n.index("{") + 1:n.index("}")].split(",")]
        names.update(expanded)
    return names


def test_monitoring_page_lists_every_exported_metric():
    assert page_metrics() == exported_names()
