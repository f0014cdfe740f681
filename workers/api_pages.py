"""The browser pages of the connect callback: small, static, secret-free.

A page names the server on success and gives a coarse reason on failure;
it never shows the code, the state or a token, never redirects, and tells
the browser not to cache it or send it on as a referrer.
"""

from __future__ import annotations

from html import escape

from starlette.responses import HTMLResponse

__all__ = ["PAGE_HEADERS", "confirm_page", "connected_page", "failed_page"]

# The callback URL carries the authorization code: keep it out of caches and Referer.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
                                "form-action 'self'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}

_REASONS = {
    "invalid_state": "This connect link is invalid, was already used, or has expired. Start the connection again.",
    "expired_state": "This connect link has expired. Start the connection again.",
    "access_denied": "Access was declined, so nothing was connected.",
    "server_changed": "The server's configuration changed while you were connecting. Start the connection again.",
    "missing_code": "The authorization server did not return an authorization code.",
    "authorization_error": "The authorization server reported an error.",
    "token_exchange_failed": "The authorization server did not accept the authorization code.",
    "store_disabled": "The credential broker cannot store credentials right now (no encryption key configured).",
    "unavailable": "The credential broker is temporarily unavailable. Try again shortly.",
    "browser_mismatch": ("This connect link was opened in another browser, so nothing was stored. "
                         "Ask for a new link and open it yourself."),
    "link_used": "This connect link was already opened. Ask for a new link.",
    "gateway_mode": "This deployment completes connections at its gateway, not here.",
    "upstream_error": "The authorization server did not accept the authorization code.",
}

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222}}
code{{background:#eee;padding:.1rem .3rem}}</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def _page(title: str, body: str, status: int) -> HTMLResponse:
    return HTMLResponse(_TEMPLATE.format(title=escape(title), body=body), status_code=status,
                        headers=PAGE_HEADERS)


def connected_page(server: str, masked_user: str | None = None) -> HTMLResponse:
    who = f" for broker user <code>{escape(masked_user)}</code>" if masked_user else ""
    body = (f"<p>Your account is now connected to <strong>{escape(server)}</strong>{who}.</p>\n"
            "<p>You can close this window.</p>")
    return _page("Connected", body, 200)


def confirm_page(server: str, masked_user: str, state: str, action: str) -> HTMLResponse:
    """The one confirming click before anything is stored: a POST to ``action``.

    Names the broker user the account will be connected to, so someone who was
    sent another person's link sees it is not theirs. Holds the state (which the
    browser already had in its address bar), never the code.
    """
    body = (f"<p>Connect your <strong>{escape(server)}</strong> account to the broker user "
            f"<code>{escape(masked_user)}</code>?</p>\n"
            "<p>Only continue if this is you. If someone sent you this link, close this window.</p>\n"
            f'<form method="post" action="{escape(action)}">'
            f'<input type="hidden" name="state" value="{escape(state)}">'
            '<button type="submit">Connect</button></form>')
    return _page("Confirm connection", body, 200)


def failed_page(reason: str, status: int = 400) -> HTMLResponse:
    """``reason`` is a coarse code (``ConnectError.reason`` or an error code)."""
    text = _REASONS.get(reason, "The connection could not be completed. Start the connection again.")
    body = f"<p>{escape(text)}</p>\n<p>Reason: <code>{escape(reason)}</code></p>"
    return _page("Connection failed", body, status)
