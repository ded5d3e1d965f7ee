"""Rows the Store reads, as the models the layers above pass around. Imports taskd.models.

The jsonb columns stay text: the API passes them through undecoded. A status written by a
later release sharing the database (one this release does not know) is read as it is, with
a warning once per process and status, never as an error: see parse_status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from taskd.models import Status, Task, TaskStatus, TaskSummary, UnknownStatus

log = logging.getLogger("taskd.rows")

_KNOWN = {status.value: status for status in TaskStatus}  # a dict look-up: an Enum call per row shows
_warned: set[str] = set()


def parse_status(text: str) -> Status:
    """A row's status: the TaskStatus it names, or, for one a later release added, an
    UnknownStatus carrying its text (reported as it is, a task never 500s or vanishes)."""
    known = _KNOWN.get(text)
    if known is not None:
        return known
    if text not in _warned:
        _warned.add(text)  # the CHECK constraint bounds how many there can be
        log.warning("tasks with status %r, which this taskd does not know (a later release wrote them): "
                    "reported as they are, never claimed, cancelled or retried here", text)
    return UnknownStatus(text)


def task_from_row(row: Mapping[str, Any]) -> Task:
    return Task(
        id=row["id"],
        task_type=row["task_type"],
        status=parse_status(row["status"]),
        payload_json=row["payload"],
        result_json=row["result"],
        attempts=row["attempts"],
        max_retries=row["max_retries"],
        crashes=row["crashes"],
        timeout_seconds=row["timeout_seconds"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        last_error_json=row["last_error"],
        errors_json=row["errors"],
        priority=row["priority"],
        run_at=row["run_at"],
        queue=row["queue"],
        expires_at=row["expires_at"],
        idempotency_key=row["idempotency_key"],
        cancel_requested_at=row["cancel_requested_at"],
        progress_json=row["progress"],
    )


def summary_from_row(row: Mapping[str, Any]) -> TaskSummary:
    return TaskSummary(
        id=row["id"],
        task_type=row["task_type"],
        status=parse_status(row["status"]),
        attempts=row["attempts"],
        max_retries=row["max_retries"],
        crashes=row["crashes"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        has_error=row["has_error"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        priority=row["priority"],
        run_at=row["run_at"],
        queue=row["queue"],
    )
