"""PKCE verifier, S256 challenge and connect state."""

from __future__ import annotations

import re

import pytest

from broker.oauth.pkce import new_state, new_verifier, s256_challenge


def test_verifier_is_43_to_128_unreserved_characters() -> None:
    verifier = new_verifier()
    assert 43 <= len(verifier) <= 128
    assert re.fullmatch(r"[A-Za-z0-9\-._~]+", verifier)
    assert new_verifier() != verifier


def test_s256_challenge_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@pytest.mark.parametrize("verifier", ["short", "x" * 129, "a" * 42 + " ", "é" * 43])
def test_s256_challenge_rejects_verifiers_outside_the_grammar(verifier: str) -> None:
    with pytest.raises(ValueError):
        s256_challenge(verifier)


def test_state_has_at_least_256_bits_and_is_urlsafe() -> None:
    state = new_state()
    assert len(state) >= 43  # 256 bits in base64url
    assert re.fullmatch(r"[A-Za-z0-9_-]+", state)
    assert len({new_state() for _ in range(100)}) == 100
