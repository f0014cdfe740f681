"""Operations the HTTP API and the CLI both offer on a user's behalf: listing
and removing credentials, erasing a user, warming a user's credentials.
Plain functions over a ``workers.common.runtime.Runtime``; they may import
``broker`` and ``workers.common``, never the API, the CLI or Celery.
"""
