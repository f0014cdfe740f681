"""What a provider profile is, and how it fills a server's ``auth_broker`` block.

A profile is data: endpoint templates, defaults for settings and a few quirk
values. ``expand`` merges it under what the servers file says (explicit keys
always win) and renders templates from parameter keys such as ``tenant``.
Pure: no I/O, and every failure is a ConfigError that names the field but
never echoes a value.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..server_config import check_url, field_error, parse_scopes

__all__ = ["Profile", "Adapter", "PARAM_KEYS"]

# Rewrites a provider's parsed token response (success or error) into the
# RFC 6749 shape before the generic parser reads it.
Adapter = Callable[[dict[str, Any]], dict[str, Any]]

# Template parameters a servers file may give; each profile says which it uses.
PARAM_KEYS = ("tenant", "domain", "base_url", "realm")

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")
_HOST = re.compile(r"^(?=.{1,253}(:|$))[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(:[0-9]{1,5})?$")
_REALM = re.compile(r"^[A-Za-z0-9._~-]{1,255}$")


def _check_param(key: str, value: object, label: str) -> str:
    field_name = f"auth_broker.{key}"
    if not isinstance(value, str) or not value.strip():
        raise field_error(label, field_name, "must be a non-empty string")
    if key == "tenant" and not _TENANT.match(value):
        raise field_error(label, field_name, "must be a tenant id or domain (letters, digits, '.' and '-')")
    if key == "domain" and not _HOST.match(value):
        raise field_error(label, field_name, "must be a host name such as example.okta.com (no scheme or path)")
    if key == "realm" and not _REALM.match(value):
        raise field_error(label, field_name, "must contain only letters, digits, '.', '_', '~' and '-'")
    if key == "base_url":
        check_url(value, label, field_name, https=True)
        if "?" in value or "#" in value:
            raise field_error(label, field_name, "must not contain a query or fragment")
        return value.rstrip("/")
    return value


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass(frozen=True)
class Profile:
    """One provider's endpoints, defaults and quirks, filled under explicit keys."""

    name: str
    # auth_broker keys with ``{param}`` templates in strings; explicit keys override.
    fills: Mapping[str, Any]
    # Template parameters this profile takes, with a default (None: required when used).
    params: Mapping[str, str | None] = field(default_factory=dict)
    # Added to the scopes of an oauth_connect server (a refresh token needs them).
    connect_scopes: tuple[str, ...] = ()
    # Response-shape quirk, applied to the parsed JSON before the generic parser.
    adapter: Adapter | None = None
    source: str = ""

    def expand(self, raw: Mapping[str, Any], label: str) -> dict[str, Any]:
        """``raw`` (an auth_broker block naming this profile) with the profile filled in."""
        for key in PARAM_KEYS:
            if key in raw and key not in self.params:
                raise field_error(label, f"auth_broker.{key}", f"not used by provider {self.name}")
        given = {k: _check_param(k, raw[k], label) for k in self.params if raw.get(k) is not None}
        merged = {k: v for k, v in raw.items() if k not in PARAM_KEYS and k != "provider"}
        for key, value in self.fills.items():
            if key == "extra_authorize_params":
                merged[key] = self._authorize_params(value, raw.get(key), label)
            elif key not in merged:
                merged[key] = self._render(value, given, label)
        if self.connect_scopes and merged.get("mode") == "oauth_connect":
            scopes = parse_scopes(merged.get("scopes"), label, "auth_broker.scopes")
            merged["scopes"] = [*scopes, *(s for s in self.connect_scopes if s not in scopes)]
        return merged

    def _render(self, value: Any, given: Mapping[str, str], label: str) -> Any:
        if not isinstance(value, str):
            return value
        values: dict[str, str] = {}
        for name in _fields(value):
            param = given.get(name, self.params.get(name))
            if param is None:
                raise field_error(label, f"auth_broker.{name}", f"required by provider {self.name}")
            values[name] = param
        return value.format(**values)

    @staticmethod
    def _authorize_params(filled: Mapping[str, str], explicit: object, label: str) -> object:
        # Merged key by key, so a servers file can add one parameter or drop one
        # (a null value) without restating the rest.
        if explicit is None:
            return dict(filled)
        if not isinstance(explicit, Mapping):
            return explicit  # the parser rejects it with the usual message
        merged: dict[str, object] = dict(filled)
        merged.update(explicit)
        return {k: v for k, v in merged.items() if v is not None}
