"""Metric names the worker exposes and those a PromQL expression reads: for the checks of deploy/ (unit and integration)."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from stream.health import Health, export_readiness
from stream.lag import LagMetrics
from stream.prometheus import Metrics


def exported_metric_names() -> set[str]:
    """Sample names the worker can expose: every family of the metric bundles and the readiness
    gauges, with their suffixes."""
    registry = CollectorRegistry()
    Metrics(registry)
    LagMetrics(registry)
    export_readiness(registry, Health())  # streamrec_ready{condition}, streamrec_ready_overall
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bstreamrec_[a-z0-9_]+", expr))
