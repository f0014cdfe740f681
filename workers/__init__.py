"""The delivery layer: everything that puts the domain (``broker``) to work.

One subpackage per delivery, plus what they share: ``workers.celery`` (the
Celery app, its tasks, result backend and transport), ``workers.api`` (the
HTTP API), ``workers.cli`` (the ``credbroker`` command, the demo and ``up``),
``workers.actions`` (operations the API and the CLI both offer) and
``workers.common`` (Redis wiring, keys, flights, metrics, tracing). The
gateway-facing client stays here, at ``workers.client``. Any module may
import ``broker``; ``broker`` never imports ``workers``.
"""
