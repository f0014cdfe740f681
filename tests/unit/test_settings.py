"""Settings: defaults, the .env file, and every validated variable."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest

from broker.crypto import Sealer
from broker.errors import ConfigError
from broker.settings import PREFIX, SETTING_NAMES, Settings, load_settings, read_env_file

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()
SHORT_KEY = base64.b64encode(b"sixteen byte key").decode()


def load(**env: str) -> Settings:
    """Settings from exactly these variables (prefix added), no .env file."""
    return load_settings({PREFIX + k: v for k, v in env.items()}, env_file=None)


# --------------------------------------------------------------------------- defaults


def test_defaults_match_design(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    s = load_settings({})
    assert s.database_url == "sqlite:///credbroker.db"  # a SQLite file in the working directory
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.keyring is None and s.transport_key is None
    assert s.servers_file is None
    assert s.api_keys == ()
    assert s.log_level == "INFO"
    assert s.callback_url == s.public_url + "/v1/connect/callback"
    assert s == Settings()


def test_missing_master_key_disables_store_only() -> None:
    s = load()
    assert s.store_enabled is False
    assert s.sealer() is None


def test_empty_value_means_default() -> None:
    s = load(REDIS_URL="", MASTER_KEYS="", RESOLVE_TIMEOUT="")
    assert s.redis_url == Settings().redis_url
    assert s.store_enabled is False
    assert s.resolve_timeout == Settings().resolve_timeout


def test_unknown_and_unprefixed_variables_are_ignored() -> None:
    s = load_settings({"CREDBROKER_NOT_A_SETTING": "x", "REDIS_URL": "bogus", "DATABASE_URL": "bogus"}, env_file=None)
    assert s == Settings()


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().redis_url = "redis://other/0"  # type: ignore[misc]


def test_setting_names_map_to_fields() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert set(SETTING_NAMES.values()) <= names


# --------------------------------------------------------------------------- .env


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\n"
        "\n"
        "CREDBROKER_REDIS_URL=redis://cache.internal:6380/2\n"
        "export CREDBROKER_LOG_LEVEL=debug\n"
        'CREDBROKER_PUBLIC_URL="https://broker.example/"\n'
        "CREDBROKER_RESOLVE_TIMEOUT='12.5'\n"
        f"CREDBROKER_MASTER_KEYS=k1:{KEY_A}\n",
        encoding="utf-8",
    )
    s = load_settings({}, env_file=env_file)
    assert s.redis_url == "redis://cache.internal:6380/2"
    assert s.log_level == "DEBUG"
    assert s.public_url == "https://broker.example"
    assert s.resolve_timeout == 12.5
    assert s.store_enabled


def test_environment_overrides_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CREDBROKER_REDIS_URL=redis://from-file:6379/0\nCREDBROKER_LOG_LEVEL=ERROR\n", encoding="utf-8")
    s = load_settings({"CREDBROKER_REDIS_URL": "redis://from-env:6379/1"}, env_file=env_file)
    assert s.redis_url == "redis://from-env:6379/1"
    assert s.log_level == "ERROR"  # not overridden, still read from the file


def test_default_env_file_is_dotenv_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CREDBROKER_LOG_LEVEL=WARNING\n", encoding="utf-8")
    assert load_settings({}).log_level == "WARNING"


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDBROKER_LOG_LEVEL", "critical")
    assert load_settings(env_file=None).log_level == "CRITICAL"


def test_missing_env_file_is_fine(tmp_path: Path) -> None:
    assert read_env_file(tmp_path / "absent.env") == {}
    assert load_settings({}, env_file=tmp_path / "absent.env") == Settings()


def test_malformed_env_file_line_names_file_and_line(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("# ok\nCREDBROKER_LOG_LEVEL=INFO\nthis line has no equals sign\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\.env:3: expected KEY=VALUE"):
        load_settings({}, env_file=env_file)


# --------------------------------------------------------------------------- master keys


def test_master_keys_parse_in_order() -> None:
    s = load(MASTER_KEYS=f"new:{KEY_B}, old:{KEY_A}")
    assert s.store_enabled
    assert s.keyring is not None
    assert s.keyring.active_kid == "new"
    assert s.keyring.kids == ("new", "old")
    assert KEY_A not in repr(s) and KEY_B not in repr(s)


def test_master_keys_accept_urlsafe_base64_without_padding() -> None:
    raw = bytes([0xFB, 0xFF] * 16)
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    s = load(MASTER_KEYS=f"k1:{urlsafe}")
    assert s.keyring is not None and s.keyring.keys[0][1] == raw


def test_master_key_derives_a_transport_sealer() -> None:
    s = load(MASTER_KEYS=f"k1:{KEY_A}")
    sealer = s.sealer()
    assert sealer is not None
    blob = sealer.seal(b"payload", "purpose")
    assert load(MASTER_KEYS=f"k1:{KEY_A}").sealer().open(blob, "purpose") == b"payload"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value, material",
    [
        pytest.param("k1:!!!not*base64!!!", "!!!not*base64!!!", id="not-base64"),
        pytest.param(f"k1:{SHORT_KEY}", SHORT_KEY, id="wrong-length"),
        pytest.param(f"k1:{KEY_A}{KEY_A}", KEY_A, id="too-long"),
        pytest.param(f"bad kid:{KEY_A}", KEY_A, id="kid-space"),
        pytest.param(f":{KEY_A}", KEY_A, id="kid-empty"),
        pytest.param(f"{'k' * 33}:{KEY_A}", KEY_A, id="kid-too-long"),
        pytest.param(f"k1:{KEY_A},k1:{KEY_B}", KEY_B, id="duplicate-kid"),
        pytest.param(KEY_A, KEY_A, id="no-kid"),
        pytest.param(" , ", "\x00", id="no-key"),
    ],
)
def test_bad_master_keys_refuse_to_start(value: str, material: str) -> None:
    with pytest.raises(ConfigError, match=r"CREDBROKER_MASTER_KEYS") as info:
        load(MASTER_KEYS=value)
    message = str(info.value)
    assert material not in message
    assert KEY_A not in message and KEY_B not in message and SHORT_KEY not in message


# --------------------------------------------------------------------------- transport key


def test_transport_key_is_used_for_sealing() -> None:
    s = load(TRANSPORT_KEY=KEY_B, MASTER_KEYS=f"k1:{KEY_A}")
    assert s.transport_key == base64.b64decode(KEY_B)
    assert KEY_B not in repr(s)
    sealer = s.sealer()
    assert sealer is not None
    blob = sealer.seal(b"x", "p")
    assert Sealer(base64.b64decode(KEY_B)).open(blob, "p") == b"x"


def test_transport_key_without_master_key() -> None:
    s = load(TRANSPORT_KEY=KEY_B)
    assert s.store_enabled is False
    assert s.sealer() is not None


@pytest.mark.parametrize("value", ["not base64 at all", SHORT_KEY])
def test_bad_transport_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"CREDBROKER_TRANSPORT_KEY") as info:
        load(TRANSPORT_KEY=value)
    assert value not in str(info.value)


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    "value",
    ["redis://cache:6379/0", "rediss://:pw@cache.example:6380/1", "unix:///run/redis.sock", "redis://[::1]:6379/0"],
)
def test_redis_url_accepted(value: str) -> None:
    assert load(REDIS_URL=value).redis_url == value


@pytest.mark.parametrize(
    "value", ["http://cache:6379/0", "cache:6379", "redis://", "redis://[::1:6379/0", "redis://cache:999999/0"]
)
def test_bad_redis_url_names_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^CREDBROKER_REDIS_URL: "):
        load(REDIS_URL=value)


def test_public_url_trailing_slash_dropped() -> None:
    s = load(PUBLIC_URL="https://broker.example/base/")
    assert s.public_url == "https://broker.example/base"
    assert s.callback_url == "https://broker.example/base/v1/connect/callback"


@pytest.mark.parametrize("value", ["ftp://broker.example", "https://", "broker.example", "http://[::1/"])
def test_bad_public_url_names_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^CREDBROKER_PUBLIC_URL: "):
        load(PUBLIC_URL=value)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("postgres://u:p@db:5432/broker", "postgresql+psycopg://u:p@db:5432/broker"),
        ("postgresql://u:p@db/broker", "postgresql+psycopg://u:p@db/broker"),
        ("postgresql+psycopg://u:p@db/broker", "postgresql+psycopg://u:p@db/broker"),
        ("sqlite:////var/lib/credbroker/db.sqlite", "sqlite:////var/lib/credbroker/db.sqlite"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
    ],
)
def test_database_url_normalised(value: str, expected: str) -> None:
    assert load(DATABASE_URL=value).database_url == expected


@pytest.mark.parametrize("value", ["mysql://u:hunter2@db/broker", "hunter2", "redis://db/0"])
def test_bad_database_url_names_variable_without_password(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^CREDBROKER_DATABASE_URL: ") as info:
        load(DATABASE_URL=value)
    assert "hunter2" not in str(info.value)


def test_repr_hides_passwords_and_keys() -> None:
    s = load(
        DATABASE_URL="postgresql://u:hunter2@db/broker",
        REDIS_URL="redis://:hunter3@cache:6379/0",
        MASTER_KEYS=f"k1:{KEY_A}",
        TRANSPORT_KEY=KEY_B,
        API_KEYS="service-key-0123456789",
        FLOWER_BASIC_AUTH="admin:hunter4",
    )
    text = repr(s)
    for secret in ("hunter2", "hunter3", "hunter4", KEY_A, KEY_B, "service-key-0123456789"):
        assert secret not in text


# --------------------------------------------------------------------------- numbers


def test_numeric_settings_parsed() -> None:
    s = load(
        HTTP_CONNECT_TIMEOUT="2.5",
        PROVIDER_MAX_ATTEMPTS="7",
        NEAR_EXPIRY_SECONDS="0",
        REFRESH_FRACTION="1.0",
        STATE_TTL_SECONDS="300",
    )
    assert s.http_connect_timeout == 2.5
    assert s.provider_max_attempts == 7 and isinstance(s.provider_max_attempts, int)
    assert s.near_expiry_seconds == 0.0
    assert s.refresh_fraction == 1.0
    assert s.state_ttl_seconds == 300


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("HTTP_READ_TIMEOUT", "ten", r"expected a float"),
        ("RESOLVE_TIMEOUT", "-1", r"must be at least 0"),
        ("RESOLVE_TIMEOUT", "nan", r"must be a finite number"),
        ("RECENT_USE_SECONDS", "inf", r"must be a finite number"),
        ("PROVIDER_MAX_ATTEMPTS", "1.5", r"expected a int"),
        ("PROVIDER_MAX_ATTEMPTS", "0", r"must be at least 1"),
        ("STATE_TTL_SECONDS", "-5", r"must be at least 1"),
        ("REFRESH_FRACTION", "1.5", r"must be between 0.05 and 1.0"),
        ("REFRESH_FRACTION", "0.01", r"must be at least 0.05"),
        ("REFRESH_FRACTION", "nan", r"must be a finite number"),
    ],
)
def test_bad_numbers_name_variable(name: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=rf"^CREDBROKER_{name}: {match}"):
        load(**{name: value})


# --------------------------------------------------------------------------- the rest


def test_api_keys_parsed_as_secrets() -> None:
    s = load(API_KEYS="first-key-0123456789, second-key-0123456789,")
    assert [k.reveal() for k in s.api_keys] == ["first-key-0123456789", "second-key-0123456789"]
    assert "first-key" not in repr(s)


def test_short_api_key_refused_without_echo() -> None:
    with pytest.raises(ConfigError, match=r"^CREDBROKER_API_KEYS: ") as info:
        load(API_KEYS="long-enough-key-0123,short")
    assert "short" not in str(info.value)
    assert "long-enough-key-0123" not in str(info.value)


def test_log_level() -> None:
    assert load(LOG_LEVEL="warning").log_level == "WARNING"
    with pytest.raises(ConfigError, match=r"^CREDBROKER_LOG_LEVEL: "):
        load(LOG_LEVEL="loud")


def test_flower_basic_auth_and_policy() -> None:
    s = load(FLOWER_BASIC_AUTH="admin:pw", POLICY="mypkg.policy:check")
    assert s.flower_basic_auth is not None and s.flower_basic_auth.reveal() == "admin:pw"
    assert s.policy == "mypkg.policy:check"
    with pytest.raises(ConfigError, match=r"^CREDBROKER_FLOWER_BASIC_AUTH: ") as info:
        load(FLOWER_BASIC_AUTH="adminpw")
    assert "adminpw" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^CREDBROKER_POLICY: "):
        load(POLICY="mypkg.policy")


def test_paths() -> None:
    s = load(SERVERS_FILE="/etc/credbroker/servers.yaml", STATE_DIR="/var/lib/credbroker")
    assert s.servers_file == Path("/etc/credbroker/servers.yaml")
    assert s.state_dir == Path("/var/lib/credbroker")


def test_renewal_backoff_settings() -> None:
    s = load_settings({}, env_file=None)
    assert (s.renewal_backoff_seconds, s.renewal_backoff_max_seconds) == (10.0, 3600.0)
    s = load_settings({"CREDBROKER_RENEWAL_BACKOFF_SECONDS": "2", "CREDBROKER_RENEWAL_BACKOFF_MAX_SECONDS": "60"},
                      env_file=None)
    assert (s.renewal_backoff_seconds, s.renewal_backoff_max_seconds) == (2.0, 60.0)
    with pytest.raises(ConfigError, match="RENEWAL_BACKOFF_SECONDS: must be at least 1"):
        load_settings({"CREDBROKER_RENEWAL_BACKOFF_SECONDS": "0"}, env_file=None)
    with pytest.raises(ConfigError, match="RENEWAL_BACKOFF_MAX_SECONDS: must be at least RENEWAL"):
        load_settings({"CREDBROKER_RENEWAL_BACKOFF_SECONDS": "100",
                       "CREDBROKER_RENEWAL_BACKOFF_MAX_SECONDS": "50"}, env_file=None)
