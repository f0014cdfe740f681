"""OAuth error responses as data, raised by grant logic and rendered by the app."""

from __future__ import annotations

__all__ = ["OAuthError"]


class OAuthError(Exception):
    """Raised when a request must be answered with an RFC 6749 §5.2 error body."""

    def __init__(
        self,
        error: str,
        description: str | None = None,
        *,
        status: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        """The JSON body: ``error`` plus an ``error_description`` when there is one."""
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        return body
