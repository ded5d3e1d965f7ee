"""Enqueue (and cancel, retry, pause) from your own code, inside your own transaction:
`await taskd.enqueue(conn, ...)`
with an asyncpg connection, from asyncio (under trio, wrap it in trio_asyncio.aio_as_trio).

taskd.enqueue calls the SQL function taskd.enqueue() (sql/migrations/0006), as any other
driver does: the database checks the task as POST /tasks does and resolves its limits
from the task, then its handler, then the server settings, as the servers published
them; so the task commits or rolls back with your transaction and wakes the workers at
commit. What SQL cannot see is checked here first: Python types (a bool is no number, a
time needs its offset), JSON, and the handler's validate= callback when the type is
registered in this process. The database's refusals come back as InvalidTask and
IdempotencyConflict.

enqueue_many inserts tasks made by `prepare` (this process's registry and environment
settings) in one statement, as the API's batches do.

Imports taskd.sql, taskd.store, taskd.registry, taskd.builtin_tasks, taskd.config,
taskd.models, taskd.errors, taskd.jsontext.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

from taskd import (
    builtin_tasks,  # noqa: F401  (the built-in types are known here too)
    jsontext,
    sql,
    store,
)
from taskd.config import Settings, load_settings
from taskd.errors import IdempotencyConflict, InvalidTask, TaskdError
from taskd.models import NewTask, Submitted
from taskd.registry import QUEUE_RULE, Registry, default_registry, is_queue_name

# What taskd.enqueue() raises (sql/migrations/0006_enqueue_function.sql).
INVALID_SQLSTATE = "22023"  # invalid_parameter_value; the argument in the error's column field
CONFLICT_SQLSTATE = "P0409"  # the idempotency key made a task from another request
INVALID_PREFIX = "invalid_task: "
_TASK_ID = re.compile(r"task_id=(\d+)")
_INT64 = (-(2**63), 2**63 - 1)

_METHODS = {"many": "fetch", "one": "fetchrow", "val": "fetchval", "exec": "execute"}


@functools.cache
def _environment_settings() -> Settings:
    return load_settings()


def prepare(task_type: str, payload: Any = None, *, max_retries: int | None = None,
            timeout_seconds: float | None = None, priority: int | None = None, run_at: dt.datetime | None = None,
            delay_seconds: float | None = None, queue: str | None = None, expires_at: dt.datetime | None = None,
            expires_in_seconds: float | None = None, idempotency_key: str | None = None,
            settings: Settings | None = None, registry: Registry = default_registry) -> NewTask:
    """Validate one task for enqueue_many exactly as the API does (InvalidTask if it would refuse it).

    The task type must be registered in this process (import your handlers' module), since
    its handler's limits are the defaults; `settings` defaults to the environment's. (enqueue
    takes the defaults the servers published instead; they agree when this process has the
    servers' settings and handlers.)"""
    # Seconds as floats, as the API reads them and taskd.enqueue() takes them: a request
    # digests alike (idempotency) whichever way it came in.
    timeout_seconds, delay_seconds, expires_in_seconds = (
        _as_float(timeout_seconds), _as_float(delay_seconds), _as_float(expires_in_seconds))
    return registry.new_task(settings or _environment_settings(), task_type, {} if payload is None else payload,
                             max_retries=max_retries, timeout_seconds=timeout_seconds, priority=priority,
                             run_at=run_at, delay_seconds=delay_seconds, queue=queue, expires_at=expires_at,
                             expires_in_seconds=expires_in_seconds, idempotency_key=idempotency_key)


def _as_float(value: Any) -> Any:
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return value  # out of every range: refused as given
    return value


class _Caller:
    """Runs taskd's named queries on the caller's asyncpg connection."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def run(self, query: sql.Query, *args: Any) -> Any:
        return await getattr(self._conn, _METHODS[query.kind])(query.text, *args)


async def enqueue_many(conn: Any, tasks: Sequence[NewTask]) -> list[int]:
    """Insert tasks made by `prepare` through the caller's asyncpg connection, in one statement
    (the API's batch insert); their ids in the order given. A task whose idempotency key is
    taken gets the id of the task holding it; IdempotencyConflict if that one was made from
    other arguments."""
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
    """Insert one task through the caller's asyncpg connection (or transaction) with the SQL
    function taskd.enqueue(); returns its id (with an idempotency key already used for the
    same request: that task's id). InvalidTask if it is refused, IdempotencyConflict if the
    key made a task from another request."""
    args = enqueue_arguments(task_type, payload, max_retries=max_retries, timeout_seconds=timeout_seconds,
                             priority=priority, run_at=run_at, delay_seconds=delay_seconds, queue=queue,
                             expires_at=expires_at, expires_in_seconds=expires_in_seconds,
                             idempotency_key=idempotency_key)
    try:
        task_id = await conn.fetchval(sql.queries()["task_enqueue"].text, *args)
    except Exception as exc:
        error = enqueue_error(exc, idempotency_key)
        if error is None:
            raise
        raise error from exc
    return int(task_id)


def enqueue_arguments(task_type: Any, payload: Any = None, *, max_retries: Any = None, timeout_seconds: Any = None,
                      priority: Any = None, run_at: Any = None, delay_seconds: Any = None, queue: Any = None,
                      expires_at: Any = None, expires_in_seconds: Any = None, idempotency_key: Any = None,
                      registry: Registry = default_registry) -> tuple[Any, ...]:
    """The arguments of the named query task_enqueue, in their order, after the
    checks the database cannot make: Python types, JSON, and the handler's validate=
    callback if this process registered the type. The rules themselves (ranges, the queue
    name, known types) are the database's: a number out of every range is sent clamped, to
    be refused there with the rule's own message."""
    if not isinstance(task_type, str):
        raise InvalidTask(f"task_type must be a string, not {type(task_type).__name__}", field="task_type")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise InvalidTask(f"payload must be a JSON object, not {type(payload).__name__}", field="payload")
    try:
        payload_json = jsontext.dumps(payload)
    except jsontext.NotJsonError as exc:
        raise InvalidTask(f"payload cannot be stored as JSON: {exc}", field="payload") from None
    handler = registry.get(task_type)
    if handler is not None and handler.validate is not None:
        try:
            handler.validate(payload)
        except ValueError as exc:
            raise InvalidTask(f"payload does not fit {task_type}: {exc}", field="payload") from None
    return (_text(task_type, "task_type"), payload_json, _text(queue, "queue"), _whole(priority, "priority"),
            _time(run_at, "run_at"), _seconds(delay_seconds, "delay_seconds"), _time(expires_at, "expires_at"),
            _seconds(expires_in_seconds, "expires_in_seconds"), _whole(max_retries, "max_retries"),
            _seconds(timeout_seconds, "timeout_seconds"), _text(idempotency_key, "idempotency_key"))


def _text(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTask(f"{field} must be a string, not {type(value).__name__}", field=field)
    if "\x00" in value:  # PostgreSQL text cannot hold it
        raise InvalidTask(f"{field} must not contain the NUL character", field=field)
    return value


def _whole(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise InvalidTask(f"{field} must be a whole number, not {type(value).__name__}", field=field)
    return min(max(value, _INT64[0]), _INT64[1])


def _seconds(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTask(f"{field} must be a number of seconds, not {type(value).__name__}", field=field)
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _time(value: Any, field: str) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime) or value.utcoffset() is None:
        raise InvalidTask(f"{field} must be a time with a UTC offset (RFC 3339)", field=field)
    return value


def enqueue_error(exc: BaseException, idempotency_key: str | None) -> TaskdError | None:
    """taskd's error for a refusal of taskd.enqueue() (from asyncpg or psycopg, or a wrapper
    whose __cause__ is theirs, as Django's), or None if exc is something else."""
    for candidate in (exc, exc.__cause__):
        if candidate is None:
            continue
        sqlstate, message, column, detail = _diagnostics(candidate)
        if sqlstate == INVALID_SQLSTATE and message.startswith(INVALID_PREFIX):
            return InvalidTask(message.removeprefix(INVALID_PREFIX), field=column)
        if sqlstate == CONFLICT_SQLSTATE:
            found = _TASK_ID.search(detail or "")
            if found is not None:
                return IdempotencyConflict(idempotency_key or "", int(found.group(1)))
    return None


def _diagnostics(exc: BaseException) -> tuple[str | None, str, str | None, str | None]:
    """(SQLSTATE, message, column, detail) of a server error: psycopg keeps them in exc.diag,
    asyncpg on the exception itself."""
    diag = getattr(exc, "diag", None)
    if diag is not None:
        return (getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None), diag.message_primary or "",
                diag.column_name, diag.message_detail)
    return (getattr(exc, "sqlstate", None), str(getattr(exc, "message", "") or ""),
            getattr(exc, "column_name", None), getattr(exc, "detail", None))


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
