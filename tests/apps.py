"""Apps that worker subprocesses load in tests (``tests.apps:leaky``)."""

from __future__ import annotations

import time
from typing import Any

from worker import App, BadPayload, Context
from worker.retries import Backoff

leaky = App()


@leaky.handler("echo")
async def echo(payload: Any) -> Any:
    """Return the payload."""
    return payload


@leaky.handler("leak")
async def leak(payload: Any) -> Any:
    """Raise an exception whose text quotes the payload (logs must not show it)."""
    raise ValueError(f"cannot handle {payload!r}")


@leaky.handler("refuse")
async def refuse(payload: Any) -> Any:
    """Refuse the payload with a message quoting it (only the client may see it)."""
    raise BadPayload(f"refused {payload!r}")


@leaky.handler("stuck", timeout_s=0.2)
def stuck(payload: Any) -> Any:
    """A plain handler that runs far past its timeout (a thread cannot be stopped)."""
    time.sleep(120)


retrying = App()


@retrying.handler(
    "flaky",
    retries=3,
    backoff=Backoff(base_s=60, cap_s=60, jitter=False),
    retry_on=(ConnectionError,),
)
async def flaky(payload: Any, ctx: Context) -> Any:
    """Fail the first attempt (a long backoff follows); later ones say their number."""
    if ctx.attempt == 1:
        raise ConnectionError("the database is away")
    return {"attempt": ctx.attempt}


broken_startup = App()


@broken_startup.on_startup
async def open_database() -> None:
    """A startup hook that cannot reach its database."""
    raise OSError("database at db.internal:5432 refused the connection")


@broken_startup.handler("echo")
async def echo_too(payload: Any) -> Any:
    """Never reached: the worker does not start."""
    return payload
