"""Dockerfile and docker-compose.yml, checked without Docker (build machines have none):
services, wiring, healthchecks, and no secret baked into the image or the files."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from tests.cli import sealstream
from tests.helpers import wait_until
from worker.cli import _parser
from worker.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|MASTER_KEY\b|_KEY=|TOKEN", re.IGNORECASE)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_image_is_slim_non_root_and_installed_at_build_time() -> None:
    """A slim Python base; the package installed by a RUN; the last USER is not root and
    comes before the entrypoint; nothing is installed when the container starts."""
    steps = _dockerfile()
    assert re.fullmatch(r"python:3\.1[1-9]-slim", dict(steps)["FROM"])
    names = [name for name, _ in steps]
    install = next(i for i, (n, a) in enumerate(steps) if n == "RUN" and "pip install" in a)
    user = max(i for i, n in enumerate(names) if n == "USER")
    assert install < user < names.index("ENTRYPOINT")
    assert steps[user][1].split(":")[0] not in ("root", "0")
    entry = json.loads(dict(steps)["ENTRYPOINT"]) + json.loads(dict(steps)["CMD"])
    assert ["sealstream", "worker"] == entry
    assert "pip" not in " ".join(entry)


def test_image_copies_no_secret() -> None:
    """COPY/ADD only the package sources; no ENV or ARG carries a password or key; the
    build context excludes everything else (.dockerignore)."""
    steps = _dockerfile()
    copied = [a.split()[:-1] for n, a in steps if n in ("COPY", "ADD")]
    assert [["pyproject.toml", "README.md"], ["worker"]] == copied
    for name, args in steps:
        if name in ("ENV", "ARG"):
            assert not SECRET_WORDS.search(args), args
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert "*" == ignore[0]
    allowed = {line.lstrip("!").rstrip("/") for line in ignore if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "worker"} == allowed


def test_image_healthcheck_asks_readyz() -> None:
    """The image's HEALTHCHECK asks the worker's /readyz on its metrics port."""
    health = dict(_dockerfile())["HEALTHCHECK"]
    assert "/readyz" in health and "SEALSTREAM_METRICS_PORT" in health


def test_compose_services_and_wiring() -> None:
    """redis (AOF, password from a secret, healthcheck), a scalable worker (no fixed
    host port or container name, /readyz healthcheck, keys as secrets, waits for a
    healthy Redis) and a one-shot producer that waits for a healthy worker."""
    doc = _compose()
    services = doc["services"]
    assert {"redis", "worker", "producer"} == set(services)
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "/run/secrets/redis_password" in command
    assert ["redis_password"] == redis["secrets"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])

    worker = services["worker"]
    assert "." == worker["build"]
    assert "ports" not in worker and "container_name" not in worker
    assert "/readyz" in " ".join(worker["healthcheck"]["test"])
    assert {"redis_password", "service_key", "master_key"} == set(worker["secrets"])
    env = worker["environment"]
    assert "/run/secrets/service_key" == env["SEALSTREAM_SERVICE_KEY_FILE"]
    assert "/run/secrets/master_key" == env["SEALSTREAM_MASTER_KEY_FILE"]
    assert "/run/secrets/redis_password" == env["SEALSTREAM_REDIS_PASSWORD_FILE"]
    assert "redis://redis:6379/0" == env["SEALSTREAM_REDIS_URL"]
    assert "9400" == env["SEALSTREAM_METRICS_PORT"]
    assert "9400" in " ".join(worker["healthcheck"]["test"])
    assert "service_healthy" == worker["depends_on"]["redis"]["condition"]
    assert "SIGTERM" == worker["stop_signal"]

    producer = services["producer"]
    assert "no" == producer["restart"]
    assert "service_healthy" == producer["depends_on"]["worker"]["condition"]
    assert worker["image"] == producer["image"]

    secrets = {name: spec["file"] for name, spec in doc["secrets"].items()}
    assert {
        "redis_password": "./secrets/redis_password",
        "service_key": "./keys/service.pem",
        "master_key": "./keys/master.key",
    } == secrets


def test_compose_holds_no_secret_values() -> None:
    """No environment value in the compose file is a password, key or URL with
    credentials: secrets are only named by file."""
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_WORDS.search(key) and not key.endswith("_FILE"):
                pytest.fail(f"{name}: {key} carries a secret")
            assert "@" not in str(value), f"{name}: {key} has credentials"
        for volume in service.get("volumes") or []:
            assert "master.key" not in volume and "service.pem" not in volume


def test_compose_commands_are_valid_sealstream_commands() -> None:
    """The worker's and producer's commands parse with the sealstream CLI."""
    services = _compose()["services"]
    parser = _parser()
    worker = parser.parse_args(services["worker"]["command"])
    assert (64, "worker") == (worker.concurrency, worker.command)
    producer = parser.parse_args(services["producer"]["command"])
    assert ("send", "echo") == (producer.command, producer.type)
    assert {"hello": "compose"} == json.loads(producer.payload)


def test_secret_files_are_ignored_by_git() -> None:
    """keys/, secrets/ and .env are in .gitignore, so they are never committed."""
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"keys/", "secrets/", ".env"} <= set(ignored)


async def test_password_file_reaches_a_password_protected_redis(tmp_path: Path) -> None:
    """As in compose: a Redis with requirepass, and SEALSTREAM_REDIS_PASSWORD_FILE
    naming the secret, let `sealstream stats` in; the password is never printed."""
    password = "s3cret-" + "ab" * 8
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = await anyio.open_process(
        ["redis-server", *args, "--dir", str(tmp_path), "--requirepass", password],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def accepts() -> bool:
            try:
                await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
            except OSError:
                return False
            return True

        await wait_until(accepts, timeout=10, interval=0.02)
        secret = tmp_path / "redis_password"
        secret.write_text(password + "\n")
        env = {"SEALSTREAM_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        code, _, err = await sealstream("stats", env=env)
        assert 1 == code and password not in err
        env["SEALSTREAM_REDIS_PASSWORD_FILE"] = str(secret)
        code, out, err = await sealstream("stats", "--json", env=env)
        assert 0 == code, err
        assert password not in out + err
    finally:
        proc.terminate()
        with anyio.fail_after(10):
            await proc.wait()
        await proc.aclose()
