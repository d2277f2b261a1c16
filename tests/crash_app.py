"""An APP whose import fails (not an ImportError): its worker process exits 1 at start,
so a supervisor restarts it (tests/test_supervisor.py)."""

from __future__ import annotations

raise RuntimeError("this app cannot start")
