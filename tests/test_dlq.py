"""``sealstream dlq``: browse, count and purge dead letters without decrypting them."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.cli import redis_env, sealstream, sealstream_json
from tests.helpers import Raw
from worker.demo_app import app
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker


async def _letters(settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis) -> Raw:
    """Three dead letters, one after the other: two malformed entries (one without an
    `e` field, so kept as `size`) and then a failed handler."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        await raw.send_fields({"x": b"garbage"})
        await raw.wait_dead_letters(1)
        await raw.send_fields({"e": b"\xc1not msgpack"})
        await raw.wait_dead_letters(2)
        out = raw.seal(grant, {"secret": "plaintext"}, type_="fail")
        await raw.send(out.request)
        await raw.wait_dead_letters(3)
    return raw


async def test_list_shows_metadata_and_only_a_prefix_of_the_ciphertext(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """`dlq list --json` gives each letter's fields, newest first; the original field
    appears only as its size and an 8-byte hex prefix, an oversize one as `size`."""
    raw = await _letters(settings, keys, redis)
    stored = await raw.dead_letters()
    letters = await sealstream_json("dlq", "list", env=redis_env(settings))
    assert ["handler_error", "malformed", "malformed"] == [x["reason"] for x in letters]
    failed = letters[0]
    assert "fail" == failed["type"]
    assert len(stored[2]["e"]) == failed["original"]["size"]
    assert stored[2]["e"][:8].hex() == failed["original"]["prefix_hex"]
    assert None is letters[2]["original"]
    assert letters[2]["size"] > 0


async def test_list_filters_by_reason_and_limit(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """--reason keeps one reason; --limit caps the count."""
    await _letters(settings, keys, redis)
    env = redis_env(settings)
    only = await sealstream_json("dlq", "list", "--reason", "malformed", env=env)
    assert ["malformed", "malformed"] == [x["reason"] for x in only]
    assert 1 == len(await sealstream_json("dlq", "list", "--limit", "1", env=env))


async def test_show_one_letter(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """`dlq show ID` prints one letter with a 32-byte prefix; an unknown id exits 1."""
    raw = await _letters(settings, keys, redis)
    env = redis_env(settings)
    newest = (await sealstream_json("dlq", "list", "--limit", "1", env=env))[0]
    shown = await sealstream_json("dlq", "show", newest["id"], env=env)
    stored = (await raw.dead_letters())[2]["e"]
    assert stored[:32].hex() == shown["original"]["prefix_hex"]
    code, out, _ = await sealstream("dlq", "show", newest["id"], env=env)
    assert 0 == code and "handler_error" in out and stored[32:].hex() not in out
    assert 1 == (await sealstream("dlq", "show", "1-0", env=env))[0]


async def test_stats_counts_by_reason(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """`dlq stats` counts the letters by reason (server-side, without fetching them)."""
    await _letters(settings, keys, redis)
    doc = await sealstream_json("dlq", "stats", env=redis_env(settings))
    assert {"total": 3, "by_reason": {"handler_error": 1, "malformed": 2}} == doc


async def test_purge_is_a_dry_run_without_yes(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """`dlq purge` without --yes only counts; nothing is deleted."""
    raw = await _letters(settings, keys, redis)
    code, out, _ = await sealstream("dlq", "purge", env=redis_env(settings))
    assert 0 == code and "dry run (add --yes to delete), would purge: 3" in out
    assert 3 == len(await raw.dead_letters())


async def test_purge_by_reason(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """`dlq purge --reason R --yes` deletes that reason's letters and no others."""
    raw = await _letters(settings, keys, redis)
    doc = await sealstream_json(
        "dlq", "purge", "--reason", "malformed", "--yes", env=redis_env(settings)
    )
    assert {"purged": True, "total": 2, "by_reason": {"malformed": 2}} == doc
    assert [b"handler_error"] == [x["reason"] for x in await raw.dead_letters()]


async def test_purge_before_keeps_newer_letters(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """--before T deletes only letters added before T (by their id in P:dlq)."""
    raw = await _letters(settings, keys, redis)
    ids = [i.decode() for i, _ in await redis.xrange(raw.names.dlq)]
    cut = ids[2].split("-")[0]
    doc = await sealstream_json("dlq", "purge", "--before", cut, "--yes", env=redis_env(settings))
    assert 2 == doc["total"]
    assert [ids[2]] == [i.decode() for i, _ in await redis.xrange(raw.names.dlq)]
    doc = await sealstream_json("dlq", "purge", "--before", "0s", "--yes", env=redis_env(settings))
    assert 1 == doc["total"]
    assert 0 == await redis.xlen(raw.names.dlq)


async def test_bad_arguments_are_one_line_and_lose_nothing(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """An unknown reason, a malformed --before or id: one line, exit 2, nothing deleted."""
    raw = await _letters(settings, keys, redis)
    env = redis_env(settings)
    for args in (
        ("purge", "--reason", "nonsense", "--yes"),
        ("purge", "--before", "yesterday", "--yes"),
        ("show", "not-an-id"),
    ):
        code, _, err = await sealstream("dlq", *args, env=env)
        assert 2 == code, args
        assert 1 == len(err.strip().splitlines()), err
        assert "Traceback" not in err
    assert 3 == len(await raw.dead_letters())
