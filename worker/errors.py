"""The one exception tree of sealstream, sorted by what happens next.

::

    SealstreamError
    ├── ConfigError                 bad settings or key files: refuse to start
    ├── StartupFailed               an app's startup hook raised: the worker stops (exit 3)
    ├── InvalidArgument             a bad argument to an operations call: nothing changed
    ├── ProtocolError               an entry the worker refuses; dead-lettered, never retried
    │   ├── Malformed                 reason ``malformed`` (format, size, fields, encoding)
    │   ├── Unsupported               reason ``unsupported`` (``v`` or ``alg``)
    │   ├── Expired                   reason ``expired`` (``ts`` outside the window)
    │   ├── SessionInvalid            reason ``session_invalid`` (no session, or it fails to open)
    │   ├── AuthFailed                reason ``auth_failed`` (unwrap or tag failure, unknown kid)
    │   ├── SessionExists             reason ``session_invalid`` (a handshake for an existing sid)
    │   ├── Replay                    reason ``replay`` (the mid was used by another entry)
    │   └── DeliveryLimit             reason ``delivery_limit`` (delivered too many times)
    ├── DecryptError                one opaque failure to open anything sealed
    ├── HandlerFailure              a handler's outcome that becomes an ``error`` reply
    │   ├── BadPayload                code ``bad_payload``: the payload was refused
    │   ├── UnknownType               code ``unknown_type``
    │   └── HandlerEscaped            code ``handler_error``: SystemExit or a stray cancellation
    └── ClientError                 raised to users of :mod:`worker.client`
        ├── RequestRejected           the worker sent a ``rejected`` notice
        ├── RemoteError               the worker sent an ``error`` reply
        └── ReplyTimeout              no reply within the timeout

Context travels as keyword attributes (``session_id``, ``message_id``), never secrets.
"""

from __future__ import annotations


class SealstreamError(Exception):
    """Root of every exception sealstream raises on purpose."""


class ConfigError(SealstreamError):
    """A setting or key file is missing or malformed; the message names the setting."""


class StartupFailed(SealstreamError):
    """An app's startup hook raised: the worker stops before reading (CLI exit code 3).

    The message names the hook and the exception's type and text (the operator's own
    code; never a payload).
    """


class InvalidArgument(SealstreamError, ValueError):
    """A malformed argument to an operations call or command (a sid, a time, a reason).

    Raised before anything is changed; the CLI prints it in one line and exits 2.
    """


class ProtocolError(SealstreamError):
    """An entry refused by the worker: dead-lettered with ``reason``, never retried.

    ``notice`` is the code of the ``rejected`` notice sent back when the entry's
    ``sid`` and ``mid`` are well formed.
    """

    reason = "malformed"
    notice = "rejected"

    def __init__(
        self,
        detail: str,
        *,
        session_id: str | None = None,
        message_id: str | None = None,
        field: str | None = None,
        alg: str | None = None,
        type: str | None = None,
        keep_original: bool = True,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        #: ids, encoding, alg and type of the refused entry, each only when well formed
        self.session_id = session_id
        self.message_id = message_id
        self.field = field
        self.alg = alg
        self.type = type
        #: False when the dead letter must carry ``size`` instead of the original field
        self.keep_original = keep_original


class Malformed(ProtocolError):
    """The entry's format, size, fields or encoding are not the protocol's."""

    reason = "malformed"


class Unsupported(ProtocolError):
    """The entry's ``v`` or ``alg`` is not one this worker speaks."""

    reason = "unsupported"


class Expired(ProtocolError):
    """The request's ``ts`` is outside the freshness window."""

    reason = "expired"
    notice = "expired"


class SessionInvalid(ProtocolError):
    """No session for ``sid``, or its sealed record expired or failed to open."""

    reason = "session_invalid"
    notice = "session_unknown"


class AuthFailed(ProtocolError):
    """Authentication failed: unknown ``kid``, unwrap or tag failure (one path)."""

    reason = "auth_failed"


class SessionExists(ProtocolError):
    """An authenticated handshake for a ``sid`` that already has a session."""

    reason = "session_invalid"


class Replay(ProtocolError):
    """The request's ``mid`` is held by another entry: never run."""

    reason = "replay"
    notice = "replay"


class DeliveryLimit(ProtocolError):
    """The entry was delivered more times than the delivery limit."""

    reason = "delivery_limit"
    notice = "delivery_limit"


class DecryptError(SealstreamError):
    """Something sealed could not be opened. Deliberately says nothing more."""


class HandlerFailure(SealstreamError):
    """A request that authenticated but ends in an ``error`` reply with ``code``."""

    code = "handler_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadPayload(HandlerFailure):
    """Raise from a handler to refuse its payload (code ``bad_payload``)."""

    code = "bad_payload"


class UnknownType(HandlerFailure):
    """No handler is registered for the request's ``type``."""

    code = "unknown_type"


class HandlerEscaped(HandlerFailure):
    """A handler raised what would end the worker (``SystemExit``, a stray cancellation).

    Caught and answered as a ``handler_error``; the message is the escaped type's name.
    """

    code = "handler_error"


class ClientError(SealstreamError):
    """Raised by the client for a request that did not end in an ``ok`` reply."""

    def __init__(self, message: str, *, message_id: str | None = None) -> None:
        super().__init__(message)
        self.message_id = message_id


class RequestRejected(ClientError):
    """The worker (or someone who can write to Redis) sent a ``rejected`` notice."""

    def __init__(self, code: str, *, message_id: str | None = None) -> None:
        super().__init__(f"request rejected: {code}", message_id=message_id)
        self.code = code


class RemoteError(ClientError):
    """The worker sent an authenticated ``error`` reply with ``code`` and ``message``."""

    def __init__(self, code: str, message: str, *, message_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}", message_id=message_id)
        self.code = code
        self.remote_message = message


class ReplyTimeout(ClientError):
    """No reply arrived within the timeout."""
