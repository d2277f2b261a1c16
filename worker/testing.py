"""Test helpers: a private ``redis-server`` and an in-process worker.

::

    with RedisServer.start() as server:
        async with running_worker(app, settings.with_url(server.url), ...) as worker:
            ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import anyio

from worker.errors import ConfigError
from worker.handlers import App
from worker.inflight import Clock, wall_clock_ms
from worker.keys import MasterKey, MasterKeys, ServiceKey
from worker.runtime import Worker
from worker.settings import Settings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class RedisServer:
    """A throwaway ``redis-server`` on a free port, in its own temp directory."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def launch(
        cls, *, port: int | None = None, directory: Path | None = None, timeout: float = 10.0
    ) -> RedisServer:
        """Start a server (loading ``directory``'s dump if any) and wait for PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(
                "redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)"
            )
        port = port or free_port()
        directory = directory or Path(tempfile.mkdtemp(prefix="sealstream-redis-"))
        args = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(directory / "redis.log"),
        ]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        server = cls(port=port, process=process, directory=directory)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ConfigError(f"redis-server exited at start (see {directory / 'redis.log'})")
            if _pings(port):
                return server
            time.sleep(0.02)
        server.stop()
        raise ConfigError(f"redis-server did not answer on port {port}")

    @classmethod
    @contextlib.contextmanager
    def start(cls, *, port: int | None = None, timeout: float = 10.0) -> Iterator[RedisServer]:
        """``launch`` as a context manager that stops the server afterwards."""
        server = cls.launch(port=port, timeout=timeout)
        try:
            yield server
        finally:
            server.stop()

    def shutdown_saving(self) -> None:
        """SHUTDOWN SAVE: the server goes away, its data kept for :meth:`restarted`."""
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(b"SHUTDOWN SAVE\r\n")
                s.recv(64)
        self.process.wait(10)

    def restarted(self) -> RedisServer:
        """A new server on the same port and directory, with the saved data."""
        return RedisServer.launch(port=self.port, directory=self.directory)

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrowawayKeys:
    """Throwaway worker keys (the service key is slow to make: share one)."""

    service: ServiceKey
    master: MasterKeys

    @classmethod
    def generate(cls) -> ThrowawayKeys:
        """A fresh service key and master key."""
        return cls(service=ServiceKey.generate(), master=MasterKeys(MasterKey.generate()))

    def write(self, directory: Path) -> dict[str, str]:
        """Write key files; return the ``SEALSTREAM_*`` variables that name them."""
        directory.mkdir(parents=True, exist_ok=True)
        service = directory / "service.pem"
        service.write_bytes(self.service.private_pem())
        os.chmod(service, 0o600)
        master = directory / "master.key"
        master.write_text(self.master.active.to_base64() + "\n")
        os.chmod(master, 0o600)
        return {
            "SEALSTREAM_SERVICE_KEY_FILE": str(service),
            "SEALSTREAM_MASTER_KEY_FILE": str(master),
        }


@contextlib.asynccontextmanager
async def running_worker(
    app: App,
    settings: Settings,
    keys: ThrowawayKeys,
    *,
    clock: Clock = wall_clock_ms,
    consumer: str | None = None,
) -> AsyncIterator[Worker]:
    """Run a worker in the background until the block ends (then stop it gracefully)."""
    worker = Worker(
        app,
        settings,
        service_key=keys.service,
        master_keys=keys.master,
        clock=clock,
        consumer=consumer,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.stop()


def with_redis(settings: Settings, url: str, prefix: str | None = None) -> Settings:
    """``settings`` pointed at ``url`` (and ``prefix``)."""
    return replace(settings, redis_url=url, prefix=prefix or settings.prefix)
