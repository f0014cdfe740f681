"""Unit-test fixtures: DNS for discovery's address check (no network here)."""

from __future__ import annotations

import pytest

# The documented example hosts the unit tests use, with public addresses.
FAKE_DNS = {"as.example": ["93.184.216.34"], "other.example": ["93.184.216.35"],
            "rebind.example": ["93.184.216.36", "10.1.2.3"], "meta.example": ["169.254.169.254"]}


def fake_resolve(host: str) -> list[str]:
    return FAKE_DNS.get(host, [])


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.oauth.discovery as discovery

    monkeypatch.setattr(discovery, "system_resolve", fake_resolve)
