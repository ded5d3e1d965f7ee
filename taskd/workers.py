"""The worker side: one claim loop per process feeding N worker loops.

The claim loop asks the Store for at most as many tasks as there are free
worker slots, in one statement, and passes them to the workers through a
channel; when the queue is empty it sleeps until a NOTIFY says new work
arrived, the next retry falls due, or the fallback poll interval passes.
Each attempt runs in its own cancel scope under its timeout; its outcome goes
back to the Store, which writes outcomes in batches.

The server starts these loops in its nurseries; this module opens none.
Imports taskd.store, taskd.registry, taskd.config, taskd.models, taskd.errors, taskd.jsontext.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import random
import time
import traceback
from typing import Any

import trio

from taskd import jsontext
from taskd.config import Settings
from taskd.errors import DatabaseError
from taskd.models import ClaimedTask, Outcome, TaskStatus, WorkerGauge, attempt_error
from taskd.registry import Handler, Registry, TaskContext
from taskd.store import Store

log = logging.getLogger("taskd.workers")

POLL_INTERVAL = 2.0  # fallback when a NOTIFY is missed
MIN_WAIT = 0.005
MAX_CLAIM = 500
RECENT_CANCELS = 10_000
TRACEBACK_CHARS = 2000
MESSAGE_CHARS = 2000


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff for the retry after `attempt` (1-based), capped, with equal jitter."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 60))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def describe_error(exc: BaseException, attempt: int) -> dict[str, Any]:
    """What is kept of a failed attempt: type, message and the tail of the traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8))
    return attempt_error(type(exc).__name__, str(exc)[:MESSAGE_CHARS], attempt, tb[-TRACEBACK_CHARS:])


class AttemptTimeout(Exception):
    """The attempt ran longer than its timeout."""


class ResultNotJSON(TypeError):
    """The handler returned something that cannot be stored as JSON."""


class WorkerPool:
    """The claim loop, the worker loops and the bookkeeping they share."""

    def __init__(self, store: Store, registry: Registry, settings: Settings, gauge: WorkerGauge) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.gauge = gauge
        self.size = settings.worker_pool_size
        self._slots = trio.Semaphore(self.size)
        # Worker slots already bound the live threads; a plain-def handler that timed
        # out keeps running in its abandoned thread, and must not hold a token that
        # would starve every later plain-def handler.
        self._threads = trio.CapacityLimiter(math.inf)
        self._claim_scope = trio.CancelScope()
        # Claimed and not yet handed to the outcome writer: task id -> attempt. Keyed
        # by id but checked by attempt: if this process lost a lease and claimed the
        # task again, the old attempt must not clear the new one's entries.
        self._held: dict[int, int] = {}
        self._running: dict[int, tuple[int, trio.CancelScope]] = {}
        self._deleted: set[int] = set()
        # Deletions whose notice may arrive before the claim that took the task lands.
        self._recent_cancels: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.claims = 0
        self.claimed = 0
        store.on_cancel(self._cancel_deleted)

    def open_channel(self) -> tuple[trio.MemorySendChannel[ClaimedTask], trio.MemoryReceiveChannel[ClaimedTask]]:
        """The hand-over from claimer to workers; it never holds more than there are slots."""
        return trio.open_memory_channel[ClaimedTask](max(1, self.size))

    def held(self) -> list[tuple[int, int]]:
        """(task id, attempt) of every task claimed and not yet finished."""
        return list(self._held.items())

    def stop_claiming(self) -> None:
        self._claim_scope.cancel()

    def _cancel_deleted(self, task_id: int) -> None:
        if task_id not in self._held:
            self._recent_cancels[task_id] = None
            if len(self._recent_cancels) > RECENT_CANCELS:
                self._recent_cancels.popitem(last=False)
            return
        self._cancel(task_id)

    def _cancel(self, task_id: int) -> None:
        """Stop working on a task this process no longer owns (deleted, or its lease lost)."""
        self._deleted.add(task_id)
        running = self._running.get(task_id)
        if running is not None:
            running[1].cancel()

    async def heartbeat_loop(self) -> None:
        """Renew the leases of the tasks this process holds, and its row in the process
        table, forever; a task whose lease could not be renewed (deleted meanwhile, or
        expired and perhaps taken by another process) is cancelled here."""
        lease = self.settings.lease_seconds
        while True:
            held = self.held()
            try:
                renewed = await self.store.heartbeat(lease, held, self.gauge.size, self.gauge.busy)
            except DatabaseError as exc:
                log.warning("heartbeat failed (leases expire in at most %gs): %s", lease, exc)
            else:
                for task_id, attempt in held:
                    if (task_id, attempt) not in renewed and self._held.get(task_id) == attempt:
                        log.warning("task %d attempt %d: lease lost (deleted, or expired); cancelling it",
                                    task_id, attempt)
                        self._cancel(task_id)
            await trio.sleep(lease / 3)

    # -- claiming ---------------------------------------------------------------------------------

    async def claim_loop(self, send: trio.MemorySendChannel[ClaimedTask]) -> None:
        """Claim work for free slots until stop_claiming(); closes `send` so the workers drain and stop.

        Slots are reserved before the claim is sent and the unused ones returned after,
        so the process never holds more tasks than it has slots to run them.
        """
        task_types = self.registry.names()
        async with send:
            with self._claim_scope:
                while True:
                    await self._slots.acquire()  # at least one free slot
                    reserved = 1
                    while reserved < MAX_CLAIM:
                        try:
                            self._slots.acquire_nowait()
                        except trio.WouldBlock:
                            break
                        reserved += 1
                    self.store.clear_new_work()
                    tasks = await self._claim(reserved, task_types)
                    for _ in range(reserved - len(tasks)):
                        self._slots.release()
                    for task in tasks:
                        if self._recent_cancels.pop(task.id, "absent") is None:
                            self._slots.release()  # deleted before its claim landed here
                            continue
                        self._held[task.id] = task.attempt
                        send.send_nowait(task)
                    if len(tasks) < reserved:
                        await self._wait_for_work(task_types)

    async def _claim(self, wanted: int, task_types: list[str]) -> list[ClaimedTask]:
        # Shielded: a claim that committed must reach the workers, or its tasks
        # would sit leased to us until the lease ran out.
        with trio.CancelScope(shield=True):
            try:
                tasks = await self.store.claim(wanted, task_types, self.settings.lease_seconds)
            except DatabaseError as exc:
                log.warning("claiming failed, will try again: %s", exc)
                tasks = []
        self.claims += 1
        self.claimed += len(tasks)
        return tasks

    async def _wait_for_work(self, task_types: list[str]) -> None:
        try:
            until_due = await self.store.seconds_until_due(task_types)
        except DatabaseError as exc:
            log.warning("reading the next due time failed: %s", exc)
            until_due = None
        wait = POLL_INTERVAL if until_due is None else min(POLL_INTERVAL, max(MIN_WAIT, until_due))
        with trio.move_on_after(wait):
            await self.store.wait_for_work()

    # -- working ----------------------------------------------------------------------------------

    async def work_loop(self, receive: trio.MemoryReceiveChannel[ClaimedTask]) -> None:
        """Run claimed tasks one at a time until the claim loop closes the channel."""
        async with receive:
            async for task in receive:
                try:
                    await self._run(task)
                finally:
                    self._slots.release()

    async def _run(self, task: ClaimedTask) -> None:
        if task.id in self._deleted:
            self._forget(task)
            return
        handler = self.registry.get(task.task_type)
        assert handler is not None, "the claim only asks for registered types"
        self.gauge.busy += 1
        try:
            outcome = await self._attempt(handler, task)
        finally:
            self.gauge.busy -= 1
        if outcome is None:
            log.info("task %d (%s) was deleted while running; cancelled", task.id, task.task_type)
        else:
            self._log_outcome(task, outcome)
            # Handed over, not awaited: the Store writes outcomes in batches, and
            # shutdown waits for them to be written before releasing what is left.
            await self.store.record(outcome)
        self._forget(task)

    def _forget(self, task: ClaimedTask) -> None:
        if self._held.get(task.id) == task.attempt:
            del self._held[task.id]
            self._deleted.discard(task.id)

    async def _attempt(self, handler: Handler, task: ClaimedTask) -> Outcome | None:
        """Run one attempt; None if the task was deleted meanwhile."""
        ctx = TaskContext(task.id, task.task_type, task.attempt, task.max_retries)
        error: BaseException | None = None
        result_json: str | None = None
        started = time.perf_counter()
        # One scope serves both the timeout (its deadline) and DELETE (cancel()).
        scope = trio.CancelScope(deadline=trio.current_time() + task.timeout_seconds)
        self._running[task.id] = (task.attempt, scope)
        try:
            with scope:
                try:
                    result = await self._call(handler, task.payload, ctx)
                    result_json = _encode_result(result)
                except (Exception, SystemExit) as exc:  # the handler's failure is the task's data, not ours
                    error = exc
        finally:
            if self._running.get(task.id, (None,))[0] == task.attempt:
                del self._running[task.id]
        if task.id in self._deleted:
            return None
        if scope.cancelled_caught:
            error = AttemptTimeout(
                f"attempt {task.attempt} exceeded its timeout of {task.timeout_seconds:g}s "
                f"(ran {time.perf_counter() - started:.3f}s)")
        # Kept with every outcome: if the database refuses to store it, the store
        # records a failed attempt instead and needs to know whether to retry.
        may_retry = task.attempt <= task.max_retries
        delay = 0.0
        if may_retry:
            delay = retry_delay(task.attempt, self.settings.retry_delay, self.settings.retry_delay_max)
        if error is None:
            return Outcome(task.id, task.attempt, TaskStatus.COMPLETED, result_json=result_json, retry_delay=delay,
                           may_retry=may_retry)
        error_json = jsontext.dumps(describe_error(error, task.attempt))
        if may_retry:
            return Outcome(task.id, task.attempt, TaskStatus.RETRYING, error_json=error_json, retry_delay=delay,
                           may_retry=True)
        return Outcome(task.id, task.attempt, TaskStatus.FAILED, error_json=error_json)

    async def _call(self, handler: Handler, payload: Any, ctx: TaskContext) -> Any:
        if handler.is_async:
            return await handler.fn(payload, ctx)
        # A plain function runs in a thread; on timeout or delete the thread is
        # abandoned (Python cannot stop it) and its result ignored.
        return await trio.to_thread.run_sync(
            functools.partial(handler.fn, payload, ctx), abandon_on_cancel=True, limiter=self._threads)

    def _log_outcome(self, task: ClaimedTask, outcome: Outcome) -> None:
        if outcome.status == TaskStatus.COMPLETED:
            log.debug("task %d (%s) completed on attempt %d", task.id, task.task_type, task.attempt)
        elif outcome.status == TaskStatus.RETRYING:
            log.info("task %d (%s) attempt %d failed, retry in %.2fs: %s", task.id, task.task_type,
                     task.attempt, outcome.retry_delay, _error_summary(outcome))
        else:
            log.warning("task %d (%s) failed after %d attempts: %s", task.id, task.task_type,
                        task.attempt, _error_summary(outcome))


def _encode_result(result: Any) -> str:
    try:
        return jsontext.dumps(result)
    except jsontext.NotJsonError as exc:
        raise ResultNotJSON(f"result of type {type(result).__name__} is not JSON-serialisable: {exc}") from None


def _error_summary(outcome: Outcome) -> str:
    error = jsontext.loads(outcome.error_json) or {}
    return f"{error.get('type')}: {error.get('message')}"
