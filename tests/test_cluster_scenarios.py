"""Round trips, refusals and poison entries again, on the session's Redis Cluster.

The tests below are the single-server tests of the same names (imported, so pytest
runs them here a second time): only the ``settings`` and ``redis`` fixtures differ,
pointing at a 3-primary cluster. A representative subset, chosen for the batch
steps a cluster splits per slot: replay-record claims (each with its session
record's digest: cached sessions, revoked or not, several sids in a batch), replies
(with their dead letters first), notices, dead letters alone, replay records,
handshakes (the session record in the reply's slot), and keys of the wrong type in
each of those places; and the operations that SCAN every node or pipeline per slot
(stats, dlq, sessions, master-key rotation), and the gateway (its ``grant`` and
``http`` fixtures come along, as does the rejection tests' ``rig``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.test_dlq import test_purge_by_reason, test_stats_counts_by_reason
from tests.test_gateway import (
    grant,
    http,
    test_request_goes_to_its_default_shard,
    test_round_trip_through_the_gateway,
)
from tests.test_hardening import (
    test_a_dead_letter_stream_of_another_type_still_ends_in_an_ack,
    test_a_refusal_whose_notice_redis_refuses_is_dead_lettered_and_acked,
    test_a_replay_record_of_another_type_is_refused_as_a_replay,
    test_a_reply_redis_refuses_is_dead_lettered_unanswerable_and_acked,
    test_a_session_key_of_another_type_is_session_unknown,
)
from tests.test_rejections import (
    rig,
    test_delivery_limit_is_refused_without_running,
    test_garbage_entry_is_malformed_without_notice,
    test_handler_exception_is_handler_error_and_dead_letter,
    test_handshake_for_existing_sid_is_refused_and_spends_mid,
    test_replayed_entry_is_refused_and_not_run,
    test_tampered_session_record_is_session_unknown,
    test_two_copies_added_at_once_run_once,
    test_unknown_session_is_session_unknown,
)
from tests.test_rotation import test_status_and_second_rotation
from tests.test_roundtrip import (
    test_handshake_then_echo,
    test_sleep_and_fail_handlers,
    test_submit_and_iterate_replies,
    test_trusted_backend_session,
)
from tests.test_session_admin import (
    test_list_counts_sessions_by_time_left,
    test_revoked_session_gets_session_unknown,
)
from tests.test_session_cache import (
    test_a_cached_session_whose_record_expired_in_redis_is_session_unknown,
    test_a_forged_request_for_a_revoked_cached_session_is_session_unknown,
    test_a_mixed_batch_of_cached_sessions_gets_the_uncached_answers,
)
from tests.test_stats import test_stats_json_reports_every_figure
from worker.cluster import cluster_client
from worker.settings import Settings
from worker.testservers import ClusterServers

__all__ = [
    "grant",
    "http",
    "rig",
    "test_a_cached_session_whose_record_expired_in_redis_is_session_unknown",
    "test_a_dead_letter_stream_of_another_type_still_ends_in_an_ack",
    "test_a_forged_request_for_a_revoked_cached_session_is_session_unknown",
    "test_a_mixed_batch_of_cached_sessions_gets_the_uncached_answers",
    "test_a_refusal_whose_notice_redis_refuses_is_dead_lettered_and_acked",
    "test_a_replay_record_of_another_type_is_refused_as_a_replay",
    "test_a_reply_redis_refuses_is_dead_lettered_unanswerable_and_acked",
    "test_a_session_key_of_another_type_is_session_unknown",
    "test_delivery_limit_is_refused_without_running",
    "test_garbage_entry_is_malformed_without_notice",
    "test_handler_exception_is_handler_error_and_dead_letter",
    "test_handshake_for_existing_sid_is_refused_and_spends_mid",
    "test_handshake_then_echo",
    "test_list_counts_sessions_by_time_left",
    "test_purge_by_reason",
    "test_replayed_entry_is_refused_and_not_run",
    "test_request_goes_to_its_default_shard",
    "test_revoked_session_gets_session_unknown",
    "test_round_trip_through_the_gateway",
    "test_sleep_and_fail_handlers",
    "test_stats_counts_by_reason",
    "test_stats_json_reports_every_figure",
    "test_status_and_second_rotation",
    "test_submit_and_iterate_replies",
    "test_tampered_session_record_is_session_unknown",
    "test_trusted_backend_session",
    "test_two_copies_added_at_once_run_once",
    "test_unknown_session_is_session_unknown",
]


@pytest.fixture
def settings(redis_cluster: ClusterServers, settings: Settings) -> Settings:
    """The usual test settings, on the session's cluster."""
    return replace(settings, redis_url=redis_cluster.url)


@pytest.fixture
async def redis(redis_cluster: ClusterServers) -> AsyncIterator[RedisCluster]:
    """A cluster client of the session's cluster (in place of the single server's)."""
    client = cluster_client(redis_cluster.url)
    try:
        yield client
    finally:
        await client.aclose()
