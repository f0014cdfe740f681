"""What every delivery shares: Redis connections and deadlines, key names,
single-flight claims and result waiting, sealed wire envelopes, outcomes, the
audit stream, metrics, tracing, the per-server upstream guard (limit and
breaker), the per-process ``Runtime`` and the local state folder that ``up``
fills in (``embedded``). It may import ``broker`` and third-party libraries
only; nothing here imports another ``workers`` subpackage, so the client, the
API, the CLI and the Celery tasks can all stand on it.
"""
