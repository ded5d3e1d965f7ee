"""Enqueue from synchronous code, inside your own transaction, with psycopg (3):

    with psycopg.connect(url) as conn:           # a transaction, committed at the end
        order_id = save_order(conn)
        taskd.enqueue_sync(conn, "send_receipt", {"order": order_id})

The same SQL function and the same checks as `await taskd.enqueue(conn, ...)`, through a
DB-API connection or cursor that takes %s placeholders; no import of psycopg here, so
taskd needs it only where it is used (`pip install 'taskd[psycopg]'`).

Imports taskd.client, taskd.sql and taskd.errors.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from typing import Any

from taskd import sql
from taskd.client import enqueue_arguments, enqueue_error
from taskd.errors import SqlFileError

_PLACEHOLDER = re.compile(r"\$(\d+)")


@functools.cache
def pyformat_text() -> str:
    """The named query task_enqueue with DB-API's %s placeholders for asyncpg's $n: the same
    statement, which psycopg sends as $n again. Only a query whose $n appear once each,
    in order, reads the same that way."""
    text = sql.queries()["task_enqueue"].text
    numbers = [int(n) for n in _PLACEHOLDER.findall(text)]
    if numbers != list(range(1, len(numbers) + 1)):
        raise SqlFileError(f"task_enqueue must use $1..$n once each, in order, not {numbers}")
    return _PLACEHOLDER.sub("%s", text.replace("%", "%%"))


def enqueue_sync(conn: Any, task_type: str, payload: Any = None, *, max_retries: int | None = None,
                 timeout_seconds: float | None = None, priority: int | None = None,
                 run_at: dt.datetime | None = None, delay_seconds: float | None = None, queue: str | None = None,
                 expires_at: dt.datetime | None = None, expires_in_seconds: float | None = None,
                 idempotency_key: str | None = None) -> int:
    """Insert one task through a psycopg connection or cursor, in its transaction (it commits
    or rolls back with it; the workers wake at commit); returns its id (with an idempotency
    key already used for the same request: that task's id). InvalidTask if it is refused,
    IdempotencyConflict if the key made a task from another request."""
    args = enqueue_arguments(task_type, payload, max_retries=max_retries, timeout_seconds=timeout_seconds,
                             priority=priority, run_at=run_at, delay_seconds=delay_seconds, queue=queue,
                             expires_at=expires_at, expires_in_seconds=expires_in_seconds,
                             idempotency_key=idempotency_key)
    text = pyformat_text()
    try:
        if hasattr(conn, "cursor"):
            with conn.cursor() as cursor:
                cursor.execute(text, args)
                row = cursor.fetchone()
        else:  # a cursor already
            conn.execute(text, args)
            row = conn.fetchone()
    except Exception as exc:
        error = enqueue_error(exc, idempotency_key)
        if error is None:
            raise
        raise error from exc
    return int(row[0])
