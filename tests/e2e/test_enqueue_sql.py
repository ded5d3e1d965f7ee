"""Enqueue from another driver's transaction (issue 8, item 4), from outside: psycopg calls the
SQL function taskd.enqueue() while `python -m taskd` runs; what commits is run, what rolls
back never existed, the server's published settings and handlers give the defaults, and a
unique_for job is one job whichever way it came in."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

import taskd

from .conftest import TaskdProcess, submit, wait_until
from .conftest import get_task as task

Start = Callable[..., TaskdProcess]


def result(server: TaskdProcess, task_id: int) -> dict[str, Any]:
    response = server.http.get(f"/tasks/{task_id}/result", params={"wait": 15})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_task_committed_through_psycopg_is_run_and_a_rolled_back_one_never_was(
    start_taskd: Start, database_url: str
) -> None:
    server = start_taskd(MAX_RETRIES="7")
    with psycopg.connect(database_url) as conn:
        with conn.transaction(force_rollback=True):
            gone = taskd.enqueue_sync(conn, "echo", {"order": 6})
        with conn.transaction():
            # What a Django or SQLAlchemy app would send: its own row, then the task, one commit.
            conn.execute("CREATE TABLE orders (id int)")
            conn.execute("INSERT INTO orders VALUES (7)")
            kept = conn.execute("SELECT taskd.enqueue('echo', %s, queue => 'default', priority => %s)",
                                [Jsonb({"order": 7}), 5]).fetchone()[0]
            mail = taskd.enqueue_sync(conn, "emails_default", {"to": "a@example.com"})
    assert server.http.get(f"/tasks/{gone}").status_code == 404
    assert result(server, kept) == {"id": kept, "status": "completed", "result": {"order": 7}}
    assert result(server, mail)["result"] == "sent"
    echo, emails = task(server, kept), task(server, mail)
    assert (echo["max_retries"], echo["priority"], echo["timeout_seconds"]) == (7, 5, 300.0), "the server's MAX_RETRIES"
    assert (emails["queue"], emails["priority"], emails["max_retries"]) == ("emails", 5, 1), "the handler's own"


def test_the_last_server_to_start_gives_the_defaults(start_taskd: Start, database_url: str) -> None:
    first = start_taskd(MAX_RETRIES="7", TASK_TIMEOUT="60")
    with psycopg.connect(database_url, autocommit=True) as conn:
        before = taskd.enqueue_sync(conn, "echo", {})
        start_taskd(MAX_RETRIES="2", TASK_TIMEOUT="30")
        after = taskd.enqueue_sync(conn, "echo", {})
    assert [(task(first, i)["max_retries"], task(first, i)["timeout_seconds"]) for i in (before, after)] == [
        (7, 60.0), (2, 30.0)]


def test_unique_for_is_one_job_through_the_api_and_through_sql(start_taskd: Start, database_url: str) -> None:
    to_edge = 3600 - time.time() % 3600  # unique_report's window is a fixed hour of the clock
    if to_edge < 10:
        time.sleep(to_edge + 0.5)
    server = start_taskd()
    report_id = submit(server, "unique_report", {"day": "2031-01-02", "totals": [1.5, 2]})
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert taskd.enqueue_sync(conn, "unique_report", {"totals": [1.5, 2], "day": "2031-01-02"}) == report_id
        other = taskd.enqueue_sync(conn, "unique_report", {"day": "2031-01-03"})
    again = server.http.post("/tasks", json={"task_type": "unique_report", "payload": {"day": "2031-01-03"}})
    assert again.status_code == 200 and again.json()["id"] == other, again.text
    wait_until(lambda: task(server, other)["status"] == "completed", 15, "the SQL-made job to run")
