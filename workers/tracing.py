"""OpenTelemetry tracing, off unless ``CREDBROKER_TRACING`` is set (optional extra ``tracing``).

One trace per resolve miss: the API's server span (Starlette instrumentation),
the task publish and the task run (Celery instrumentation, which carries the
trace context in the task's message headers), and the provider call
(httpx instrumentation), in whichever process each happens.

``CREDBROKER_TRACING`` picks the exporter: ``otlp`` (OTLP over HTTP, set up
by the standard ``OTEL_EXPORTER_OTLP_*`` variables), ``console`` (JSON on
stderr) or ``jsonl:PATH`` (one JSON span per line appended to PATH, for
development and tests). ``OTEL_SERVICE_NAME`` overrides the service names
(``credbroker-api``, ``credbroker-worker``).

No secret reaches a span: task arguments are a user id and a server name and
are not recorded; results are not recorded; outbound requests record the
method, URL and status of the authorization server's endpoints (which carry
no secret), never a header or body; the browser callback, whose query holds
the authorization code and state, is not traced at all.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

__all__ = ["TRACING_VARIABLE", "tracing_mode", "setup_tracing", "instrument_api", "reset_tracing", "JsonLinesExporter"]

log = logging.getLogger(__name__)

TRACING_VARIABLE = "CREDBROKER_TRACING"
# Paths never traced: the browser connect routes carry the state (and the callback the code).
EXCLUDED_URLS = "/v1/connect/callback,/v1/connect/open,/v1/connect/confirm,/healthz,/readyz,/metrics"

_lock = threading.Lock()
_provider: Any = None


def tracing_mode(environ: Mapping[str, str] | None = None) -> str | None:
    """The configured exporter (``otlp``, ``console``, ``jsonl:PATH``), or None when tracing is off."""
    if environ is None:
        from .embedded import configured  # the environment over .env, as every setting

        environ = configured()
    value = environ.get(TRACING_VARIABLE, "").strip()
    if not value or value.lower() in ("0", "off", "false", "none"):
        return None
    if value in ("otlp", "console") or (value.startswith("jsonl:") and len(value) > len("jsonl:")):
        return value
    raise ConfigError(f"{TRACING_VARIABLE}: expected otlp, console or jsonl:PATH")


class JsonLinesExporter:
    """A span exporter appending one JSON object per span to a file (safe across forked processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n" for span in spans)
        # One append of whole lines per batch: concurrent writers never interleave within a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _exporter(mode: str) -> tuple[Any, bool]:
    """The exporter for a mode, and whether it must be called synchronously (a file)."""
    if mode == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(), False
    if mode == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(), True
    return JsonLinesExporter(mode.split(":", 1)[1]), True


def setup_tracing(service: str, environ: Mapping[str, str] | None = None, *, exporter: Any = None) -> Any:
    """Install a tracer provider and the Celery and httpx instrumentations, once per process.

    Returns the provider, or None when tracing is off (no ``CREDBROKER_TRACING``
    and no ``exporter`` given). ``exporter`` (e.g. an in-memory one in tests)
    is used as is, synchronously.
    """
    global _provider
    mode = tracing_mode(environ)
    if exporter is None and mode is None:
        return None
    with _lock:
        if _provider is not None:
            return _provider
        try:
            from opentelemetry import trace
            from opentelemetry.instrumentation.celery import CeleryInstrumentor
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError:
            raise ConfigError(f"{TRACING_VARIABLE} is set but OpenTelemetry is not installed: "
                              "pip install 'credential-broker[tracing]'") from None
        env = os.environ if environ is None else environ
        provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            assert mode is not None
            made, synchronous = _exporter(mode)
            provider.add_span_processor(SimpleSpanProcessor(made) if synchronous else BatchSpanProcessor(made))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument(tracer_provider=provider)
        HTTPXClientInstrumentor().instrument(tracer_provider=provider)
        _provider = provider
        log.info("tracing on (%s) as %s", mode or "given exporter", service)
        return provider


def instrument_api(app: Any, environ: Mapping[str, str] | None = None) -> None:
    """Trace the API's requests when tracing is on (a no-op otherwise)."""
    provider = setup_tracing("credbroker-api", environ) if _provider is None else _provider
    if provider is None:
        return
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.util.http import parse_excluded_urls

    try:  # span names by route ("POST /v1/resolve"), as the Starlette instrumentation names them
        from opentelemetry.instrumentation.starlette import _get_default_span_details as details
    except ImportError:
        details = None
    # The Starlette instrumentation's own middleware, with our exclusions rather than an environment variable's.
    app.add_middleware(OpenTelemetryMiddleware, excluded_urls=parse_excluded_urls(EXCLUDED_URLS),
                       default_span_details=details, tracer_provider=provider)


def reset_tracing() -> None:
    """Undo the instrumentations (for tests that must not leave them to the next test)."""
    global _provider
    with _lock:
        if _provider is None:
            return
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        CeleryInstrumentor().uninstrument()
        HTTPXClientInstrumentor().uninstrument()
        _provider.shutdown()
        _provider = None


def _on_worker_init(**_: Any) -> None:
    # In the worker's main process, before the pool forks: the provider and the
    # instrumentations' signal handlers are inherited by every pool process.
    setup_tracing("credbroker-worker")


def connect_worker_signals() -> None:
    """Set tracing up in Celery workers when it is configured."""
    from celery.signals import worker_init

    worker_init.connect(_on_worker_init, weak=False)
