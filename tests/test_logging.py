"""JSON log lines: one per event, valid JSON, whatever the values (orjson, with the
json module for what orjson refuses)."""

from __future__ import annotations

import json
import subprocess
import sys

from worker.logging import _dumps

_SCRIPT = """
from worker.logging import configure, get_logger
configure("info", "json")
log = get_logger("test")
log.info("plain", session_id="a" * 32, attempts=1)
log.info("wide", n=2**70, text="é\\nü", raw=b"x")
log.warning("mapped", detail={1: "int key"})
log.debug("dropped")
"""


def test_each_event_is_one_json_line_whatever_its_values() -> None:
    """Three events at info and above give three JSON lines (the debug one is
    dropped): a 70-bit integer, a non-ASCII text with a newline, bytes and a map with
    an integer key are all written, each line whole."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, check=True, timeout=60
    )
    lines = done.stderr.decode("utf-8").splitlines()
    assert 3 == len(lines)
    events = [json.loads(line) for line in lines]
    assert ["plain", "wide", "mapped"] == [e["event"] for e in events]
    assert {"info", "warning"} == {e["level"] for e in events}
    assert 2**70 == events[1]["n"]
    assert "é\nü" == events[1]["text"]
    assert "test" == events[0]["component"] and "timestamp" in events[0]


def test_dumps_falls_back_to_the_json_module_for_what_orjson_refuses() -> None:
    """orjson refuses integers past 64 bits and non-string keys; the line is still
    written, by the json module."""
    assert {"n": 2**70} == json.loads(_dumps({"n": 2**70}))
    assert {"1": "x"} == json.loads(_dumps({1: "x"}))
    assert {"event": "e", "x": "é"} == json.loads(_dumps({"event": "e", "x": "é"}))
