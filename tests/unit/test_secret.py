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


def test_the_guard_sees_error_messages() -> None:
    """The autouse guard records every BrokerError message; prove it would catch a leak."""
    from broker.errors import UpstreamError
    from tests.conftest import _ERROR_MESSAGES
    from tests.secrets import find_leaks

    leaked = canary("guard-probe")
    UpstreamError(f"oops {leaked}")
    assert find_leaks("\n".join(_ERROR_MESSAGES)) == [leaked]
    _ERROR_MESSAGES.clear()  # this one was on purpose
