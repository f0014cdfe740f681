"""Small I/O helpers of the workers: the per-thread HTTP pools and the
cluster counts a batch gathers before writing them once."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import httpx
import pytest

from broker.oauth.sender import make_http_client
from broker.oauth.transport import ThreadLocalTransport
from broker.settings import Settings
from workers.common.metrics import DeferredCounts, cluster_incr


class _Recording(httpx.BaseTransport):
    """Answers 200 and remembers which transport (and thread) served each request."""

    made: list[_Recording] = []

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.closed = False
        _Recording.made.append(self)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.threads.add(threading.get_ident())
        return httpx.Response(200, json={"ok": True})

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def recording() -> Iterator[type[_Recording]]:
    _Recording.made = []
    yield _Recording


def test_each_thread_gets_its_own_pool_and_close_closes_all(recording) -> None:  # type: ignore[no-untyped-def]
    transport = ThreadLocalTransport(recording)
    client = httpx.Client(transport=transport)
    client.post("http://as.test/token")
    client.post("http://as.test/token")  # same thread: same pool
    assert len(recording.made) == 1

    def call() -> None:
        assert client.post("http://as.test/token").json() == {"ok": True}

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(recording.made) == 4
    assert all(len(t.threads) == 1 for t in recording.made)
    gc.collect()
    assert all(t.closed for t in recording.made[1:])  # the ended threads' pools are closed
    assert not recording.made[0].closed  # this thread's is still in use
    client.close()
    assert all(t.closed for t in recording.made)
    errors: list[BaseException] = []

    def after_close() -> None:
        try:
            transport.handle_request(httpx.Request("POST", "http://as.test/token"))
        except RuntimeError as exc:
            errors.append(exc)

    late = threading.Thread(target=after_close)
    late.start()
    late.join()
    assert len(errors) == 1 and len(recording.made) == 5 and recording.made[-1].closed  # no pool outlives close


def test_the_provider_client_uses_per_thread_pools_unless_given_a_transport() -> None:
    with make_http_client(Settings()) as http:
        assert isinstance(http._transport, ThreadLocalTransport)  # noqa: SLF001
    mock = httpx.MockTransport(lambda request: httpx.Response(204))
    with make_http_client(Settings(), transport=mock) as http:
        assert http._transport is mock  # noqa: SLF001


class _Hash:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def hincrby(self, key: str, field: str, amount: int) -> None:
        self.calls.append((field, amount))


def test_deferred_counts_go_out_once_per_flush() -> None:
    direct = _Hash()
    counts = DeferredCounts()

    def three_calls() -> None:
        for _ in range(3):
            cluster_incr(direct, "credbroker_provider_calls_total", grant="token_exchange", result="ok")

    workers = [threading.Thread(target=counts.run, args=(three_calls,)) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert direct.calls == []  # nothing reached Redis while gathering
    pipe = _Hash()
    counts.flush(pipe)
    assert len(pipe.calls) == 1 and pipe.calls[0][1] == 12
    counts.flush(pipe)
    assert len(pipe.calls) == 1  # flushed counts are gone
    cluster_incr(direct, "credbroker_provider_calls_total", grant="token_exchange", result="ok")
    assert len(direct.calls) == 1  # outside ``run`` counts go straight out
