"""The public API is small and pinned."""

from __future__ import annotations

import worker


def test_exported_members() -> None:
    """``worker.__all__`` is exactly the documented API, sorted, and every name exists."""
    expected = [
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
    assert expected == worker.__all__
    assert sorted(worker.__all__) == worker.__all__
    for name in expected:
        assert hasattr(worker, name)


def test_every_error_is_a_sealstream_error() -> None:
    """Every exception class in worker.errors derives from SealstreamError."""
    from worker import errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) > 10
    assert all(issubclass(c, errors.SealstreamError) for c in classes)
