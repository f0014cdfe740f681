"""The HTTP API (Starlette under uvicorn): routes and the app in ``app``, the
edge (API keys, request ids, error bodies) in ``edge``, request validation in
``input``, the connect flow's endpoints and pages in ``connect`` and
``pages``, warm and event endpoints in ``events``, the OpenAPI document in
``openapi``. It may import ``broker``, ``workers.common``,
``workers.actions``, ``workers.client`` and task names from
``workers.celery.app``; nothing outside the CLI imports it.
"""
