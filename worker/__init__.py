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
from worker.session_admin import revoke_session
from worker.settings import Settings

__all__ = [
    "App",
    "BadPayload",
    "Client",
    "ClientSession",
    "ConfigError",
    "Context",
    "RemoteError",
    "ReplyTimeout",
    "RequestRejected",
    "Result",
    "SealstreamError",
    "SessionGrant",
    "Settings",
    "Worker",
    "create_session",
    "revoke_session",
]
