"""credential-broker domain: per-user upstream credentials, minted, stored, refreshed.

This package never imports Celery; ``workers`` is the delivery layer.
"""

__version__ = "0.1.0"
