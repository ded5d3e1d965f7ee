"""How an attempt's end becomes its Outcome: completed, a retry after backoff, a snooze, a
failure for good, a crash, or cancelled; and the one log line each gets.

Imports taskd.attempts, taskd.control, taskd.quarantine, taskd.config, taskd.models,
taskd.failures, taskd.jsontext.
"""

from __future__ import annotations

import logging
import random

from taskd import failures, jsontext
from taskd.attempts import Attempt, HandlerEnded, crash_error
from taskd.config import Settings
from taskd.control import Fail, Retry, steering
from taskd.models import Outcome, TaskStatus, attempt_error
from taskd.quarantine import QuarantinedFailure

_log = logging.getLogger("taskd.workers")  # where these lines have always been logged


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff for the retry after `attempt` (1-based), capped, with equal jitter."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 60))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def of(attempt: Attempt, ended: HandlerEnded, settings: Settings) -> Outcome:
    """The outcome of an attempt whose handler ran to an end (a result or an error)."""
    task = attempt.task
    # Kept with every outcome: if the database refuses to store it, the store
    # records a failed attempt instead and needs to know whether to retry.
    may_retry = task.retries_used < task.max_retries
    delay = retry_delay(task.retries_used + 1, settings.retry_delay, settings.retry_delay_max)
    if ended.error is None:
        return Outcome(task.id, task.attempt, TaskStatus.COMPLETED, result_json=ended.result_json,
                       retry_delay=delay, may_retry=may_retry)
    if isinstance(ended.error, failures.Crashed):
        error_json, give_up = crash_error(task, ended.error, settings.max_crashes)
        status = TaskStatus.FAILED if give_up else TaskStatus.RETRYING
        return Outcome(task.id, task.attempt, status, error_json=error_json, retry_delay=delay,
                       may_retry=not give_up, crashed=True)
    control = steering(ended.error)
    if isinstance(control, Retry):
        # A snooze, not a failure: no error recorded, no retry spent.
        return Outcome(task.id, task.attempt, TaskStatus.RETRYING, retry_delay=control.after, may_retry=True,
                       snoozed=True)
    if isinstance(ended.error, failures.PayloadUnreadable) or isinstance(control, Fail) or (
            isinstance(ended.error, QuarantinedFailure) and ended.error.final):
        may_retry = False  # the row will not read better next time; the handler said so
    error_json = ended.error_json(task.attempt)
    if may_retry:
        return Outcome(task.id, task.attempt, TaskStatus.RETRYING, error_json=error_json, retry_delay=delay,
                       may_retry=True)
    return Outcome(task.id, task.attempt, TaskStatus.FAILED, error_json=error_json)


def cancelled(attempt: Attempt, message: str) -> Outcome:
    """The end of an attempt stopped because its task was cancelled (or deleted: then the
    lease fence turns it away, as the row is gone)."""
    task = attempt.task
    error = jsontext.dumps(attempt_error("Cancelled", message, task.attempt))
    return Outcome(task.id, task.attempt, TaskStatus.CANCELLED, error_json=error,
                   progress_json=attempt.progress_to_write())


def log(attempt: Attempt, outcome: Outcome) -> None:
    task = attempt.task
    if outcome.status == TaskStatus.COMPLETED:
        _log.debug("task %d (%s) completed on attempt %d", task.id, task.task_type, task.attempt)
    elif outcome.snoozed:
        _log.debug("task %d (%s) attempt %d snoozed; runs again in %.2fs", task.id, task.task_type,
                   task.attempt, outcome.retry_delay)
    elif outcome.status == TaskStatus.RETRYING:
        _log.info("task %d (%s) attempt %d failed, retry in %.2fs: %s", task.id, task.task_type,
                  task.attempt, outcome.retry_delay, _error_summary(outcome))
    else:
        _log.warning("task %d (%s) failed after %d attempts: %s", task.id, task.task_type,
                     task.attempt, _error_summary(outcome))


def _error_summary(outcome: Outcome) -> str:
    error = jsontext.loads(outcome.error_json) or {}
    return f"{error.get('type')}: {error.get('message')}"
