"""The delivery layer: everything that puts the domain (``broker``) to work.

One subpackage per delivery, plus what they share: ``workers.celery`` (the
Celery app, its tasks, result backend and transport), ``workers.api`` (the
HTTP API), ``workers.cli`` (the ``credbroker`` command, the demo and ``up``),
``workers.actions`` (operations the API and the CLI both offer) and
``workers.common`` (Redis wiring, keys, flights, metrics, tracing). The
gateway-facing clients stay here: ``workers.client`` (``BrokerClient``, and
``AsyncBrokerClient`` from ``aclient``) with their shared ``client_core``.
Any module may import ``broker``; ``broker`` never imports ``workers``.
"""
