"""AsyncBrokerClient under asyncio against real Redis, real Celery workers and
the sandbox provider (which counts the grants it issues): a thousand
concurrent fast-path resolves in one loop, a burst of cold resolves costing
one provider call, the sync client's errors, and the caller's deadline
against a black-holed (SIGSTOPped) private Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from broker.errors import BrokerError, NotConnected, SubjectTokenMissing, UnknownServer
from tests.cluster import Cluster
from tests.integration.test_cluster import sign_in
from tests.integration.test_deadlines import DEADLINE, SLACK, Stalled, stalled  # noqa: F401  (fixture)
from tests.integration.test_namespace import two  # noqa: F401  (fixture)
from tests.secrets import register
from workers.client import AsyncBrokerClient
from workers.common.metrics import METRICS

pytestmark = pytest.mark.integration


def _exchanges(sandbox: Any) -> int:
    return int(sandbox.provider.stats()["grants"].get("token_exchange", 0))


def _fast_count() -> float:
    return METRICS.value("credbroker_resolves_total", outcome="ok", path="fast")


def test_thousand_concurrent_fast_path_resolves_in_one_loop(cluster: Cluster, sandbox: Any) -> None:
    cluster.start_worker()
    sign_in(cluster, sandbox, "alice")

    async def main() -> tuple[str, list[Any]]:
        async with AsyncBrokerClient(settings=cluster.settings) as client:
            first = await client.resolve("alice", "tx", timeout=20)  # one flight fills the cache
            register(first.value.reveal()[7:])
            results = await asyncio.gather(*(client.resolve("alice", "tx", timeout=10) for _ in range(1000)),
                                           return_exceptions=True)
            return first.value.reveal(), results

    before = _fast_count()
    header, results = asyncio.run(main())
    assert header.startswith("Bearer ")
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert all(r.value.reveal() == header for r in results)
    assert _fast_count() - before == 1000  # every one served from the cache, none flew
    assert _exchanges(sandbox) == 1


def test_burst_of_cold_resolves_for_one_pair_costs_one_provider_call(cluster: Cluster, sandbox: Any) -> None:
    cluster.start_worker(concurrency=2)
    sign_in(cluster, sandbox, "bob")

    async def main() -> list[Any]:
        async with AsyncBrokerClient(settings=cluster.settings) as client:
            return await asyncio.gather(*(client.resolve("bob", "tx", timeout=20) for _ in range(200)),
                                        return_exceptions=True)

    results = asyncio.run(main())
    assert [r for r in results if isinstance(r, BaseException)] == []
    headers = {r.value.reveal() for r in results}
    for h in headers:
        register(h[7:])
    assert len(headers) == 1
    assert _exchanges(sandbox) == 1


def _outcome(call: Any) -> BrokerError:
    try:
        call()
    except BrokerError as exc:
        return exc
    raise AssertionError("no error")


def test_errors_are_the_sync_clients(cluster: Cluster, sandbox: Any) -> None:
    cluster.start_worker()

    async def main() -> list[BrokerError]:
        out: list[BrokerError] = []
        async with AsyncBrokerClient(settings=cluster.settings) as client:
            for user, server in (("carol", "gh"), ("carol", "tx"), ("carol", "nope")):
                try:
                    await client.resolve(user, server, timeout=20)
                except BrokerError as exc:
                    out.append(exc)
        return out

    got = asyncio.run(main())
    with cluster.client() as sync:
        want = [_outcome(lambda s=s: sync.resolve("carol", s, timeout=20)) for s in ("gh", "tx", "nope")]
    assert [type(e) for e in got] == [NotConnected, SubjectTokenMissing, UnknownServer]
    assert [type(e) for e in got] == [type(e) for e in want]
    assert [(e.code, e.http_status) for e in got] == [(e.code, e.http_status) for e in want]
    nc = got[0]
    assert isinstance(nc, NotConnected) and nc.reason == "never_connected"
    assert nc.connect_url and nc.connect_url.startswith(cluster.settings.public_url + "/v1/connect/open?state=")
    register(nc.connect_url.split("state=", 1)[1])


def test_no_worker_times_out_at_the_deadline_and_says_why(cluster: Cluster, sandbox: Any) -> None:
    from broker.errors import ResolveTimeout

    sign_in(cluster, sandbox, "gina")  # no worker started: the flight's task waits in the queue

    async def main() -> tuple[float, BrokerError]:
        async with AsyncBrokerClient(settings=cluster.settings) as client:
            started = time.monotonic()
            try:
                await client.resolve("gina", "tx", timeout=2)
            except BrokerError as exc:
                return time.monotonic() - started, exc
        raise AssertionError("resolved without a worker")

    took, exc = asyncio.run(main())
    assert isinstance(exc, ResolveTimeout) and 1.9 < took < 2 + SLACK, (exc, took)
    assert "no worker took them" in exc.message


def test_warm_queues_the_users_servers(cluster: Cluster, sandbox: Any) -> None:
    cluster.start_worker()
    sign_in(cluster, sandbox, "dave")

    async def main() -> tuple[list[str], Any]:
        async with AsyncBrokerClient(settings=cluster.settings) as client:
            queued = await client.warm("dave", ["tx", "gh"], timeout=20)
            with pytest.raises(UnknownServer):
                await client.warm("dave", ["nope"])
            return queued, await client.resolve("dave", "tx", timeout=20)

    queued, resolved = asyncio.run(main())
    register(resolved.value.reveal()[7:])
    assert queued == ["tx"]  # gh: never connected, skipped
    assert _exchanges(sandbox) == 1  # the resolve joined or read what the warm minted


def test_policy_hook_runs_in_the_caller_and_use_marks_reach_redis(cluster: Cluster, sandbox: Any) -> None:
    import json

    from broker.errors import PolicyDenied
    from broker.servers import servers_from_settings
    from workers.common.constants import used_zset

    cluster.start_worker()
    sign_in(cluster, sandbox, "frank")

    async def main() -> None:
        async with AsyncBrokerClient(settings=cluster.settings,
                                     policy=lambda data: (data.server != "obo", "obo is off limits")) as client:
            register((await client.resolve("frank", "tx", timeout=20)).value.reveal()[7:])
            with pytest.raises(PolicyDenied, match="off limits"):
                await client.resolve("frank", "obo", timeout=20)
        # aclose flushed the buffered use marks

    asyncio.run(main())
    servers = servers_from_settings(cluster.settings)
    marks = {tuple(json.loads(m)) for m in cluster.redis.zrange(used_zset(), 0, -1)}
    assert ("frank", servers["tx"].key) in marks
    assert ("frank", servers["obo"].key) not in marks  # denied: not in use


@pytest.mark.parametrize("two", [("alpha", "beta")], indirect=True)
def test_namespaces_keep_async_clients_apart(two: tuple[Cluster, Cluster], sandbox: Any) -> None:  # noqa: F811
    a, b = two
    for c in (a, b):
        c.start_worker()
        sign_in(c, sandbox, "erin")

    async def main() -> list[str]:
        out = []
        for c, server in ((a, "a-tx"), (b, "b-tx")):
            async with AsyncBrokerClient(settings=c.settings) as client:
                for _ in range(2):  # a flight, then the fast path
                    out.append((await client.resolve("erin", server, timeout=20)).value.reveal())
                with pytest.raises(UnknownServer):  # each deployment knows only its own servers
                    await client.resolve("erin", "b-tx" if c is a else "a-tx", timeout=5)
        return out

    headers = asyncio.run(main())
    for h in headers:
        register(h[7:])
    assert headers[0] == headers[1] and headers[2] == headers[3] and headers[0] != headers[2]
    assert _exchanges(sandbox) == 2
    names = [k.decode() for k in a.redis.scan_iter(count=1000)]
    assert names and all(n.startswith(("alpha:", "beta:")) for n in names), sorted(names)[:20]
    assert any(n.startswith("alpha:credbroker:cache:") for n in names)
    assert any(n.startswith("beta:credbroker:cache:") for n in names)


async def _timed(coro: Any) -> tuple[float, str]:
    started = time.monotonic()
    try:
        await coro
    except BrokerError as exc:
        code = exc.code
    else:
        code = "ok"
    took = time.monotonic() - started
    print(f"async deadline: {code} after {took:.2f}s")  # figures for the report (pytest -s)
    return took, code


def test_resolve_deadline_holds_when_redis_black_holed(stalled: Stalled, sandbox: Any) -> None:  # noqa: F811
    c = stalled.cluster
    for u in ("warm", "cold-a", "cold-b"):
        sign_in(c, sandbox, u)

    async def main() -> list[tuple[float, str]]:
        out = []
        async with AsyncBrokerClient(settings=c.settings) as client:
            await client.resolve("warm", "tx", timeout=10)  # opens the pool, the producer, the listener
            stalled.stall()
            out.append(await _timed(client.resolve("cold-a", "tx", timeout=DEADLINE)))  # a flight
            out.append(await _timed(client.resolve("warm", "tx", timeout=DEADLINE)))  # the fast path
            # Several at once, as a gateway would send them, from a client built during the stall.
            cold = AsyncBrokerClient(settings=c.settings)
            out.extend(await asyncio.gather(*(_timed(cold.resolve(u, "tx", timeout=DEADLINE))
                                              for u in ("cold-a", "cold-b", "warm"))))
            stalled.unstall()
            # Redis back: the same clients recover on their own.
            for cl, user in ((cold, "cold-b"), (client, "cold-a")):
                for _ in range(100):
                    if (await _timed(cl.resolve(user, "tx", timeout=5)))[1] == "ok":
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError(f"{user} did not recover")
            await cold.aclose()
        return out

    try:
        results = asyncio.run(main())
    finally:
        stalled.unstall()
    assert len(results) == 5
    assert all(code in ("unavailable", "timeout") and took < DEADLINE + SLACK for took, code in results), results
