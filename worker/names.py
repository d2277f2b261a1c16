"""Every Redis key name sealstream uses, from one place.

Braces are literal Redis Cluster hash tags: a session's record, replies and replay
records share one slot, so the worker's atomic steps touch a single slot.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"


@dataclass(frozen=True, slots=True)
class Names:
    """Key names under one prefix ``P`` (default ``sealstream``)."""

    prefix: str = "sealstream"

    @property
    def config(self) -> str:
        """``P:config``: hash of ``shards``, ``servicePublicKey`` and ``kid``."""
        return f"{self.prefix}:config"

    @property
    def dlq(self) -> str:
        """``P:dlq``: the dead-letter stream."""
        return f"{self.prefix}:dlq"

    def request_stream(self, shard: int) -> str:
        """``P:req:{n}``: request shard ``n``."""
        return f"{self.prefix}:req:{{{shard}}}"

    def session(self, sid: str) -> str:
        """``P:{sid}:session``: the sealed session record."""
        return f"{self.prefix}:{{{sid}}}:session"

    def reply_stream(self, sid: str) -> str:
        """``P:{sid}:reply``: the session's reply stream."""
        return f"{self.prefix}:{{{sid}}}:reply"

    def seen(self, sid: str, mid: str) -> str:
        """``P:{sid}:seen:<mid>``: the replay/idempotency record of one request."""
        return f"{self.prefix}:{{{sid}}}:seen:{mid}"

    def default_shard(self, mid: str, shards: int) -> int:
        """The protocol's default shard for a message id: ``int(mid[:8], 16) % shards``."""
        return int(mid[:8], 16) % shards
