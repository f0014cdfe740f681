"""django-oauth-toolkit on loopback, as a process of its own, for the interop tests.

``DotServer`` starts ``tests/interop/dot_server`` (fresh SQLite file, test
users, one confidential Application whose redirect URI is the broker's
callback), and reads back what the server's recorder wrote: the ground truth
of what the broker sent, taken at the server rather than in our client.
``complete_connect`` is the user's browser for the connect flow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from tests.cluster import wait_for

__all__ = ["DotServer", "complete_connect", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
_CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


class DotServer:
    """One django-oauth-toolkit process; ``stop()`` ends it."""

    def __init__(self, workdir: Path, *, redirect_uri: str, client_id: str, client_secret: str,
                 users: list[str], password: str, access_token_seconds: int = 30) -> None:
        self.workdir = workdir
        self.client_id = client_id
        self.client_secret = client_secret
        self.password = password
        self.record_path = workdir / "dot-requests.jsonl"
        self.log_path = workdir / "dot.log"
        port_file = workdir / "dot.port"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDBROKER_", "DJANGO_"))}
        env.update({
            "DJANGO_SETTINGS_MODULE": "tests.interop.dot_server.settings",
            "DOT_DB_PATH": str(workdir / "dot.sqlite3"),
            "DOT_RECORD_PATH": str(self.record_path),
            "DOT_PORT_FILE": str(port_file),
            "DOT_USERS": ",".join(users),
            "DOT_PASSWORD": password,
            "DOT_CLIENT_ID": client_id,
            "DOT_CLIENT_SECRET": client_secret,
            "DOT_REDIRECT_URI": redirect_uri,
            "DOT_ACCESS_TOKEN_SECONDS": str(access_token_seconds),
            "PYTHONUNBUFFERED": "1",
        })
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.interop.dot_server.serve"], env=env,
                                         cwd=str(REPO_ROOT), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(lambda: port_file.exists() or self.proc.poll() is not None, 60,
                 what="django-oauth-toolkit to listen")
        assert self.proc.poll() is None, self.log()[-3000:]
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)

    # -- what the server received ---------------------------------------------------------

    def records(self, *, user: str | None = None, endpoint: str | None = None,
                grant_type: str | None = None) -> list[dict[str, Any]]:
        """The recorder's lines for what the broker sent (not the tests' own calls), oldest first."""
        if not self.record_path.exists():
            return []
        lines = [json.loads(line) for line in self.record_path.read_text().splitlines() if line.strip()]
        return [r for r in lines
                if r.get("actor") == "client"
                and (user is None or r.get("user") == user)
                and (endpoint is None or r["endpoint"] == endpoint)
                and (grant_type is None or r.get("grant_type") == grant_type)]

    def refreshes(self, user: str) -> list[dict[str, Any]]:
        return self.records(user=user, endpoint="token", grant_type="refresh_token")

    # -- acting as resource server and administrator -----------------------------------------

    def whoami(self, access_token: str) -> httpx.Response:
        """DOT's protected resource: 200 and the user for a live access token."""
        return self.http.get("/api/whoami", headers={"Authorization": f"Bearer {access_token}"})

    def refresh_directly(self, refresh_token: str) -> httpx.Response:
        """The refresh grant as any client would send it, to prove a token is dead."""
        return self.http.post("/o/token/", data={"grant_type": "refresh_token", "refresh_token": refresh_token,
                                                 "client_id": self.client_id,
                                                 "client_secret": self.client_secret},
                              headers={"X-Interop-Actor": "test"})

    def revoke_grants(self, user: str) -> int:
        """Revoke every live grant of ``user`` behind the client's back."""
        r = self.http.post(f"/interop/revoke-grants/{user}")
        assert r.status_code == 200, r.status_code
        return int(r.json()["revoked"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


def _sign_in(browser: httpx.Client, dot_url: str, username: str, password: str) -> None:
    """Django's login form: GET for the CSRF cookie and token, POST the credentials."""
    login_url = f"{dot_url}/accounts/login/"
    page = browser.get(login_url)
    assert page.status_code == 200, page.status_code
    match = _CSRF_INPUT.search(page.text)
    assert match, "no CSRF token on the login page"
    done = browser.post(login_url, data={"username": username, "password": password,
                                         "csrfmiddlewaretoken": match.group(1), "next": "/"},
                        headers={"Referer": login_url})
    assert done.status_code == 302, f"login failed for {username}: {done.status_code}"


class _PostForm(HTMLParser):
    """The first ``<form method="post">`` of a page: its action and the fields a
    browser would submit (inputs with a name, and the first named submit button)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._inside = False
        self._done = False
        self._button = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and not self._done and a.get("method", "get").lower() == "post":
            self._inside, self.action = True, a.get("action", "")
        elif self._inside and tag in ("input", "button") and a.get("name"):
            kind = a.get("type", "submit" if tag == "button" else "text").lower()
            if kind == "submit":
                if not self._button:
                    self._button = True
                    self.fields[a["name"]] = a.get("value", "")
            elif kind not in ("checkbox", "radio") or "checked" in a:
                self.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._inside:
            self._inside, self._done = False, True


def complete_connect(connect_url: str, *, dot_url: str, username: str, password: str,
                     max_hops: int = 8) -> httpx.Response:
    """The user's browser for the whole connect flow; returns the broker's last page.

    Signs in at DOT (cookie jar + CSRF), opens the broker's connect URL and
    follows redirects by hand across both origins (the broker and DOT) to the
    broker's callback; a page of the broker's that asks to confirm with a POST
    form is submitted, as the user would click it. Keep every browser step
    here: the broker's side of the flow changes in this one place.
    """
    dot_origin = urlsplit(dot_url).netloc
    with httpx.Client(timeout=20, trust_env=False, follow_redirects=False) as browser:
        _sign_in(browser, dot_url, username, password)
        return walk(browser, browser.get(connect_url), max_hops, forms_not_from=dot_origin)


def walk(browser: httpx.Client, response: httpx.Response, max_hops: int = 8, *,
         forms_not_from: str | None = None) -> httpx.Response:
    """Follow redirects by hand (loopback only) and submit POST forms as a user's
    click would, until a page asks for nothing more; returns that page. Forms
    on pages of ``forms_not_from`` (an origin, e.g. a login page) are left alone."""
    for _ in range(max_hops):
        if response.status_code in (301, 302, 303, 307, 308):
            target = urljoin(str(response.url), response.headers["location"])
            assert urlsplit(target).hostname == "127.0.0.1", "the flow left loopback"
            response = browser.get(target)
            continue
        form = _PostForm()
        if response.status_code == 200 and response.url.netloc.decode() != forms_not_from:
            form.feed(response.text)
        if form.action is None:
            return response
        response = browser.post(urljoin(str(response.url), form.action), data=form.fields,
                                headers={"Referer": str(response.url)})
    raise AssertionError(f"more than {max_hops} redirects or forms")
