"""Enqueue (and cancel, retry, pause) from your own code, inside your own transaction:
`await taskd.enqueue(conn, ...)`
with an asyncpg connection, from asyncio (under trio, wrap it in trio_asyncio.aio_as_trio).
The task is validated and its limits resolved by the same function as the HTTP API's
(the task's own, then its handler's, then the server settings found in the
environment and ./.env), and inserted by the same named statements, idempotency keys
included, so it commits or rolls back with your transaction and wakes the workers at commit.

Imports taskd.sql, taskd.store, taskd.registry, taskd.builtin_tasks, taskd.config, taskd.models,
taskd.errors.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from typing import Any

from taskd import (
    builtin_tasks,  # noqa: F401  (the built-in types are known here too)
    sql,
    store,
)
from taskd.config import Settings, load_settings
from taskd.errors import InvalidTask
from taskd.models import NewTask, Submitted
from taskd.registry import QUEUE_RULE, Registry, default_registry, is_queue_name

_METHODS = {"many": "fetch", "one": "fetchrow", "val": "fetchval", "exec": "execute"}


@functools.cache
def _environment_settings() -> Settings:
    return load_settings()


def prepare(task_type: str, payload: Any = None, *, max_retries: int | None = None,
            timeout_seconds: float | None = None, priority: int | None = None, run_at: dt.datetime | None = None,
            delay_seconds: float | None = None, queue: str | None = None, expires_at: dt.datetime | None = None,
            expires_in_seconds: float | None = None, idempotency_key: str | None = None,
            settings: Settings | None = None, registry: Registry = default_registry) -> NewTask:
    """Validate one task for insertion exactly as the API does (InvalidTask if it would refuse it).

    The task type must be registered in this process (import your handlers' module), since
    its handler's limits are the defaults; `settings` defaults to the environment's."""
    return registry.new_task(settings or _environment_settings(), task_type, {} if payload is None else payload,
                             max_retries=max_retries, timeout_seconds=timeout_seconds, priority=priority,
                             run_at=run_at, delay_seconds=delay_seconds, queue=queue, expires_at=expires_at,
                             expires_in_seconds=expires_in_seconds, idempotency_key=idempotency_key)


class _Caller:
    """Runs taskd's named queries on the caller's asyncpg connection."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def run(self, query: sql.Query, *args: Any) -> Any:
        return await getattr(self._conn, _METHODS[query.kind])(query.text, *args)


async def enqueue_many(conn: Any, tasks: Sequence[NewTask]) -> list[int]:
    """Insert prepared tasks through the caller's asyncpg connection, in one statement; their
    ids in the order given. A task whose idempotency key is taken gets the id of the task
    holding it; IdempotencyConflict if that one was made from other arguments."""
    results = await store.insert_tasks(_Caller(conn), sql.queries(), tasks)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r.id for r in results if isinstance(r, Submitted)]


async def enqueue(conn: Any, task_type: str, payload: Any = None, *, max_retries: int | None = None,
                  timeout_seconds: float | None = None, priority: int | None = None,
                  run_at: dt.datetime | None = None, delay_seconds: float | None = None, queue: str | None = None,
                  expires_at: dt.datetime | None = None, expires_in_seconds: float | None = None,
                  idempotency_key: str | None = None) -> int:
    """Insert one task through the caller's asyncpg connection (or transaction); returns its id
    (with an idempotency key already used for the same arguments: that task's id)."""
    task = prepare(task_type, payload, max_retries=max_retries, timeout_seconds=timeout_seconds, priority=priority,
                   run_at=run_at, delay_seconds=delay_seconds, queue=queue, expires_at=expires_at,
                   expires_in_seconds=expires_in_seconds, idempotency_key=idempotency_key)
    (task_id,) = await enqueue_many(conn, [task])
    return task_id


# -- steering from Python, through the caller's connection (the same statements as the API) --------


async def cancel(conn: Any, task_id: int) -> bool:
    """Cancel a task as POST /tasks/{id}/cancel does: a waiting one ends cancelled, a running one
    is stopped by its process. False if it had finished already (or does not exist)."""
    return await _Caller(conn).run(sql.queries()["task_cancel"], task_id) is not None


async def retry(conn: Any, task_id: int) -> bool:
    """Run a failed, cancelled or expired task again, as POST /tasks/{id}/retry does. False if it
    is in another state (or does not exist)."""
    return await _Caller(conn).run(sql.queries()["task_retry"], task_id) is not None


async def pause_queue(conn: Any, name: str) -> None:
    """Stop every process claiming from the queue, as POST /queues/{name}/pause does."""
    await _set_paused(conn, name, True)


async def resume_queue(conn: Any, name: str) -> None:
    """Let every process claim from the queue again."""
    await _set_paused(conn, name, False)


async def _set_paused(conn: Any, name: str, paused: bool) -> None:
    if not is_queue_name(name):
        raise InvalidTask(f"queue must be {QUEUE_RULE}", field="queue")
    await _Caller(conn).run(sql.queries()["queue_set_paused"], name, paused)
