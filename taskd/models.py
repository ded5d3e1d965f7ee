"""Plain data passed between the layers: statuses, tasks, outcomes. Imports nothing from taskd."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
from collections.abc import Iterator
from typing import Any


class TaskStatus(enum.StrEnum):
    SCHEDULED = "scheduled"  # reported, never stored: a pending task whose run_at is still ahead
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped on request before it finished
    EXPIRED = "expired"  # not started before its expires_at; never ran


class UnknownStatus(str):
    """A status this release does not know, written by a later one sharing the database.

    Reported as it is (its `value` is its text, as a TaskStatus's is); it is in none of the
    sets below, so this release neither claims, cancels nor retries such a task. Made by
    taskd.rows.parse_status."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str(self)


Status = TaskStatus | UnknownStatus

FINISHED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.EXPIRED})
CANCELLABLE = frozenset({TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.RETRYING, TaskStatus.RUNNING})
RETRYABLE = frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.EXPIRED})


def attempt_error(kind: str, message: str, attempt: int, traceback: str | None = None) -> dict[str, Any]:
    """What is kept of a failed attempt, wherever the failure was noticed."""
    error: dict[str, Any] = {"type": kind, "message": message, "attempt": attempt,
                             "at": dt.datetime.now(dt.UTC).isoformat()}
    if traceback is not None:
        error["traceback"] = traceback
    return error


# Made once per submitted task: not frozen, whose __init__ costs a setattr call per field.
@dataclasses.dataclass(slots=True)
class NewTask:
    """A task ready to insert: defaults resolved, payload already encoded as JSON text."""

    task_type: str
    payload_json: str
    max_retries: int
    timeout_seconds: float
    priority: int = 0
    run_at: dt.datetime | None = None  # when it may first run (None: now, or after delay_seconds)
    delay_seconds: float | None = None
    queue: str = "default"
    expires_at: dt.datetime | None = None  # not run if not started by then (or after expires_in_seconds)
    expires_in_seconds: float | None = None
    idempotency_key: str | None = None
    idempotency_hash: str | None = None  # digest of the request: a repeat with another body is a conflict

    @property
    def starts_later(self) -> bool:
        """Is it scheduled: may it not run yet (by this machine's clock)?"""
        return (self.delay_seconds or 0) > 0 or (self.run_at is not None and self.run_at > dt.datetime.now(dt.UTC))


@dataclasses.dataclass(slots=True)
class Submitted:
    """What a submit did: made the task (created), or found the one its idempotency key made."""

    id: int
    created: bool
    status: Status  # as clients see it now


# ClaimedTask and Outcome are made once per task on the hot path: plain slotted
# classes, since a frozen dataclass's __init__ costs several times more.
@dataclasses.dataclass(slots=True)
class ClaimedTask:
    """A task a worker process holds a lease on, for one attempt."""

    id: int
    task_type: str
    payload_json: str  # decoded inside the attempt, where a row that cannot be read fails only its task
    attempt: int
    max_retries: int
    timeout_seconds: float
    crashes: int = 0  # earlier attempts cut short by a dying process; they do not spend retries
    snoozes: int = 0  # earlier attempts that asked to run again later (taskd.Retry); no retries spent either
    attempts_forgiven: int = 0  # attempts before the task was retried by hand; they no longer count

    @property
    def retries_used(self) -> int:
        """Failed attempts before this one that count against max_retries."""
        return self.attempt - 1 - self.crashes - self.snoozes - self.attempts_forgiven


@dataclasses.dataclass(slots=True)
class Outcome:
    """How one attempt ended, for the completion batch.

    `status` is completed, retrying or failed; `result_json` and `error_json`
    are JSON text; `retry_delay` is seconds until the task is due again if it is
    retried.
    """

    task_id: int
    attempt: int
    status: TaskStatus
    result_json: str | None = None
    error_json: str | None = None
    retry_delay: float = 0.0
    may_retry: bool = False  # retries remain, should this outcome turn out unstorable
    crashed: bool = False  # the attempt took its (quarantine) process down: counts as a crash, not a retry
    snoozed: bool = False  # the handler asked to run again later (taskd.Retry): not a failure
    progress_json: str | None = None  # the handler's last progress, written with the outcome


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """A task as a client sees it.

    payload, result, last_error and errors are kept as the JSON text PostgreSQL
    wrote, and the API splices that text into its responses undecoded: decoding
    only to encode again costs memory, and a row another producer wrote may nest
    deeper than json.loads can go. The properties decode them for callers that
    want values.
    """

    id: int
    task_type: str
    status: Status
    payload_json: str
    result_json: str | None
    attempts: int
    max_retries: int
    crashes: int
    timeout_seconds: float
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    last_error_json: str | None
    errors_json: str
    priority: int = 0
    run_at: dt.datetime | None = None
    queue: str = "default"
    expires_at: dt.datetime | None = None
    idempotency_key: str | None = None
    cancel_requested_at: dt.datetime | None = None
    progress_json: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def payload(self) -> Any:
        return json.loads(self.payload_json)

    @property
    def result(self) -> Any:
        return None if self.result_json is None else json.loads(self.result_json)

    @property
    def last_error(self) -> Any:
        return None if self.last_error_json is None else json.loads(self.last_error_json)

    @property
    def errors(self) -> Any:
        return json.loads(self.errors_json)


@dataclasses.dataclass(frozen=True, slots=True)
class TaskSummary:
    """What a listing shows of a task by default: no payload, result or error history,
    and of the last error only its type and the start of its message."""

    id: int
    task_type: str
    status: Status
    attempts: int
    max_retries: int
    crashes: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    has_error: bool  # there is a last error (its type and message may still be null)
    error_type: str | None
    error_message: str | None
    priority: int = 0
    run_at: dt.datetime | None = None
    queue: str = "default"


@dataclasses.dataclass(frozen=True, slots=True)
class TaskPage:
    """Full tasks, newest first, and the cursor to the rest of the listing (None at its end)."""

    tasks: list[Task]
    next_before_id: int | None

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


@dataclasses.dataclass(slots=True)
class WorkerGauge:
    """How many of this process's worker slots are busy; workers write it, the API reads it."""

    size: int
    busy: int = 0
