"""The thin httpx sender: POST a TokenRequest, bounded body, bounded retries.

Everything protocol-shaped lives in ``forms`` and ``responses``; this module
only moves bytes. Logs carry the endpoint host, grant, status and attempt,
never a form, a header value or a body.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urlsplit

import httpx

from .. import __version__
from ..errors import UpstreamError, UpstreamOutcomeUnknown
from ..settings import Settings
from .backoff import retry_delay
from .forms import TokenRequest
from .responses import parse_error_response
from .transport import ThreadLocalTransport

__all__ = ["TokenEndpointSender", "make_http_client", "MAX_BODY_BYTES", "USER_AGENT", "Response"]

log = logging.getLogger(__name__)

# Token and metadata responses are a few KiB; anything near this is hostile.
MAX_BODY_BYTES = 1024 * 1024
USER_AGENT = f"credential-broker/{__version__}"

Response = tuple[int, dict[str, str], bytes]


def make_http_client(settings: Settings, *, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The per-process httpx client for authorization servers.

    Redirects are not followed: a token endpoint that redirects would make us
    re-send credentials to a URL nobody configured.
    """
    return httpx.Client(
        timeout=httpx.Timeout(
            connect=settings.http_connect_timeout,
            read=settings.http_read_timeout,
            write=settings.http_read_timeout,
            pool=settings.http_connect_timeout,
        ),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        # A worker process runs up to ~64-128 flight threads, each holding one
        # connection while it waits on a provider: a small pool per thread
        # (``transport``'s docstring says why not one shared pool).
        transport=transport or ThreadLocalTransport(),
    )


def _too_large(status: int) -> UpstreamError:
    return UpstreamError("authorization server response too large", status=status)


def _decoded(raw: Iterator[bytes], encoding: str, status: int) -> Iterator[bytes]:
    """Yield the decoded body, never inflating more than the cap (gzip bombs)."""
    if encoding in ("", "identity"):
        yield from raw
        return
    if encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise UpstreamError("authorization server sent an unsupported content encoding", status=status)
    try:
        for chunk in raw:
            out = inflater.decompress(chunk, MAX_BODY_BYTES + 1)
            if inflater.unconsumed_tail:
                raise _too_large(status)
            yield out
        yield inflater.flush()
    except zlib.error:
        raise UpstreamError("authorization server sent a corrupt body", status=status) from None


def _read_capped(response: httpx.Response) -> bytes:
    status = response.status_code
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise _too_large(status)
    if response.is_stream_consumed:
        # Built from bytes already in memory (a MockTransport response): httpx
        # has decoded it; only the cap is left to apply.
        if len(response.content) > MAX_BODY_BYTES:
            raise _too_large(status)
        return response.content
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    body = bytearray()
    for chunk in _decoded(response.iter_raw(), encoding, status):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large(status)  # leaving the with-block closes the stream unread
    return bytes(body)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}".lower()


def _wants_nonce(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("error") == "use_dpop_nonce"


class TokenEndpointSender:
    """Sends requests to authorization servers with bounded, jittered retries.

    Retried: network errors, timeouts, 5xx, 408 and 429 (honouring
    ``Retry-After``), within ``retry_seconds`` in total and ``max_attempts``.
    Anything else is final at once.
    """

    def __init__(
        self,
        http: httpx.Client,
        *,
        retry_seconds: float,
        max_attempts: int,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._http = http
        self._retry_seconds = retry_seconds
        self._max_attempts = max(1, max_attempts)
        self._sleep = sleep
        self._monotonic = monotonic
        self._rand = rand
        # The latest DPoP-Nonce per authorization-server origin (RFC 9449 section 8).
        self._dpop_nonces: dict[str, str] = {}
        self._nonce_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, http: httpx.Client | None = None) -> TokenEndpointSender:
        return cls(
            http or make_http_client(settings),
            retry_seconds=settings.provider_retry_seconds,
            max_attempts=settings.provider_max_attempts,
        )

    def send(self, req: TokenRequest, *, max_attempts: int | None = None) -> Response:
        """POST the form; return a 2xx ``(status, headers, body)`` or raise UpstreamError.

        A non-2xx answer raises the secret-free error from
        ``parse_error_response`` (status and allow-listed code only). Every
        attempt carries a fresh client assertion and DPoP proof (never one
        already sent); a ``use_dpop_nonce`` answer with a ``DPoP-Nonce`` is
        retried once with that nonce. ``max_attempts`` lowers the configured
        attempt limit for this call.
        """
        origin = _origin(req.url)
        attempts = 0

        def once() -> Response:
            nonlocal attempts
            attempts += 1
            form, headers = req.form, req.headers
            if attempts > 1 and req.reassert is not None:
                form = {**form, "client_assertion": req.reassert()}
            if req.proof is not None:
                headers = {**headers, "DPoP": req.proof(self._nonce(origin))}
            response = self._once("POST", req.url, form, headers)
            if req.proof is not None and response[1].get("dpop-nonce"):
                self._remember_nonce(origin, response[1]["dpop-nonce"])
            return response

        status, headers, body = self._with_retries(once, req.host, req.grant, max_attempts)
        if req.proof is not None and status in (400, 401) and headers.get("dpop-nonce") and _wants_nonce(body):
            log.info("authorization server host=%s grant=%s: DPoP nonce required, retrying once", req.host, req.grant)
            status, headers, body = self._with_retries(once, req.host, req.grant, max_attempts)
        if not 200 <= status < 300:
            raise parse_error_response(status, headers, body)
        return status, headers, body

    def _nonce(self, origin: str) -> str | None:
        with self._nonce_lock:
            return self._dpop_nonces.get(origin)

    def _remember_nonce(self, origin: str, nonce: str) -> None:
        if len(nonce) > 512 or not nonce.isascii() or not nonce.isprintable():
            return  # RFC 9449: NQCHAR; anything else is not worth echoing back
        with self._nonce_lock:
            if len(self._dpop_nonces) > 1024:
                self._dpop_nonces.clear()
            self._dpop_nonces[origin] = nonce

    def get(self, url: str) -> Response:
        """GET a document (discovery metadata); any non-retryable status is returned."""
        host = urlsplit(url).hostname or ""
        return self._with_retries(lambda: self._once("GET", url, None, {}), host, "discovery")

    def post_json(self, url: str, body: Mapping[str, object]) -> Response:
        """POST a JSON document (RFC 7591 registration); any non-retryable status is returned."""
        host = urlsplit(url).hostname or ""
        return self._with_retries(lambda: self._once("POST", url, None, {}, json_body=body), host, "registration")

    def _once(
        self, method: str, url: str, form: Mapping[str, str] | None, headers: Mapping[str, str],
        json_body: Mapping[str, object] | None = None,
    ) -> Response:
        # identity: a token response is tiny, and compression only adds bomb risk.
        all_headers = {"Accept-Encoding": "identity", **headers}
        try:
            with self._http.stream(method, url, data=form, json=json_body, headers=all_headers) as response:
                body = _read_capped(response)
                return response.status_code, {k.lower(): v for k, v in response.headers.items()}, body
        except (httpx.ConnectTimeout, httpx.PoolTimeout):
            raise UpstreamError("authorization server timed out", retryable=True) from None
        except httpx.TimeoutException:
            # Read or write timed out: the server may have the request, and acted on it.
            raise UpstreamOutcomeUnknown("authorization server timed out", retryable=True) from None
        except httpx.UnsupportedProtocol:
            raise UpstreamError("invalid authorization server URL") from None
        except httpx.ConnectError:
            raise UpstreamError("could not reach authorization server", retryable=True) from None
        except httpx.TransportError:
            raise UpstreamOutcomeUnknown("could not reach authorization server", retryable=True) from None
        except httpx.InvalidURL:
            raise UpstreamError("invalid authorization server URL") from None

    def _with_retries(self, call: Callable[[], Response], host: str, grant: str,
                      max_attempts: int | None = None) -> Response:
        limit = self._max_attempts if max_attempts is None else max(1, min(max_attempts, self._max_attempts))
        start = self._monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                status, headers, body = call()
            except UpstreamError as exc:
                error = exc
                outcome = "network"
                if isinstance(exc, UpstreamOutcomeUnknown) and grant == "refresh_token":
                    # The token may be spent: sending it again would present it twice.
                    log.warning("authorization server host=%s grant=%s attempt=%d: no answer; "
                                "not retried (the refresh token may be spent)", host, grant, attempt)
                    raise
            else:
                error = None if 200 <= status < 300 else parse_error_response(status, headers, body)
                if error is None or not error.retryable:
                    log.debug("authorization server host=%s grant=%s status=%s attempt=%d",
                              host, grant, status, attempt)
                    return status, headers, body
                outcome = str(status)
            delay = None
            if attempt < limit:
                remaining = self._retry_seconds - (self._monotonic() - start)
                delay = retry_delay(error, attempt, remaining, rand=self._rand)
            if delay is None:
                log.warning("authorization server host=%s grant=%s status=%s attempt=%d: giving up",
                            host, grant, outcome, attempt)
                raise error
            log.info("authorization server host=%s grant=%s status=%s attempt=%d: retrying in %.2fs",
                     host, grant, outcome, attempt, delay)
            self._sleep(delay)
