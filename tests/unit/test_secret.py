import pickle

import pytest

from broker.secret import Secret
from tests.secrets import canary


def test_secret_is_redacted_everywhere() -> None:
    value = canary("secret-type")
    s = Secret(value)
    for rendering in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % s, repr([s]), repr({"k": s})):
        assert value not in rendering
    assert s.reveal() == value


def test_secret_equality_and_pickling() -> None:
    assert Secret("abc") == Secret("abc")
    assert Secret("abc") != Secret("abd")
    with pytest.raises(TypeError):
        pickle.dumps(Secret("abc"))
