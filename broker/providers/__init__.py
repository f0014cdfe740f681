"""Built-in provider profiles: ``provider: NAME`` in a server's ``auth_broker`` block.

A profile fills endpoints and settings (explicit keys override it) and may
carry one response adapter for a provider whose token responses are not in
RFC 6749 shape. Imports only ``broker.server_config`` and ``broker.errors``,
so ``broker.servers`` can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..server_config import field_error
from .catalog import PROFILES
from .profile import PARAM_KEYS, Adapter, Profile

__all__ = [
    "Profile",
    "Adapter",
    "PROFILES",
    "PARAM_KEYS",
    "expand_auth_broker",
    "response_adapter",
]


def expand_auth_broker(raw: Mapping[str, Any], label: str) -> Mapping[str, Any]:
    """``raw`` with its named profile filled in; unchanged when it names none."""
    name = raw.get("provider")
    if name is None:
        for key in PARAM_KEYS:
            if key in raw:
                raise field_error(label, f"auth_broker.{key}", "only used with a provider profile")
        return raw
    profile = PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        raise field_error(label, "auth_broker.provider", f"unknown provider (one of {', '.join(PROFILES)})")
    return profile.expand(raw, label)


def response_adapter(provider: str | None) -> Adapter | None:
    """The named profile's response adapter, if it has one."""
    profile = PROFILES.get(provider) if provider else None
    return profile.adapter if profile else None
