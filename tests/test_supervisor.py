"""`sealstream worker --processes N`: a supervisor of real worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.cli import sealstream
from tests.helpers import Raw, wait_until
from tests.procs import WorkerProcs, wait_answered, wait_started
from worker.settings import Settings
from worker.supervisor import child_environment
from worker.testing import ThrowawayKeys, free_port

pytestmark = pytest.mark.slow


def _events(log: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            row = json.loads(line)
            if row.get("event") == event:
                out.append(row)
    return out


async def _wait_events(log: Path, event: str, n: int, timeout: float = 30.0) -> list[Any]:
    def enough() -> list[Any] | None:
        rows = _events(log, event)
        return rows if len(rows) >= n else None

    return await wait_until(enough, timeout=timeout, interval=0.05)


def _sample(text: str, series: str) -> float:
    """The value of one series (``name`` or ``name{labels}``) in an exposition."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == series:
            return float(value)
    return 0.0


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""


@contextlib.contextmanager
def _supervisor(procs: WorkerProcs, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`sealstream worker ARGS` (with --processes) logging to ``log``; killed afterwards
    with every child it started (they run in their own session: a killed supervisor
    cannot stop them)."""
    with log.open("wb") as out:
        sup = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", *args],
            env=procs.env(),
            stdout=out,
            stderr=out,
        )
    try:
        yield sup
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        for row in _events(log, "child_started"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(row["pid"], signal.SIGKILL)


async def _exit_code(sup: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    with anyio.fail_after(timeout):
        return await anyio.to_thread.run_sync(sup.wait)


async def test_a_killed_child_comes_back_and_nothing_is_lost(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Two supervised workers serve 600 requests; one child is SIGKILLed mid-way: it is
    restarted (logged), every request is answered exactly once, one /metrics counts
    both children's work (the dead one's too), and SIGTERM to the supervisor drains
    all and exits 0."""
    raw = Raw(redis, settings.prefix, keys)
    procs = WorkerProcs(settings, keys, tmp_path)
    grants = [await raw.grant() for _ in range(10)]
    outs = [raw.seal(grants[i % 10], {"ms": 10}, type_="sleep") for i in range(600)]
    port = free_port()
    log = tmp_path / "supervisor.log"
    args = ("--processes", "2", "--concurrency", "16", "--metrics-port", str(port))
    with _supervisor(procs, log, *args) as sup:
        started = await _wait_events(log, "child_started", 2)
        await wait_started(redis, settings.prefix, 2)
        for out in outs:
            await raw.send(out.request)

        async def ten_replies() -> bool:
            return len(await raw.replies(grants[0].sid)) >= 10

        await wait_until(ten_replies, timeout=60, interval=0.02)
        victim = started[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        died = await _wait_events(log, "child_died", 1)
        assert (victim, -signal.SIGKILL) == (died[0]["pid"], died[0]["code"])
        again = await _wait_events(log, "child_started", 3)
        assert again[2]["pid"] != victim
        got = await wait_answered(raw, grants, {o.request.mid for o in outs}, timeout=90)
        assert {} == {m: dict(c) for m, c in got.items() if c != Counter(ok=1)}
        status, text = await anyio.to_thread.run_sync(_get, port, "/metrics")
        assert 200 == status
        # Each request counts once as answered, or as a redelivery of an answered one
        # (killed between reply and ack); only one killed in the instant between its
        # ack and its count is missing.
        counted = _sample(text, 'sealstream_requests_total{status="ok",type="sleep"}')
        counted += _sample(text, "sealstream_redelivered_done_total")
        assert 600 - 16 <= counted <= 600, text
        sup.send_signal(signal.SIGTERM)
        assert 0 == await _exit_code(sup), log.read_text()[-3000:]
    assert [0, 0] == [e["code"] for e in _events(log, "child_exited")]


async def test_readyz_of_the_supervisor(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """/readyz of a supervisor is 200 once every child is consuming; /healthz 200;
    SIGINT stops it with exit 0."""
    procs = WorkerProcs(settings, keys, tmp_path)
    port = free_port()
    log = tmp_path / "supervisor.log"
    with _supervisor(procs, log, "--processes", "2", "--metrics-port", str(port)) as sup:
        await wait_started(redis, settings.prefix, 2)

        async def ready() -> bool:
            return (await anyio.to_thread.run_sync(_get, port, "/readyz"))[0] == 200

        await wait_until(ready, timeout=30, interval=0.1)
        assert 200 == (await anyio.to_thread.run_sync(_get, port, "/healthz"))[0]
        sup.send_signal(signal.SIGINT)
        assert 0 == await _exit_code(sup)


async def test_burst_children_finish_and_the_supervisor_exits(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """With --burst, children that drained the shards exit 0 and are not restarted."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    for i in range(20):
        await raw.send(raw.seal(grant, {"i": i}).request)
    procs = WorkerProcs(settings, keys, tmp_path)
    log = tmp_path / "supervisor.log"
    with _supervisor(procs, log, "--processes", "2", "--burst") as sup:
        assert 0 == await _exit_code(sup)
    assert 20 == len(await raw.replies(grant.sid))
    assert [] == _events(log, "child_died")


async def test_bad_settings_are_one_line_before_any_child_starts() -> None:
    """Bad settings are one line before any child starts (exit 2); --processes 0 is a
    usage error."""
    code, _, err = await sealstream("worker", "--processes", "2", env={"SEALSTREAM_SHARDS": "many"})
    assert 2 == code and 1 == len(err.strip().splitlines())
    code, _, err = await sealstream("worker", "--processes", "0")
    assert 2 == code and "positive integer" in err


async def test_a_child_config_error_stops_the_supervisor(
    settings: Settings, keys: ThrowawayKeys, tmp_path: Path
) -> None:
    """Children exiting 2 (here: an APP that is not an App) are not restarted: the
    supervisor stops and exits 2."""
    procs = WorkerProcs(settings, keys, tmp_path)
    log = tmp_path / "supervisor.log"
    with _supervisor(procs, log, "--processes", "2", "os:path") as sup:
        assert 2 == await _exit_code(sup)
    assert 1 <= len(_events(log, "child_config_error"))
    assert [] == _events(log, "child_died")


async def test_a_crashing_child_is_restarted_with_growing_backoff(
    settings: Settings, keys: ThrowawayKeys, tmp_path: Path
) -> None:
    """A child that exits 1 at once is restarted after 0.5 s, 1 s, 2 s...; a SIGTERM
    during the backoff ends the supervisor without starting another."""
    procs = WorkerProcs(settings, keys, tmp_path)
    log = tmp_path / "supervisor.log"
    with _supervisor(procs, log, "--processes", "1", "tests.crash_app:app") as sup:
        died = await _wait_events(log, "child_died", 3)
        assert [0.5, 1.0, 2.0] == [d["restart_in_s"] for d in died[:3]]
        assert {1} == {d["code"] for d in died}
        sup.send_signal(signal.SIGTERM)
        await _exit_code(sup, timeout=30)
    assert len(_events(log, "child_started")) == len(_events(log, "child_died"))


async def test_sigterm_mid_work_drains_every_child(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGTERM while both children run handlers: they finish and answer what they took,
    the supervisor exits 0, and nothing is left pending (delivered but unanswered)."""
    raw = Raw(redis, settings.prefix, keys)
    grants = [await raw.grant() for _ in range(4)]
    outs = [raw.seal(grants[i % 4], {"ms": 300}, type_="sleep") for i in range(200)]
    procs = WorkerProcs(settings, keys, tmp_path)
    log = tmp_path / "supervisor.log"
    with _supervisor(procs, log, "--processes", "2", "--concurrency", "8") as sup:
        await wait_started(redis, settings.prefix, 2)
        for out in outs:
            await raw.send(out.request)

        async def ten_pending() -> bool:
            return await raw.pending() >= 10

        await wait_until(ten_pending, timeout=60, interval=0.01)
        sup.send_signal(signal.SIGTERM)
        assert 0 == await _exit_code(sup), log.read_text()[-3000:]
    assert 0 == await raw.pending()
    got: dict[str, int] = {}
    for grant in grants:
        for reply in await raw.replies(grant.sid):
            got[reply.mid] = got.get(reply.mid, 0) + (reply.status == "ok")
    assert got and {1} == set(got.values())
    assert len(got) < len(outs)  # stopped mid-way: the rest waits for the next workers


def test_children_read_the_password_file_themselves(tmp_path: Path) -> None:
    """Without --redis-url, children get the password file's name, not the password;
    with it, the flag's URL is passed on and the password file dropped."""
    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    base = {
        "SEALSTREAM_REDIS_URL": "redis://redis:6379/0",
        "SEALSTREAM_REDIS_PASSWORD_FILE": str(secret),
    }
    settings = Settings.from_env(base)
    env = child_environment(base, settings, redis_url_flag=False)
    assert "hunter2" not in "".join(env.values())
    assert str(secret) == env["SEALSTREAM_REDIS_PASSWORD_FILE"]
    assert Settings.from_env(env).redis_url == settings.redis_url
    flagged = replace(settings, redis_url="redis://other:6379/0")
    env = child_environment(base, flagged, redis_url_flag=True)
    assert "SEALSTREAM_REDIS_PASSWORD_FILE" not in env
    assert "redis://other:6379/0" == Settings.from_env(env).redis_url


def test_children_share_the_cpus_as_unwrap_processes() -> None:
    """Unless set, N supervised workers get the CPUs shared out as unwrap processes (at
    least one each); a value that is set is passed on as it is."""
    cpus = os.cpu_count() or 2
    settings = Settings.from_env({})
    for n, each in ((1, cpus), (cpus, 1), (cpus * 4, 1)):
        env = child_environment({}, settings, redis_url_flag=False, processes=n)
        assert str(each) == env["SEALSTREAM_UNWRAP_PROCESSES"]
    settings = Settings.from_env({"SEALSTREAM_UNWRAP_PROCESSES": "0"})
    env = child_environment({}, settings, redis_url_flag=False, processes=2)
    assert "0" == env["SEALSTREAM_UNWRAP_PROCESSES"]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


async def test_children_stop_when_the_supervisor_is_killed(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A supervisor killed with SIGKILL cannot forward a signal: its children notice
    their parent is gone and stop gracefully on their own."""
    procs = WorkerProcs(settings, keys, tmp_path)
    log = tmp_path / "supervisor.log"
    with _supervisor(procs, log, "--processes", "2") as sup:
        children = [row["pid"] for row in await _wait_events(log, "child_started", 2)]
        await wait_started(redis, settings.prefix, 2)
        sup.kill()
        sup.wait()
        await wait_until(
            lambda: not any(_running(pid) for pid in children), timeout=30, interval=0.1
        )
    assert 2 == len(_events(log, "supervisor_gone"))
    assert 2 == len(_events(log, "worker_stopped"))


async def test_sigterm_while_children_start_is_a_clean_stop(
    settings: Settings, keys: ThrowawayKeys, tmp_path: Path
) -> None:
    """A SIGTERM that reaches children still importing (before they handle signals, and
    so before they read anything) is a clean stop: exit 0."""
    procs = WorkerProcs(settings, keys, tmp_path)
    log = tmp_path / "supervisor.log"
    with _supervisor(procs, log, "--processes", "2") as sup:
        await _wait_events(log, "child_started", 2)
        sup.send_signal(signal.SIGTERM)
        assert 0 == await _exit_code(sup), log.read_text()[-3000:]


async def test_sighup_to_the_supervisor_reloads_every_childs_keys(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGHUP to the supervisor is forwarded: each child re-reads its key files and
    logs ``keys_reloaded``; all go on serving and none is restarted."""
    procs = WorkerProcs(settings, keys, tmp_path)
    log = tmp_path / "supervisor.log"
    with _supervisor(procs, log, "--processes", "2", "--concurrency", "4") as sup:
        await _wait_events(log, "child_started", 2)
        await wait_started(redis, settings.prefix, 2)
        sup.send_signal(signal.SIGHUP)
        reloaded = await _wait_events(log, "keys_reloaded", 2)
        assert {keys.service.kid} == {row["kid"] for row in reloaded}
        assert [] == _events(log, "child_died")
        sup.send_signal(signal.SIGTERM)
        assert 0 == await _exit_code(sup), log.read_text()[-3000:]
