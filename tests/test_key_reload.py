"""SIGHUP key reload in a real worker process: the new service key is published,
handshakes pinned to the old and the new key both work during the overlap, the new
master key seals new sessions, nothing in flight is lost, and a bad file on reload
keeps the keys in use."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from tests.procs import WorkerProcs, wait_started
from worker import Client, Settings
from worker.keys import MasterKey, MasterKeys, ServiceKey
from worker.sessions import open_record
from worker.testing import ThrowawayKeys


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as an operator should: a new file renamed over it."""
    new = path.with_suffix(".new")
    new.write_bytes(data)
    os.chmod(new, 0o600)
    new.replace(path)


async def _published_kid(redis: aioredis.Redis, prefix: str, kid: str) -> None:
    with anyio.fail_after(20):
        while (await redis.hget(f"{prefix}:config", "kid")) != kid.encode():
            await anyio.sleep(0.05)


async def _echo(settings: Settings, value: int, *, kid: str, pem: str | None = None) -> int:
    async with (
        Client.from_url(
            settings.redis_url, kid=kid, service_public_key=pem, prefix=settings.prefix
        ) as client,
        client.session() as session,
    ):
        result: int = await session.request("echo", value, timeout=20)
        return result


@pytest.fixture(scope="module")
def new_service() -> ServiceKey:
    """The service key rotated to."""
    return ServiceKey.generate()


async def test_sighup_swaps_in_new_keys_and_keeps_the_old_service_key_during_the_overlap(
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
    tmp_path: Path,
    new_service: ServiceKey,
) -> None:
    """After the key files are replaced and SIGHUP sent: ``P:config`` names the new
    kid, handshakes pinned to the old and to the new kid both succeed, new sessions
    are sealed under the new master key, and requests sent throughout are answered."""
    procs = WorkerProcs(settings, keys, tmp_path)
    key_dir = tmp_path / "keys"
    old_file = key_dir / "old.pem"
    env = procs.env()  # writes the current keys
    old_file.write_bytes(keys.service.private_pem())
    new_kek = MasterKey.generate()
    try:
        worker = procs.start("--concurrency", "8", SEALSTREAM_OLD_SERVICE_KEY_FILES=str(old_file))
        await wait_started(redis, settings.prefix, 1)
        answered: list[int] = []

        async with (
            Client.from_url(
                settings.redis_url, kid=keys.service.kid, prefix=settings.prefix
            ) as client,
            client.session() as session,
        ):

            async def keep_sending() -> None:
                for n in range(200):
                    answered.append(await session.request("echo", n, timeout=20))
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_sending)
                while len(answered) < 20:
                    await anyio.sleep(0.01)
                _replace(Path(env["SEALSTREAM_SERVICE_KEY_FILE"]), new_service.private_pem())
                master_text = f"{new_kek.to_base64()}\n{keys.master.active.to_base64()}\n"
                _replace(Path(env["SEALSTREAM_MASTER_KEY_FILE"]), master_text.encode())
                worker.send_signal(signal.SIGHUP)
                await _published_kid(redis, settings.prefix, new_service.kid)
                old_pem = keys.service.public_pem
                assert 1 == await _echo(settings, 1, kid=keys.service.kid, pem=old_pem)
                assert 2 == await _echo(settings, 2, kid=new_service.kid)
            assert list(range(200)) == answered

        async with (
            Client.from_url(
                settings.redis_url, kid=new_service.kid, prefix=settings.prefix
            ) as client,
            client.session() as fresh,
        ):
            raw = await redis.get(f"{settings.prefix}:{{{fresh.sid}}}:session")
            assert fresh.sid == open_record(fresh.sid, raw, MasterKeys(new_kek)).sid
        assert worker.poll() is None
    finally:
        procs.kill_all()
    assert "keys_reloaded" in procs.logs()


async def test_a_bad_key_file_on_reload_is_logged_and_the_keys_in_use_kept(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGHUP with a service key file that is not a key: ``keys_reload_failed`` is
    logged, the worker serves on with the key it had, and ``P:config`` is unchanged."""
    procs = WorkerProcs(settings, keys, tmp_path)
    env = procs.env()
    try:
        worker = procs.start("--concurrency", "4")
        await wait_started(redis, settings.prefix, 1)
        _replace(Path(env["SEALSTREAM_SERVICE_KEY_FILE"]), b"not a key\n")
        worker.send_signal(signal.SIGHUP)
        with anyio.fail_after(20):
            while "keys_reload_failed" not in procs.logs():
                await anyio.sleep(0.05)
        assert 5 == await _echo(settings, 5, kid=keys.service.kid)
        assert keys.service.kid.encode() == await redis.hget(f"{settings.prefix}:config", "kid")
        assert worker.poll() is None
    finally:
        procs.kill_all()
