"""The sandbox provider as the OAuth integration tests use it: a fresh canary
client secret, and every token it issues registered with the secret guard."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.db import make_engine
from broker.migrate import upgrade
from sandbox import SandboxHandle, SandboxProvider, run_sandbox
from broker.store import CredentialStore
from tests.conftest import make_keyring
from tests.secrets import canary, register

__all__ = ["CALLBACK_URL", "RegisteringProvider", "client_secret", "sandbox", "store"]

CALLBACK_URL = "http://127.0.0.1:18080/v1/connect/callback"


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


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[CredentialStore]:
    """An encrypted store on a fresh SQLite file, on the test's fake clock."""
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    yield CredentialStore(engine, make_keyring("A"), clock=clock)
    engine.dispose()
