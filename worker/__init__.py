"""sealstream: an async Redis Streams worker with application-level encryption."""

from worker.backend import create_session
from worker.client import Client, ClientSession, Result, SessionGrant
from worker.errors import (
    BadPayload,
    ConfigError,
    RemoteError,
    ReplyTimeout,
    RequestRejected,
    SealstreamError,
)
from worker.handlers import App, Context
from worker.pool import Worker
from worker.retries import Backoff, RetryPolicy
from worker.session_admin import revoke_session
from worker.settings import Settings

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
