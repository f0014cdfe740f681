"""The Celery app at its former path, for ``celery -A workers.celery_app`` in
existing deployments; the app lives in ``workers.celery.app``."""

from workers.celery.app import app, make_celery

__all__ = ["app", "make_celery"]
