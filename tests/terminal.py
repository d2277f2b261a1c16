"""Running a command with a terminal as its stdout or stderr (a pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Sequence

from tests.cli import base_env


def run_on_terminal(
    args: Sequence[str], env: dict[str, str], *, stream: str, timeout: float = 30.0
) -> tuple[int, bytes]:
    """Run ``python -m worker ARGS`` with ``stream`` ("stdout" or "stderr") on a
    pseudo-terminal; return the exit code and what it wrote to the terminal."""
    return _run([sys.executable, "-m", "worker", *args], env, stream=stream, timeout=timeout)


def run_python_on_terminal(
    script: str, env: dict[str, str], *, timeout: float = 30.0
) -> tuple[int, bytes]:
    """Run ``python -c SCRIPT`` with stdout on a pseudo-terminal."""
    return _run([sys.executable, "-c", script], env, stream="stdout", timeout=timeout)


def _run(
    command: list[str], env: dict[str, str], *, stream: str, timeout: float
) -> tuple[int, bytes]:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            command,
            env={**base_env(), **env},
            stdin=subprocess.DEVNULL,
            stdout=follower if stream == "stdout" else subprocess.DEVNULL,
            stderr=follower if stream == "stderr" else subprocess.DEVNULL,
        )
        os.close(follower)
        follower = -1
        out = b""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([leader], [], [], left)[0]:
                proc.kill()  # still running past the timeout: fail, never hang
                proc.wait()
                raise TimeoutError(f"{command[:2]} ran past {timeout} s; it wrote {out!r}")
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
        try:
            return proc.wait(timeout), out
        except subprocess.TimeoutExpired:
            proc.kill()  # its terminal closed, but it did not exit: fail, never leak it
            proc.wait()
            raise
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
