"""One record per attempt, and the wall around the handler.

An attempt is (task id, attempt number): this process's claim on one run of one
task, from the claim until its outcome is written. Its record holds everything
that belongs to that run and nothing keyed by task id alone: the cancel scope,
the local lease deadline, whether it was cancelled (deleted, or cancelled on request) or
lost its lease, its handler's context (progress, cancelled()), and whether its
handler ignores cancellation.

`run_handler` is the wall: whatever the handler does, returns or raises (exception
groups, BaseExceptions, exceptions whose __str__ raises), and whatever the row
holds, ends as the attempt's outcome here; only this process's own cancellation
(shutdown) passes through.
Imports taskd.registry, taskd.quarantine, taskd.failures, taskd.models, taskd.jsontext.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import trio

from taskd import failures, jsontext
from taskd.models import ClaimedTask, attempt_error
from taskd.quarantine import QuarantinedFailure, run_quarantined
from taskd.registry import Handler, TaskContext

# A task whose process died under it this many times runs in quarantine.
QUARANTINE_AFTER_CRASHES = 2


class Attempt:
    """This process's claim on one attempt of one task."""

    __slots__ = ("task", "lease_deadline", "timeout_deadline", "scope", "cancelled", "lease_lost", "cancelled_at",
                 "abandoned", "ctx", "progress_written")

    def __init__(self, task: ClaimedTask, lease_deadline: float) -> None:
        self.task = task
        # By trio's clock, when the lease may run out in the database: counted from
        # when the claim (or the last renewal) was sent, so it never trails the row's.
        self.lease_deadline = lease_deadline
        self.timeout_deadline = math.inf
        self.scope: trio.CancelScope | None = None
        self.cancelled = False  # deleted, or cancelled on request: stop it, and it ends cancelled
        self.ctx: TaskContext | None = None
        self.progress_written: str | None = None  # the handler's progress as last stored
        self.lease_lost = False
        self.cancelled_at: float | None = None  # first seen cancelled yet still running (heartbeat's view)
        self.abandoned = False  # its handler ignores cancellation; its lease is left to run out

    @property
    def key(self) -> tuple[int, int]:
        return (self.task.id, self.task.attempt)

    @property
    def quarantined(self) -> bool:
        return self.task.crashes >= QUARANTINE_AFTER_CRASHES

    def extend_lease(self, deadline: float) -> None:
        # A renewal that lands after the scope was cancelled (by its lease deadline)
        # comes too late: the attempt is already being cut off.
        if self.scope is not None and self.scope.cancel_called:
            return
        self.lease_deadline = deadline
        if self.scope is not None:
            self.scope.deadline = min(self.timeout_deadline, deadline)

    def stop(self, *, cancelled: bool = False, lease_lost: bool = False) -> None:
        """Cancel the attempt: the task was deleted or cancelled, or this process may no longer own it."""
        self.cancelled |= cancelled
        self.lease_lost |= lease_lost
        if cancelled and self.ctx is not None:
            self.ctx.mark_cancelled()  # a plain-def handler's thread cannot be interrupted: it can ask
        if self.scope is not None:
            self.scope.cancel()

    def progress_to_write(self) -> str | None:
        """The handler's latest progress, if not stored yet."""
        latest = None if self.ctx is None else self.ctx.latest_progress()
        return None if latest is None or latest is self.progress_written else latest


class HandlerEnded:
    """How the handler's run ended: a result (JSON text) or an error (its timeout included), or cut off."""

    __slots__ = ("result_json", "error", "lease_ran_out", "no_thread")

    def __init__(self) -> None:
        self.result_json: str | None = None
        self.error: BaseException | None = None
        self.lease_ran_out = False
        self.no_thread = False  # no thread came free within the task's timeout: not run at all

    def error_json(self, attempt: int) -> str:
        assert self.error is not None
        try:
            if isinstance(self.error, QuarantinedFailure):
                return jsontext.dumps({**self.error.described, "attempt": attempt})
            return failures.describe_json(self.error, attempt)
        except BaseException as exc:  # noqa: BLE001  (not expected: describing is guarded; still, never lose it)
            if isinstance(exc, trio.Cancelled):
                raise
            return jsontext.dumps(attempt_error(failures.error_type(self.error), "(the error could not be described)",
                                                attempt))


class _Reserved:
    """A place in the thread limit taken ahead of the thread: trio.to_thread's limiter
    protocol, acquiring nothing more and giving the place back when the thread ends."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._held = True
        self.taken = False  # a thread was started on it, and gives it back when it ends

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        self.taken = True

    def release_on_behalf_of(self, borrower: object) -> None:
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter.release_on_behalf_of(self)


class ThreadTracker:
    """Plain-`def` handlers' threads: bounded in number, abandoned ones included, and
    known by task, so a task's next attempt never starts here while a thread of an
    earlier one still runs."""

    def __init__(self, limit: int, on_idle: Callable[[], None] = lambda: None) -> None:
        self.limiter = trio.CapacityLimiter(limit)
        self.by_task: collections.Counter[int] = collections.Counter()
        self._on_idle = on_idle

    def _ended(self, task_id: int) -> None:
        self.by_task[task_id] -= 1
        if self.by_task[task_id] <= 0:
            del self.by_task[task_id]
            self._on_idle()

    async def reserve(self) -> _Reserved:
        """Wait for a thread of the limit; the attempt's timeout starts after this wait,
        so threads abandoned by other tasks delay a plain-`def` handler but never time it out."""
        reserved = _Reserved(self.limiter)
        await self.limiter.acquire_on_behalf_of(reserved)
        return reserved

    async def run(self, task_id: int, fn: Callable[[], Any], reserved: _Reserved) -> Any:
        """Run fn in a thread on a reserved place; on cancel the thread is abandoned (it keeps
        its place in the limit until it returns) and its result ignored."""
        token = trio.lowlevel.current_trio_token()
        lock = threading.Lock()
        state = ["waiting"]  # -> "running" (in the thread) or "void" (cancelled before it started)

        def in_thread() -> Any:
            with lock:
                if state[0] == "void":
                    return None
                state[0] = "running"
            try:
                return fn()
            finally:
                try:
                    trio.from_thread.run_sync(self._ended, task_id, trio_token=token)
                except trio.RunFinishedError:
                    pass

        self.by_task[task_id] += 1
        try:
            # trio documents any CapacityLimiter-like object here; its hint names only the class.
            return await trio.to_thread.run_sync(in_thread, abandon_on_cancel=True,
                                                 limiter=reserved)  # type: ignore[arg-type]
        finally:
            with lock:
                never_started = state[0] == "waiting"
                if never_started:
                    state[0] = "void"
            if never_started:
                reserved.release()
                self._ended(task_id)


async def run_handler(attempt: Attempt, handler: Handler, threads: ThreadTracker,
                      task_modules: tuple[str, ...]) -> HandlerEnded:
    """Run the attempt under its timeout and lease deadline; see the module's docstring."""
    task = attempt.task
    ended = HandlerEnded()
    reserved = None
    scope = trio.CancelScope(deadline=attempt.lease_deadline)
    attempt.scope = scope
    try:
        with scope:
            try:
                payload = None if attempt.quarantined else failures.decode_payload(task.payload_json)
                if not handler.is_async and not attempt.quarantined:
                    with trio.move_on_after(task.timeout_seconds):
                        reserved = await threads.reserve()
                    if reserved is None:
                        ended.no_thread = True
                        return ended
                attempt.timeout_deadline = trio.current_time() + task.timeout_seconds
                scope.deadline = min(attempt.timeout_deadline, attempt.lease_deadline)
                if attempt.quarantined:
                    ended.result_json = await run_quarantined(task, task_modules)
                else:
                    ctx = TaskContext(task.id, task.task_type, task.attempt, task.max_retries)
                    attempt.ctx = ctx
                    if attempt.cancelled:
                        ctx.mark_cancelled()
                    if reserved is None:
                        result = await handler.fn(payload, ctx)
                    else:
                        call = functools.partial(handler.fn, payload, ctx)
                        result = await threads.run(task.id, call, reserved)
                    ended.result_json = failures.encode_result(result)
            except BaseException as exc:  # noqa: BLE001  (the wall: see the module docstring)
                ended.error = exc
                ended.result_json = None
    finally:
        attempt.scope = None
        if reserved is not None and not reserved.taken:
            reserved.release()
    # A cancellation of this process's own (shutdown) is not the attempt's outcome:
    # it was swallowed above with the handler's errors, and is raised again here.
    await trio.lowlevel.checkpoint_if_cancelled()
    if scope.cancel_called and not attempt.cancelled:
        # Cancelled by its timeout only if that came first; by anything else (the lease
        # deadline, a lost lease) the attempt was cut off, not failed.
        timed_out = (not attempt.lease_lost and attempt.timeout_deadline <= attempt.lease_deadline
                     and trio.current_time() >= attempt.timeout_deadline)
        if not timed_out:
            ended.lease_ran_out = True
        else:
            ended.error = _timeout_error(task, ended.error)
            ended.result_json = None
    return ended


def _only_cancelled(exc: BaseException) -> bool:
    """Is this trio's Cancelled, or a group of nothing else (looked at with a bounded walk)?"""
    pending, seen = [exc], 0
    while pending:
        current = pending.pop()
        seen += 1
        if seen > 100:
            return False
        if isinstance(current, BaseExceptionGroup):
            pending.extend(failures.members(current))
        elif not isinstance(current, trio.Cancelled):
            return False
    return True


def _timeout_error(task: ClaimedTask, cause: BaseException | None) -> failures.AttemptTimeout:
    message = f"attempt {task.attempt} exceeded its timeout of {task.timeout_seconds:g}s"
    try:
        if cause is not None and not _only_cancelled(cause):
            message += f" (and raised {failures.error_type(cause)}: {failures.error_message(cause)})"
    except BaseException as exc:  # noqa: BLE001  (whatever the handler raised, describing it never escapes)
        if isinstance(exc, trio.Cancelled):
            raise
    return failures.AttemptTimeout(message)


def crash_error(task: ClaimedTask, crash: failures.Crashed, max_crashes: int) -> tuple[str, bool]:
    """The stored error of a quarantined attempt that crashed, and whether the task gives up."""
    crashes = task.crashes + 1
    give_up = crashes >= max_crashes
    message = failures.error_message(crash)
    if give_up:
        message = f"crashed {crashes} times (MAX_CRASHES {max_crashes}); not run again. Last: {message}"
    return jsontext.dumps(attempt_error("Crashed", message, task.attempt)), give_up
