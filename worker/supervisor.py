"""``sealstream worker --processes N``: a supervisor of N worker processes.

Each child is ``python -m worker worker [APP]``, configured through ``SEALSTREAM_*``
variables (so a Redis password never shows in a process list). The supervisor:

- restarts a child that dies, after an exponential backoff (0.5 s doubling to 30 s,
  back to 0.5 s once a child has run a minute), and logs it;
- gives up and exits 2 when a child exits 2 (a configuration error: restarting
  cannot fix it);
- forwards SIGHUP (reload the key files) to every child;
- forwards SIGTERM/SIGINT to every child (a second signal too: children then stop at
  once) and exits 0 once all have drained and exited 0 (1 otherwise);
- with a metrics port, serves one ``/metrics`` for all children (prometheus-client's
  multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` in a temporary directory it owns
  and removes) plus ``/healthz`` and ``/readyz`` (every child alive and consuming).

Children run in their own session, so a terminal's Ctrl-C reaches only the
supervisor, which forwards it once. A supervisor killed with SIGKILL cannot forward
anything: its children notice (their parent changes, checked every second) and stop
gracefully on their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup, TaskStatus
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker.health import READY_WINDOW_S, HttpServer
from worker.health import serve as serve_http
from worker.logging import get_logger
from worker.settings import Settings

log = get_logger("sealstream.supervisor")
#: A child's exit code for a configuration error (see ``worker.cli``).
CONFIG_ERROR = 2
_LAST_READ = "sealstream_last_read_timestamp_seconds"


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Delays between restarts of a slot's child."""

    initial_s: float = 0.5
    cap_s: float = 30.0
    #: a child that ran this long resets the delay to ``initial_s``
    reset_after_s: float = 60.0


class Supervisor:
    """Runs ``processes`` worker children until stopped; see the module docstring."""

    def __init__(
        self,
        *,
        processes: int,
        args: Sequence[str],
        env: Mapping[str, str],
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        burst: bool = False,
        stop_timeout_s: float = 60.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.processes = processes
        self.args = list(args)
        self.env = dict(env)
        self.metrics_port = metrics_port
        self.metrics_addr = metrics_addr
        self.burst = burst
        self.stop_timeout_s = stop_timeout_s
        self.backoff = backoff or Backoff()
        self.children: dict[int, Process] = {}
        self.exit_codes: list[int] = []
        self._stopping = anyio.Event()
        self._config_error = False
        self._metrics_dir: Path | None = None

    # -- control -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop restarting and forward SIGTERM to every child (idempotent per call)."""
        first = not self._stopping.is_set()
        self._stopping.set()
        if first:
            log.info("supervisor_stopping", children=len(self.children))
        self._signal_children(signal.SIGTERM)

    def ready(self) -> bool:
        """For ``/readyz``: not stopping, every slot has a child, each read recently."""
        if self._stopping.is_set() or len(self.children) < self.processes:
            return False
        if self._metrics_dir is None:
            return True
        last: dict[str, float] = {}
        collector = MultiProcessCollector(None, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
        for metric in collector.collect():  # type: ignore[no-untyped-call]
            if metric.name == _LAST_READ:
                for sample in metric.samples:
                    last[sample.labels.get("pid", "")] = sample.value
        now = time.time()
        return all(
            now - last.get(str(p.pid), 0.0) <= READY_WINDOW_S for p in self.children.values()
        )

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Supervise until stopped (or, in burst mode, until every child is done).

        Returns 0 when every child's last exit was 0, 2 after a child's configuration
        error, 1 otherwise.
        """
        server: HttpServer | None = None
        env = dict(self.env)
        if self.metrics_port is not None:
            self._metrics_dir = Path(tempfile.mkdtemp(prefix="sealstream-metrics-"))
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
            server = serve_http(
                registry, port=self.metrics_port, addr=self.metrics_addr, ready=self.ready
            )
            log.info("metrics_serving", addr=self.metrics_addr, port=server.port)
        env["SEALSTREAM_METRICS_PORT"] = ""  # children never serve: the supervisor does
        env["SEALSTREAM_SUPERVISOR_PID"] = str(os.getpid())  # they stop if it vanishes
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals, tg)
                async with anyio.create_task_group() as slots:
                    for slot in range(self.processes):
                        slots.start_soon(self._slot, slot, env)
                    log.info("supervisor_started", processes=self.processes, pid=os.getpid())
                    task_status.started()
                tg.cancel_scope.cancel()
        finally:
            if server is not None:
                server.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._config_error:
            return CONFIG_ERROR
        code = 0 if all(c == 0 for c in self.exit_codes) else 1
        log.info("supervisor_stopped", exit_codes=self.exit_codes, code=code)
        return code

    async def _slot(self, slot: int, env: dict[str, str]) -> None:
        """Keep one child running: start it, wait, restart it after a backoff."""
        delay = self.backoff.initial_s
        while not self._stopping.is_set():
            proc = await anyio.open_process(
                [sys.executable, "-m", "worker", "worker", *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                start_new_session=True,
            )
            self.children[slot] = proc
            log.info("child_started", slot=slot, pid=proc.pid)
            if self._stopping.is_set():  # stopped while it was being started
                proc.send_signal(signal.SIGTERM)
            started = anyio.current_time()
            try:
                with anyio.CancelScope(shield=True):
                    code = await proc.wait()
            finally:
                del self.children[slot]
                if self._metrics_dir is not None:
                    mark_process_dead(proc.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
                await proc.aclose()
            if self._stopping.is_set() or (self.burst and code == 0):
                if self._stopping.is_set() and code == -signal.SIGTERM:
                    # Our SIGTERM reached it before it could handle signals, which
                    # it does before reading anything: a clean stop, nothing taken.
                    code = 0
                log.info("child_exited", slot=slot, pid=proc.pid, code=code)
                self.exit_codes.append(code)
                return
            if code == CONFIG_ERROR:
                log.error("child_config_error", slot=slot, pid=proc.pid)
                self._config_error = True
                self.stop()
                return
            if anyio.current_time() - started >= self.backoff.reset_after_s:
                delay = self.backoff.initial_s
            log.warning("child_died", slot=slot, pid=proc.pid, code=code, restart_in_s=delay)
            with anyio.move_on_after(delay):
                await self._stopping.wait()
            delay = min(delay * 2, self.backoff.cap_s)

    async def _watch_signals(self, tg: TaskGroup) -> None:
        """SIGHUP: forward. SIGTERM/SIGINT: stop and forward; again: forward again
        (children stop now).
        Children still running ``stop_timeout_s`` after the first are SIGKILLed."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("supervisor_reload_forwarded")
                    self._signal_children(signal.SIGHUP)
                elif self._stopping.is_set():
                    log.warning("supervisor_second_signal", signal=int(signum))
                    self._signal_children(signal.SIGTERM)
                else:
                    self.stop()
                    tg.start_soon(self._kill_after_timeout)

    async def _kill_after_timeout(self) -> None:
        # Cancelled with the rest when every child has exited in time.
        await anyio.sleep(self.stop_timeout_s)
        log.error("children_killed", pids=[p.pid for p in self.children.values()])
        self._signal_children(signal.SIGKILL)

    def _signal_children(self, signum: signal.Signals) -> None:
        for proc in list(self.children.values()):
            if proc.returncode is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass


def child_environment(
    base: Mapping[str, str], settings: Settings, *, redis_url_flag: bool, processes: int = 1
) -> dict[str, str]:
    """The children's environment: ``base`` with the supervisor's resolved settings.

    The Redis URL is passed on only when it came from ``--redis-url`` (then any
    password file is dropped, as a flag's URL is used as it is); otherwise children
    read ``SEALSTREAM_REDIS_URL`` and ``SEALSTREAM_REDIS_PASSWORD_FILE`` themselves,
    so a password from a file stays out of their environment. Unless it is set, the
    machine's CPUs are shared out as unwrap processes: one per CPU in all, at least
    one per worker (``processes`` workers on a host, each with one unwrap process per
    CPU, kept a decrypt per CPU-bound process more than the cores could run: two
    workers with two each drained RSA slower than two with one, see README).
    """
    env = dict(base)
    env.update(
        SEALSTREAM_PREFIX=settings.prefix,
        SEALSTREAM_CONCURRENCY=str(settings.concurrency),
        SEALSTREAM_SHARDS=str(settings.shards),
        SEALSTREAM_GRACE_S=repr(settings.grace_s),
        SEALSTREAM_UNWRAP_PROCESSES=str(
            settings.unwrap_processes
            if settings.unwrap_processes is not None
            else max(1, settings.unwrap_processes_or_cpus // max(1, processes))
        ),
    )
    if redis_url_flag:
        env["SEALSTREAM_REDIS_URL"] = settings.redis_url
        env.pop("SEALSTREAM_REDIS_PASSWORD_FILE", None)
    return env
