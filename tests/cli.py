"""Running ``sealstream`` as an operator would: a subprocess with a clean environment."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio

from worker.settings import Settings


def base_env() -> dict[str, str]:
    """This process's environment without any ``SEALSTREAM_*`` variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SEALSTREAM_")}


def redis_env(settings: Settings, **extra: str) -> dict[str, str]:
    """``SEALSTREAM_REDIS_URL`` and ``SEALSTREAM_PREFIX`` of the test, plus ``extra``."""
    return {
        "SEALSTREAM_REDIS_URL": settings.redis_url,
        "SEALSTREAM_PREFIX": settings.prefix,
        **extra,
    }


async def sealstream(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m worker ARGS``; return (exit code, stdout, stderr)."""
    result = await anyio.run_process(
        [sys.executable, "-m", "worker", *args], env={**base_env(), **(env or {})}, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def sealstream_json(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run a command with ``--json`` that must succeed; return its parsed output."""
    code, out, err = await sealstream(*args, "--json", env=env)
    assert 0 == code, err
    return json.loads(out)
