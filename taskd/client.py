"""Enqueue from your own code, inside your own transaction: `await taskd.enqueue(conn, ...)`
with an asyncpg connection, from asyncio (under trio, wrap it in trio_asyncio.aio_as_trio).
The task is validated and its limits resolved by the same function as the HTTP API's
(the task's own, then its handler's, then the server settings found in the
environment and ./.env), and inserted by the same named statement, so it commits or
rolls back with your transaction and wakes the workers at commit.

Imports taskd.sql, taskd.registry, taskd.builtin_tasks, taskd.config, taskd.models.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from typing import Any

from taskd import (
    builtin_tasks,  # noqa: F401  (the built-in types are known here too)
    sql,
)
from taskd.config import Settings, load_settings
from taskd.models import NewTask
from taskd.registry import Registry, default_registry


@functools.cache
def _environment_settings() -> Settings:
    return load_settings()


def prepare(task_type: str, payload: Any = None, *, max_retries: int | None = None,
            timeout_seconds: float | None = None, priority: int | None = None, run_at: dt.datetime | None = None,
            delay_seconds: float | None = None, settings: Settings | None = None,
            registry: Registry = default_registry) -> NewTask:
    """Validate one task for insertion exactly as the API does (InvalidTask if it would refuse it).

    The task type must be registered in this process (import your handlers' module), since
    its handler's limits are the defaults; `settings` defaults to the environment's."""
    return registry.new_task(settings or _environment_settings(), task_type, {} if payload is None else payload,
                             max_retries=max_retries, timeout_seconds=timeout_seconds, priority=priority,
                             run_at=run_at, delay_seconds=delay_seconds)


async def enqueue_many(conn: Any, tasks: Sequence[NewTask]) -> list[int]:
    """Insert prepared tasks through the caller's asyncpg connection, in one statement; ids in order."""
    rows = await conn.fetch(sql.queries()["task_insert_many"].text,
                            [t.task_type for t in tasks], [t.payload_json for t in tasks],
                            [t.max_retries for t in tasks], [t.timeout_seconds for t in tasks],
                            [t.priority for t in tasks], [t.run_at for t in tasks], [t.delay_seconds for t in tasks])
    return sorted(row["id"] for row in rows)


async def enqueue(conn: Any, task_type: str, payload: Any = None, *, max_retries: int | None = None,
                  timeout_seconds: float | None = None, priority: int | None = None,
                  run_at: dt.datetime | None = None, delay_seconds: float | None = None) -> int:
    """Insert one task through the caller's asyncpg connection (or transaction); returns its id."""
    task = prepare(task_type, payload, max_retries=max_retries, timeout_seconds=timeout_seconds, priority=priority,
                   run_at=run_at, delay_seconds=delay_seconds)
    (task_id,) = await enqueue_many(conn, [task])
    return task_id
