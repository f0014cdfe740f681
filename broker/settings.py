"""One frozen settings object, built from ``CREDBROKER_*`` variables.

Built from an injectable environment (a plain dict in tests) plus an optional
``.env`` file; the process environment wins over the file. A malformed value
stops start-up with a ConfigError naming the variable; a missing master key
only disables the store.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from .crypto import Keyring, Sealer, parse_key, parse_master_keys
from .errors import ConfigError
from .keyspace import validate_namespace
from .secret import Secret

__all__ = ["Settings", "PREFIX", "SETTING_NAMES", "read_env_file", "load_settings"]

PREFIX = "CREDBROKER_"
# HKDF labels of the two subkeys of each master key; changing one invalidates live blobs.
TRANSPORT_LABEL = "credbroker transport v1"
INTERNAL_LABEL = "credbroker internal v1"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: KEY=VALUE lines, ``#`` comments, optional quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


@dataclass(frozen=True)
class Settings:
    """Every setting of credential-broker; see the README for each one."""

    # repr=False: these URLs may carry passwords and Settings gets logged.
    database_url: str = field(default="sqlite:///credbroker.db", repr=False)
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    # Prefix of every Redis key, queue and channel ("" = the historical names).
    namespace: str = ""
    keyring: Keyring | None = None
    transport_key: bytes | None = field(default=None, repr=False)
    servers_file: Path | None = None
    api_keys: tuple[Secret, ...] = ()
    public_url: str = "http://127.0.0.1:8080"
    policy: str | None = None
    # Authorization-server calls.
    http_connect_timeout: float = 5.0
    http_read_timeout: float = 10.0
    provider_retry_seconds: float = 10.0
    provider_max_attempts: int = 4
    # Added to the worst-case provider call to size a renewal's lease (broker.lease).
    lease_margin_seconds: float = 5.0
    # Expiry and refresh.
    near_expiry_seconds: float = 60.0
    refresh_fraction: float = 0.8
    recent_use_seconds: float = 86400.0
    refresh_scan_seconds: float = 5.0
    refresh_jitter_seconds: float = 2.0
    # Per-credential backoff after a failed renewal: first delay and cap.
    renewal_backoff_seconds: float = 10.0
    renewal_backoff_max_seconds: float = 3600.0
    # Resolve and flights.
    resolve_timeout: float = 30.0
    task_time_limit: float = 60.0
    # Seconds a taken, unacknowledged task message may wait before the Redis
    # transport delivers it again; 0: twice the task time limit plus 60 s.
    visibility_timeout: float = 0.0
    state_ttl_seconds: int = 600
    # Capacity and per-server protection (workers/upstream_guard.py, the beat's scan budget).
    worker_slots: int = 64  # the cluster's worker slots (sum of --concurrency; one default worker: 64), an estimate
    server_max_concurrency: int = 0  # per server; 0 = half of worker_slots, at least 1
    breaker_failures: int = 5
    breaker_cooldown_seconds: float = 30.0
    # Connect flow completion and abuse limits (README "Security model").
    connect_callback_url: str | None = None
    connect_states_per_pair: int = 5
    audit_retention_days: int = 0  # 0: keep forever
    # Operations.
    log_level: str = "INFO"
    flower_basic_auth: Secret | None = None
    state_dir: Path = Path(".credbroker")
    # Connection lifecycle webhooks (Standard Webhooks); repr=False: URLs may hold tokens.
    webhook_urls: tuple[str, ...] = field(default=(), repr=False)
    webhook_secret: Secret | None = None
    webhook_max_attempts: int = 8
    webhook_timeout: float = 5.0
    webhook_retry_seconds: float = 1.0

    @property
    def store_enabled(self) -> bool:
        return self.keyring is not None

    def sealer(self) -> Sealer | None:
        """The transport sealer (what a gateway also holds): it opens the cache and
        flight results. TRANSPORT_KEY, else a subkey of each master key."""
        if self.transport_key is not None:
            return Sealer(self.transport_key)
        if self.keyring is not None:
            return Sealer(self.keyring.derive_ring(TRANSPORT_LABEL))
        return None

    def internal_sealer(self) -> Sealer | None:
        """The sealer only the API and workers hold (connect states and what a
        gateway must not forge): a subkey of each master key, never TRANSPORT_KEY."""
        if self.keyring is None:
            return None
        return Sealer(self.keyring.derive_ring(INTERNAL_LABEL), role="internal")

    @property
    def callback_url(self) -> str:
        """Where the authorization server sends the browser back."""
        return self.connect_callback_url or self.public_url.rstrip("/") + "/v1/connect/callback"

    @property
    def open_url(self) -> str | None:
        """The broker URL a connect link starts at (None when a gateway hosts the callback)."""
        return None if self.connect_callback_url else self.public_url.rstrip("/") + "/v1/connect/open"


# Variable name (without prefix) -> Settings field, for docs and for tests
# that check docker-compose only sets real settings.
SETTING_NAMES: dict[str, str] = {
    "DATABASE_URL": "database_url",
    "REDIS_URL": "redis_url",
    "NAMESPACE": "namespace",
    "MASTER_KEYS": "keyring",
    "TRANSPORT_KEY": "transport_key",
    "SERVERS_FILE": "servers_file",
    "API_KEYS": "api_keys",
    "PUBLIC_URL": "public_url",
    "POLICY": "policy",
    "HTTP_CONNECT_TIMEOUT": "http_connect_timeout",
    "HTTP_READ_TIMEOUT": "http_read_timeout",
    "PROVIDER_RETRY_SECONDS": "provider_retry_seconds",
    "PROVIDER_MAX_ATTEMPTS": "provider_max_attempts",
    "LEASE_MARGIN_SECONDS": "lease_margin_seconds",
    "NEAR_EXPIRY_SECONDS": "near_expiry_seconds",
    "REFRESH_FRACTION": "refresh_fraction",
    "RECENT_USE_SECONDS": "recent_use_seconds",
    "REFRESH_SCAN_SECONDS": "refresh_scan_seconds",
    "REFRESH_JITTER_SECONDS": "refresh_jitter_seconds",
    "RENEWAL_BACKOFF_SECONDS": "renewal_backoff_seconds",
    "RENEWAL_BACKOFF_MAX_SECONDS": "renewal_backoff_max_seconds",
    "RESOLVE_TIMEOUT": "resolve_timeout",
    "TASK_TIME_LIMIT": "task_time_limit",
    "VISIBILITY_TIMEOUT": "visibility_timeout",
    "STATE_TTL_SECONDS": "state_ttl_seconds",
    "WORKER_SLOTS": "worker_slots",
    "SERVER_MAX_CONCURRENCY": "server_max_concurrency",
    "BREAKER_FAILURES": "breaker_failures",
    "BREAKER_COOLDOWN_SECONDS": "breaker_cooldown_seconds",
    "CONNECT_CALLBACK_URL": "connect_callback_url",
    "CONNECT_STATES_PER_PAIR": "connect_states_per_pair",
    "AUDIT_RETENTION_DAYS": "audit_retention_days",
    "LOG_LEVEL": "log_level",
    "FLOWER_BASIC_AUTH": "flower_basic_auth",
    "STATE_DIR": "state_dir",
    "WEBHOOK_URLS": "webhook_urls",
    "WEBHOOK_SECRET": "webhook_secret",
    "WEBHOOK_MAX_ATTEMPTS": "webhook_max_attempts",
    "WEBHOOK_TIMEOUT": "webhook_timeout",
    "WEBHOOK_RETRY_SECONDS": "webhook_retry_seconds",
}


def _url(name: str, value: str, schemes: tuple[str, ...]) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:  # e.g. an unclosed IPv6 bracket or a port out of range
        raise ConfigError(f"{PREFIX}{name}: not a valid URL") from None
    if parts.scheme not in schemes:
        raise ConfigError(f"{PREFIX}{name}: scheme must be one of {', '.join(schemes)}")
    if parts.scheme.startswith(("http", "redis", "sentinel")) and not parts.hostname and parts.scheme != "redis+socket":
        raise ConfigError(f"{PREFIX}{name}: URL has no host")
    return value


def _number(name: str, value: str, kind: type, minimum: float) -> float | int:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}: expected a {kind.__name__}, got {value!r}") from None
    if not math.isfinite(number):  # nan compares false to everything and would pass
        raise ConfigError(f"{PREFIX}{name}: must be a finite number")
    if number < minimum:
        raise ConfigError(f"{PREFIX}{name}: must be at least {minimum}")
    return number


def _database_url(value: str) -> str:
    scheme = value.split(":", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(f"{PREFIX}DATABASE_URL: expected sqlite:/// or postgresql:// URL")
    if scheme == "postgres":  # common alias that SQLAlchemy rejects
        value = "postgresql" + value[len("postgres") :]
    if value.startswith("postgresql://"):
        value = "postgresql+psycopg://" + value[len("postgresql://") :]
    return value


def _webhook_secret(value: str) -> Secret:
    """A Standard Webhooks signing secret: ``whsec_`` and base64 of 24-64 bytes."""
    import base64
    import binascii

    body = value[len("whsec_"):] if value.startswith("whsec_") else ""
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not 24 <= len(raw) <= 64:
        raise ConfigError(f"{PREFIX}WEBHOOK_SECRET: expected whsec_ followed by base64 of 24 to 64 random bytes")
    return Secret(value)


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | str | None = ".env"
) -> Settings:
    """Build Settings from the environment (default ``os.environ``) and ``.env``."""
    env: dict[str, str] = {}
    if env_file is not None:
        env.update(read_env_file(Path(env_file)))
    env.update(os.environ if environ is None else environ)
    raw = {k[len(PREFIX) :]: v for k, v in env.items() if k.startswith(PREFIX) and v != ""}
    values: dict[str, object] = {}
    defaults = Settings()
    for name, value in raw.items():
        if name not in SETTING_NAMES:
            continue  # unknown names are ignored so newer configs don't break older builds
        attr = SETTING_NAMES[name]
        default = getattr(defaults, attr)
        if name == "DATABASE_URL":
            values[attr] = _database_url(value)
        elif name == "REDIS_URL":
            if value.startswith("sentinel://"):  # several ';'-joined addresses: parsed by workers.redisconn
                if "?" not in value or "master_name=" not in value.split("?", 1)[1]:
                    raise ConfigError(f"{PREFIX}REDIS_URL: a sentinel URL needs ?master_name=NAME")
                for part in value.split("?", 1)[0].split(";"):
                    _url(name, part, ("sentinel",))
                values[attr] = value
            else:
                values[attr] = _url(name, value, ("redis", "rediss", "unix"))
        elif name == "NAMESPACE":
            values[attr] = validate_namespace(value)
        elif name == "PUBLIC_URL":
            values[attr] = _url(name, value, ("http", "https")).rstrip("/")
        elif name == "CONNECT_CALLBACK_URL":
            values[attr] = _url(name, value, ("http", "https"))
        elif name == "MASTER_KEYS":
            values[attr] = Keyring.from_mapping(parse_master_keys(value, PREFIX + name))
        elif name == "TRANSPORT_KEY":
            values[attr] = parse_key(value, PREFIX + name)
        elif name == "API_KEYS":
            keys = tuple(Secret(k.strip()) for k in value.split(",") if k.strip())
            if any(len(k.reveal()) < 16 for k in keys):
                raise ConfigError(f"{PREFIX}API_KEYS: each key must be at least 16 characters")
            values[attr] = keys
        elif name == "FLOWER_BASIC_AUTH":
            if ":" not in value:
                raise ConfigError(f"{PREFIX}FLOWER_BASIC_AUTH: expected user:password")
            values[attr] = Secret(value)
        elif name == "POLICY":
            if ":" not in value:
                raise ConfigError(f"{PREFIX}POLICY: expected package.module:object")
            values[attr] = value
        elif name == "WEBHOOK_URLS":
            values[attr] = tuple(_url(name, u.strip(), ("http", "https")) for u in value.split(",") if u.strip())
        elif name == "WEBHOOK_SECRET":
            values[attr] = _webhook_secret(value)
        elif name == "REFRESH_FRACTION":
            fraction = _number(name, value, float, 0.05)
            if fraction > 1.0:
                raise ConfigError(f"{PREFIX}REFRESH_FRACTION: must be between 0.05 and 1.0")
            values[attr] = fraction
        elif name in ("RENEWAL_BACKOFF_SECONDS", "RENEWAL_BACKOFF_MAX_SECONDS"):
            # Below a second, "backoff" would be a retry loop against a failing server.
            values[attr] = _number(name, value, float, 1.0)
        elif name == "LOG_LEVEL":
            if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                raise ConfigError(f"{PREFIX}LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR")
            values[attr] = value.upper()
        elif isinstance(default, Path) or attr == "servers_file":
            values[attr] = Path(value)
        elif isinstance(default, bool):
            values[attr] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            values[attr] = _number(name, value, int, 1)
        elif isinstance(default, float):
            values[attr] = _number(name, value, float, 0.0)
        else:
            values[attr] = value
    base = values.get("renewal_backoff_seconds", defaults.renewal_backoff_seconds)
    if values.get("renewal_backoff_max_seconds", defaults.renewal_backoff_max_seconds) < base:  # type: ignore[operator]
        raise ConfigError(f"{PREFIX}RENEWAL_BACKOFF_MAX_SECONDS: must be at least RENEWAL_BACKOFF_SECONDS")
    known = {f.name for f in fields(Settings)}
    assert set(values) <= known
    return Settings(**values)  # type: ignore[arg-type]
