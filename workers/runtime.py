"""Per-process wiring: clients built once per process, rebuilt after a fork.

A Celery prefork child must not reuse its parent's database or Redis
sockets, so the runtime is keyed by pid and built lazily on first use.
"""

from __future__ import annotations

import logging
import os
import threading
from urllib.parse import parse_qs, urlsplit
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import redis

from broker.clock import Clock, SystemClock
from broker.connect import ConnectFlow
from broker.crypto import DecryptError, Sealer
from broker.db import make_engine
from broker.keyspace import set_namespace
from broker.lease import lease_seconds
from broker.oauth.client import OAuthClient
from broker.oauth.discovery import MetadataCache
from broker.oauth.sender import TokenEndpointSender, make_http_client
import httpx
from broker.policy import Policy, load_policy
from broker.resolver import Resolver
from broker.servers import Mode, ServerRegistry, servers_from_settings
from broker.settings import Settings, load_settings
from broker.state import BIND_SUFFIX, RedisStateStore, state_key
from broker.oauth.mcp_discovery import client_metadata_url
from broker.registrations import RegistrationStore
from broker.store import CredentialStore

from .auditstream import StreamAuditSink
from .constants import pending_connect_key
from .flight import Claims
from .metrics import cluster_incr
from .redisconn import redis_client as _redis_client
from .upstream_guard import GuardedOAuth, GuardLimits, ServerGuard

__all__ = ["Runtime", "runtime", "set_settings", "build_runtime"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything a worker process needs, built from one Settings."""

    settings: Settings
    servers: ServerRegistry
    redis: redis.Redis
    sealer: Sealer | None
    internal_sealer: Sealer | None
    claims: Claims
    audit: StreamAuditSink
    store: CredentialStore
    oauth: OAuthClient
    resolver: Resolver
    connect: ConnectFlow | None
    policy: Policy
    clock: Clock
    http: httpx.Client
    heartbeat_claims: Claims
    guard: ServerGuard | None = None

    def close(self) -> None:
        self.http.close()
        self.heartbeat_claims.client.close()
        self.audit.close()
        self.store.engine.dispose()
        self.redis.close()


# redis-py 8 caps a default pool at 100 connections and then fails at once with
# "Too many connections"; a gateway or the API runs more concurrent resolves than
# that, so callers queue for a connection (up to 10 s, or their deadline) instead
# of getting a 503.
REDIS_POOL_MAX = 1024


def redis_client(settings: Settings) -> redis.Redis:
    """The process's pooled client (plain or Sentinel, see ``workers.redisconn``)."""
    return _redis_client(settings, max_connections=REDIS_POOL_MAX)


def build_runtime(settings: Settings, clock: Clock | None = None) -> Runtime:
    set_namespace(settings.namespace)  # this process serves one deployment
    clock = clock or SystemClock()
    servers = servers_from_settings(settings)
    client = redis_client(settings)
    sealer = settings.sealer()
    internal = settings.internal_sealer()
    near = timedelta(seconds=settings.near_expiry_seconds)
    store = CredentialStore(make_engine(settings.database_url), settings.keyring, clock=clock,
                            near_expiry=near, refresh_fraction=settings.refresh_fraction,
                            idle_seconds=_idle_limits(servers))
    http = make_http_client(settings)
    oauth = OAuthClient(TokenEndpointSender.from_settings(settings, http), MetadataCache(clock=clock), clock,
                        on_call=lambda grant, result: cluster_incr(client, "credbroker_provider_calls_total",
                                                                   grant=grant, result=result),
                        registrations=RegistrationStore(store.engine, settings.keyring, clock=clock),
                        redirect_uri=settings.callback_url,
                        client_metadata_url=client_metadata_url(settings.public_url))
    audit = StreamAuditSink(client)
    connect = None
    if internal is not None:
        # States are sealed with the internal key: a gateway holding only the
        # transport key cannot forge one.
        connect = ConnectFlow(servers, store, oauth, RedisStateStore(client, internal), audit, clock,
                              settings.callback_url, settings.state_ttl_seconds, open_url=settings.open_url,
                              states_per_pair=settings.connect_states_per_pair,
                              lease_seconds=lease_seconds(settings))
    policy = load_policy(settings.policy)
    # Flights call providers through the per-server limiter and breaker.
    guard = ServerGuard(client, GuardLimits.from_settings(settings), clock)
    resolver = Resolver(
        servers, store, GuardedOAuth(oauth, guard), audit, clock, policy=policy,
        connect_url=pending_connect_url(client, internal, connect, settings.state_ttl_seconds) if connect else None,
        near_expiry=near, refresh_fraction=settings.refresh_fraction,
        backoff_seconds=settings.renewal_backoff_seconds, backoff_max_seconds=settings.renewal_backoff_max_seconds,
        lease_seconds=lease_seconds(settings), lease_margin=settings.lease_margin_seconds,
    )
    resolver.on_rotation_lost = lambda server: cluster_incr(client, "credbroker_rotation_lost_total", server=server)
    # Flight heartbeats get their own connection with a short timeout, so one
    # stalled extension is noticed well before the claim could expire.
    heartbeat = _redis_client(settings, max_connections=64, socket_timeout=1, connect_timeout=1)
    return Runtime(settings, servers, client, sealer, internal, Claims(client), audit, store, oauth, resolver, connect,
                   policy, clock, http, Claims(heartbeat), guard)


def _idle_limits(servers: ServerRegistry) -> Callable[[str], float | None]:
    """server_key -> refresh-token idle limit, for connect servers that set one."""
    limits = {s.key: float(s.auth_broker.refresh_token_idle_seconds) for s in servers.values()
              if s.mode is Mode.OAUTH_CONNECT and s.auth_broker.refresh_token_idle_seconds}
    return limits.get


def pending_connect_url(client: redis.Redis, sealer: Sealer | None, connect: ConnectFlow,
                        ttl_seconds: int) -> Callable[[str, str], str | None]:
    """Connect URLs for not-connected errors, one live state per (user, server):
    a gateway retrying a resolve in a loop must not mint a new state each time.
    A state is reused for the first half of its life, so a link handed out is
    always good for at least half the TTL."""
    reuse_seconds = max(1, ttl_seconds // 2)

    def url_for(user_id: str, server_name: str) -> str | None:
        assert sealer is not None
        key = pending_connect_key(user_id, connect.servers.get_server(server_name).key)
        try:
            blob = client.get(key)
            if blob is not None:
                pending = sealer.open_json(blob, key)
                # Reuse only while its state is unused (a callback consumes it)
                # and, in browser mode, no browser has opened the link yet.
                if (isinstance(pending, dict) and client.exists(pending["k"])
                        and not client.exists(pending["k"] + BIND_SUFFIX)):
                    return str(pending["u"])
        except (redis.RedisError, DecryptError, ValueError, KeyError):
            pass
        url = connect.start(user_id, server_name).connect_url
        state = parse_qs(urlsplit(url).query).get("state", [""])[0]
        try:
            client.set(key, sealer.seal_json({"u": url, "k": state_key(state)}, key), ex=reuse_seconds)
        except redis.RedisError:
            pass
        return url

    return url_for


_lock = threading.Lock()
_current: tuple[int, Runtime] | None = None
_settings: Settings | None = None


def set_settings(settings: Settings | None) -> None:
    """Use these settings instead of the environment (tests, embedded runs)."""
    global _settings, _current
    with _lock:
        _settings = settings
        _current = None


def runtime() -> Runtime:
    """This process's runtime, built on first use and after every fork."""
    global _current
    pid = os.getpid()
    current = _current
    if current is not None and current[0] == pid:
        return current[1]
    with _lock:
        if _current is None or _current[0] != pid:
            _current = (pid, build_runtime(_settings or load_settings()))
        return _current[1]
