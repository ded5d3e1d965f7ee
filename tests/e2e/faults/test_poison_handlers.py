"""Handlers that misbehave in every way a handler can (tests/e2e/handlers.py) fail only their own
attempts: the process stays up, the tasks beside them complete, each failure is readable."""

from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

from tests.e2e.conftest import TaskdProcess

from .conftest import (
    completed_count,
    db_fetch,
    record_tasks,
    report,
    submit_batch,
    task_rows,
    tracebacks,
    wait_all_finished,
    wait_for,
)

Launch = Callable[..., TaskdProcess]

POISON: dict[str, dict[str, Any]] = {
    "raise_nul": {},
    "raise_group_on_cancel": {},
    "raise_keyboard_interrupt": {},
    "raise_base_exception": {},
    "raise_unprintable": {},
    "return_garbage": {},
    "return_nan": {},
    "sync_hang": {"seconds": 3},  # beyond --task-timeout 2
}
EXPECTED_TYPE = {
    "raise_nul": "ValueError",
    "raise_keyboard_interrupt": "KeyboardInterrupt",
    "raise_base_exception": "BaseException",
    "raise_unprintable": "UnprintableError",
}
INSTANCES = 3


def test_poison_handlers_fail_only_their_own_attempts_with_readable_errors(
    database_url: str, launch_taskd: Launch, record_path: pathlib.Path
) -> None:
    server = launch_taskd(database_url, "--max-retries", "1", "--retry-delay", "0.1", "--task-timeout", "2")
    ordinary = record_tasks(200, 0.05)
    tasks: list[dict[str, Any]] = []
    kinds: list[str] = []
    for index, task in enumerate(ordinary):  # poison spread among the ordinary tasks
        tasks.append(task)
        kinds.append("record")
        if index % 8 == 0 and index // 8 < INSTANCES * len(POISON):
            name = list(POISON)[(index // 8) % len(POISON)]
            tasks.append({"task_type": name, "payload": POISON[name]})
            kinds.append(name)
    ids = submit_batch(server, tasks)
    counts = wait_all_finished(database_url, len(ids), 90, what="every task", watch=[server])
    rows = task_rows(database_url)
    by_kind = dict(zip(ids, kinds, strict=True))
    poison_ids = [i for i in ids if by_kind[i] != "record"]
    seen = {name: sorted({(rows[i].status, (rows[i].last_error or {}).get("type")) for i in ids if by_kind[i] == name})
            for name in POISON}
    report("poison handlers", tasks=len(rows), statuses=dict(counts), poison=len(poison_ids), outcomes=seen,
           alive=server.proc.poll() is None, tracebacks=tracebacks(server))
    assert server.proc.poll() is None, "no handler takes the process down"
    assert sum(k != "record" for k in kinds) == INSTANCES * len(POISON)
    assert all(rows[i].status == "completed" for i in ids if by_kind[i] == "record"), \
        {i: rows[i].status for i in ids if by_kind[i] == "record" and rows[i].status != "completed"}
    for task_id in poison_ids:
        name, row = by_kind[task_id], rows[task_id]
        assert row.status == "failed", (name, row)
        assert row.attempts == 2 and len(row.errors) == 2, (name, "retried once (--max-retries 1)", row)
        error = row.last_error or {}
        assert isinstance(error.get("type"), str) and error["type"], (name, error)
        assert isinstance(error.get("message"), str), (name, error)
        if name in EXPECTED_TYPE:
            assert error["type"] == EXPECTED_TYPE[name], (name, error)
        response = server.http.get(f"/tasks/{task_id}")
        assert response.status_code == 200, (name, response.text)
        assert response.json()["status"] == "failed"
    for task_id in (i for i in poison_ids if by_kind[i] == "raise_nul"):
        message = rows[task_id].last_error["message"]  # type: ignore[index]
        assert "bad" in message and "byte" in message, f"kept, escaped, not refused: {message!r}"
        assert "\x00" not in message and "\\" in message, f"NUL and surrogate written as escapes: {message!r}"
        message.encode("utf-8")  # no lone surrogate left


def test_a_row_nested_too_deep_to_decode_fails_its_task_and_never_stops_a_start(
    database_url: str, launch_taskd: Launch
) -> None:
    # Written by another producer: 5,000 levels of nested arrays, deeper than Python's json decodes.
    deep = "[" * 5000 + "]" * 5000
    (row,) = db_fetch(database_url, "INSERT INTO taskd.tasks (task_type, payload, max_retries, timeout_seconds) "
                                    "VALUES ('echo', json_build_object('x', $1::jsonb)::jsonb, 3, 10) RETURNING id",
                      deep)
    server = launch_taskd(database_url)  # the row is waiting when the process starts
    ids = submit_batch(server, record_tasks(20))
    wait_all_finished(database_url, len(ids) + 1, 60, what="every task", watch=[server])
    rows = task_rows(database_url)
    poisoned = rows[row["id"]]
    report("undecodable payload", status=poisoned.status, attempts=poisoned.attempts,
           error=(poisoned.last_error or {}).get("type"), alive=server.proc.poll() is None)
    assert server.proc.poll() is None
    assert (poisoned.status, poisoned.attempts) == ("failed", 1), "not retried: it will not decode next time"
    assert (poisoned.last_error or {}).get("type") == "PayloadUnreadable"
    assert all(rows[i].status == "completed" for i in ids)
    assert server.http.get(f"/tasks/{row['id']}").status_code == 200


def test_shutdown_ends_even_when_a_handler_swallows_cancellation(database_url: str, launch_taskd: Launch) -> None:
    server = launch_taskd(database_url, "--shutdown-grace", "1", "--lease-seconds", "2")
    (stuck,) = submit_batch(server, [{"task_type": "swallow_cancel", "payload": {}}])
    waiting = submit_batch(server, [{"task_type": "record", "payload": {"seconds": 0.05}} for _ in range(5)])
    wait_for(lambda: completed_count(database_url) == len(waiting), 30, "the ordinary tasks")
    server.signal(signal.SIGTERM)
    began = time.monotonic()
    code = server.wait_exit(60)
    took = time.monotonic() - began
    row = task_rows(database_url)[stuck]
    report("handler swallows Cancelled", exit=code, shutdown_s=round(took, 1), stuck=(row.status, row.attempts))
    assert code == 1 and took < 30, "bounded: grace, then 10 s for the stuck handler, then exit"
    assert "did not stop" in server.output and "Traceback" not in server.output
    assert (row.status, row.attempts) == ("running", 1), "not handed back uncounted: its lease runs out, rescued"
