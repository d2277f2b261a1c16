"""sealstream: an async Redis Streams worker with application-level encryption."""

from worker.client import Client, ClientSession, Result
from worker.errors import (
    BadPayload,
    ConfigError,
    RemoteError,
    ReplyTimeout,
    RequestRejected,
    SealstreamError,
)
from worker.handlers import App, Context
from worker.handshake import SessionGrant
from worker.retries import Backoff, RetryPolicy
from worker.runtime import Worker
from worker.session_admin import revoke_session
from worker.settings import Settings
from worker.trusted import create_session

__all__ = [
    "App",
    "Backoff",
    "BadPayload",
    "Client",
    "ClientSession",
    "ConfigError",
    "Context",
    "RemoteError",
    "ReplyTimeout",
    "RequestRejected",
    "Result",
    "RetryPolicy",
    "SealstreamError",
    "SessionGrant",
    "Settings",
    "Worker",
    "create_session",
    "revoke_session",
]
