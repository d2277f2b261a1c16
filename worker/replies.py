"""What a client makes of its reply stream: batches, authentication, results.

Notices (``rejected``) are unauthenticated: anyone who can write to Redis can
forge one. So within a batch sealed replies are handled before notices, and a
reply that fails to open is ignored as a forgery (the caller logs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker import codec, envelopes, wire
from worker.errors import DecryptError, Malformed, RemoteError, ReplyTimeout, RequestRejected
from worker.logging import get_logger
from worker.streams import Entry

log = get_logger("sealstream.client")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """A result as :meth:`ClientSession.replies` yields it.

    ``status`` is ``ok``, ``error`` (authenticated, with ``code`` and ``message``),
    ``rejected`` (a notice, with ``code``) or ``timeout`` (no reply within the
    ``submit`` timeout).
    """

    mid: str
    type: str
    status: str
    value: Any = None
    code: str | None = None
    message: str | None = None

    def unwrap(self) -> Any:
        """The value of an ``ok`` result.

        Raises :class:`RemoteError` (``error``), :class:`ReplyTimeout` (``timeout``)
        or :class:`RequestRejected` (``rejected``).
        """
        if self.status == "ok":
            return self.value
        if self.status == "error":
            raise RemoteError(self.code or "", self.message or "", message_id=self.mid)
        if self.status == "timeout":
            raise ReplyTimeout("no reply within the submit timeout", message_id=self.mid)
        raise RequestRejected(self.code or "rejected", message_id=self.mid)


def batch(entries: list[Entry], sid: str) -> list[wire.Reply]:
    """A batch's well-formed replies for ``sid``, sealed ones before notices.

    Otherwise in read order. A notice read in the same batch as the authenticated
    reply to its ``mid`` (a forgery, say) thus never counts: the reply settles it first.
    """
    replies = []
    for entry in entries:
        try:
            reply = wire.decode_reply(entry.fields)
        except Malformed:
            log.warning("reply_malformed", session_id=sid)
            continue
        if reply.sid == sid:
            replies.append(reply)
    return sorted(replies, key=lambda r: r.status == "rejected")


def copy_refused(reply: wire.Reply) -> bool:
    """A ``replay`` notice for a mid we sent once refers to a copy of our entry.

    Our own entry was (or will be) answered, so the notice is no reason to stop
    waiting: it would otherwise let anyone who can add entries cancel our requests.
    """
    return reply.status == "rejected" and reply.code == "replay"


def resolve(reply: wire.Reply, out: envelopes.Outgoing, type_: str) -> Result:
    """Authenticate and decode a reply to ``out``; DecryptError if it is not genuine."""
    mid = out.request.mid
    if reply.status == "rejected":
        return Result(mid=mid, type=type_, status="rejected", code=reply.code)
    plaintext = envelopes.open_reply(reply, reply_key=out.reply_key, request=out.request)
    try:
        value = codec.loads(plaintext, out.request.field)
    except codec.DecodeError:
        raise DecryptError("cannot open") from None
    if reply.status == "error":
        if not isinstance(value, dict):
            raise DecryptError("cannot open")
        return Result(
            mid=mid,
            type=type_,
            status="error",
            code=str(value.get("code")),
            message=str(value.get("message")),
        )
    return Result(mid=mid, type=type_, status="ok", value=value)
