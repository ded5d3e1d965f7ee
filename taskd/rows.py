"""Rows the Store reads, as the models the layers above pass around. Imports taskd.models.

The jsonb columns stay text: the API passes them through undecoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from taskd.models import Task, TaskStatus, TaskSummary


def task_from_row(row: Mapping[str, Any]) -> Task:
    return Task(
        id=row["id"],
        task_type=row["task_type"],
        status=TaskStatus(row["status"]),
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
        status=TaskStatus(row["status"]),
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
