"""Worker logs never carry plaintext, keys or exception text that may quote them."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization

from tests.helpers import Raw, wait_until
from tests.procs import WorkerProcs, wait_started
from tests.test_secrets_at_rest import _forms
from worker import codec
from worker.protocol import ALG_RSA, ALG_SK
from worker.sessions import open_record
from worker.settings import Settings
from worker.testing import ThrowawayKeys


async def test_worker_logs_hold_no_secret(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """At debug level, through successes, handler errors and refusals, no secret is logged."""
    raw = Raw(redis, settings.prefix, keys)
    procs = WorkerProcs(settings, keys, tmp_path)
    grant = await raw.grant()
    marker = f"PLAINTEXT-{os.urandom(8).hex()}"
    secrets: dict[str, bytes] = {"marker": marker.encode(), "ks": grant.session_key}
    try:
        worker = procs.start("tests.apps:leaky", SEALSTREAM_LOG_LEVEL="debug")
        await wait_started(redis, settings.prefix, 1)
        outs = []
        for alg in (ALG_SK, ALG_RSA):
            for type_ in ("echo", "leak", "refuse"):
                out = raw.seal(grant, {"secret": marker}, alg=alg, type_=type_)
                await raw.send(out.request)
                outs.append(out)
                secrets[f"K {out.request.mid}"] = out.reply_key
        tampered = raw.seal(grant, {"secret": marker})
        await raw.send(dataclasses.replace(tampered.request, auth_tag=bytes(16)))
        await raw.send_fields({"j": b'{"secret": "' + marker.encode() + b'"'})
        statuses = [(await raw.reply(grant.sid, o.request.mid)).status for o in outs]
        assert ["ok", "error", "error"] * 2 == statuses
        assert "rejected" == (await raw.reply(grant.sid, tampered.request.mid)).status
        await raw.wait_dead_letters(4)
        record = await raw.store.get_session(grant.sid)
        assert record is not None
        session = open_record(grant.sid, record, keys.master)
        secrets["session key"] = session.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        secrets["service key"] = keys.service.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        secrets["kek"] = keys.master.active.key
        worker.send_signal(signal.SIGTERM)
        await wait_until(lambda: worker.poll() is not None, timeout=20, interval=0.05)
    finally:
        procs.kill_all()
    log = procs.logs().encode()
    assert b"handler_failed" in log and b"request_refused" in log and b"handler_done" in log
    assert b"ValueError" in log  # the exception's type is logged, not its text
    leaked = sorted(n for n, s in secrets.items() for f in _forms(s) if f in log)
    assert [] == leaked
    assert codec.b64encode(marker.encode())[:12].encode() not in log
