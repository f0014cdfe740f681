"""Process-local counters and histograms, rendered in Prometheus text format."""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["Metrics", "METRICS", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join('{}="{}"'.format(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")) for k, v in labels)
    return "{" + inner + "}"


class Metrics:
    """Counters and histograms with fixed label sets; labels never hold user data."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._help: dict[str, tuple[str, str]] = {}
        self._hist: dict[str, dict[tuple[tuple[str, str], ...], list[float]]] = defaultdict(dict)

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._hist[name].get(key)
            if series is None:
                series = self._hist[name][key] = [0.0] * (len(LATENCY_BUCKETS) + 2)
            for i, bound in enumerate(LATENCY_BUCKETS):
                if value <= bound:
                    series[i] += 1
            series[-2] += 1  # count
            series[-1] += value  # sum

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                kind, text = self._help.get(name, ("counter", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for key, v in sorted(series.items()):
                    lines.append(f"{name}{_labels(key)} {v:g}")
            for name, hseries in sorted(self._hist.items()):
                _, text = self._help.get(name, ("histogram", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                for key, b in sorted(hseries.items()):
                    for i, bound in enumerate(LATENCY_BUCKETS):
                        lines.append(f"{name}_bucket{_labels(key + (('le', f'{bound:g}'),))} {b[i]:g}")
                    lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {b[-2]:g}")
                    lines.append(f"{name}_count{_labels(key)} {b[-2]:g}")
                    lines.append(f"{name}_sum{_labels(key)} {b[-1]:.6f}")
        return "\n".join(lines) + "\n"


METRICS = Metrics()
METRICS.describe("credbroker_resolves_total", "counter", "Resolves by outcome (error code or ok) and path (fast or flight)")
METRICS.describe("credbroker_resolve_seconds", "histogram", "Resolve latency by path")
METRICS.describe("credbroker_flight_joins_total", "counter", "Resolves that joined a flight another caller started")
METRICS.describe("credbroker_flights_started_total", "counter", "Flights started by this process")


# -- cluster-wide counters -----------------------------------------------------------
# Provider calls, refreshes and beat scans happen in worker processes; they are
# counted in one Redis hash so any API process can serve them on /metrics.

CLUSTER_HASH = "credbroker:metrics"
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
}


def _field(name: str, labels: dict[str, str]) -> str:
    return name + _labels(tuple(sorted(labels.items())))


def cluster_incr(client: object, name: str, amount: int = 1, **labels: str) -> None:
    """Count an event cluster-wide; a Redis outage only loses the count."""
    try:
        client.hincrby(CLUSTER_HASH, _field(name, labels), amount)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass


def cluster_set(client: object, name: str, value: float, **labels: str) -> None:
    try:
        client.hset(CLUSTER_HASH, _field(name, labels), value)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass


def render_cluster(client: object) -> str:
    raw = client.hgetall(CLUSTER_HASH)  # type: ignore[attr-defined]
    series: dict[str, list[str]] = {}
    for field, value in sorted((k.decode() if isinstance(k, bytes) else k, v) for k, v in raw.items()):
        name = field.split("{", 1)[0]
        number = float(value.decode() if isinstance(value, bytes) else value)
        series.setdefault(name, []).append(f"{field} {number:g}")
    lines: list[str] = []
    for name, rows in series.items():
        kind, text = _CLUSTER_HELP.get(name, ("counter", name))
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *rows]
    return "\n".join(lines) + ("\n" if lines else "")
