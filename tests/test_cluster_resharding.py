"""Redis Cluster resharding: a slot moved to another primary while a worker serves it.

The slot is moved the way ``redis-cli --cluster reshard`` moves it, one step at a
time: IMPORTING on the target, MIGRATING on the source, MIGRATE of the keys in
batches, then SETSLOT NODE on every primary. Requests keep arriving throughout, so
the worker reads, claims and answers while the slot is half moved: redis-py follows
the ASK redirections, and a script whose keys are not all on one node (or not yet
on a node that owns the slot) is refused with TRYAGAIN until the slot is handed
over, which the worker waits out (see :mod:`worker.retrier`).

The cluster is this module's own (2 primaries, no replicas): a test that failed
half way must not leave the session's cluster with a slot in migration.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import anyio
import pytest
import redis.asyncio as aioredis
import structlog
from redis.cluster import key_slot

from tests.helpers import Raw, open_ok, wait_until
from worker import envelopes
from worker.cluster import cluster_client
from worker.handlers import App
from worker.handshake import SessionGrant
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker
from worker.testservers import ClusterServers

SHARDS = 2
#: How long each half-moved state is held open once new requests have arrived in it (s).
HOLD_S = 0.3

app = App()


@app.handler("echo")
async def echo(payload: Any) -> Any:
    """Return the payload unchanged."""
    return payload


@app.handler("slow")
async def slow(payload: Any) -> Any:
    """Return the payload after 150 ms, so some reply steps fall in a later step of the
    move than their claims."""
    await anyio.sleep(0.15)
    return payload


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[ClusterServers]:
    """A Redis Cluster of 2 primaries and no replicas, for this module alone."""
    cluster = ClusterServers.launch(primaries=2, replicas=0)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_settings(small_cluster: ClusterServers, settings: Settings) -> Settings:
    """The test's settings on the module's cluster, with 2 request shards, and entries
    reclaimed only after a minute: none is, so an entry left pending stays so."""
    return replace(settings, redis_url=small_cluster.url, shards=SHARDS, claim_idle_ms=60_000)


@pytest.fixture
async def raw(
    small_cluster: ClusterServers, cluster_settings: Settings, keys: ThrowawayKeys
) -> AsyncIterator[Raw]:
    """A hand-driven client on a cluster client of the module's cluster."""
    client = cluster_client(small_cluster.url)
    try:
        # Raw's commands are single-slot ones, which a cluster client runs alike.
        yield Raw(cast(aioredis.Redis, client), cluster_settings.prefix, keys)
    finally:
        await client.aclose()


async def _node(port: int) -> tuple[aioredis.Redis, str]:
    """A plain client of one node, and the node's id."""
    node = aioredis.Redis(host="127.0.0.1", port=port)
    return node, (await node.execute_command("CLUSTER", "MYID")).decode()


@dataclass
class SlotMove:
    """One hash slot moved from the primary on ``source`` to the one on ``target``."""

    slot: int
    source: int
    target: int
    others: list[int]
    nodes: dict[int, tuple[aioredis.Redis, str]] = field(default_factory=dict)

    @classmethod
    async def open(cls, cluster: ClusterServers, slot: int, source: int, target: int) -> SlotMove:
        others = [p for p in cluster.ports if p not in (source, target)]
        move = cls(slot=slot, source=source, target=target, others=others)
        for port in (source, target, *others):
            move.nodes[port] = await _node(port)
        return move

    def _cmd(self, port: int, *args: Any) -> Any:
        return self.nodes[port][0].execute_command(*args)

    async def begin(self) -> None:
        """IMPORTING on the target, then MIGRATING on the source (redis-cli's order)."""
        source_id, target_id = self.nodes[self.source][1], self.nodes[self.target][1]
        await self._cmd(self.target, "CLUSTER", "SETSLOT", self.slot, "IMPORTING", source_id)
        await self._cmd(self.source, "CLUSTER", "SETSLOT", self.slot, "MIGRATING", target_id)

    async def keys_left(self) -> list[bytes]:
        """The slot's keys still on the source."""
        keys: list[bytes] = await self._cmd(
            self.source, "CLUSTER", "GETKEYSINSLOT", self.slot, 1000
        )
        return keys

    async def migrate(self, keys: list[bytes]) -> None:
        """MIGRATE ``keys`` (those still on the source) to the target in one batch."""
        if keys:
            await self._cmd(
                self.source, "MIGRATE", "127.0.0.1", self.target, "", 0, 5000, "KEYS", *keys
            )

    async def end(self) -> None:
        """SETSLOT NODE on the target, the source, then every other primary."""
        target_id = self.nodes[self.target][1]
        for port in (self.target, self.source, *self.others):
            await self._cmd(port, "CLUSTER", "SETSLOT", self.slot, "NODE", target_id)

    async def close(self) -> None:
        for node, _ in self.nodes.values():
            await node.aclose()


@dataclass
class Traffic:
    """Requests for one session, sent every ``every_s`` until stopped, over the shards."""

    raw: Raw
    grant: SessionGrant
    every_s: float = 0.02
    sent: dict[str, tuple[envelopes.Outgoing, Any]] = field(default_factory=dict)
    stopped: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        for i in itertools.count():
            if self.stopped.is_set():
                return
            payload = {"i": i}
            out = self.raw.seal(self.grant, payload, type_="slow" if i % 3 == 0 else "echo")
            self.sent[out.request.mid] = (out, payload)
            await self.raw.send(out.request, shard=i % SHARDS)
            await anyio.sleep(self.every_s)

    async def more(self, n: int) -> None:
        """Wait until ``n`` more requests have been sent."""
        goal = len(self.sent) + n
        await wait_until(lambda: len(self.sent) >= goal)


async def _tryagains(cluster: ClusterServers) -> int:
    """TRYAGAIN refusals the cluster's nodes have answered so far (INFO errorstats)."""
    total = 0
    for port in cluster.ports:
        node = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            stats = await node.info("errorstats")
        finally:
            await node.aclose()
        total += int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))
    return total


async def _answered_once(raw: Raw, sid: str, traffic: Traffic) -> None:
    """Every request sent is answered, once, with its own payload; nothing is left."""

    async def all_answered() -> list[Any] | None:
        replies = await raw.replies(sid)
        return replies if {r.mid for r in replies} >= set(traffic.sent) else None

    replies = await wait_until(all_answered, timeout=20)
    assert {mid: 1 for mid in traffic.sent} == Counter(r.mid for r in replies)
    for reply in replies:
        out, payload = traffic.sent[reply.mid]
        assert payload == open_ok(reply, out)
    for shard in range(SHARDS):
        await raw.wait_drained(shard)
        assert 0 == await raw.pending(shard)
    assert [] == await raw.dead_letters()


async def _move_under_traffic(
    cluster: ClusterServers,
    settings: Settings,
    keys: ThrowawayKeys,
    raw: Raw,
    grant: SessionGrant,
    key: str,
) -> float:
    """Move ``key``'s slot to the other primary while requests for ``grant``'s session
    keep arriving; then check that each was answered once, that no answered entry was
    left unacknowledged, and that the worker logged no error. ``key`` itself stays on
    the source until the second MIGRATE batch. Returns the Redis outages the worker
    rode out meanwhile."""
    slot = key_slot(key.encode())
    source = cluster.primary_of(key)
    (target,) = [p for p in cluster.ports if p != source]
    move = await SlotMove.open(cluster, slot, source, target)
    traffic = Traffic(raw, grant)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_worker(app, settings, keys) as worker:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(traffic.run)
                    await traffic.more(10)
                    # Replay records and the reply stream exist before the slot moves.
                    await wait_until(lambda: raw.replies(grant.sid))
                    await move.begin()
                    # First batch: every key of the slot but ``key``.
                    await move.migrate([k for k in await move.keys_left() if k != key.encode()])
                    await traffic.more(5)
                    await anyio.sleep(HOLD_S)
                    # Second batch: ``key`` and whatever was written meanwhile.
                    while keys_left := await move.keys_left():
                        await move.migrate(keys_left)
                    await traffic.more(5)
                    await anyio.sleep(HOLD_S)
                    await move.end()
                    await traffic.more(10)
                    traffic.stopped.set()
                await _answered_once(raw, grant.sid, traffic)
                outages = worker.metrics.registry.get_sample_value("sealstream_redis_outages_total")
        assert target == cluster.primary_of(key)
        assert [] == [e for e in logs if e["log_level"] in ("error", "critical")]
        assert 0 == worker.stats["redelivered_done"]  # no answered entry was left unacked
        return outages or 0.0
    finally:
        await move.close()


async def test_a_session_slot_moved_mid_traffic_answers_every_request_once(
    small_cluster: ClusterServers, cluster_settings: Settings, keys: ThrowawayKeys, raw: Raw
) -> None:
    """While requests keep arriving for a session, its slot (session record, replay
    records, reply stream) moves to the other primary: first everything but the
    session record, then the rest. Requests read meanwhile find their claims and
    reply steps refused with TRYAGAIN (their keys on two nodes) until the slot is
    handed over; they are waited out, not dead-lettered: every request gets exactly
    one reply, opened and correct; nothing stays pending; no dead letter."""
    grant = await raw.grant()
    session_key = raw.names.session(grant.sid)
    before = await _tryagains(small_cluster)
    outages = await _move_under_traffic(
        small_cluster, cluster_settings, keys, raw, grant, session_key
    )
    assert await _tryagains(small_cluster) > before  # the scripts met the window
    assert outages >= 1  # long enough for the retrier to wait it out, past redis-py


async def test_a_request_shard_moved_mid_traffic_answers_every_request_once(
    small_cluster: ClusterServers, cluster_settings: Settings, keys: ThrowawayKeys, raw: Raw
) -> None:
    """While requests keep arriving, request shard 0's stream (with its consumer
    group and pending entries) moves to the other primary: reads, acknowledgements
    and new entries follow it (ASK, then MOVED). Every request gets exactly one
    reply, opened and correct; nothing stays pending; no dead letter."""
    grant = await raw.grant()
    await _move_under_traffic(
        small_cluster, cluster_settings, keys, raw, grant, raw.names.request_stream(0)
    )
