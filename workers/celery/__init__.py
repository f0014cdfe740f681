"""The Celery runtime: the app, its queues and task names in ``app``; the
flight tasks (resolve, refresh, the due scan, audit persistence) in ``tasks``
with the scan's budget in ``refresh_scan``; warming and webhook delivery in
``tasks_events``; audit retention in ``retention``; the result backend
(``backend``) and kombu transport (``transport``) that Celery loads by class
path. It may import ``broker``, ``workers.common`` and ``workers.actions``;
the client and the API import only ``app`` from here, to send tasks by name.
"""
