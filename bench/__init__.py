"""The credential-broker benchmark: ``python -m bench`` (``--smoke`` for tiny sizes).

Starts what it needs (Redis if absent, the sandbox identity provider, Celery
workers, beat and the HTTP API as separate processes), measures each row
three times or more, and prints a markdown table with every figure beside its
floor. See ``bench/README.md``.
"""
