"""The Store's hand-packed commands read the same under RESP2 and RESP3."""

from __future__ import annotations

import pytest

from worker.names import GROUP, Names
from worker.streams import Claim, Store, connect
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
