"""Every Redis key name sealstream uses, from one place.

Braces are literal Redis Cluster hash tags: a session's record, replies and replay
records share one slot, so the worker's atomic steps touch a single slot.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
_GLOB_SPECIAL = "*?[]\\"


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


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

    def attempt(self, sid: str, mid: str) -> str:
        """``P:{sid}:attempt:<mid>``: the attempt a retried request is on (same slot as
        its replay record, and no longer lived), so a redelivery goes on from it."""
        return f"{self.prefix}:{{{sid}}}:attempt:{mid}"

    @property
    def request_stream_pattern(self) -> str:
        """SCAN MATCH pattern of every request shard ``P:req:{*}``."""
        return f"{_glob_escape(self.prefix)}:req:{{*}}"

    @property
    def session_pattern(self) -> str:
        """SCAN MATCH pattern of every session record ``P:{*}:session``."""
        return f"{_glob_escape(self.prefix)}:{{*}}:session"

    @property
    def reply_stream_pattern(self) -> str:
        """SCAN MATCH pattern of every reply stream ``P:{*}:reply``."""
        return f"{_glob_escape(self.prefix)}:{{*}}:reply"

    def sid_of_session_key(self, key: str) -> str | None:
        """The ``sid`` in a session record's key name, or None if it is not one."""
        head, tail = f"{self.prefix}:{{", "}:session"
        if key.startswith(head) and key.endswith(tail):
            return key[len(head) : -len(tail)]
        return None

    def default_shard(self, mid: str, shards: int) -> int:
        """The protocol's default shard for a message id: ``int(mid[:8], 16) % shards``."""
        return int(mid[:8], 16) % shards
