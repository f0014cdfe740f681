"""private_key_jwt and DPoP, pure parts: signing (checked by the sandbox's
independent verifier), every rejection the verifier makes, the form fields,
the servers-file keys and where the DPoP key is sealed."""

from __future__ import annotations

import base64
import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.clock import FakeClock
from broker.crypto import Sealer
from broker.dpop import DPoPKey, access_token_hash, dpop_proof, htu
from broker.errors import ConfigError, InvalidRequest, UpstreamError
from broker.jose import SigningKey, generate_private_key, private_pem
from broker.models import Credential, ObtainedVia
from broker.oauth.assertion import CLIENT_ASSERTION_TYPE, client_assertion
from broker.oauth.forms import refresh_request, revocation_request, token_exchange_request
from broker.oauth.sender import TokenEndpointSender
from broker.resolver import Acquisition, resolved_from
from broker.audit import Action
from broker.sandbox.errors import OAuthError
from broker.sandbox.pop import jwk_thumbprint, verify_client_assertion, verify_dpop_proof
from broker.secret import Secret
from broker.servers import AuthBrokerConfig, ClientAuth, Mode, parse_servers
from tests.secrets import register
from workers.wire import from_envelope, open_envelope, seal_envelope, to_envelope

NOW = 1_800_000_000.0
TOKEN_URL = "https://as.example/oauth/token"
RESOURCE = "https://api.example/v1/items"


def claims_of(jws: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def seg(s: str) -> dict[str, Any]:
        return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    h, c, _ = jws.split(".")
    return seg(h), seg(c)


def tamper(jws: str) -> str:
    head, body, sig = jws.split(".")
    _, claims = claims_of(jws)
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


@pytest.fixture(params=["ES256", "RS256"])
def signing_key(request: pytest.FixtureRequest) -> SigningKey:
    return SigningKey.of(generate_private_key(request.param), kid="k-2026")


# -- client assertions -------------------------------------------------------


def verify(assertion: str, key: SigningKey, *, seen: dict[str, float] | None = None, now: float = NOW,
           audiences: set[str] | None = None) -> None:
    verify_client_assertion(assertion, client_id="cli", jwk=key.public_jwk(), now=now,
                            audiences=audiences or {TOKEN_URL}, seen={} if seen is None else seen)


def test_assertion_claims_and_signature(signing_key: SigningKey) -> None:
    first = client_assertion(signing_key, "cli", TOKEN_URL, NOW)
    second = client_assertion(signing_key, "cli", TOKEN_URL, NOW)
    header, claims = claims_of(first)
    assert header == {"typ": "JWT", "kid": "k-2026", "alg": signing_key.alg}
    assert (claims["iss"], claims["sub"], claims["aud"]) == ("cli", "cli", TOKEN_URL)
    assert (claims["iat"], claims["exp"]) == (int(NOW), int(NOW) + 60)
    assert claims["jti"] != claims_of(second)[1]["jti"]
    verify(first, signing_key)  # the sandbox's own verifier accepts it


@pytest.mark.parametrize("case", ["tampered", "wrong_key", "wrong_aud", "expired", "replayed", "wrong_iss"])
def test_assertion_rejections(signing_key: SigningKey, case: str) -> None:
    seen: dict[str, float] = {}
    key, aud, now, client = signing_key, TOKEN_URL, NOW, "cli"
    if case == "wrong_key":
        key = SigningKey.of(generate_private_key(signing_key.alg))
    if case == "wrong_aud":
        aud = "https://other.example/token"
    if case == "wrong_iss":
        client = "someone-else"
    assertion = client_assertion(key, client, aud, NOW)
    if case == "tampered":
        assertion = tamper(assertion)
    if case == "expired":
        now = NOW + 61
    if case == "replayed":
        verify(assertion, signing_key, seen=seen)
    with pytest.raises(OAuthError) as info:
        verify(assertion, signing_key, seen=seen, now=now)
    assert (info.value.error, info.value.status) == ("invalid_client", 401)


# -- DPoP proofs ----------------------------------------------------------------


def test_proof_header_and_claims() -> None:
    key = DPoPKey.generate()
    proof = dpop_proof(key, "post", "HTTPS://API.example/v1/items?page=2#x", NOW, access_token="tok", nonce="n1")
    header, claims = claims_of(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256" and "d" not in header["jwk"]
    assert jwk_thumbprint(header["jwk"]) == key.thumbprint
    assert claims["htm"] == "POST" and claims["htu"] == "https://api.example/v1/items"
    assert (claims["iat"], claims["nonce"], claims["ath"]) == (int(NOW), "n1", access_token_hash("tok"))
    assert claims["jti"] != claims_of(dpop_proof(key, "POST", RESOURCE, NOW))[1]["jti"]
    assert htu("https://a.example") == "https://a.example/"


def check(proof: str, **kw: Any) -> str:
    args: dict[str, Any] = {"method": "GET", "url": RESOURCE, "now": NOW, "seen": {}, "access_token": "tok"}
    args.update(kw)
    return verify_dpop_proof(proof, **args)


@pytest.mark.parametrize("case,error", [
    ("tampered", "invalid_dpop_proof"), ("wrong_htm", "invalid_dpop_proof"), ("wrong_htu", "invalid_dpop_proof"),
    ("old_iat", "invalid_dpop_proof"), ("wrong_ath", "invalid_dpop_proof"), ("replayed", "invalid_dpop_proof"),
    ("missing_nonce", "use_dpop_nonce"), ("wrong_typ", "invalid_dpop_proof"),
])
def test_proof_rejections(case: str, error: str) -> None:
    key = DPoPKey.generate()
    proof = dpop_proof(key, "GET", RESOURCE, NOW, access_token="tok")
    kw: dict[str, Any] = {}
    if case == "tampered":
        proof = tamper(proof)
    elif case == "wrong_htm":
        kw["method"] = "DELETE"
    elif case == "wrong_htu":
        kw["url"] = "https://api.example/v1/admin"
    elif case == "old_iat":
        kw["now"] = NOW + 61
    elif case == "wrong_ath":
        kw["access_token"] = "another-token"
    elif case == "replayed":
        seen: dict[str, float] = {}
        check(proof, seen=seen)
        kw["seen"] = seen
    elif case == "missing_nonce":
        kw["nonce"] = "server-nonce"
    elif case == "wrong_typ":
        proof = key.sign({"typ": "JWT", "jwk": key.jwk}, claims_of(proof)[1])
    assert check(dpop_proof(key, "GET", RESOURCE + "?q=1", NOW, access_token="tok")) == key.thumbprint
    with pytest.raises(OAuthError) as info:
        check(proof, **kw)
    assert info.value.error == error
    if case == "missing_nonce":
        assert info.value.headers == {"DPoP-Nonce": "server-nonce"}


def test_keys_never_print_or_pickle(signing_key: SigningKey) -> None:
    key = DPoPKey.generate()
    d = key.to_private_jwk()["d"]
    assert d not in repr(key) and "PRIVATE" not in repr(signing_key) and signing_key.kid in repr(signing_key)
    for value in (key, signing_key):
        with pytest.raises(TypeError):
            pickle.dumps(value)
    assert DPoPKey.from_private_jwk(key.to_private_jwk()) == key


# -- forms ------------------------------------------------------------------------


def pkj_cfg(key: SigningKey, **changes: Any) -> AuthBrokerConfig:
    base = AuthBrokerConfig(mode=Mode.TOKEN_EXCHANGE, token_endpoint=TOKEN_URL, issuer="https://as.example",
                            revocation_endpoint="https://as.example/oauth/revoke", client_id="cli",
                            client_auth=ClientAuth.PRIVATE_KEY_JWT, client_assertion_key=key)
    return replace(base, **changes)


def test_private_key_jwt_on_every_grant(signing_key: SigningKey) -> None:
    cfg = pkj_cfg(signing_key)
    reqs = [token_exchange_request(cfg, Secret("subj"), now=NOW), refresh_request(cfg, Secret("rt"), now=NOW),
            revocation_request(cfg, Secret("at"), "access_token", now=NOW)]
    jtis = set()
    for req in reqs:
        assert req.form["client_id"] == "cli" and req.form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
        assert "client_secret" not in req.form and "Authorization" not in req.headers
        _, claims = claims_of(req.form["client_assertion"])
        assert claims["aud"] == TOKEN_URL and claims["iat"] == int(NOW)
        jtis.add(claims["jti"])
        assert req.reassert is not None and claims_of(req.reassert())[1]["jti"] != claims["jti"]
        assert "client_assertion" in repr(req) and req.form["client_assertion"] not in repr(req)
    assert len(jtis) == 3
    by_issuer = token_exchange_request(pkj_cfg(signing_key, client_assertion_aud="issuer"), Secret("s"), now=NOW)
    assert claims_of(by_issuer.form["client_assertion"])[1]["aud"] == "https://as.example"


def test_sender_signs_each_attempt_afresh(signing_key: SigningKey) -> None:
    """A retried request (503, then a nonce demand) never resends a proof or an assertion."""
    seen: list[httpx.Request] = []
    answers = [httpx.Response(503), httpx.Response(400, json={"error": "use_dpop_nonce"},
                                                    headers={"DPoP-Nonce": "n-7"}),
               httpx.Response(200, json={"access_token": "x", "token_type": "DPoP"})]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[len(seen) - 1]

    sender = TokenEndpointSender(httpx.Client(transport=httpx.MockTransport(handler)), retry_seconds=5,
                                 max_attempts=3, sleep=lambda s: None)
    key = DPoPKey.generate()
    req = token_exchange_request(pkj_cfg(signing_key), Secret("subj"), now=NOW,
                                 proof=lambda nonce: dpop_proof(key, "POST", TOKEN_URL, NOW, nonce=nonce))
    status, _, _ = sender.send(req)
    assert status == 200 and len(seen) == 3
    proofs = [claims_of(r.headers["DPoP"])[1] for r in seen]
    forms = [dict(httpx.QueryParams(r.content.decode())) for r in seen]
    assert len({p["jti"] for p in proofs}) == 3 and [p.get("nonce") for p in proofs] == [None, None, "n-7"]
    assert len({claims_of(f["client_assertion"])[1]["jti"] for f in forms}) == 3


# -- servers file -------------------------------------------------------------------


def servers(auth: dict[str, Any], environ: dict[str, str] | None = None) -> AuthBrokerConfig:
    block = {"mode": "token_exchange", "token_endpoint": TOKEN_URL, "client_id": "cli", **auth}
    return parse_servers({"servers": [{"name": "s", "url": "https://s.example", "auth_broker": block}]},
                         environ or {})["s"].auth_broker


def test_servers_file_keys(tmp_path: Path) -> None:
    key = generate_private_key("RS256")
    pem = register(private_pem(key))
    path = tmp_path / "client.pem"
    path.write_text(pem)
    cfg = servers({"client_auth": "private_key_jwt", "client_assertion_key_file": str(path)})
    assert cfg.client_assertion_key is not None and cfg.client_assertion_key.alg == "RS256"
    assert cfg.client_assertion_key.kid == SigningKey.of(key).kid  # the JWK thumbprint by default
    one_line = pem.replace("\n", "\\n")
    by_env = servers({"client_auth": "private_key_jwt", "client_assertion_key_env": "PKJ",
                      "client_assertion_kid": "mine", "client_assertion_aud": "token_endpoint"}, {"PKJ": one_line})
    assert by_env.client_assertion_key is not None and by_env.client_assertion_key.kid == "mine"
    dpop = servers({"dpop": True})
    assert dpop.dpop and dpop.header_format == "DPoP {token}"
    assert servers({}).dpop is False and servers({}).header_format == "Bearer {token}"


@pytest.mark.parametrize("auth,environ,message", [
    ({"client_auth": "private_key_jwt"}, {}, "private_key_jwt needs client_assertion_key_file"),
    ({"client_auth": "private_key_jwt", "client_assertion_key_env": "NOPE"}, {}, "'NOPE' is not set"),
    ({"client_auth": "private_key_jwt", "client_assertion_key_env": "K"}, {"K": "-----BEGIN cbtest-notakey"},
     "not a PEM private key"),
    ({"client_auth": "private_key_jwt", "client_assertion_key_env": "K", "client_assertion_alg": "RS256"},
     {"K": "EC"}, "the key is for ES256, not RS256"),
    ({"client_auth": "private_key_jwt", "client_assertion_key_env": "K", "client_assertion_alg": "HS256"},
     {"K": "EC"}, "must be one of ES256, RS256"),
    ({"client_auth": "private_key_jwt", "client_assertion_key_env": "K", "client_secret": "cbtest-x-secret"},
     {"K": "EC"}, "not used with private_key_jwt"),
    ({"client_auth": "private_key_jwt", "client_assertion_key_env": "K", "client_assertion_aud": "issuer"},
     {"K": "EC"}, "issuer needs auth_broker.issuer"),
    ({"client_assertion_key_env": "K"}, {"K": "EC"}, "only used with client_auth: private_key_jwt"),
    ({"client_auth": "private_key_jwt", "client_assertion_key_file": "/nonexistent/k.pem"}, {},
     "cannot read the key file"),
    ({"dpop": "yes"}, {}, "auth_broker.dpop: must be true or false"),
])
def test_servers_file_errors_never_echo_the_key(auth: dict[str, Any], environ: dict[str, str], message: str) -> None:
    environ = {k: (private_pem(generate_private_key("ES256")) if v == "EC" else v) for k, v in environ.items()}
    with pytest.raises(ConfigError) as info:
        servers(auth, environ)
    assert message in info.value.message
    for value in environ.values():
        assert value not in info.value.message and "BEGIN" not in info.value.message


# -- where the DPoP key lives ------------------------------------------------------------


def dpop_credential(key: DPoPKey) -> Credential:
    return Credential(access_token=Secret(register("cbtest-at-" + "x" * 16)), obtained_via=ObtainedVia.TOKEN_EXCHANGE,
                      token_type="DPoP", dpop_key=key)


def test_envelope_carries_the_key_sealed() -> None:
    key = DPoPKey.generate()
    sealer = Sealer(b"k" * 32)
    env = to_envelope("u", "sk", Acquisition(dpop_credential(key), Action.INJECT))
    blob = seal_envelope(sealer, env, "cache:u")
    assert key.to_private_jwk()["d"] not in blob
    back = from_envelope(open_envelope(sealer, blob, "cache:u"), "u", "sk")
    assert back.credential.dpop_key == key


def test_store_seals_the_key_with_the_credential(tmp_path: Path, clock: FakeClock) -> None:
    from broker.db import make_engine
    from broker.migrate import upgrade
    from broker.store import CredentialStore
    from tests.conftest import make_keyring

    engine = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    upgrade(engine)
    store = CredentialStore(engine, make_keyring("A"), clock=clock)
    key = DPoPKey.generate()
    store.compare_and_swap("alice", "sk", None, dpop_credential(key))
    assert store.get("alice", "sk").credential.dpop_key == key  # type: ignore[union-attr]
    with engine.connect() as conn:
        raw = b"".join(bytes(r[0]) for r in conn.exec_driver_sql("SELECT ciphertext FROM credentials"))
    assert key.to_private_jwk()["d"].encode() not in raw
    engine.dispose()


def test_resolved_mints_a_fresh_bound_proof_per_request() -> None:
    svc = parse_servers({"servers": [{"name": "s", "url": "https://s.example", "auth_broker": {
        "mode": "token_exchange", "token_endpoint": TOKEN_URL, "dpop": True}}]}, {})["s"]
    key = DPoPKey.generate()
    cred = dpop_credential(key)
    resolved = resolved_from(svc, cred, method="get", url=RESOURCE, now=NOW)
    headers = resolved.apply({"authorization": "Bearer inbound", "dpop": "stale"})
    assert headers["Authorization"] == "DPoP " + cred.access_token.reveal() and len(headers) == 2
    first = claims_of(headers["DPoP"])[1]
    assert (first["htm"], first["htu"], first["ath"]) == ("GET", RESOURCE, access_token_hash(cred.access_token.reveal()))
    more = claims_of(resolved.dpop_proof("POST", RESOURCE, now=NOW).reveal())[1]
    assert more["jti"] != first["jti"] and more["htm"] == "POST"
    body = resolved.to_dict()
    assert body["dpop"]["header"] == "DPoP" and body["dpop"]["value"] == headers["DPoP"]
    assert "dpop" not in repr(resolved.dpop_key) or key.thumbprint in repr(resolved.dpop_key)
    bare = resolved_from(svc, cred)
    assert bare.dpop is None and bare.to_dict()["dpop"] == {"header": "DPoP", "value": None}
    for method, url in [("GET", None), ("G T", RESOURCE), ("GET", "ftp://x/y"), ("GET", "/relative")]:
        with pytest.raises(InvalidRequest):
            resolved_from(svc, cred, method=method, url=url)
    with pytest.raises(UpstreamError):
        resolved_from(svc, cred.with_changes(dpop_key=None), method="GET", url=RESOURCE)
