"""Settings come from SEALSTREAM_* variables, purely, with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.keys import MasterKey
from worker.settings import Settings, redacted_url


def test_defaults_without_environment() -> None:
    """An empty environment gives the documented defaults."""
    s = Settings.from_env({})
    assert ("redis://127.0.0.1:6379/0", "sealstream", 1) == (s.redis_url, s.prefix, s.shards)
    assert (30_000, 900_000, 10) == (s.claim_idle_ms, s.replay_window_ms, s.delivery_limit)
    assert (1000, 100_000) == (s.reply_maxlen, s.dlq_maxlen)


def test_variables_are_read() -> None:
    """Each SEALSTREAM_* variable sets its field."""
    s = Settings.from_env(
        {
            "SEALSTREAM_REDIS_URL": "redis://example:1/2",
            "SEALSTREAM_PREFIX": "app",
            "SEALSTREAM_SHARDS": "4",
            "SEALSTREAM_CLAIM_IDLE_MS": "5000",
            "SEALSTREAM_REPLAY_WINDOW_MS": "60000",
            "SEALSTREAM_SERVICE_KEY_FILE": "/k/service.pem",
            "SEALSTREAM_REPLY_MAXLEN": "50",
            "SEALSTREAM_HANDLER_TIMEOUT_S": "2.5",
        }
    )
    assert ("redis://example:1/2", "app", 4) == (s.redis_url, s.prefix, s.shards)
    assert (5000, 60_000, 50, 2.5) == (
        s.claim_idle_ms,
        s.replay_window_ms,
        s.reply_maxlen,
        s.handler_timeout_s,
    )
    assert Path("/k/service.pem") == s.service_key_file


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SEALSTREAM_SHARDS", "0"),
        ("SEALSTREAM_CONCURRENCY", "lots"),
        ("SEALSTREAM_HANDLER_TIMEOUT_S", "-1"),
        ("SEALSTREAM_HANDLER_TIMEOUT_S", "inf"),
        ("SEALSTREAM_SESSION_KEY_BITS", "2500"),
        ("SEALSTREAM_LOG_FORMAT", "xml"),
        ("SEALSTREAM_PREFIX", "a{b}"),
        ("SEALSTREAM_SESSION_KEY_BITS", "1024"),
        ("SEALSTREAM_LOG_LEVEL", "loud"),
        ("SEALSTREAM_REDIS_URL", "http://127.0.0.1:6379"),
        ("SEALSTREAM_REDIS_URL", "127.0.0.1:6379"),
        ("SEALSTREAM_UNWRAP_PROCESSES", "-1"),
        ("SEALSTREAM_UNWRAP_PROCESSES", "65"),
    ],
)
def test_bad_values_name_their_variable(name: str, value: str) -> None:
    """A bad value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_unwrap_processes_default_to_one_per_cpu() -> None:
    """Unset, a worker keeps one unwrap process per CPU; 0 keeps none (threads)."""
    assert (os.cpu_count() or 2) == Settings.from_env({}).unwrap_processes_or_cpus
    env = {"SEALSTREAM_UNWRAP_PROCESSES": "0"}
    assert 0 == Settings.from_env(env).unwrap_processes_or_cpus
    env = {"SEALSTREAM_UNWRAP_PROCESSES": "3"}
    assert 3 == Settings.from_env(env).unwrap_processes_or_cpus


def test_master_key_never_in_repr() -> None:
    """The base64 master key does not appear in the settings' repr."""
    key = MasterKey.generate().to_base64()
    s = Settings.from_env({"SEALSTREAM_MASTER_KEY": key})
    assert key not in repr(s)
    assert s.load_master_keys().active.to_base64() == key


def test_master_key_ring_from_variable() -> None:
    """Several comma-separated master keys: the first seals, all open."""
    new, old = MasterKey.generate(), MasterKey.generate()
    s = Settings.from_env({"SEALSTREAM_MASTER_KEY": f"{new.to_base64()},{old.to_base64()}"})
    ring = s.load_master_keys()
    assert new.id == ring.active.id
    assert old == ring.get(old.id)


def test_missing_key_settings_are_named() -> None:
    """Loading keys that are not configured names the variables to set."""
    s = Settings.from_env({})
    with pytest.raises(ConfigError, match="SEALSTREAM_SERVICE_KEY_FILE"):
        s.load_service_key()
    with pytest.raises(ConfigError, match="SEALSTREAM_MASTER_KEY"):
        s.load_master_keys()


def test_bad_redis_url_error_does_not_echo_it() -> None:
    """The URL may carry a password: the error names the setting, not the value."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"SEALSTREAM_REDIS_URL": "http://user:hunter2@db:6379"})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@db:6380/1", "redis://***@db:6380/1"),
        ("rediss://user:hunter2@db/0?ssl_cert_reqs=none", "rediss://***@db/0"),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock"),
    ],
)
def test_redacted_url_drops_credentials(url: str, shown: str) -> None:
    """Logs show where Redis is, never its credentials."""
    assert shown == redacted_url(url)


def test_redis_password_file_goes_into_the_url(tmp_path: Path) -> None:
    """SEALSTREAM_REDIS_PASSWORD_FILE (a container secret) supplies the URL's password,
    URL-quoted, without its trailing newline."""
    secret = tmp_path / "redis_password"
    secret.write_text("p@ss/word\n")
    s = Settings.from_env(
        {
            "SEALSTREAM_REDIS_URL": "redis://redis:6379/0",
            "SEALSTREAM_REDIS_PASSWORD_FILE": str(secret),
        }
    )
    assert "redis://:p%40ss%2Fword@redis:6379/0" == s.redis_url
    assert "redis://***@redis:6379/0" == redacted_url(s.redis_url)


@pytest.mark.parametrize("problem", ["missing", "empty", "twice"])
def test_redis_password_file_errors(tmp_path: Path, problem: str) -> None:
    """A missing or empty password file, or a URL that already has a password, is a
    ConfigError naming the setting and never showing the password."""
    secret = tmp_path / "redis_password"
    if problem != "missing":
        secret.write_text("" if problem == "empty" else "hunter2")
    url = "redis://:other@redis:6379/0" if problem == "twice" else "redis://redis:6379/0"
    with pytest.raises(ConfigError, match="SEALSTREAM_REDIS_PASSWORD_FILE") as info:
        Settings.from_env(
            {"SEALSTREAM_REDIS_URL": url, "SEALSTREAM_REDIS_PASSWORD_FILE": str(secret)}
        )
    assert "hunter2" not in str(info.value) and "other" not in str(info.value)
