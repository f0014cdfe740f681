"""Metrics on ``prometheus_client``: per-process ones, and cluster-wide ones kept in Redis.

Two kinds, because of where things happen:

- **Per process** (resolves, flights, HTTP requests, connect callbacks): counted
  by the process that serves the call, the API or a gateway's BrokerClient, in
  ``prometheus_client`` metrics on this module's registry. Each API process
  serves its own on ``/metrics``; scrape every replica. Several processes
  behind one port (e.g. uvicorn ``--workers``) use ``prometheus_client``'s
  multi-process mode: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder for
  all of them and ``/metrics`` serves the sum.
- **Cluster-wide** (provider calls, refreshes, beat scans): these happen in
  worker pool processes, prefork or threaded, on any host, none of which
  serves HTTP; they are added up in one Redis hash (``cluster_incr``), read at
  scrape time by a ``prometheus_client`` collector. Every API process shows
  the same cluster totals.

Metric names are those of the hand-rolled exporter this replaces; labels never
hold user data (no user id, no server name from a request).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .constants import metrics_hash

__all__ = ["Metrics", "METRICS", "LATENCY_BUCKETS", "CLUSTER_HASH", "ClusterCollector", "cluster_incr",
           "DeferredCounts",
           "cluster_set", "render_cluster"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


def _base(name: str) -> str:
    """prometheus_client names a counter without ``_total`` and adds it to the sample."""
    return name[: -len("_total")] if name.endswith("_total") else name


class Metrics:
    """Counters, gauges and histograms by name, each with a fixed label set.

    A thin facade over ``prometheus_client`` so call sites say
    ``METRICS.inc("credbroker_resolves_total", outcome="ok", path="fast")``;
    a metric is created on first use, with the label names of that use.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._metrics: dict[str, Any] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        if kind not in _KINDS:
            raise ValueError(f"unknown metric kind {kind!r}")
        self._help[name] = (kind, text)

    def _metric(self, name: str, default_kind: str, labels: dict[str, str]) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            with self._lock:
                metric = self._metrics.get(name)
                if metric is None:
                    kind, text = self._help.get(name, (default_kind, name))
                    options: dict[str, Any] = {"buckets": LATENCY_BUCKETS} if kind == "histogram" else {}
                    if kind == "gauge" and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                        options["multiprocess_mode"] = "livesum"
                    metric = _KINDS[kind](_base(name) if kind == "counter" else name, text,
                                          labelnames=sorted(labels), registry=self.registry, **options)
                    self._metrics[name] = metric
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._metric(name, "counter", labels).inc(amount)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._metric(name, "gauge", labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._metric(name, "histogram", labels).observe(value)

    def value(self, name: str, **labels: str) -> float:
        """This process's current value of a counter or gauge (0 when never touched)."""
        found = self.registry.get_sample_value(name, labels)
        return float(found) if found is not None else 0.0

    def render(self) -> str:
        """The Prometheus text format: this process's metrics, or all processes' in multi-process mode."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)
            return generate_latest(combined).decode()
        return generate_latest(self.registry).decode()


def _no_created_series() -> None:
    # The *_created samples add a series per label set and say nothing a scrape needs.
    try:
        from prometheus_client import disable_created_metrics

        disable_created_metrics()
    except ImportError:  # older prometheus_client: they stay
        pass


_no_created_series()
METRICS = Metrics()
METRICS.describe("credbroker_resolves_total", "counter", "Resolves by outcome (error code or ok) and path (fast or flight)")
METRICS.describe("credbroker_resolve_seconds", "histogram", "Resolve latency by path")
METRICS.describe("credbroker_flight_joins_total", "counter", "Resolves that joined a flight another caller started")
METRICS.describe("credbroker_flights_started_total", "counter", "Flights started by this process")


# -- cluster-wide counters -----------------------------------------------------------
# Provider calls, refreshes and beat scans happen in worker processes; they are
# counted in one Redis hash so any API process can serve them on /metrics. A
# field is one sample in the text format, ``name{label="value"}``.

CLUSTER_HASH = "credbroker:metrics"  # in the empty namespace; see ``metrics_hash``
_CLUSTER_HELP = {
    "credbroker_provider_calls_total": ("counter", "Authorization-server calls by grant and result, cluster-wide"),
    "credbroker_refreshes_total": ("counter", "Credential renewals by trigger (resolve or proactive) and outcome"),
    "credbroker_beat_scans_total": ("counter", "Proactive refresh scans run"),
    "credbroker_credentials_due": ("gauge", "Credentials due in the last beat scan"),
    "credbroker_refresh_flights_sent_total": ("counter", "Proactive refresh flights sent by the beat"),
    "credbroker_refresh_queue_depth": ("gauge", "Refresh tasks waiting in the refresh queue at the last scan"),
    "credbroker_server_circuit_state": ("gauge", "Circuit breaker per server: 0 closed, 1 open, 2 half-open"),
    "credbroker_server_refusals_total": ("counter", "Calls the broker declined by server and reason "
                                         "(circuit_open, server_busy)"),
    "credbroker_rotation_lost_total": ("counter", "Refresh tokens found spent by a flight whose outcome was lost "
                                                  "(lease expired mid-call); each user must reconnect"),
}


def _field(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join('{}="{}"'.format(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " "))
                     for k, v in sorted(labels.items()))
    return name + "{" + inner + "}"


class DeferredCounts:
    """Cluster counts gathered on the threads of one unit of work (a bulk
    warm's batch) and written in one round trip, instead of one per event."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, field: str, amount: int) -> None:
        with self._lock:
            self._counts[field] = self._counts.get(field, 0) + amount

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` with this thread's cluster counts going here."""
        previous = getattr(_deferred, "sink", None)
        _deferred.sink = self
        try:
            return fn(*args)
        finally:
            _deferred.sink = previous

    def flush(self, pipe: Any) -> None:
        """Queue the gathered counts on a Redis pipeline (the caller executes it)."""
        with self._lock:
            counts, self._counts = self._counts, {}
        for field, amount in counts.items():
            pipe.hincrby(metrics_hash(), field, amount)


_deferred = threading.local()


def cluster_incr(client: object, name: str, amount: int = 1, **labels: str) -> None:
    """Count an event cluster-wide; a Redis outage only loses the count."""
    sink = getattr(_deferred, "sink", None)
    if sink is not None:
        sink.add(_field(name, labels), amount)
        return
    try:
        client.hincrby(metrics_hash(), _field(name, labels), amount)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass


def cluster_set(client: object, name: str, value: float, **labels: str) -> None:
    try:
        client.hset(metrics_hash(), _field(name, labels), value)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass


class ClusterCollector(Collector):
    """The cluster-wide counters, read from Redis at each scrape."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        raw = self.client.hgetall(metrics_hash())
        lines = []
        for field, value in raw.items():
            field = field.decode() if isinstance(field, bytes) else str(field)
            value = value.decode() if isinstance(value, bytes) else str(value)
            lines.append(f"{field} {float(value)!r}")
        families: dict[str, Metric] = {}
        # The stored fields are samples in the text format: let prometheus_client's parser read them.
        for parsed in text_string_to_metric_families("\n".join(sorted(lines)) + "\n"):
            for sample in parsed.samples:
                kind, text = _CLUSTER_HELP.get(sample.name, ("counter", sample.name))
                family = families.get(sample.name)
                if family is None:
                    labels = sorted(sample.labels)
                    family = (CounterMetricFamily(_base(sample.name), text, labels=labels) if kind == "counter"
                              else GaugeMetricFamily(sample.name, text, labels=labels))
                    families[sample.name] = family
                family.add_metric([sample.labels[k] for k in sorted(sample.labels)], sample.value)
        yield from families.values()


def render_cluster(client: object) -> str:
    """The cluster-wide counters in the text format (raises redis.RedisError when Redis is down)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(client))
    return generate_latest(registry).decode()
