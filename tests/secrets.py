"""Recognizable test secrets and the scanner that proves none of them leaked."""

from __future__ import annotations

import secrets as _secrets
import threading

__all__ = ["canary", "all_canaries", "find_leaks", "assert_no_leak"]

_LOCK = threading.Lock()
_CANARIES: set[str] = set()


def canary(label: str = "secret") -> str:
    """A fresh secret that the scanners recognise: ``cbtest-<label>-<hex>``."""
    value = f"cbtest-{label}-{_secrets.token_hex(8)}"
    register(value)
    return value


def register(value: str) -> str:
    """Mark a secret made elsewhere (e.g. a provider-issued token) as one to scan for."""
    if len(value) >= 8:
        with _LOCK:
            _CANARIES.add(value)
    return value


def all_canaries() -> frozenset[str]:
    with _LOCK:
        return frozenset(_CANARIES)


def find_leaks(text: str) -> list[str]:
    """The registered secrets that occur in ``text``."""
    return [c for c in all_canaries() if c in text]


def assert_no_leak(text: str, where: str = "output") -> None:
    leaks = find_leaks(text)
    assert not leaks, f"{len(leaks)} test secret(s) leaked into {where}"
