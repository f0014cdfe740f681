from __future__ import annotations

from datetime import timedelta

import pytest

from broker.clock import utcnow
from broker.db import make_engine
from broker.models import SubjectToken
from broker.secret import Secret
from broker.store import CredentialStore

pytestmark = pytest.mark.integration


def test_resolve_through_worker(cluster, sandbox) -> None:  # type: ignore[no-untyped-def]
    cluster.start_worker()
    store = CredentialStore(make_engine(cluster.settings.database_url), cluster.settings.keyring)
    token = sandbox.provider.issue_subject_token("alice")
    store.put_subject_token("alice", SubjectToken(Secret(token), utcnow() + timedelta(hours=1)))
    with cluster.client() as client:
        r = client.resolve("alice", "tx", timeout=20)
        assert r.value.reveal().startswith("Bearer ")
        r2 = client.resolve("alice", "tx", timeout=20)
        assert r2.value == r.value
    assert sandbox.provider.stats()["grants"]["token_exchange"] == 1
