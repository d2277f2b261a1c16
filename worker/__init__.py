"""sealstream: an async Redis Streams worker with application-level encryption.

The names below are the public API (pinned by ``tests/test_exported_members.py``).
The modules under ``worker/`` are the implementation: importing from them directly
works, but they may change without notice. ``worker.testing`` is the one exception,
the documented test helper.
"""

from worker.client import Client, ClientSession, Result
from worker.errors import (
    BadPayload,
    ClientError,
    ConfigError,
    RemoteError,
    ReplyTimeout,
    RequestRejected,
    SealstreamError,
    SessionExists,
)
from worker.handlers import App, Context
from worker.handshake import SessionGrant
from worker.keys import MasterKey, MasterKeys, ServiceKey
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
    "ClientError",
    "ClientSession",
    "ConfigError",
    "Context",
    "MasterKey",
    "MasterKeys",
    "RemoteError",
    "ReplyTimeout",
    "RequestRejected",
    "Result",
    "RetryPolicy",
    "SealstreamError",
    "ServiceKey",
    "SessionExists",
    "SessionGrant",
    "Settings",
    "Worker",
    "create_session",
    "revoke_session",
]
