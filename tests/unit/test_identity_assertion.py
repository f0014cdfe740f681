"""SEP-990 (ID-JAG) builders and config: both legs' exact forms, and the mcp SDK's leg 2 beside ours."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest

from broker.errors import ConfigError
from broker.oauth.forms import (
    GRANT_JWT_BEARER,
    GRANT_TOKEN_EXCHANGE,
    ID_JAG_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    id_jag_grant_request,
    id_jag_request,
)
from broker.secret import Secret
from broker.servers import Mode, parse_servers

UPSTREAM_ISSUER = "https://as.upstream.example"
RESOURCE = "https://mcp.upstream.example/mcp"


def server(**auth: object) -> dict[str, object]:
    block = {
        "mode": "identity_assertion",
        "idp_token_endpoint": "https://idp.example/oauth2/token",
        "idp_client_id": "broker-at-idp",
        "idp_client_secret": "idp-secret-value",
        "issuer": UPSTREAM_ISSUER,
        "token_endpoint": f"{UPSTREAM_ISSUER}/token",
        "client_id": "broker-at-upstream",
        "client_secret": "upstream-secret-value",
        "resource": RESOURCE,
        "scopes": ["read"],
        **auth,
    }
    return {"name": "ia", "url": RESOURCE, "auth_broker": {k: v for k, v in block.items() if v is not None}}


def config():  # type: ignore[no-untyped-def]
    return parse_servers({"servers": [server()]})["ia"].auth_broker


def test_leg_one_asks_the_idp_for_an_id_jag_for_the_upstream_issuer_as_the_idp_client() -> None:
    req = id_jag_request(config(), Secret("user-id-token"))
    assert req.url == "https://idp.example/oauth2/token"
    assert req.form == {
        "grant_type": GRANT_TOKEN_EXCHANGE,
        "requested_token_type": ID_JAG_TOKEN_TYPE,
        "subject_token": "user-id-token",
        "subject_token_type": ID_TOKEN_TYPE,
        "audience": UPSTREAM_ISSUER,
        "resource": RESOURCE,
        "scope": "read",
        "client_id": "broker-at-idp",
        "client_secret": "idp-secret-value",
    }
    assert req.headers == {} and req.grant == "id_jag"
    assert "idp-secret-value" not in repr(req) and "user-id-token" not in repr(req)


def test_leg_two_presents_the_id_jag_with_jwt_bearer_as_the_upstream_client() -> None:
    req = id_jag_grant_request(config(), Secret("the-id-jag"))
    assert req.url == f"{UPSTREAM_ISSUER}/token"
    assert req.form == {
        "grant_type": GRANT_JWT_BEARER, "assertion": "the-id-jag", "resource": RESOURCE, "scope": "read",
        "client_id": "broker-at-upstream", "client_secret": "upstream-secret-value",
    }
    assert req.grant == "jwt_bearer"  # not counted as Entra OBO


def test_leg_two_matches_the_mcp_sdk_client() -> None:
    """The ``mcp`` package's SEP-990 client (an independent implementation) builds the same form."""
    from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider

    class Storage:
        async def get_tokens(self):  # type: ignore[no-untyped-def]
            return None

        async def set_tokens(self, tokens):  # type: ignore[no-untyped-def]
            return None

    async def assertion(audience: str, resource: str) -> str:
        return "the-id-jag"

    sdk = IdentityAssertionOAuthProvider(server_url=RESOURCE, storage=Storage(), client_id="broker-at-upstream",
                       client_secret="upstream-secret-value", issuer=UPSTREAM_ISSUER,
                       assertion_provider=assertion, scope="read")
    sdk._token_endpoint = f"{UPSTREAM_ISSUER}/token"
    theirs = sdk._build_token_request("read", "the-id-jag")
    ours = id_jag_grant_request(config(), Secret("the-id-jag"))
    their_form = {k: v[0] for k, v in parse_qs(theirs.content.decode()).items()}
    assert str(theirs.url) == ours.url
    assert their_form == ours.form


@pytest.mark.parametrize(("change", "field"), [
    ({"idp_token_endpoint": None}, "idp_token_endpoint"),
    ({"client_id": None, "client_secret": None}, "client_id"),
    ({"issuer": None}, "issuer"),
    ({"idp_client_id": None}, "idp_client_id"),
])
def test_config_names_what_identity_assertion_lacks(change: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_servers({"servers": [server(**change)]})


def test_secret_from_the_environment_and_mode() -> None:
    entry = server(idp_client_secret=None, idp_client_secret_env="IDP_SECRET")
    cfg = parse_servers({"servers": [entry]}, environ={"IDP_SECRET": "from-env"})["ia"].auth_broker
    assert cfg.mode is Mode.IDENTITY_ASSERTION and cfg.idp_client_secret == Secret("from-env")
