"""Interoperability: the JavaScript client (clients/js, grown from a Node.js client written
from PROTOCOL.md alone) runs the protocol conformance steps against our worker."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import anyio
import pytest

from worker import codec
from worker.demo_app import app
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker

INTEROP = Path(__file__).parent / "interop"
NODE = shutil.which("node")
if NODE is None or not (INTEROP / "node_modules").is_dir():
    if os.environ.get("CI"):
        # In CI a silently skipped interop test would hide a broken setup.
        pytest.fail("node and tests/interop/node_modules are needed in CI")
    pytest.skip(
        "node and tests/interop/node_modules are needed (scripts/test installs them)",
        allow_module_level=True,
    )


async def test_node_selftest_passes() -> None:
    """The JS client's offline checks (AAD, HKDF, X25519, strict decoders) pass."""
    assert NODE is not None
    result = await anyio.run_process([NODE, "selftest.mjs"], cwd=INTEROP, check=False)
    assert 0 == result.returncode, result.stdout.decode() + result.stderr.decode()


async def test_node_client_round_trips(
    settings: Settings, keys: ThrowawayKeys, tmp_path: Path
) -> None:
    """The JS client handshakes, echoes in both algs and encodings, and sees refusals."""
    assert NODE is not None
    pub = tmp_path / "service.pub.pem"
    pub.write_text(keys.service.public_pem)
    env = {
        **os.environ,
        "SEALSTREAM_REDIS_URL": settings.redis_url,
        "SEALSTREAM_PREFIX": settings.prefix,
        "SEALSTREAM_SERVICE_PUBLIC_KEY_FILE": str(pub),
        "SEALSTREAM_KID": keys.service.kid,
    }
    async with running_worker(app, settings, keys):
        result = await anyio.run_process([NODE, "client.mjs"], cwd=INTEROP, env=env, check=False)
    lines = [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]
    assert 0 == result.returncode, result.stdout.decode() + result.stderr.decode()
    assert {"done": True, "passed": lines[-1]["passed"], "failed": 0} == lines[-1]
    steps = {(line.get("step"), line.get("encoding"), line.get("alg")) for line in lines[:-1]}
    assert ("echo", "j", "SK+A256GCM") in steps
    assert ("echo", "e", "RSA-OAEP-256+A256GCM") in steps
    assert all(line.get("ok") for line in lines[:-1])


async def test_json_is_written_byte_for_byte_as_json_stringify() -> None:
    """Our JSON writer and Node's JSON.stringify give the same bytes (floats included)."""
    assert NODE is not None
    rng = random.Random(20261129)
    floats = [
        struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(3000)
    ]
    floats = [x for x in floats if math.isfinite(x)]
    floats += [rng.uniform(-1e6, 1e6) for _ in range(1000)]
    floats += [float(10**e) for e in range(-10, 25)] + [1.5 * 10.0**e for e in range(-10, 25)]
    values: list[Any] = [[x] for x in floats]
    values.append({"text": 'é😀\n\t\x01\x1f"\\/\u2028', "n": [0, -1, 2**53, True, None, {}]})
    script = (
        "const lines = require('fs').readFileSync(0, 'utf8').split('\\n').filter(Boolean);"
        "for (const l of lines) console.log(JSON.stringify(JSON.parse(l)));"
    )
    # Python's repr reads back exactly, so Node parses the very same doubles.
    stdin = "\n".join(json.dumps(v, ensure_ascii=False) for v in values).encode()
    result = await anyio.run_process([NODE, "-e", script], input=stdin, check=True)
    expected = result.stdout.decode().split("\n")[:-1]
    assert len(values) == len(expected)
    mismatches = [
        (v, want)
        for v, want in zip(values, expected, strict=True)
        if codec.dumps(v, "j").decode() != want
    ]
    assert [] == mismatches[:5]
