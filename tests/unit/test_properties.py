"""Property tests: hostile or random input gives a clear error, never a crash
and never a stored half-record."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.audit import MemoryAuditSink
from broker.clock import FakeClock
from broker.connect import ConnectError, ConnectFlow
from broker.crypto import DecryptError, Sealer, record_ad
from broker.db import make_engine
from broker.errors import InvalidState, OAUTH_ERROR_CODES, BrokerError, ConfigError, InvalidRequest, UpstreamError
from broker.migrate import upgrade
from broker.models import ObtainedVia
from broker.oauth.responses import parse_token_response
from broker.servers import parse_servers
from broker.state import MemoryStateStore
from broker.store import CredentialStore
from broker.validation import validate_user_id
from tests.conftest import make_keyring

NOW = datetime(2026, 1, 1, tzinfo=UTC)
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=6),
    max_leaves=30,
)
field_names = st.sampled_from([
    "mode", "token_endpoint", "authorization_endpoint", "revocation_endpoint", "issuer", "client_id",
    "client_secret", "client_secret_env", "client_auth", "scopes", "resource", "audience", "header",
    "header_format", "requested_token_type",
])
auth_broker = st.dictionaries(field_names, json_values | st.sampled_from(
    ["token_exchange", "entra_obo", "oauth_connect", "https://idp.example.com/token", "http://127.0.0.1:9/t",
     "Bearer {token}", "{token}{token}", "X-Key", "Host", "client_secret_basic"]), max_size=8)
server_entry = st.fixed_dictionaries(
    {"name": st.text(max_size=20) | st.integers(), "url": st.sampled_from(["https://u.example.com", "", "ftp://x"]) | st.text(max_size=10)},
    optional={"auth_broker": auth_broker | json_values, "command": st.text(max_size=5), "protocol": st.text(max_size=6)},
)


@PROPS
@given(st.one_of(json_values, st.fixed_dictionaries({"servers": st.lists(server_entry, max_size=4)}),
                 st.fixed_dictionaries({"mcpServers": st.lists(server_entry, max_size=4)})))
def test_server_config_parsing_only_raises_config_error(data: object) -> None:
    try:
        registry = parse_servers(data, environ={})
    except ConfigError as exc:
        assert exc.message and "Traceback" not in exc.message
        return
    for name in registry:
        server = registry[name]
        assert "{token}" in server.auth_broker.header_format
        assert server.auth_broker.token_endpoint or server.auth_broker.issuer


token_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={
        "access_token": json_values | st.text(max_size=50), "token_type": json_values,
        "expires_in": json_values | st.integers(-10, 10**12), "refresh_token": json_values,
        "scope": json_values, "error": st.text(max_size=20) | st.sampled_from(["invalid_grant", "server_error"]),
    }).map(lambda d: json.dumps(d).encode()),
)


@PROPS
@given(st.sampled_from([200, 201, 400, 401, 429, 500, 503]), token_bodies)
def test_token_response_parsing_only_raises_upstream_error(status: int, body: bytes) -> None:
    try:
        cred = parse_token_response(status, {"content-type": "application/json"}, body,
                                    obtained_via=ObtainedVia.TOKEN_EXCHANGE, requested_scopes=("read",), now=NOW)
    except UpstreamError as exc:
        assert exc.oauth_error is None or exc.oauth_error in OAUTH_ERROR_CODES
        return
    raw = cred.access_token.reveal()
    assert raw and all(0x20 <= ord(ch) < 0x7F for ch in raw)
    assert "\n" not in cred.token_type and "\r" not in cred.token_type


@PROPS
@given(st.text(max_size=300))
def test_user_ids_are_accepted_only_when_safe(value: str) -> None:
    try:
        out = validate_user_id(value)
    except InvalidRequest as exc:
        assert exc.message.startswith("user_id")
        return
    assert out == value and 0 < len(out) <= 256 and "/" not in out and out.isprintable()


SEALER = Sealer(os.urandom(32))
RING = make_keyring("A")


@PROPS
@given(st.text(max_size=200) | st.binary(max_size=200), st.text(max_size=20))
def test_sealed_blobs_reject_garbage_cleanly(blob: str | bytes, purpose: str) -> None:
    with pytest.raises(DecryptError):
        SEALER.open(blob, purpose)
    raw = blob if isinstance(blob, bytes) else blob.encode("utf-8", "surrogatepass")
    with pytest.raises(DecryptError):
        RING.decrypt(raw, record_ad("credential", "u", "k"))


@PROPS
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0))
def test_any_bit_flip_of_a_sealed_blob_is_rejected(payload: bytes, position: int) -> None:
    blob = bytearray(RING.encrypt(payload, b"ad"))
    i = position % len(blob)
    blob[i] ^= 1 << (position % 8)
    with pytest.raises(DecryptError):
        RING.decrypt(bytes(blob), b"ad")


@pytest.fixture(scope="module")
def flow(tmp_path_factory):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('p') / 'p.db'}")
    upgrade(engine)
    servers = parse_servers({"servers": [{"name": "gh", "url": "https://gh.example.com", "auth_broker": {
        "mode": "oauth_connect", "token_endpoint": "https://gh.example.com/t",
        "authorization_endpoint": "https://gh.example.com/a", "client_id": "c"}}]})
    store = CredentialStore(engine, make_keyring("A"))

    class NoOAuth:
        def __getattr__(self, name: str) -> object:
            raise AssertionError("no authorization server call for a bad state")

    states = MemoryStateStore()
    yield ConnectFlow(servers, store, NoOAuth(), states, MemoryAuditSink(), FakeClock(), "https://b/cb",
                      open_url="https://b/open"), store  # type: ignore[arg-type]
    engine.dispose()


@PROPS
@given(st.one_of(st.none(), st.text(max_size=600)), st.one_of(st.none(), st.text(max_size=50)),
       st.one_of(st.none(), st.text(max_size=30)))
def test_callback_state_values_never_store_anything(flow, state, code, error) -> None:  # type: ignore[no-untyped-def]
    connect_flow, store = flow
    with pytest.raises(InvalidState):
        connect_flow.callback(state, code=code, error=error, cookie=code)
    with pytest.raises((InvalidState, ConnectError)) as info:
        connect_flow.confirm(state, cookie=code)
    assert isinstance(info.value, BrokerError) and info.value.code in {"invalid_state", "connect_failed"}
    with pytest.raises(InvalidState):
        connect_flow.open(state)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM credentials").scalar() == 0
