"""An app's startup and shutdown hooks, run once per worker process.

Startup hooks run in registration order after the worker has checked Redis and
before it reads; the first that raises stops the worker with :class:`StartupFailed`
(the CLI exits 3) and the later ones do not run. Shutdown hooks run after the worker
drained (its replies written), in reverse order, each within the grace period and
shielded from cancellation; one that fails is logged and the others still run.
"""

from __future__ import annotations

import anyio

from worker.errors import StartupFailed
from worker.handlers import App, Hook
from worker.logging import get_logger

log = get_logger("sealstream.worker")


def _name(hook: Hook) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


async def start(app: App) -> None:
    """Run the startup hooks; StartupFailed naming the first one that raises."""
    for hook in app.startup_hooks:
        try:
            await hook()
        except Exception as exc:
            log.error("startup_hook_failed", hook=_name(hook), error_type=type(exc).__name__)  # noqa: TRY400
            raise StartupFailed(
                f"startup hook {_name(hook)} failed: {type(exc).__name__}: {exc}"
            ) from exc
        log.debug("startup_hook_done", hook=_name(hook))


async def stop(app: App, *, timeout_s: float) -> None:
    """Run the shutdown hooks (last registered first); failures are logged."""
    for hook in reversed(app.shutdown_hooks):
        with anyio.move_on_after(timeout_s, shield=True) as scope:
            try:
                await hook()
            except Exception as exc:
                log.error("shutdown_hook_failed", hook=_name(hook), error_type=type(exc).__name__)  # noqa: TRY400
        if scope.cancelled_caught:
            log.error("shutdown_hook_timeout", hook=_name(hook), timeout_s=timeout_s)
