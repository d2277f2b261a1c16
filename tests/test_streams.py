"""The Store's commands: hand-packed replies under RESP2 and RESP3, and how Redis's
refusals are classified (waited out, or final)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ResponseError

from worker.keyspace import GROUP, Names
from worker.streams import TRIM_STEP, Claim, RefusalWrite, ReplyWrite, Store, connect, transient
from worker.testing import RedisServer


@pytest.mark.parametrize("protocol", [2, 3])
async def test_read_returns_entries_under_either_protocol(
    redis_server: RedisServer, prefix: str, protocol: int
) -> None:
    """XREADGROUP through the packed path gives ids and fields, RESP2 or RESP3."""
    client = connect(f"{redis_server.url}?protocol={protocol}")
    try:
        store = Store(client, Names(prefix))
        await store.ensure_groups(1)
        first = await store.add_request(0, {"e": b"one"})
        second = await store.add_request(0, {"j": b"two"})
        entries = await store.read(0, "c", count=10, block_ms=100)
        assert [(first, {b"e": b"one"}), (second, {b"j": b"two"})] == [
            (e.id, e.fields) for e in entries
        ]
        assert [] == await store.read(0, "c", count=10, block_ms=10)
        assert [None, None] == await store.get_sessions(["a" * 32, "b" * 32])
        claims = [Claim(sid="a" * 32, mid="c" * 32, owner=f"0|{first}", ttl_ms=10_000)]
        assert [None] == await store.claim(claims)
        assert [f"0|{first}"] == await store.claim(claims)
        (group,) = await client.xinfo_groups(Names(prefix).request_stream(0))
        assert (GROUP, 2) == (group["name"].decode(), group["pending"])
    finally:
        await client.aclose()


async def test_a_trim_frees_a_backlog_in_steps_and_keeps_what_is_pending(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog of acknowledged entries goes in XTRIM calls of at most TRIM_STEP
    entries each (Redis frees them while other clients wait), down to the oldest
    pending entry exactly: the last call takes the part of a stream node below it."""
    backlog = 2 * TRIM_STEP + 350  # 100-entry nodes: the bound falls inside one
    with RedisServer.start() as server:
        client = connect(server.url)
        try:
            await client.config_set("stream-node-max-entries", 100)  # Redis's default
            store = Store(client, Names(prefix))
            stream = store.names.request_stream(0)
            await store.ensure_groups(1)
            async with client.pipeline(transaction=False) as pipe:
                for i in range(backlog + 3):
                    pipe.xadd(stream, {"i": i})
                ids = await pipe.execute()
            await client.xreadgroup(GROUP, "c", {stream: ">"}, count=backlog + 3)
            await client.xack(stream, GROUP, *ids[:backlog])
            freed: list[int] = []
            xtrim = client.xtrim

            async def counted(*args: Any, **kwargs: Any) -> Any:
                n = await xtrim(*args, **kwargs)
                freed.append(int(n))
                return n

            monkeypatch.setattr(client, "xtrim", counted)
            assert backlog == await store.trim(0)
            assert backlog == sum(freed)
            assert max(freed) <= TRIM_STEP, freed
            assert ids[backlog:] == [eid for eid, _ in await client.xrange(stream)]
        finally:
            await client.aclose()


async def test_out_of_memory_is_a_refusal_for_now(redis_server: RedisServer, prefix: str) -> None:
    """With Redis out of memory, the batch scripts fail with an error the worker waits
    out (transient), never one it would dead-letter and acknowledge; afterwards they run."""
    client = connect(redis_server.url)
    store = Store(client, Names(prefix))
    claims = [Claim(sid="a" * 32, mid="b" * 32, owner="0|1-1", ttl_ms=10_000)]
    letter = {"reason": "timeout"}
    try:
        await client.config_set("maxmemory", "1")
        try:
            for op in (
                lambda: store.claim(claims),
                lambda: store.finish([_reply(letter)]),
                lambda: store.finish([RefusalWrite(shard=0, entry_id="1-1", letter=letter)]),
            ):
                with pytest.raises(ResponseError) as err:
                    await op()
                assert transient(err.value), str(err.value)
        finally:
            await client.config_set("maxmemory", "0")
        assert [None] == await store.claim(claims)
    finally:
        await client.aclose()


async def test_a_read_only_replica_is_a_refusal_for_now(prefix: str) -> None:
    """On a replica (a failover in progress), the batch scripts fail with an error the
    worker waits out, instead of refusing every request as a replay."""
    with RedisServer.start() as primary, RedisServer.start() as replica:
        client = connect(replica.url)
        try:
            await client.execute_command("REPLICAOF", "127.0.0.1", primary.port)
            store = Store(client, Names(prefix))
            claims = [Claim(sid="a" * 32, mid="b" * 32, owner="0|1-1", ttl_ms=10_000)]
            for op in (lambda: store.claim(claims), lambda: store.finish([_reply(None)])):
                with pytest.raises(ResponseError) as err:
                    await op()
                assert transient(err.value), str(err.value)
        finally:
            await client.aclose()


def _reply(letter: dict[str, str] | None) -> ReplyWrite:
    return ReplyWrite(
        shard=0,
        entry_id="1-1",
        sid="a" * 32,
        mid="b" * 32,
        owner="0|1-1",
        entry={"e": b"reply"},
        seen_ttl_ms=10_000,
        letter=letter,
    )


async def test_a_retried_reply_step_writes_its_dead_letter_once(
    redis_server: RedisServer, prefix: str
) -> None:
    """FINISH run twice for one reply (a lost answer, retried): one reply, one dead
    letter; the second call finds the record done and writes nothing."""
    client = connect(redis_server.url)
    try:
        names = Names(prefix)
        store = Store(client, names)
        await store.ensure_groups(1)
        assert [None] == await store.claim(
            [Claim(sid="a" * 32, mid="b" * 32, owner="0|1-1", ttl_ms=10_000)]
        )
        write = _reply({"reason": "timeout"})
        assert [1] == await store.finish([write])
        assert [0] == await store.finish([write])
        assert 1 == await client.xlen(names.dlq)
        assert 1 == await client.xlen(names.reply_stream("a" * 32))
    finally:
        await client.aclose()


async def test_lag_counts_entries_not_yet_delivered_to_the_group(
    redis_server: RedisServer, prefix: str
) -> None:
    """Store.lag is the number of entries the group has not read yet."""
    client = connect(redis_server.url)
    try:
        store = Store(client, Names(prefix))
        await store.ensure_groups(1)
        assert 0 == await store.lag(0)
        await store.add_request(0, {"e": b"one"})
        await store.add_request(0, {"e": b"two"})
        assert 2 == await store.lag(0)
        await store.read(0, "c", count=1, block_ms=10)
        assert 1 == await store.lag(0)
    finally:
        await client.aclose()
