"""Retention on a real `python -m taskd`: a completed task is pruned once its retention is
past (GET then answers 404), not before, while a failed one, kept longer, stays; a bad
retention value stops start-up with one line."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from .conftest import TaskdProcess, get_task, submit, wait_until
from .test_server import run_cli

Start = Callable[..., TaskdProcess]
RETENTION = 2.0


def test_a_completed_task_is_pruned_after_its_retention(start_taskd: Start) -> None:
    server = start_taskd(RETENTION_COMPLETED=f"{RETENTION:g}s", LOG_LEVEL="INFO")
    done = submit(server, "echo", {"keep": "briefly"})
    failed = submit(server, "control", {"do": "fail"})
    finished = wait_until(lambda: (t := get_task(server, done))["status"] == "completed" and t, what="completed")
    wait_until(lambda: get_task(server, failed)["status"] == "failed", what="failed")

    def gone() -> bool:
        status = server.http.get(f"/tasks/{done}").status_code
        assert status in (200, 404), status
        return status == 404

    wait_until(gone, timeout=30, what="the completed task pruned")
    # The server's clock and ours are this machine's: pruned no earlier than its retention allows.
    age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(finished["finished_at"])
    assert age.total_seconds() >= RETENTION
    assert server.http.get(f"/tasks/{done}/result").status_code == 404
    assert get_task(server, failed)["status"] == "failed"  # failed tasks are kept 30 days
    wait_until(lambda: "pruned 1 finished tasks" in server.output, what="the prune logged")
    assert "(completed 1)" in server.output


def test_a_bad_retention_stops_start_up_with_one_line() -> None:
    result = run_cli(env={"RETENTION_FAILED": "a month"})
    assert result.returncode == 2
    assert result.stderr.strip() == ("taskd: invalid RETENTION_FAILED: must be a duration like 30m, 12h or 7d, "
                                     "or seconds (0 keeps forever), got 'a month'")
