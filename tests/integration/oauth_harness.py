"""The sandbox provider as the OAuth integration tests use it: a fresh canary
client secret, and every token it issues registered with the secret guard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from broker.sandbox import SandboxHandle, SandboxProvider, run_sandbox
from tests.secrets import canary, register

__all__ = ["RegisteringProvider", "client_secret", "sandbox"]


class RegisteringProvider(SandboxProvider):
    """The sandbox provider, registering every token it issues with the secret guard."""

    def issue_subject_token(self, user_id: str, ttl: int = 3600) -> str:
        return register(super().issue_subject_token(user_id, ttl))

    def mint_access_token(self, **kwargs: Any) -> str:
        return register(super().mint_access_token(**kwargs))


@pytest.fixture
def client_secret() -> str:
    return canary("client-secret")


@pytest.fixture
def sandbox(client_secret: str) -> Iterator[SandboxHandle]:
    provider = RegisteringProvider(clients={"broker-client": client_secret, "public-client": None})
    with run_sandbox(provider) as handle:
        yield handle
    with provider.lock:  # refresh tokens and codes, so the guard scans for them too
        for token in [*provider.store.refresh, *provider.store.codes]:
            register(token)
