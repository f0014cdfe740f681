"""The deployment's Redis namespace: one prefix for every key, queue and channel.

``CREDBROKER_NAMESPACE`` lets several deployments share one Redis database.
A process serving one deployment (a worker, the beat, the API) sets it once
from its settings; key functions read it when called, never at import, so a
test or an embedded run can switch it. A client serving a deployment other
than its process's passes its namespace explicitly. The empty namespace keeps
the historical key names, so existing data keeps working.
"""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["set_namespace", "namespace", "key_prefix", "validate_namespace"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_namespace = ""


def validate_namespace(value: str) -> str:
    if value and not _NAME.fullmatch(value):
        raise ConfigError("CREDBROKER_NAMESPACE: letters, digits, '_', '.', '-' (at most 64), "
                          "starting with a letter or digit")
    return value


def set_namespace(value: str) -> None:
    """This process's namespace (from settings, at runtime build)."""
    global _namespace
    _namespace = validate_namespace(value)


def namespace() -> str:
    return _namespace


def key_prefix(ns: str | None = None) -> str:
    """What every Redis name of namespace ``ns`` (default: this process's) starts with."""
    name = _namespace if ns is None else ns
    return name + ":" if name else ""
