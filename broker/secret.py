"""A value that must never be printed: tokens, refresh tokens, client secrets."""

from __future__ import annotations

import hmac

__all__ = ["Secret", "reveal"]


class Secret:
    """Holds a secret string; ``repr`` and ``str`` are redacted.

    The value is only reachable through ``reveal()``, so every place that
    uses the plaintext is greppable.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError("Secret holds a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __format__(self, spec: str) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return hmac.compare_digest(self._value.encode(), other._value.encode())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str:
        # Pickling would copy the plaintext into a message; refuse loudly.
        raise TypeError("a Secret cannot be pickled")


def reveal(value: Secret | None) -> str | None:
    """The plaintext of an optional secret."""
    return None if value is None else value.reveal()
