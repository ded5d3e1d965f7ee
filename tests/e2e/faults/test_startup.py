"""A start-up that fails after the database was reached leaves the queue as it found it."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

from tests.e2e.conftest import ROOT

from .conftest import RECORD_ENV, Recording, db_fetch, report, task_rows


def test_busy_port_exits_1_with_one_line_and_claims_nothing(database_url: str, record_path: pathlib.Path) -> None:
    db_fetch(database_url, "INSERT INTO taskd.tasks (task_type, payload, max_retries, timeout_seconds)"
                           " SELECT 'record', '{\"seconds\": 30}', 3, 300 FROM generate_series(1, 20)")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update({"DATABASE_URL": database_url, "TASK_MODULES": "tests.e2e.handlers", RECORD_ENV: str(record_path)})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        began = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "taskd", "--port", str(port)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        took = time.monotonic() - began
    rows = task_rows(database_url)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    ran = Recording(record_path).executions
    report("busy port", exit=result.returncode, seconds=round(took, 2), stderr_lines=len(lines),
           statuses=sorted({(r.status, r.attempts) for r in rows.values()}), executions=len(ran))
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and "address is in use" in lines[0], result.stderr
    assert len(rows) == 20
    assert all(r.status == "pending" and r.attempts == 0 and r.crashes == 0 for r in rows.values()), \
        {i: (r.status, r.attempts) for i, r in rows.items()}
    assert not ran, f"no task started: {[str(r) for r in ran]}"
