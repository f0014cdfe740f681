"""A minimal Django project serving django-oauth-toolkit, for the interop tests.

Started as its own process by ``tests/interop/dot.py``; configured only by the
``DOT_*`` environment variables read in ``settings.py``. Nothing here is
imported by the broker.
"""
