"""Enqueue from your own code, inside your own transaction: `await taskd.enqueue(conn, ...)`
with an asyncpg connection, from asyncio (under trio, wrap it in trio_asyncio.aio_as_trio).
The task is inserted by the same named statement the HTTP API uses, so it
commits or rolls back with your transaction and wakes the workers at commit.

Imports taskd.sql, taskd.registry, taskd.config, taskd.models, taskd.errors, taskd.jsontext.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskd import jsontext, sql
from taskd.config import Settings
from taskd.errors import InvalidTask
from taskd.models import NewTask
from taskd.registry import MAX_RETRIES_LIMIT, MAX_TIMEOUT, default_registry

_DEFAULTS = Settings()


def prepare(task_type: str, payload: Any = None, *, max_retries: int | None = None,
            timeout_seconds: float | None = None) -> NewTask:
    """Validate one task for insertion; the type need not be registered in this process."""
    if not isinstance(task_type, str) or not task_type:
        raise InvalidTask("task_type must be a non-empty string", field="task_type")
    if max_retries is not None and (isinstance(max_retries, bool) or not 0 <= max_retries <= MAX_RETRIES_LIMIT):
        raise InvalidTask(f"max_retries must be between 0 and {MAX_RETRIES_LIMIT}", field="max_retries")
    if timeout_seconds is not None and not 0 < timeout_seconds <= MAX_TIMEOUT:
        raise InvalidTask(f"timeout_seconds must be > 0 and <= {MAX_TIMEOUT:g}", field="timeout_seconds")
    payload = {} if payload is None else payload
    if default_registry.get(task_type) is not None:
        return default_registry.new_task(_DEFAULTS, task_type, payload, max_retries=max_retries,
                                         timeout_seconds=timeout_seconds)
    try:
        payload_json = jsontext.dumps(payload)
    except jsontext.NotJsonError as exc:
        raise InvalidTask(f"payload cannot be stored as JSON: {exc}", field="payload") from None
    return NewTask(task_type, payload_json,
                   _DEFAULTS.max_retries if max_retries is None else max_retries,
                   float(_DEFAULTS.task_timeout if timeout_seconds is None else timeout_seconds))


async def enqueue_many(conn: Any, tasks: Sequence[NewTask]) -> list[int]:
    """Insert prepared tasks through the caller's asyncpg connection, in one statement; ids in order."""
    rows = await conn.fetch(sql.queries()["task_insert_many"].text,
                            [t.task_type for t in tasks], [t.payload_json for t in tasks],
                            [t.max_retries for t in tasks], [t.timeout_seconds for t in tasks])
    return sorted(row["id"] for row in rows)


async def enqueue(conn: Any, task_type: str, payload: Any = None, *, max_retries: int | None = None,
                  timeout_seconds: float | None = None) -> int:
    """Insert one task through the caller's asyncpg connection (or transaction); returns its id."""
    task = prepare(task_type, payload, max_retries=max_retries, timeout_seconds=timeout_seconds)
    (task_id,) = await enqueue_many(conn, [task])
    return task_id
