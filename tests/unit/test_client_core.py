"""The steps both clients share (workers.client_core): how a flight's stored
outcome reads for a caller, how transport failures map to broker errors, and
the fast path's refusal of entries it must not serve."""

from __future__ import annotations

import base64
import os
import time
from datetime import timedelta

import pytest
import redis

from broker.audit import Action, Outcome
from broker.clock import FakeClock, utcnow
from broker.errors import BrokerError, NotConnected, ResolveTimeout, ServiceUnavailable, SubjectTokenMissing
from broker.models import Credential, ObtainedVia
from broker.resolver import Acquisition
from broker.secret import Secret
from broker.servers import parse_servers
from broker.settings import load_settings
from workers.client_core import RETRY, ClientCore, client_settings, transport_failure, warm_outcome
from workers.common.constants import cache_key
from workers.common.deadline import DeadlinePassed
from workers.common.wire import connect_url_purpose, result_purpose, seal_envelope, to_envelope

SERVERS = {"servers": [{"name": "tx", "url": "https://tx.upstream.test/mcp", "auth_broker": {
    "mode": "token_exchange", "token_endpoint": "https://idp.test/token", "client_id": "c", "client_secret": "s",
    "audience": "tx-api"}}]}


@pytest.fixture
def core() -> ClientCore:
    key = base64.b64encode(os.urandom(32)).decode()
    settings = load_settings({"CREDBROKER_TRANSPORT_KEY": key}, env_file=None)
    return ClientCore(settings, parse_servers(SERVERS), None, FakeClock(utcnow()))


def _sealed(core: ClientCore, purpose: str, ttl: int = 3600, user: str = "alice") -> str:
    now = core.clock.now()
    cred = Credential(Secret("tok-" + os.urandom(6).hex()), ObtainedVia.TOKEN_EXCHANGE,
                      expires_at=now + timedelta(seconds=ttl), issued_at=now)
    assert core.sealer is not None
    return seal_envelope(core.sealer, to_envelope(user, core.servers["tx"].key,
                                                  Acquisition(cred, Action.ACQUIRE, Outcome.SUCCESS)), purpose)


def test_flight_outcomes_read_as_credential_error_or_retry(core: ClientCore) -> None:
    srv = core.servers["tx"]
    ok = {"status": "SUCCESS", "result": {"ok": _sealed(core, result_purpose("t1"))}}
    assert core.read_flight(ok, "t1", False, False, "alice", srv).credential.access_token.reveal().startswith("tok-")
    # sealed for another task: refused loudly, it is a key mismatch, not a retry
    with pytest.raises(BrokerError, match="TRANSPORT_KEY"):
        core.read_flight(ok, "t2", False, False, "alice", srv)
    # another user's envelope under this task id is refused the same way
    other = {"status": "SUCCESS", "result": {"ok": _sealed(core, result_purpose("t1"), user="bob")}}
    with pytest.raises(BrokerError):
        core.read_flight(other, "t1", False, False, "alice", srv)
    error = {"status": "SUCCESS", "result": {"error": SubjectTokenMissing().to_dict()}}
    with pytest.raises(SubjectTokenMissing):
        core.read_flight(error, "t1", False, False, "alice", srv)
    # an old answer (joined a flight that had finished before we came), a background
    # refresh's failure, a superseded run and an unusable meta: fly ourselves
    assert core.read_flight(error, "t1", True, True, "alice", srv) is RETRY
    refresh = {"status": "SUCCESS", "result": {"error": SubjectTokenMissing().to_dict(), "trigger": "refresh"}}
    assert core.read_flight(refresh, "t1", False, False, "alice", srv) is RETRY
    assert core.read_flight({"status": "SUCCESS", "result": {"superseded": True}}, "t1", False, False,
                            "alice", srv) is RETRY
    assert core.read_flight({"status": "REVOKED"}, "t1", False, False, "alice", srv) is RETRY


def test_not_connected_carries_its_unsealed_connect_url(core: ClientCore) -> None:
    assert core.sealer is not None
    url = "http://127.0.0.1:8080/v1/connect/open?state=abc"
    result = {"error": NotConnected(reason="never_connected").to_dict(),
              "connect_url_sealed": core.sealer.seal(url.encode(), connect_url_purpose("t9"))}
    exc = core.flight_error(result, "t9")
    assert isinstance(exc, NotConnected) and exc.connect_url == url
    assert core.flight_error(result, "other").connect_url is None  # type: ignore[attr-defined]


def test_fast_path_serves_only_fresh_entries_for_the_pair(core: ClientCore) -> None:
    srv = core.servers["tx"]
    key = cache_key("alice", srv.key)
    assert core.from_cache(_sealed(core, key), key, "alice", srv) is not None
    assert core.from_cache(None, key, "alice", srv) is None
    assert core.from_cache(_sealed(core, key, ttl=5), key, "alice", srv) is None  # near expiry: renew
    assert core.from_cache(_sealed(core, "other-key"), key, "alice", srv) is None  # bound to its key
    assert core.from_cache(b"garbage", key, "alice", srv) is None


def test_transport_failures_map_to_the_callers_errors() -> None:
    future, past = time.monotonic() + 60, time.monotonic() - 1
    assert isinstance(transport_failure(redis.ConnectionError("x"), future)[0], ServiceUnavailable)
    failure, explain = transport_failure(redis.ConnectionError("x"), past)
    assert isinstance(failure, ResolveTimeout) and not explain
    failure, explain = transport_failure(DeadlinePassed("late"), future)
    assert isinstance(failure, ResolveTimeout) and explain
    assert transport_failure(ResolveTimeout(), future)[1] is True
    with pytest.raises(ResolveTimeout):
        warm_outcome(None)
    with pytest.raises(ServiceUnavailable):
        warm_outcome({"status": "FAILURE", "result": {}})
    assert warm_outcome({"status": "SUCCESS", "result": {"queued": ["tx"]}}) == ["tx"]


def test_explicit_arguments_override_settings() -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    base = load_settings({"CREDBROKER_REDIS_URL": "redis://a:6379/0"}, env_file=None)
    s = client_settings(base, None, redis_url="redis://b:6379/1", transport_key=key, master_keys=None, timeout=3)
    assert (s.redis_url, s.resolve_timeout, s.transport_key) == ("redis://b:6379/1", 3.0, base64.b64decode(key))
    assert client_settings(base, None, redis_url=None, transport_key=None, master_keys=None, timeout=None) is base
