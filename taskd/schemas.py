"""The HTTP API's request and response shapes (pydantic), for validation and the
OpenAPI document. Imports nothing from taskd but taskd.models and taskd.control.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from taskd.control import MAX_DELAY_SECONDS
from taskd.models import TaskStatus

QUEUE_PATTERN = r"^[a-z0-9_.-]{1,64}$"
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
MAX_BATCH = 1000
MAX_TIMEOUT_SECONDS = 7 * 86_400
# A ?full=true page of GET /tasks is cut short at about this much JSON (never below one task).
FULL_PAGE_BYTES = 8 * 1024 * 1024


def rfc3339_time(value: Any) -> Any:
    """A time as the API promises to read it: RFC 3339 with an offset (pydantic alone also
    reads a bare number of seconds as a time)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 time with an offset, like 2031-01-02T03:04:05+01:00")
    try:
        return datetime.datetime.fromisoformat(value)  # parsed here: strict mode takes no text after this
    except ValueError:
        raise ValueError("must be an RFC 3339 time with an offset, like 2031-01-02T03:04:05+01:00") from None


class TaskIn(BaseModel):
    """A task to run."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task_type: str = Field(min_length=1, max_length=200, description="a registered task type")
    payload: dict[str, Any] = Field(default_factory=dict, description="the handler's input, a JSON object")
    max_retries: int | None = Field(None, ge=0, le=1000, description="retries after the first attempt")
    priority: int | None = Field(None, ge=-100, le=100, description="higher runs first; equal priorities in "
                                 "submission order (default: the handler's, else 0)")
    run_at: AwareDatetime | None = Field(None, description="run no earlier than this time (RFC 3339 with an offset); "
                                         "until then the task is reported as scheduled")
    delay_seconds: float | None = Field(None, ge=0, le=MAX_DELAY_SECONDS, description="run no earlier than this many "
                                        "seconds from now (instead of run_at)")
    queue: str | None = Field(None, pattern=QUEUE_PATTERN, description="the queue it waits in (default: the "
                              "handler's, else 'default'): 1 to 64 of a-z, 0-9, '_', '.' and '-'")
    expires_at: AwareDatetime | None = Field(None, description="if not started by this time (RFC 3339 with an "
                                             "offset), never run: it ends expired")
    expires_in_seconds: float | None = Field(None, gt=0, le=MAX_DELAY_SECONDS, description="expire this many seconds "
                                             "from now (instead of expires_at)")
    idempotency_key: str | None = Field(None, min_length=1, max_length=200, description="a repeat with the same key "
                                        "and body returns the first task (200); with another body, 409. Or send "
                                        "the Idempotency-Key header")

    @field_validator("run_at", "expires_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        return rfc3339_time(value)

    timeout_seconds: float | None = Field(None, gt=0, le=MAX_TIMEOUT_SECONDS, description="limit on one attempt")


class BatchIn(BaseModel):
    """Up to 1,000 tasks, inserted all or nothing."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tasks: list[TaskIn] = Field(min_length=1, max_length=MAX_BATCH)


class TaskCreated(BaseModel):
    id: int
    task_type: str
    status: TaskStatus
    url: str


class IdempotencyHeader(BaseModel):
    idempotency_key: str | None = Field(None, alias="Idempotency-Key", min_length=1, max_length=200,
                                        description="instead of idempotency_key in the body")


class LocationHeader(BaseModel):
    location: str = Field(alias="Location", description="the task's URL, /tasks/{id}")


class BatchCreated(BaseModel):
    ids: list[int]
    count: int
    created: list[bool] = Field(description="per item: made now (false: its idempotency key found the task made "
                                "by an earlier request)")


class AttemptError(BaseModel):
    type: str
    message: str
    traceback: str | None = None
    attempt: int
    at: str


class TaskOut(BaseModel):
    """A task, with its payload, result and every attempt's error."""

    id: int
    task_type: str
    status: TaskStatus
    payload: Any
    result: Any = None
    attempts: int
    max_retries: int
    crashes: int = Field(description="attempts cut short by a dying process; they do not spend retries")
    priority: int = Field(description="-100..100; higher runs first")
    queue: str
    run_at: str | None = Field(description="when it may run: first, or (retrying) its next attempt")
    expires_at: str | None = Field(description="not started by then: never run, ends expired")
    idempotency_key: str | None
    cancel_requested_at: str | None = Field(description="when a cancel was asked for (a running task stops soon "
                                            "after)")
    progress: Progress | None = Field(description="what the handler last reported through ctx.progress()")
    timeout_seconds: float
    created_at: str
    started_at: str | None
    finished_at: str | None
    last_error: AttemptError | None
    errors: list[AttemptError]


class Progress(BaseModel):
    fraction: float = Field(ge=0, le=1)
    message: str
    updated_at: str


class ErrorSummary(BaseModel):
    type: str | None
    message: str | None = Field(description="the first 500 characters of the message")


class TaskSummaryOut(BaseModel):
    """What GET /tasks lists by default: no payload, result or error history."""

    id: int
    task_type: str
    status: TaskStatus
    attempts: int
    max_retries: int
    crashes: int
    priority: int
    queue: str
    run_at: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    last_error: ErrorSummary | None


class TaskListOut(BaseModel):
    """A page of tasks, newest first: summaries, or full tasks with ?full=true."""

    items: list[TaskSummaryOut] | list[TaskOut] = Field(
        description="summaries by default; full tasks with ?full=true")
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next (older) page; null at the end. A full page is cut short "
                    f"after about {FULL_PAGE_BYTES // 2**20} MB of tasks (at least one) and then has a next_cursor")


class ListQuery(BaseModel):
    status: TaskStatus | None = None
    task_type: str | None = None
    queue: str | None = None
    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = None
    full: bool = Field(
        False, description="true: full tasks (payload, result, errors), the page cut short after about "
                           f"{FULL_PAGE_BYTES // 2**20} MB with a next_cursor; false (default): summaries")

    @field_validator("full", mode="before")
    @classmethod
    def _true_or_false(cls, value: Any) -> Any:
        # pydantic alone would also take 1, yes, on, t...: accept only what the documentation shows.
        if not isinstance(value, bool) and value not in ("true", "false"):
            raise ValueError("must be true or false")
        return value


class WaitQuery(BaseModel):
    wait: float = Field(0, ge=0, le=60, description="seconds to wait for the task to finish")


class ResultOut(BaseModel):
    id: int
    status: TaskStatus
    result: Any = None
    error: AttemptError | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    error: ErrorBody


class WorkersOut(BaseModel):
    busy: int
    size: int


class StatsOut(BaseModel):
    counts: dict[str, int]
    total: int
    workers: WorkersOut
    completed_last_60s: int
    failed_last_60s: int
    success_rate: float | None
    uptime_seconds: float


class Percentiles(BaseModel):
    avg: float | None
    p50: float | None
    p95: float | None
    p99: float | None


class TypeStats(BaseModel):
    task_type: str
    counts: dict[str, int]
    total: int
    success_rate: float | None
    retry_success_rate: float | None
    finished_last_hour: int
    run_time_ms: Percentiles
    queue_wait_ms: Percentiles


class TimelinePoint(BaseModel):
    second: str
    completed: int
    failed: int


class DetailedStatsOut(BaseModel):
    by_type: list[TypeStats]
    timeline: list[TimelinePoint]
    database_pool: dict[str, int]
    processes: list[dict[str, Any]]


class Health(BaseModel):
    status: str


class QueueOut(BaseModel):
    """A queue: its tasks per status, how long its oldest due task has waited, and whether it is paused."""

    name: str
    paused: bool = Field(description="no process claims from it; submissions are still accepted")
    counts: dict[str, int] = Field(description="tasks per status (scheduled: pending, not yet due)")
    running: int
    oldest_wait_seconds: float | None = Field(description="how long its oldest due task has waited; null if none")


class QueueListOut(BaseModel):
    items: list[QueueOut]


class CancelFilter(BaseModel):
    """Which tasks to cancel: every waiting or running one that matches all that is given."""

    model_config = ConfigDict(extra="forbid", strict=True)

    status: TaskStatus | None = Field(None, description="pending, scheduled, retrying or running (default: all four)")
    task_type: str | None = Field(None, min_length=1, max_length=200)
    queue: str | None = Field(None, pattern=QUEUE_PATTERN)
    created_before: AwareDatetime | None = None

    @field_validator("created_before", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        return rfc3339_time(value)


class RetryFilter(BaseModel):
    """Which tasks to retry: every failed, cancelled or expired one that matches all that is given."""

    model_config = ConfigDict(extra="forbid", strict=True)

    status: TaskStatus | None = Field(None, description="failed, cancelled or expired (default: all three)")
    task_type: str | None = Field(None, min_length=1, max_length=200)
    queue: str | None = Field(None, pattern=QUEUE_PATTERN)
    finished_before: AwareDatetime | None = None

    @field_validator("finished_before", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        return rfc3339_time(value)


class CancelledOut(BaseModel):
    cancelled: int = Field(description="tasks cancelled (running ones are asked to stop, and end cancelled)")


class RetriedOut(BaseModel):
    retried: int
