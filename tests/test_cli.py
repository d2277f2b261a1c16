"""The ``sealstream`` command line, run as a user would run it."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path
from subprocess import CompletedProcess

import anyio
import pytest

from tests.helpers import wait_until
from worker import cli
from worker.demo_app import app
from worker.keys import load_service_key
from worker.settings import Settings
from worker.testing import ThrowawayKeys, free_port, running_worker


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEALSTREAM_")}
    result = await anyio.run_process(
        [sys.executable, "-m", "worker", *args], env={**base, **(env or {})}, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_keygen_writes_private_files_and_prints_kid(tmp_path: Path) -> None:
    """keygen writes service.pem and master.key with mode 0600 and prints the service kid."""
    code, out, _ = await _run("keygen", "--dir", str(tmp_path / "k"))
    assert 0 == code
    assert 0o600 == stat.S_IMODE((tmp_path / "k" / "service.pem").stat().st_mode)
    assert 0o600 == stat.S_IMODE((tmp_path / "k" / "master.key").stat().st_mode)
    assert (tmp_path / "k" / "service.pub.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert load_service_key(tmp_path / "k" / "service.pem").kid == out.strip()


async def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    """keygen into a directory that has keys fails with one line and changes nothing."""
    assert 0 == (await _run("keygen", "--dir", str(tmp_path)))[0]
    before = (tmp_path / "master.key").read_bytes()
    code, _, err = await _run("keygen", "--dir", str(tmp_path))
    assert 2 == code
    assert 1 == len(err.strip().splitlines())
    assert before == (tmp_path / "master.key").read_bytes()


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({}, "SEALSTREAM_SERVICE_KEY_FILE"),
        (
            {"SEALSTREAM_SERVICE_KEY_FILE": "/nonexistent/service.pem"},
            "SEALSTREAM_SERVICE_KEY_FILE",
        ),
        ({"SEALSTREAM_SHARDS": "many"}, "SEALSTREAM_SHARDS"),
        ({"SEALSTREAM_CLAIM_IDLE_MS": "-5"}, "SEALSTREAM_CLAIM_IDLE_MS"),
    ],
)
async def test_worker_config_errors_are_one_line(env: dict[str, str], setting: str) -> None:
    """A missing or malformed setting is a one-line error naming it, exit 2, no traceback."""
    code, _, err = await _run("worker", env=env)
    assert 2 == code
    assert 1 == len(err.strip().splitlines()), err
    assert setting in err
    assert "Traceback" not in err


async def test_worker_bad_master_key_file(tmp_path: Path, keys: ThrowawayKeys) -> None:
    """A master key file that is not base64 of 32 bytes is named in a one-line error."""
    env = keys.write(tmp_path)
    Path(env["SEALSTREAM_MASTER_KEY_FILE"]).write_text("not a key\n")
    code, _, err = await _run("worker", env=env)
    assert 2 == code
    assert "SEALSTREAM_MASTER_KEY_FILE" in err and 1 == len(err.strip().splitlines())


async def test_worker_bad_app_spec(tmp_path: Path, keys: ThrowawayKeys) -> None:
    """An APP that is not module:attribute of an App is a one-line error."""
    code, _, err = await _run("worker", "os:path", env=keys.write(tmp_path))
    assert 2 == code
    assert "APP" in err and 1 == len(err.strip().splitlines())


async def test_send_prints_the_reply(settings: Settings, keys: ThrowawayKeys) -> None:
    """`sealstream send TYPE JSON` handshakes, sends, and prints the decrypted result."""
    env = {
        "SEALSTREAM_REDIS_URL": settings.redis_url,
        "SEALSTREAM_PREFIX": settings.prefix,
        "SEALSTREAM_KID": keys.service.kid,
    }
    async with running_worker(app, settings, keys):
        code, out, err = await _run("send", "echo", '{"hello": [1, 2]}', env=env)
        assert (0, {"hello": [1, 2]}) == (code, json.loads(out)), err
        code, out, _ = await _run("send", "fail", "{}", "--alg", "RSA-OAEP-256+A256GCM", env=env)
        assert 1 == code
        assert "handler_error" in json.loads(out)["error"]


async def test_send_needs_a_pin() -> None:
    """`send` without a pinned kid or public key refuses to run."""
    code, _, err = await _run("send", "echo", "{}")
    assert 2 == code
    assert "SEALSTREAM_KID" in err


async def test_send_refuses_bad_json() -> None:
    """`send` with a payload that is not JSON says so."""
    code, _, err = await _run("send", "echo", "{nope", env={"SEALSTREAM_KID": "0" * 64})
    assert 2 == code
    assert "PAYLOAD" in err


async def test_demo_runs_end_to_end(settings: Settings) -> None:
    """`sealstream demo` runs workers and a producer, prints the summary, exits 0."""
    code, out, err = await _run(
        "demo",
        "--workers",
        "1",
        "--sessions",
        "2",
        "--jobs",
        "60",
        env={"SEALSTREAM_REDIS_URL": settings.redis_url},
    )
    assert 0 == code, out + err
    assert "demo passed" in out
    assert '"mismatches": 0' in out


async def test_worker_finds_an_app_in_the_current_directory(
    settings: Settings, keys: ThrowawayKeys, tmp_path: Path
) -> None:
    """`sealstream worker myapp:app` run from myapp's directory imports it (burst run)."""
    source = "from worker import App\napp = App()\n"
    result = await _burst_from(tmp_path, "myapp", source, settings, keys)
    err = result.stderr.decode()
    assert 0 == result.returncode, err
    assert "'hi'" in err or '"hi"' in err


async def _burst_from(
    directory: Path, module: str, source: str, settings: Settings, keys: ThrowawayKeys
) -> CompletedProcess[bytes]:
    """Run `sealstream worker <module>:app --burst` from ``directory``, where the module
    is written from ``source`` plus a handler ``hi`` (echo)."""
    (directory / f"{module}.py").write_text(
        f"{source}\n@app.handler('hi')\nasync def hi(p):\n    return p\n"
    )
    env = {
        **keys.write(directory / "keys"),
        "SEALSTREAM_REDIS_URL": settings.redis_url,
        "SEALSTREAM_PREFIX": settings.prefix,
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEALSTREAM_", "PYTHONPATH"))}
    sealstream = str(Path(sys.executable).with_name("sealstream"))
    return await anyio.run_process(
        [sealstream, "worker", f"{module}:app", "--burst"],
        env={**base, **env},
        cwd=directory,
        check=False,
    )


async def test_send_without_redis_is_one_line() -> None:
    """`send` against a Redis that does not answer says so in one line, no traceback."""
    code, _, err = await _run(
        "send",
        "echo",
        "{}",
        env={"SEALSTREAM_REDIS_URL": "redis://127.0.0.1:1/0", "SEALSTREAM_KID": "0" * 64},
    )
    assert 1 == code
    assert 1 == len(err.strip().splitlines()), err
    assert "Redis" in err and "Traceback" not in err


async def test_keygen_into_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    """keygen where it cannot write says so in one line."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = await _run("keygen", "--dir", str(blocker / "keys"))
    assert 2 == code
    assert 1 == len(err.strip().splitlines()), err


async def test_demo_refuses_zero_workers() -> None:
    """`demo --workers 0` is a usage error, not a hang."""
    code, _, err = await _run("demo", "--workers", "0")
    assert 2 == code
    assert "positive integer" in err


async def test_sigterm_while_redis_is_unreachable_stops_the_worker(
    tmp_path: Path, keys: ThrowawayKeys
) -> None:
    """A worker waiting for a Redis that is down at startup stops on the first SIGTERM,
    exit 0, and its log says where it was connecting (without credentials)."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEALSTREAM_")}
    env = {
        **base,
        **keys.write(tmp_path),
        "SEALSTREAM_REDIS_URL": url,
        "SEALSTREAM_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = await anyio.open_process(
            [sys.executable, "-m", "worker", "worker"], env=env, stdout=log, stderr=log
        )
    try:
        await wait_until(
            lambda: "redis_unavailable" in log_path.read_text(), timeout=30, interval=0.05
        )
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.aclose()
    text = log_path.read_text()
    assert 0 == proc.returncode, text
    assert "worker_stopped_before_start" in text
    assert "redis://***@127.0.0.1" in text
    assert "hunter2" not in text


async def test_worker_at_critical_prints_no_info_line(
    settings: Settings, keys: ThrowawayKeys, tmp_path: Path
) -> None:
    """SEALSTREAM_LOG_LEVEL=critical is honoured: a worker's whole run (start, burst
    drain, stop) prints no debug, info, warning or error line."""
    env = {
        **keys.write(tmp_path),
        "SEALSTREAM_REDIS_URL": settings.redis_url,
        "SEALSTREAM_PREFIX": settings.prefix,
        "SEALSTREAM_LOG_FORMAT": "json",
        "SEALSTREAM_LOG_LEVEL": "critical",
    }
    code, out, err = await _run("worker", "--burst", env=env)
    assert 0 == code, err
    levels = [json.loads(line)["level"] for line in (out + err).splitlines() if line.strip()]
    assert [] == [level for level in levels if level != "critical"]


PASSWORD = "hunter2"

# Every subcommand's error paths, with the planted password in the Redis URL. `{url}`
# is a Redis URL with user and password on a closed port; `{keys}` adds key files.
# Add a row for each new subcommand (stats, dlq, session, keys, gateway, ...).
# (id, argv, extra env, run until this text appears and then SIGTERM it)
_SECRET_CASES: list[tuple[str, list[str], dict[str, str], str | None]] = [
    (
        "worker-refused-env",
        ["worker"],
        {"SEALSTREAM_REDIS_URL": "{url}", "{keys}": ""},
        "redis_unavailable",
    ),
    (
        "worker-refused-flag",
        ["worker", "--redis-url", "{url}"],
        {"{keys}": ""},
        "redis_unavailable",
    ),
    ("worker-bad-scheme", ["worker"], {"SEALSTREAM_REDIS_URL": "http://u:hunter2@h/0"}, None),
    ("worker-bad-port", ["worker", "--redis-url", "redis://u:hunter2@127.0.0.1:x/0"], {}, None),
    ("worker-bad-query", ["worker", "--redis-url", "{url}?socket_timeout=z"], {}, None),
    ("worker-missing-keys", ["worker", "--redis-url", "{url}"], {}, None),
    (
        "worker-bad-master-key",
        ["worker"],
        {"SEALSTREAM_REDIS_URL": "{url}", "{keys}": "", "SEALSTREAM_MASTER_KEY": PASSWORD},
        None,
    ),
    ("worker-bad-flag", ["worker", "--concurrency", "0", "--redis-url", "{url}"], {}, None),
    ("worker-unknown-flag", ["worker", "a:b", "--bogus", "{url}"], {}, None),
    (
        "send-refused-env",
        ["send", "echo", "{}"],
        {"SEALSTREAM_REDIS_URL": "{url}", "SEALSTREAM_KID": "0" * 64},
        None,
    ),
    (
        "send-refused-flag",
        ["send", "echo", "{}", "--redis-url", "{url}", "--kid", "0" * 64],
        {},
        None,
    ),
    (
        "send-unix-socket",
        ["send", "echo", "{}", "--kid", "0" * 64],
        {"SEALSTREAM_REDIS_URL": "unix://u:hunter2@/nonexistent/redis.sock"},
        None,
    ),
    ("send-bad-scheme", ["send", "echo", "{}", "--redis-url", "http://u:hunter2@h/0"], {}, None),
    (
        "send-sentinel-refused",
        ["send", "echo", "{}", "--kid", "0" * 64],
        {"SEALSTREAM_REDIS_URL": "redis+sentinel://:hunter2@127.0.0.1:1/svc"},
        None,
    ),
    (
        "stats-sentinel-no-port",
        ["stats"],
        {"SEALSTREAM_REDIS_URL": "redis+sentinel://:hunter2@127.0.0.1/svc"},
        None,
    ),
    ("send-no-pin", ["send", "echo", "{}", "--redis-url", "{url}"], {}, None),
    (
        "send-bad-json",
        ["send", "echo", "{nope", "--redis-url", "{url}"],
        {"SEALSTREAM_KID": "0" * 64},
        None,
    ),
    (
        "send-bad-timeout",
        ["send", "echo", "{}", "--timeout", "soon", "--redis-url", "{url}"],
        {},
        None,
    ),
    ("send-unknown-flag", ["send", "echo", "{}", "extra", "{url}"], {}, None),
    (
        "demo-refused",
        ["demo", "--workers", "1", "--sessions", "1", "--jobs", "1"],
        {"SEALSTREAM_REDIS_URL": "{url}"},
        None,
    ),
    ("demo-bad-scheme", ["demo"], {"SEALSTREAM_REDIS_URL": "http://u:hunter2@h/0"}, None),
    ("demo-bad-port", ["demo"], {"SEALSTREAM_REDIS_URL": "redis://u:hunter2@h:x/0"}, None),
    ("demo-bad-flag", ["demo", "--workers", "0"], {"SEALSTREAM_REDIS_URL": "{url}"}, None),
    ("no-subcommand", ["--redis-url", "{url}"], {}, None),
    ("stats-refused", ["stats", "--redis-url", "{url}"], {}, None),
    ("stats-refused-env", ["stats", "--json"], {"SEALSTREAM_REDIS_URL": "{url}"}, None),
    ("dlq-list-refused", ["dlq", "list", "--redis-url", "{url}"], {}, None),
    ("dlq-purge-refused", ["dlq", "purge", "--yes"], {"SEALSTREAM_REDIS_URL": "{url}"}, None),
    ("session-list-refused", ["session", "list"], {"SEALSTREAM_REDIS_URL": "{url}"}, None),
    (
        "session-revoke-refused",
        ["session", "revoke", "0" * 32],
        {"SEALSTREAM_REDIS_URL": "{url}"},
        None,
    ),
    ("keys-status-refused", ["keys", "status"], {"SEALSTREAM_REDIS_URL": "{url}"}, None),
    (
        "keys-rotate-refused",
        ["keys", "rotate-master"],
        {"SEALSTREAM_REDIS_URL": "{url}", "{keys}": ""},
        None,
    ),
    ("gateway-bad-scheme", ["gateway"], {"SEALSTREAM_REDIS_URL": "http://u:hunter2@h/0"}, None),
]


async def _run_until(argv: list[str], env: dict[str, str], marker: str, log: Path) -> str:
    """Run until ``marker`` shows in the output, then SIGTERM; return the output."""
    with log.open("wb") as out:
        proc = await anyio.open_process(
            [sys.executable, "-m", "worker", *argv], env=env, stdout=out, stderr=out
        )
    try:
        await wait_until(lambda: marker in log.read_text(), timeout=30, interval=0.05)
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.aclose()
    return log.read_text()


@pytest.mark.parametrize(
    ("argv", "extra", "until"),
    [case[1:] for case in _SECRET_CASES],
    ids=[case[0] for case in _SECRET_CASES],
)
async def test_no_subcommand_prints_the_redis_password(
    tmp_path: Path,
    keys: ThrowawayKeys,
    argv: list[str],
    extra: dict[str, str],
    until: str | None,
) -> None:
    """On its error paths (Redis refused or unreachable, bad URL, bad flags, missing
    keys) no subcommand prints a credential to the terminal or to a log it writes."""
    url = f"redis://user:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing listens there
    argv = [a.replace("{url}", url) for a in argv]
    env = {k: v.replace("{url}", url) for k, v in extra.items() if k != "{keys}"}
    if "{keys}" in extra:
        env.update(keys.write(tmp_path / "keys"))
    env["SEALSTREAM_LOG_FORMAT"] = "json"
    if until is None:
        _, out, err = await _run(*argv, env=env)
        text = out + err
    else:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SEALSTREAM_")}
        text = await _run_until(argv, {**base, **env}, until, tmp_path / "out.log")
    assert text.strip()  # it did say something
    # `demo` leaves its workers' logs behind: they must be clean too.
    for logs in re.findall(r"logs in (\S+?)\)", text):
        text += "".join(p.read_text() for p in Path(logs).glob("*.log"))
    assert PASSWORD not in text, text


def test_the_worker_process_keeps_start_up_out_of_its_collector() -> None:
    """``sealstream worker`` freezes what start-up made (full passes skip it) and runs
    the young generation every ``GC_YOUNG`` net new objects, not Python's 700."""
    before = gc.get_threshold()
    assert 0 == gc.get_freeze_count()  # nothing frozen yet, so the check below can fail
    try:
        cli.tune_gc()
        assert gc.get_freeze_count() > 0
        assert (cli.GC_YOUNG, *before[1:]) == gc.get_threshold()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_the_worker_command_tunes_its_collector_before_the_app_starts(
    settings: Settings, keys: ThrowawayKeys, tmp_path: Path
) -> None:
    """`sealstream worker` sets the collector up before the event loop starts: the app's
    startup hook already sees start-up frozen and a young generation of ``GC_YOUNG``."""
    seen = tmp_path / "gc.json"
    source = (
        "import gc, json\n"
        "from worker import App\n"
        "app = App()\n\n"
        "@app.on_startup\n"
        "async def record():\n"
        f"    open({str(seen)!r}, 'w').write(json.dumps(\n"
        "        [gc.get_threshold()[0], gc.get_freeze_count()]))\n"
    )
    result = await _burst_from(tmp_path, "gcapp", source, settings, keys)
    assert 0 == result.returncode, result.stderr.decode()
    threshold, frozen = json.loads(seen.read_text())
    assert cli.GC_YOUNG == threshold
    assert frozen > 0
