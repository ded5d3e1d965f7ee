"""Plain data passed between the layers: statuses, tasks, outcomes. Imports nothing from taskd."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Any


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"


FINISHED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED})


def attempt_error(kind: str, message: str, attempt: int, traceback: str | None = None) -> dict[str, Any]:
    """What is kept of a failed attempt, wherever the failure was noticed."""
    error: dict[str, Any] = {"type": kind, "message": message, "attempt": attempt,
                             "at": dt.datetime.now(dt.UTC).isoformat()}
    if traceback is not None:
        error["traceback"] = traceback
    return error


@dataclasses.dataclass(frozen=True, slots=True)
class NewTask:
    """A task ready to insert: defaults resolved, payload already encoded as JSON text."""

    task_type: str
    payload_json: str
    max_retries: int
    timeout_seconds: float


# ClaimedTask and Outcome are made once per task on the hot path: plain slotted
# classes, since a frozen dataclass's __init__ costs several times more.
@dataclasses.dataclass(slots=True)
class ClaimedTask:
    """A task a worker process holds a lease on, for one attempt."""

    id: int
    task_type: str
    payload: Any
    attempt: int
    max_retries: int
    timeout_seconds: float


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


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """A task as a client sees it."""

    id: int
    task_type: str
    status: TaskStatus
    payload: Any
    result: Any
    attempts: int
    max_retries: int
    timeout_seconds: float
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    last_error: dict[str, Any] | None
    errors: list[dict[str, Any]]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclasses.dataclass(slots=True)
class WorkerGauge:
    """How many of this process's worker slots are busy; workers write it, the API reads it."""

    size: int
    busy: int = 0
