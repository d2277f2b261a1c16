"""Redis Cluster resharding: a slot moved to another primary while a worker serves it.

The slot is moved the way ``redis-cli --cluster reshard`` moves it, one step at a
time: IMPORTING on the target, MIGRATING on the source, MIGRATE of the keys in
batches, then SETSLOT NODE on every primary. Requests keep arriving throughout, so
the worker reads, claims and answers while the slot is half moved: redis-py follows
the ASK redirections, and a script whose keys are not all on one node (or not yet
on a node that owns the slot) is refused with TRYAGAIN until the slot is handed
over, which the worker waits out (see :mod:`worker.retrier`).

A migration can also be left broken half way: the dead-letter stream's slot
MIGRATING on its source with no IMPORTING on the target. redis-py is then sent back
and forth (ASK, MOVED) until it gives up with ``ClusterError("TTL exhausted.")``; a
dead letter written meanwhile is waited out until the slot is settled, never
dropped, and nothing of its entry (reply, notice, XACK) is written before it.

The cluster is this module's own (2 primaries, no replicas): a test that failed
half way must not leave the session's cluster with a slot in migration.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import anyio
import pytest
import redis.asyncio as aioredis
import structlog
from redis.cluster import key_slot

from tests.helpers import Raw, open_ok, wait_until
from worker import envelopes, wire
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


@app.handler("fail", retries=0)
async def fail(payload: Any) -> Any:
    """Fail at once, not retried: an error reply and a ``handler_error`` dead letter."""
    raise RuntimeError("boom")


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


async def _errorstat(port: int, code: str) -> int:
    """The ``code`` errors (MOVED, say) one node has answered so far."""
    node = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        stats = await node.info("errorstats")
    finally:
        await node.aclose()
    return int(stats.get(f"errorstat_{code}", {}).get("count", 0))


async def _keys_in_slot(move: SlotMove) -> int:
    """The slot's keys on its source and target together."""
    total = 0
    for port in (move.source, move.target):
        total += int(await move._cmd(port, "CLUSTER", "COUNTKEYSINSLOT", move.slot))
    return total


async def _letter_through_a_broken_slot(
    cluster: ClusterServers,
    settings: Settings,
    keys: ThrowawayKeys,
    raw: Raw,
    seal: Callable[[SessionGrant], envelopes.Outgoing],
    reason: str,
) -> tuple[envelopes.Outgoing, wire.Reply]:
    """Send a request sealed by ``seal`` for a new session, whose entry ends in a
    dead letter for ``reason``, while the dead-letter stream's slot is left MIGRATING
    on its source without IMPORTING on the target: the source answers ASK, the
    target MOVED back, and redis-py gives up on the pipelined XADD with
    ``ClusterError("TTL exhausted.")``. While the slot stays so: no dead letter on
    either node, no reply or notice, the entry pending, no error logged. Then the
    slot is made STABLE: the dead letter lands exactly once, the one reply or notice
    is written, the entry is acknowledged, no error is logged. Returns the request
    and its reply (or notice). Only the dead letter's slot is broken: the session's
    and the request shard's are others."""
    dlq = raw.names.dlq
    slot = key_slot(dlq.encode())
    source = cluster.primary_of(dlq)
    (target,) = [p for p in cluster.ports if p != source]
    shard = next(n for n in range(SHARDS) if key_slot(raw.names.request_stream(n).encode()) != slot)
    grant = await raw.grant()
    while key_slot(raw.names.session(grant.sid).encode()) == slot:
        grant = await raw.grant()
    out = seal(grant)
    move = await SlotMove.open(cluster, slot, source, target)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_worker(app, settings, keys) as worker:

                def errors() -> list[Any]:
                    return [e for e in logs if e["log_level"] in ("error", "critical")]

                def outages() -> float:
                    n = worker.metrics.registry.get_sample_value("sealstream_redis_outages_total")
                    return n or 0.0

                keys_before = await _keys_in_slot(move)  # no dead letter: none of ours
                moved_before = await _errorstat(target, "MOVED")
                target_id = move.nodes[target][1]
                await move._cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
                entry_id = await raw.send(out.request, shard=shard)
                # The dead letter's XADD was tried: waited out as an outage, or taken
                # as refused for good (a refusal then counted done, a reply's letter
                # logged as dead_letter_refused).
                await wait_until(
                    lambda: outages() >= 1 or errors() or worker.stats.get("refused", 0)
                )
                await anyio.sleep(HOLD_S)
                assert [] == errors()
                assert keys_before == await _keys_in_slot(move)  # no dead letter anywhere
                assert [] == await raw.replies(grant.sid)  # nothing before its letter
                assert 1 == await raw.pending(shard)  # not acknowledged
                assert outages() >= 1  # waited out (TTL exhausted: "for now")
                assert await _errorstat(target, "MOVED") > moved_before  # ASK, then MOVED
                await move._cmd(source, "CLUSTER", "SETSLOT", slot, "STABLE")
                await raw.wait_drained(shard)
                letters = await raw.dead_letters()
                assert [(reason.encode(), entry_id.encode())] == [
                    (letter["reason"], letter["id"]) for letter in letters
                ]
                replies = await raw.replies(grant.sid)
                assert [out.request.mid] == [r.mid for r in replies]
        assert source == cluster.primary_of(dlq)
        assert [] == errors()
        return out, replies[0]
    finally:
        await move.close()


async def test_a_failed_requests_dead_letter_in_a_broken_migration_waits_for_the_slot(
    small_cluster: ClusterServers, cluster_settings: Settings, keys: ThrowawayKeys, raw: Raw
) -> None:
    """A failing handler's dead letter, its XADD given up on by redis-py while the
    dead-letter stream's slot is in a broken migration, is waited out, not refused
    for good (which left the request unanswered, pending until reclaimed): nothing
    is written before it, and once the slot is settled the dead letter lands once,
    the one error reply is written and the entry acknowledged."""
    out, reply = await _letter_through_a_broken_slot(
        small_cluster,
        cluster_settings,
        keys,
        raw,
        lambda grant: raw.seal(grant, {"x": 1}, type_="fail"),
        "handler_error",
    )
    assert "error" == reply.status
    assert "handler_error" == open_ok(reply, out)["code"]


async def test_a_refusals_dead_letter_in_a_broken_migration_is_not_dropped(
    small_cluster: ClusterServers, cluster_settings: Settings, keys: ThrowawayKeys, raw: Raw
) -> None:
    """A refused request's dead letter (an expired one), its XADD given up on by
    redis-py while the dead-letter stream's slot is in a broken migration, is waited
    out, not dropped with the entry acknowledged: nothing is written before it, and
    once the slot is settled the dead letter lands once, the one ``expired`` notice
    is written and the entry acknowledged."""
    _, notice = await _letter_through_a_broken_slot(
        small_cluster,
        cluster_settings,
        keys,
        raw,
        lambda grant: raw.seal(grant, {"x": 1}, ts=1),
        "expired",
    )
    assert ("rejected", "expired") == (notice.status, notice.code)
