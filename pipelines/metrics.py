"""Metrics of the batch jobs, with prometheus-client.

A nightly task is gone before Prometheus could scrape it, so each job's metrics are pushed
to a Pushgateway when ``metrics.pushgateway`` is set (the convention for batch jobs), else
written to ``<metrics.textfile_dir>/<job>.prom`` for node_exporter's textfile collector.
Every push replaces the job's previous values for the same project and model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pipelines.config import MetricsConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    name: str
    help: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


def emit(metrics: MetricsConfig, identity: dict[str, str], job: str, samples: list[Sample]) -> str:
    """Push or write ``samples`` as job ``job``, all labelled with ``identity`` (a project's
    ``Project.identity``: its name and its model's); returns where they went."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

    registry = CollectorRegistry()
    gauges: dict[str, Gauge] = {}
    for sample in [*samples, Sample(f"flywheel_{job}_last_run_timestamp_seconds", f"When the {job} job last reported.", time.time())]:
        labels = {**identity, **sample.labels}
        if sample.name not in gauges:
            gauges[sample.name] = Gauge(sample.name, sample.help, sorted(labels), registry=registry)
        gauges[sample.name].labels(**labels).set(sample.value)
    if metrics.pushgateway:
        push_to_gateway(metrics.pushgateway, job=f"flywheel_{job}", registry=registry, grouping_key=identity)
        return metrics.pushgateway
    path = metrics.textfile_dir / f"{job}.prom"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)  # atomic: written beside, then renamed
    return str(path)
