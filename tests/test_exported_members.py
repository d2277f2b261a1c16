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
    assert expected == worker.__all__
    assert sorted(worker.__all__) == worker.__all__
    for name in expected:
        assert hasattr(worker, name)


def test_public_signatures_take_public_types() -> None:
    """The key types Worker and create_session take are exported, so users can name them."""
    import inspect
    import typing

    from worker.keys import MasterKeys, ServiceKey

    worker_hints = typing.get_type_hints(worker.Worker.__init__)
    session_hints = typing.get_type_hints(worker.create_session)
    assert (ServiceKey, MasterKeys, MasterKeys) == (
        worker_hints["service_key"],
        worker_hints["master_keys"],
        session_hints["master_keys"],
    )
    assert {ServiceKey, MasterKeys} <= {getattr(worker, n) for n in worker.__all__}
    assert inspect.isclass(worker.ClientError)


def test_every_error_is_a_sealstream_error() -> None:
    """Every exception class in worker.errors derives from SealstreamError."""
    from worker import errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) > 10
    assert all(issubclass(c, errors.SealstreamError) for c in classes)
