"""The worker side: one claim loop per process feeding N worker loops, and the
heartbeat that keeps their leases.

The claim loop asks the Store for at most as many tasks as there are free
worker slots, in one statement, and passes them to the workers through a
channel; when the queue is empty it sleeps until a NOTIFY says new work
arrived, the next retry falls due, or the fallback poll interval passes.
Each claim becomes an `Attempt` record (taskd.attempts), which lives until its
outcome is written: the heartbeat renews its lease until then, and an attempt
whose lease this process could not renew in time is cancelled before another
process may take the task, its outcome discarded and the task released.

The server starts these loops in its nurseries; this module opens none.
Imports taskd.store, taskd.attempts, taskd.registry, taskd.config, taskd.models,
taskd.failures, taskd.errors, taskd.jsontext.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Sequence

import trio

from taskd import failures, jsontext
from taskd.attempts import Attempt, HandlerEnded, ThreadTracker, crash_error, run_handler
from taskd.config import Settings
from taskd.control import Fail, Retry
from taskd.errors import DatabaseError
from taskd.models import Outcome, TaskStatus, WorkerGauge, attempt_error
from taskd.quarantine import QuarantinedFailure
from taskd.registry import Registry
from taskd.store import Store

log = logging.getLogger("taskd.workers")

POLL_INTERVAL = 2.0  # fallback when a NOTIFY is missed
MIN_WAIT = 0.005
MAX_CLAIM = 500
RECENT_CANCELS = 10_000


HEARTBEAT_RETRY = 0.5
CLAIM_LIMIT = 10.0  # seconds a claim may take before it is abandoned (its tasks then rescued)


def lease_deadline(sent_at: float, lease: float) -> float:
    """When this process stops trusting a lease sent at `sent_at`: a margin before the row's
    locked_until (set when the database ran the statement, later than `sent_at`), so an
    attempt cut off is stopped before another process can be given the task."""
    return sent_at + lease - min(lease / 4, 5.0)


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff for the retry after `attempt` (1-based), capped, with equal jitter."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 60))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class WorkerPool:
    """The claim loop, the worker loops, the heartbeat, and the attempts they share."""

    def __init__(self, store: Store, registry: Registry, settings: Settings, gauge: WorkerGauge) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.gauge = gauge
        self.size = settings.worker_pool_size
        self._slots = trio.Semaphore(self.size)
        self.threads = ThreadTracker(settings.max_threads, on_idle=store.wake_claimer)
        self._claim_scope = trio.CancelScope()
        self._attempts: dict[tuple[int, int], Attempt] = {}
        # Attempts this process gave up on (lease lapsed) whose rows may still be leased
        # to it: handed back, without counting them, once the database answers.
        self._to_release: set[tuple[int, int]] = set()
        # Deletions whose notice may arrive before the claim that took the task lands.
        self._recent_cancels: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.claims = 0
        self.claimed = 0
        store.on_cancel(self._cancel_deleted)
        store.on_outcomes_written(self._outcomes_written)

    def open_channel(self) -> tuple[trio.MemorySendChannel[Attempt], trio.MemoryReceiveChannel[Attempt]]:
        """The hand-over from claimer to workers; it never holds more than there are slots."""
        return trio.open_memory_channel[Attempt](max(1, self.size))

    def attempts(self) -> list[Attempt]:
        return list(self._attempts.values())

    def unfinished(self) -> list[tuple[int, int]]:
        """(task id, attempt) of every claim this process still holds with no outcome written,
        but those whose handler ignores cancellation (left to be rescued)."""
        return sorted({*(key for key, a in self._attempts.items() if not a.abandoned), *self._to_release})

    def handing_back(self) -> list[int]:
        """Tasks this process still answers for, which its own rescue must leave alone: attempts
        it is releasing, running, or whose outcome is with the writer. Not those whose handler
        ignores cancellation: their lease is left to run out on purpose."""
        return sorted({key[0] for key in self._to_release}
                      | {a.task.id for a in self._attempts.values() if not a.abandoned})

    def stop_claiming(self) -> None:
        self._claim_scope.cancel()

    def _cancel_deleted(self, task_id: int) -> None:
        found = False
        for attempt in self.attempts():
            if attempt.task.id == task_id:
                found = True
                attempt.stop(deleted=True)
        if not found:
            self._recent_cancels[task_id] = None
            if len(self._recent_cancels) > RECENT_CANCELS:
                self._recent_cancels.popitem(last=False)

    def _outcomes_written(self, outcomes: Sequence[Outcome], written: set[tuple[int, int]]) -> None:
        # Written or turned away by the fence: either way this process is done with it.
        for outcome in outcomes:
            self._attempts.pop((outcome.task_id, outcome.attempt), None)

    def _claimable_types(self) -> list[str]:
        """Every registered type, but while abandoned threads hold every handler thread, only
        the async ones: a plain-def task claimed now could not run."""
        if self.threads.limiter.available_tokens > 0:
            return self.registry.names()
        return sorted(h.name for h in self.registry if h.is_async)

    def _skip(self) -> list[int]:
        """Tasks this process must not claim now: it still runs something of theirs."""
        return sorted({key[0] for key in self._attempts} | {key[0] for key in self._to_release}
                      | set(self.threads.by_task))

    # -- leases -----------------------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        """Renew the leases of the attempts whose outcome is not written yet, and this
        process's row in the process table, forever. An attempt whose lease could not be
        renewed (deleted meanwhile, or expired and perhaps taken by another process) is
        cancelled here; one whose local deadline passes first is cancelled by its scope."""
        lease = self.settings.lease_seconds
        while True:
            live = [a for a in self.attempts() if not a.lease_lost and not self._ignores_cancel(a)]
            sent_at = trio.current_time()
            try:
                renewed = await self.store.heartbeat(lease, [a.key for a in live], self.gauge.size,
                                                     self.gauge.busy)
            except DatabaseError as exc:
                # Soon again, not in lease/3: two missed beats in a row must not be all
                # it takes to cut every attempt off.
                log.debug("heartbeat failed (leases run out locally in at most %gs): %s", lease, exc)
                await trio.sleep(min(lease / 3, HEARTBEAT_RETRY))
                continue
            for attempt in live:
                if attempt.key in renewed:
                    attempt.extend_lease(lease_deadline(sent_at, lease))
                elif self._attempts.get(attempt.key) is attempt and not attempt.deleted:
                    log.warning("task %d attempt %d: lease lost (deleted, or expired); cancelling it",
                                *attempt.key)
                    attempt.stop(lease_lost=True)
            if self._to_release:
                releasing = sorted(self._to_release)
                try:
                    await self.store.release(releasing, from_heartbeat=True)
                except DatabaseError as exc:
                    log.debug("releasing %d cut-off attempts failed, will try again: %s", len(releasing), exc)
                else:
                    self._to_release.difference_update(releasing)
                    log.info("handed back %d tasks whose attempts were cut off from the database (unless "
                             "another process had rescued them already)", len(releasing))
            await trio.sleep(lease / 3)

    def _ignores_cancel(self, attempt: Attempt) -> bool:
        """An attempt still running a lease after it was cancelled swallows trio.Cancelled:
        it cannot be stopped, so its lease is left to run out and another process takes
        the task, rather than this one holding it for as long as it lives."""
        if attempt.scope is None or not attempt.scope.cancel_called:
            return False
        now = trio.current_time()
        if attempt.cancelled_at is None:
            attempt.cancelled_at = now
            return False
        if now - attempt.cancelled_at < self.settings.lease_seconds:
            return False
        if not attempt.abandoned:
            attempt.abandoned = True
            log.error("task %d attempt %d ignores cancellation (its handler swallows trio.Cancelled); no longer "
                      "renewing its lease, so another process will run the task", *attempt.key)
        return True

    # -- claiming ---------------------------------------------------------------------------------

    async def claim_loop(self, send: trio.MemorySendChannel[Attempt]) -> None:
        """Claim work for free slots until stop_claiming(); closes `send` so the workers drain and stop.

        Slots are reserved before the claim is sent and the unused ones returned after,
        so the process never holds more tasks than it has slots to run them.
        """
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
                    task_types = self._claimable_types()
                    skip = self._skip()
                    attempts = await self._claim(reserved, task_types, skip)
                    for _ in range(reserved - len(attempts)):
                        self._slots.release()
                    for attempt in attempts:
                        if self._recent_cancels.pop(attempt.task.id, "absent") is None:
                            self._slots.release()  # deleted before its claim landed here
                            continue
                        self._attempts[attempt.key] = attempt
                        send.send_nowait(attempt)
                    if len(attempts) < reserved:
                        await self._wait_for_work(task_types, skip)

    async def _claim(self, wanted: int, task_types: list[str], skip: list[int]) -> list[Attempt]:
        # Shielded: a claim that committed must reach the workers, or its tasks
        # would sit leased to us until the lease ran out. Bounded all the same, so a
        # database that hangs cannot hold shutdown: what it claimed is then rescued.
        sent_at = trio.current_time()
        tasks = []
        with trio.CancelScope(shield=True, deadline=sent_at + max(1.0, min(self.settings.lease_seconds, CLAIM_LIMIT))):
            try:
                tasks = await self.store.claim(wanted, task_types, self.settings.lease_seconds, skip)
            except DatabaseError as exc:
                log.debug("claiming failed, will try again: %s", exc)
                tasks = []
        self.claims += 1
        self.claimed += len(tasks)
        deadline = lease_deadline(sent_at, self.settings.lease_seconds)
        return [Attempt(task, deadline) for task in tasks]

    async def _wait_for_work(self, task_types: list[str], skip: list[int]) -> None:
        try:
            until_due = await self.store.seconds_until_due(task_types, skip)
        except DatabaseError as exc:
            log.debug("reading the next due time failed: %s", exc)
            until_due = None
        wait = POLL_INTERVAL if until_due is None else min(POLL_INTERVAL, max(MIN_WAIT, until_due))
        with trio.move_on_after(wait):
            await self.store.wait_for_work()

    # -- working ----------------------------------------------------------------------------------

    async def work_loop(self, receive: trio.MemoryReceiveChannel[Attempt]) -> None:
        """Run claimed attempts one at a time until the claim loop closes the channel."""
        async with receive:
            async for attempt in receive:
                try:
                    await self._run(attempt)
                finally:
                    self._slots.release()

    async def _run(self, attempt: Attempt) -> None:
        task = attempt.task
        if attempt.deleted or attempt.lease_lost:
            self._settle_without_outcome(attempt)
            return
        handler = self.registry.get(task.task_type)
        assert handler is not None, "the claim only asks for registered types"
        if attempt.quarantined:
            log.warning("task %d (%s) attempt %d runs in quarantine: its process died under it %d times",
                        task.id, task.task_type, task.attempt, task.crashes)
        self.gauge.busy += 1
        try:
            ended = await run_handler(attempt, handler, self.threads, self.settings.task_modules)
        finally:
            self.gauge.busy -= 1
        if attempt.deleted or attempt.lease_lost or ended.lease_ran_out or ended.no_thread:
            self._settle_without_outcome(attempt, no_thread=ended.no_thread)
            return
        try:
            outcome = self._outcome(attempt, ended)
        except BaseException as exc:  # noqa: BLE001  (describing must not cost the worker, nor the result)
            if isinstance(exc, trio.Cancelled):
                raise
            log.error("task %d attempt %d: describing its outcome failed: %s", *attempt.key, failures.error_type(exc))
            if ended.error is None:
                outcome = Outcome(task.id, task.attempt, TaskStatus.COMPLETED, result_json=ended.result_json)
            else:
                outcome = Outcome(task.id, task.attempt, TaskStatus.FAILED, error_json=jsontext.dumps(attempt_error(
                    "OutcomeNotDescribed", failures.error_type(exc), task.attempt)))
        self._log_outcome(attempt, outcome)
        # Handed over, not awaited: the Store writes outcomes in batches, and calls
        # back once written; until then the heartbeat keeps renewing the lease.
        await self.store.record(outcome)

    def _settle_without_outcome(self, attempt: Attempt, *, no_thread: bool = False) -> None:
        self._attempts.pop(attempt.key, None)
        if attempt.deleted:
            log.info("task %d (%s) was deleted while running; cancelled", attempt.task.id, attempt.task.task_type)
            return
        if no_thread:
            log.warning("task %d attempt %d: no handler thread came free within its timeout (all %d are "
                        "busy, abandoned ones included); handed back without running", attempt.task.id,
                        attempt.task.attempt, self.settings.max_threads)
            self._to_release.add(attempt.key)
            return
        attempt.lease_lost = True
        # Info, not a warning: in an outage every running attempt ends here, and the
        # outage itself is already reported once.
        log.info("task %d attempt %d: cancelled, since this process could not renew its lease in time; "
                 "it will be released or rescued", *attempt.key)
        self._to_release.add(attempt.key)

    def _outcome(self, attempt: Attempt, ended: HandlerEnded) -> Outcome:
        task = attempt.task
        # Kept with every outcome: if the database refuses to store it, the store
        # records a failed attempt instead and needs to know whether to retry.
        may_retry = task.retries_used < task.max_retries
        delay = retry_delay(task.retries_used + 1, self.settings.retry_delay, self.settings.retry_delay_max)
        if ended.error is None:
            return Outcome(task.id, task.attempt, TaskStatus.COMPLETED, result_json=ended.result_json,
                           retry_delay=delay, may_retry=may_retry)
        if isinstance(ended.error, failures.Crashed):
            error_json, give_up = crash_error(task, ended.error, self.settings.max_crashes)
            status = TaskStatus.FAILED if give_up else TaskStatus.RETRYING
            return Outcome(task.id, task.attempt, status, error_json=error_json, retry_delay=delay,
                           may_retry=not give_up, crashed=True)
        if isinstance(ended.error, Retry):
            # A snooze, not a failure: no error recorded, no retry spent.
            return Outcome(task.id, task.attempt, TaskStatus.RETRYING, retry_delay=ended.error.after, may_retry=True,
                           snoozed=True)
        if isinstance(ended.error, failures.PayloadUnreadable | Fail) or (
                isinstance(ended.error, QuarantinedFailure) and ended.error.final):
            may_retry = False  # the row will not read better next time; the handler said so
        error_json = ended.error_json(task.attempt)
        if may_retry:
            return Outcome(task.id, task.attempt, TaskStatus.RETRYING, error_json=error_json, retry_delay=delay,
                           may_retry=True)
        return Outcome(task.id, task.attempt, TaskStatus.FAILED, error_json=error_json)

    def _log_outcome(self, attempt: Attempt, outcome: Outcome) -> None:
        task = attempt.task
        if outcome.status == TaskStatus.COMPLETED:
            log.debug("task %d (%s) completed on attempt %d", task.id, task.task_type, task.attempt)
        elif outcome.snoozed:
            log.debug("task %d (%s) attempt %d snoozed; runs again in %.2fs", task.id, task.task_type,
                      task.attempt, outcome.retry_delay)
        elif outcome.status == TaskStatus.RETRYING:
            log.info("task %d (%s) attempt %d failed, retry in %.2fs: %s", task.id, task.task_type,
                     task.attempt, outcome.retry_delay, _error_summary(outcome))
        else:
            log.warning("task %d (%s) failed after %d attempts: %s", task.id, task.task_type,
                        task.attempt, _error_summary(outcome))


def _error_summary(outcome: Outcome) -> str:
    error = jsontext.loads(outcome.error_json) or {}
    return f"{error.get('type')}: {error.get('message')}"
