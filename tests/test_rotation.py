"""Master-key rotation: records counted per KEK, re-sealed under the active KEK while
real worker processes keep serving requests."""

from __future__ import annotations

import json
import stat
from collections import Counter
from pathlib import Path

import anyio
import redis.asyncio as aioredis

from tests.cli import redis_env, sealstream, sealstream_json
from tests.helpers import Raw, open_ok
from tests.procs import WorkerProcs, wait_started
from tests.terminal import run_on_terminal
from worker.envelopes import Outgoing
from worker.handshake import SessionGrant
from worker.keys import MasterKey, MasterKeys, load_master_key_file
from worker.rotation import compare_and_set, kek_of, kek_status
from worker.settings import Settings
from worker.testing import ThrowawayKeys


def _ring_file(path: Path, *keys: MasterKey) -> Path:
    path.write_text("".join(k.to_base64() + "\n" for k in keys))
    path.chmod(0o600)
    return path


async def _serve_while(
    raw: Raw, grants: list[SessionGrant], done: anyio.Event
) -> tuple[Counter[str], int]:
    """Send requests round-robin over the sessions, each awaited, until ``done``; return
    the reply outcomes and how many were sent."""
    outcomes: Counter[str] = Counter()
    sent = 0
    while not done.is_set() or sent < 2 * len(grants):
        grant = grants[sent % len(grants)]
        out: Outgoing = raw.seal(grant, {"n": sent})
        await raw.send(out.request)
        reply = await raw.reply(grant.sid, out.request.mid, timeout=20)
        if reply.status == "ok" and {"n": sent} == open_ok(reply, out):
            outcomes["ok"] += 1
        else:
            outcomes[f"{reply.status}:{reply.code}"] += 1
        sent += 1
    return outcomes, sent


async def test_rotation_under_load_reseals_every_record(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Two worker processes holding [new, old] serve requests of sessions sealed under
    the old KEK while `keys rotate-master` runs: every request is answered ok, every
    record ends under the new KEK with its expiry kept, and the old KEK is removable."""
    raw = Raw(redis, settings.prefix, keys)
    old = keys.master.active
    grants = [await raw.grant() for _ in range(12)]
    names = raw.names
    ttl_before = {g.sid: await redis.pttl(names.session(g.sid)) for g in grants}
    new = MasterKey.generate()
    ring = _ring_file(tmp_path / "ring.key", new, old)
    procs = WorkerProcs(settings, keys, tmp_path)
    env = redis_env(settings, SEALSTREAM_MASTER_KEY_FILE=str(ring))
    try:
        for _ in range(2):
            procs.start(SEALSTREAM_MASTER_KEY_FILE=str(ring))
        await wait_started(redis, settings.prefix, 2)
        before = await sealstream_json("keys", "status", env=env)
        assert {old.id: 12} == before["by_kek"]
        done = anyio.Event()
        result: dict[str, object] = {}

        async def rotate() -> None:
            await anyio.sleep(0.3)  # requests are flowing
            result["report"] = await sealstream_json("keys", "rotate-master", env=env)
            done.set()

        async def serve() -> None:
            result["served"] = await _serve_while(raw, grants, done)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                tg.start_soon(rotate)
    finally:
        procs.kill_all()
    served = result["served"]
    assert isinstance(served, tuple)
    outcomes, sent = served
    assert Counter(ok=sent) == outcomes
    report = result["report"]
    assert isinstance(report, dict)
    assert (new.id, 12, 12, 0) == (
        report["active"],
        report["examined"],
        report["resealed"],
        report["failed"],
    )
    assert [old.id] == report["removable"]
    assert {new.id: 12} == (await kek_status(redis, prefix=settings.prefix)).by_kek
    for g in grants:
        ttl = await redis.pttl(names.session(g.sid))
        assert 0 < ttl <= ttl_before[g.sid]
        assert ttl_before[g.sid] - ttl < 60_000


async def test_status_and_second_rotation(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """`keys status` marks the ring's roles; rotating twice re-seals nothing the second
    time; a record under a KEK not in the ring is reported, left as is, exit 1."""
    raw = Raw(redis, settings.prefix, keys)
    old = keys.master.active
    await raw.grant()
    stranger = MasterKey.generate()
    await Raw(
        redis, settings.prefix, ThrowawayKeys(service=keys.service, master=MasterKeys(stranger))
    ).grant()
    new = MasterKey.generate()
    env = redis_env(
        settings, SEALSTREAM_MASTER_KEY_FILE=str(_ring_file(tmp_path / "r.key", new, old))
    )
    code, out, _ = await sealstream("keys", "status", env=env)
    assert 0 == code
    assert "older" in out and "not in ring" in out and "active" in out
    code, out, _ = await sealstream("keys", "rotate-master", "--json", env=env)
    assert 1 == code
    first = json.loads(out)
    assert (1, 1, [old.id]) == (first["resealed"], first["failed"], first["removable"])
    assert {new.id: 1, stranger.id: 1} == first["remaining"]["by_kek"]
    code, out, _ = await sealstream("keys", "rotate-master", "--json", env=env)
    second = json.loads(out)
    assert (0, 1) == (second["resealed"], second["already_active"])


async def test_compare_and_set_keeps_a_changed_record(redis: aioredis.Redis, prefix: str) -> None:
    """The write-back replaces a record only while it holds the bytes read, and keeps
    the key's expiry."""
    key = f"{prefix}:{{{'a' * 32}}}:session"
    await redis.set(key, b"current", px=600_000)
    assert not await compare_and_set(redis, key, b"stale", b"new")
    assert b"current" == await redis.get(key)
    assert await compare_and_set(redis, key, b"current", b"new")
    assert b"new" == await redis.get(key)
    assert 590_000 < await redis.pttl(key)
    assert not await compare_and_set(redis, f"{prefix}:gone", b"current", b"new")
    assert None is await redis.get(f"{prefix}:gone")


def test_kek_of_reads_only_the_clear_field() -> None:
    """kek_of returns the record's clear `kek` id, None for anything else."""
    assert None is kek_of(b"not msgpack \xc1")
    assert None is kek_of(b"\x90")


async def test_new_master_writes_a_private_file_and_prints_its_id(tmp_path: Path) -> None:
    """`keys new-master --out F` writes one key line (0600), prints only its id, and
    refuses to overwrite."""
    path = tmp_path / "next.key"
    code, out, _ = await sealstream("keys", "new-master", "--out", str(path))
    assert 0 == code
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)
    key = load_master_key_file(path).active
    assert key.id == out.strip()
    assert key.to_base64() not in out
    code, _, err = await sealstream("keys", "new-master", "--out", str(path))
    assert 2 == code and 1 == len(err.strip().splitlines())


async def test_rotate_without_a_key_ring_is_a_config_error(settings: Settings) -> None:
    """rotate-master with no master key configured: one line naming the setting, exit 2."""
    code, _, err = await sealstream("keys", "rotate-master", env=redis_env(settings))
    assert 2 == code
    assert "SEALSTREAM_MASTER_KEY" in err and 1 == len(err.strip().splitlines())


async def test_progress_bar_on_a_terminal(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """With stderr on a terminal, rotate-master draws a progress bar up to N/N."""
    raw = Raw(redis, settings.prefix, keys)
    for _ in range(3):
        await raw.grant()
    ring = _ring_file(tmp_path / "ring.key", MasterKey.generate(), keys.master.active)
    env = redis_env(settings, SEALSTREAM_MASTER_KEY_FILE=str(ring))
    code, err = await anyio.to_thread.run_sync(
        lambda: run_on_terminal(["keys", "rotate-master"], env, stream="stderr")
    )
    assert 0 == code
    assert b"\rre-sealing [" in err and b"3/3" in err
