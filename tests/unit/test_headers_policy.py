"""Header injection and the policy hook's loading and answers."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError, InvalidRequest, UpstreamError
from broker.headers import apply_header, render_header_value
from broker.policy import PolicyDecision, PolicyInput, evaluate, load_policy
from broker.resolver import Resolved
from broker.secret import Secret

INPUT = PolicyInput("alice", "srv", "k" * 64, ("read",), "aud", None, "token_exchange")


def test_apply_replaces_same_header_case_insensitively() -> None:
    inbound = {"authorization": "Bearer users-own-idp-token", "AUTHORIZATION": "x", "Accept": "json"}
    r = Resolved("srv", "Authorization", Secret("Bearer minted"), "Bearer", None, "token_exchange")
    out = r.apply(inbound)
    assert out == {"Authorization": "Bearer minted", "Accept": "json"}


def test_custom_header_keeps_inbound_authorization_out_of_it() -> None:
    headers = {"Authorization": "Bearer inbound", "x-api-key": "old"}
    apply_header(headers, "X-API-Key", Secret("new"))
    assert headers["X-API-Key"] == "new" and "x-api-key" not in headers
    assert headers["Authorization"] == "Bearer inbound"  # not ours to touch


@pytest.mark.parametrize("bad", ["tok\r\nX-Evil: 1", "tok\nX", "tok\rX", "tok\x00"])
def test_control_characters_never_split_a_header(bad: str) -> None:
    with pytest.raises(UpstreamError):
        render_header_value("Bearer {token}", Secret(bad))
    with pytest.raises(InvalidRequest):
        apply_header({}, "Authorization", Secret(bad))


def test_render_uses_the_format() -> None:
    assert render_header_value("token {token}", Secret("abc")).reveal() == "token abc"


def test_load_policy_dotted_path_and_errors() -> None:
    hook = load_policy("broker.policy:allow_all")
    assert evaluate(hook, INPUT).allow
    assert load_policy(None)(INPUT).allow
    with pytest.raises(ConfigError, match="CREDBROKER_POLICY"):
        load_policy("no.such.module:thing")
    with pytest.raises(ConfigError, match="CREDBROKER_POLICY"):
        load_policy("broker.policy:missing")
    with pytest.raises(ConfigError, match="not callable"):
        load_policy("broker.policy:__all__")


@pytest.mark.parametrize(
    "answer, allow, reason",
    [(True, True, None), (False, False, "denied"), ((False, "quota"), False, "quota"),
     (PolicyDecision(True), True, None), ("yes", False, "policy_invalid_answer"), (None, False, "policy_invalid_answer")],
)
def test_policy_answers(answer: object, allow: bool, reason: str | None) -> None:
    d = evaluate(lambda _: answer, INPUT)
    assert (d.allow, d.reason) == (allow, reason)
