"""Inserting tasks: the arrays one statement takes, and idempotent inserts (a repeat of a key
finds its task; a key used with another request is a conflict). Shared by the Store and by
taskd.enqueue on a caller's own connection.

Imports taskd.sql, taskd.models, taskd.errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from taskd import sql
from taskd.errors import DatabaseUnavailable, IdempotencyConflict
from taskd.models import NewTask, Submitted, TaskStatus
from taskd.rows import parse_status


def insert_args(tasks: Sequence[NewTask]) -> tuple[list[Any] | None, ...]:
    """task_insert_many's arguments (taskd.enqueue passes the same): one array per column."""
    queues = [t.queue for t in tasks]
    return (
        [t.task_type for t in tasks],
        [t.payload_json for t in tasks],
        [t.max_retries for t in tasks],
        [t.timeout_seconds for t in tasks],
        [t.priority for t in tasks],
        or_null([t.run_at for t in tasks]),
        or_null([t.delay_seconds for t in tasks]),
        # NULL is the default queue to the insert: most batches then send no array for it.
        None if queues.count("default") == len(queues) else queues,
        or_null([t.expires_at for t in tasks]),
        or_null([t.expires_in_seconds for t in tasks]),
        or_null([t.idempotency_key for t in tasks]),
        or_null([t.idempotency_hash for t in tasks]),
    )


def or_null(column: list[Any]) -> list[Any] | None:
    """NULL instead of an array of nothing but NULLs: unnest pads a NULL array with NULLs
    all the same, and the driver's per-element encoding is most of a batch's cost in this
    process (measured)."""
    return None if column and column[0] is None and column.count(None) == len(column) else column


class Runner(Protocol):
    """Runs a named query (a Store connection, or the adapter taskd.enqueue puts on a caller's)."""

    async def run(self, query: sql.Query, *args: Any) -> Any: ...


async def insert_tasks(runner: Runner, queries: Mapping[str, sql.Query],
                  tasks: Sequence[NewTask]) -> list[Submitted | BaseException]:
    """Insert in one statement; a task whose idempotency key is taken gets the task that holds
    it, or IdempotencyConflict if that one came from another request."""
    if not any(t.idempotency_key is not None for t in tasks):
        # Nothing can conflict: the plain statement, without the key-ordering step.
        rows = await runner.run(queries["task_insert_many"], *insert_args(tasks)[:10])
        return [Submitted(row["id"], True, _STATUS[row["status"]]) for row in sorted(rows, key=_by_id)]
    rows = await runner.run(queries["task_insert_keyed"], *insert_args(tasks))
    # Rows without a key cannot be skipped, and their ids follow the order given.
    plain = iter(sorted((row for row in rows if row["idempotency_key"] is None), key=_by_id))
    made = {row["idempotency_key"]: row for row in rows if row["idempotency_key"] is not None}
    keyed = [t.idempotency_key for t in tasks if t.idempotency_key is not None]
    held: dict[str, Any] = {}
    missing = sorted(set(keyed) - set(made))
    if missing:
        held = {row["idempotency_key"]: row
                for row in await runner.run(queries["task_by_idempotency_keys"], missing)}
    results: list[Submitted | BaseException] = []
    for task in tasks:
        key = task.idempotency_key
        if key is None:
            row = next(plain)
            results.append(Submitted(row["id"], True, _STATUS[row["status"]]))
            continue
        row = made.get(key) or held.get(key)
        if row is None:
            # Its holder was deleted between the insert and the look-up: a rare race; the
            # client may simply send again.
            results.append(DatabaseUnavailable("the task holding this idempotency key changed; try again"))
        elif row["idempotency_hash"] != task.idempotency_hash:
            results.append(IdempotencyConflict(key, row["id"]))
        else:
            # Of the requests with the body that made the row, the first made it; the rest repeat it.
            created = made.pop(key, None) is not None
            held[key] = row
            results.append(Submitted(row["id"], created, parse_status(row["status"])))
    return results


_STATUS = {status.value: status for status in TaskStatus}  # a dict look-up: an Enum call per row shows


def _by_id(row: Any) -> int:
    return int(row["id"])
