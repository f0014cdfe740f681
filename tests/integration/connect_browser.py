"""A user's browser for the broker-hosted (browser mode) connect flow.

It keeps cookies like a browser and follows redirects one at a time, so a test
can look at each step::

    browser = ConnectBrowser()
    page = browser.consent(connect_url, consent="approve", user="alice-upstream")  # open, consent, callback
    done = browser.confirm(page)        # the confirming click: POST state to the form's action

``connect_url`` is what ``POST /v1/connect`` returned (``PUBLIC_URL/v1/connect/open?state=...``).
``consent``/``user`` are the sandbox provider's auto-answer parameters; for
another provider pass ``extra=""`` and drive its consent page yourself
between ``open`` and ``callback``.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

__all__ = ["ConnectBrowser", "form_of"]

_ACTION = re.compile(r'<form method="post" action="([^"]+)">')
_STATE = re.compile(r'<input type="hidden" name="state" value="([^"]+)">')


def form_of(page: httpx.Response) -> tuple[str, str]:
    """The confirmation page's form: (action URL, state)."""
    action, state = _ACTION.search(page.text), _STATE.search(page.text)
    assert action and state, "not a confirmation page"
    return action.group(1).replace("&amp;", "&"), state.group(1)


class ConnectBrowser:
    """Cookies kept, redirects not followed: one request per step."""

    def __init__(self) -> None:
        self.http = httpx.Client(follow_redirects=False, trust_env=False, timeout=20)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ConnectBrowser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get(self, url: str) -> httpx.Response:
        return self.http.get(url)

    def open(self, connect_url: str) -> str:
        """Open the broker link: the cookie is set, returns the authorization URL."""
        r = self.get(connect_url)
        assert r.status_code == 302, (r.status_code, r.text[:200])
        return r.headers["location"]

    def authorize(self, authorize_url: str, consent: str = "approve", user: str = "sandbox-user") -> str:
        """The sandbox's consent, answered by query parameters; returns the callback URL."""
        r = self.get(f"{authorize_url}&consent={consent}&user={user}")
        assert r.status_code == 302, r.status_code
        return r.headers["location"]

    def consent(self, connect_url: str, consent: str = "approve", user: str = "sandbox-user") -> httpx.Response:
        """open -> consent -> callback; returns the callback's page (the confirmation page on success)."""
        return self.get(self.authorize(self.open(connect_url), consent, user))

    def confirm(self, page: httpx.Response) -> httpx.Response:
        """The confirming click."""
        action, state = form_of(page)
        return self.http.post(action, data={"state": state})
