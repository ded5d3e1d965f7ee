"""The worker side: one claim loop per process feeding N worker loops, and the
heartbeat that keeps their leases.

The slots are split into lanes: one for every queue (the default), or one per queue
the process is told to serve (QUEUES), so a busy queue cannot take another's slots.
Each lane's claim loop asks the Store for at most as many tasks as the lane has free
slots, in one statement, and passes them to its workers through a channel; when
nothing is due it sleeps until a NOTIFY says new work arrived, the next scheduled
task or retry falls due, or the fallback poll interval passes.
Each claim becomes an `Attempt` record (taskd.attempts), which lives until its
outcome is written: the heartbeat renews its lease until then, and an attempt
whose lease this process could not renew in time is cancelled before another
process may take the task, its outcome discarded and the task released.

The server starts these loops in its nurseries; this module opens none.
Imports taskd.store, taskd.attempts, taskd.outcomes (what an attempt's end becomes),
taskd.registry, taskd.config, taskd.models, taskd.failures, taskd.errors, taskd.jsontext.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Sequence

import trio

from taskd import failures, jsontext, outcomes
from taskd.attempts import Attempt, ThreadTracker, run_handler
from taskd.config import Settings
from taskd.errors import DatabaseError
from taskd.models import Outcome, TaskStatus, WorkerGauge, attempt_error
from taskd.registry import Registry
from taskd.store import Store, WorkSignal

log = logging.getLogger("taskd.workers")

POLL_INTERVAL = 2.0  # fallback when a NOTIFY is missed
MIN_WAIT = 0.005
MAX_CLAIM = 500
RECENT_CANCELS = 10_000


HEARTBEAT_RETRY = 0.5
PROGRESS_EVERY = 1.0  # seconds: a task's progress is written at most this often
# How long a lane of every queue trusts its list of waiting queues. While one queue alone
# waits, it claims from it by the cheaper one-queue statement; a queue that starts to
# wait meanwhile is seen at the latest this much later (at once if a claim leaves due
# work behind).
WAITING_QUEUES_TTL = 1.0
CLAIM_LIMIT = 10.0  # seconds a claim may take before it is abandoned (its tasks then rescued)


def lease_deadline(sent_at: float, lease: float) -> float:
    """When this process stops trusting a lease sent at `sent_at`: a margin before the row's
    locked_until (set when the database ran the statement, later than `sent_at`), so an
    attempt cut off is stopped before another process can be given the task."""
    return sent_at + lease - min(lease / 4, 5.0)


@dataclasses.dataclass(eq=False)
class Lane:
    """Slots that claim only from `queues` (None: every queue)."""

    queues: tuple[str, ...] | None
    size: int
    slots: trio.Semaphore
    signal: WorkSignal
    # For a lane of every queue: the queues seen waiting, and when (trio's clock).
    waiting: tuple[str, ...] = ()
    waiting_seen_at: float = -math.inf

    @property
    def name(self) -> str:
        return "every queue" if self.queues is None else ",".join(self.queues)


class WorkerPool:
    """The lanes' claim loops, the worker loops, the heartbeat, and the attempts they share."""

    def __init__(self, store: Store, registry: Registry, settings: Settings, gauge: WorkerGauge) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.gauge = gauge
        self.size = settings.worker_pool_size
        split = settings.queues or ((None, self.size),)
        self.lanes = [Lane(None if queue is None else (queue,), size, trio.Semaphore(size), store.work_signal())
                      for queue, size in split]
        self.threads = ThreadTracker(settings.max_threads, on_idle=store.wake_claimer)
        self._claim_scopes: list[trio.CancelScope] = []  # one per lane's claim loop
        self._claiming_stopped = False
        self._attempts: dict[tuple[int, int], Attempt] = {}
        # Attempts this process gave up on (lease lapsed) whose rows may still be leased
        # to it: handed back, without counting them, once the database answers.
        self._to_release: set[tuple[int, int]] = set()
        # Cancels (and deletions) whose notice may arrive before the claim that took the task lands.
        self._recent_cancels: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()
        self.claims = 0
        self.claimed = 0
        store.on_cancel(self._cancel_running)
        store.on_outcomes_written(self._outcomes_written)

    def start_workers(self, nursery: trio.Nursery) -> list[tuple[Lane, trio.MemorySendChannel[Attempt]]]:
        """Start each lane's worker loops in `nursery`; returns each lane's hand-over channel, for
        start_claiming (or, if claiming never starts, to be closed so the workers stop). A
        channel never holds more than its lane has slots."""
        channels = []
        for lane in self.lanes:
            send, receive = trio.open_memory_channel[Attempt](max(1, lane.size))
            with receive:
                for _ in range(lane.size):
                    nursery.start_soon(self.work_loop, lane, receive.clone())
            channels.append((lane, send))
        return channels

    def start_claiming(self, nursery: trio.Nursery,
                       channels: Sequence[tuple[Lane, trio.MemorySendChannel[Attempt]]]) -> None:
        """Start each lane's claim loop in `nursery`; each closes its channel when it stops."""
        for lane, send in channels:
            nursery.start_soon(self.claim_loop, lane, send)

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
        self._claiming_stopped = True
        for scope in self._claim_scopes:
            scope.cancel()

    def _cancel_running(self, task_id: int, attempt_number: int) -> None:
        attempt = self._attempts.get((task_id, attempt_number))
        if attempt is not None:
            attempt.stop(cancelled=True)
            return
        # Perhaps its claim has not landed here yet; if it does, it stops at once.
        self._recent_cancels[(task_id, attempt_number)] = None
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
                renewed, cancel_asked = await self.store.heartbeat(lease, [a.key for a in live], self.gauge.size,
                                                                   self.gauge.busy)
            except DatabaseError as exc:
                # Soon again, not in lease/3: two missed beats in a row must not be all
                # it takes to cut every attempt off.
                log.debug("heartbeat failed (leases run out locally in at most %gs): %s", lease, exc)
                await trio.sleep(min(lease / 3, HEARTBEAT_RETRY))
                continue
            for attempt in live:
                if attempt.key in cancel_asked and not attempt.cancelled:
                    # The notice of it was missed (the listening connection was down).
                    log.info("task %d attempt %d: cancel asked for; cancelling it", *attempt.key)
                    attempt.stop(cancelled=True)
                if attempt.key in renewed:
                    attempt.extend_lease(lease_deadline(sent_at, lease))
                elif self._attempts.get(attempt.key) is attempt and not attempt.cancelled:
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

    async def progress_loop(self) -> None:
        """Store the handlers' progress, every attempt's latest in one statement, at most once a
        second, forever (an outcome carries the last progress with it)."""
        while True:
            await trio.sleep(PROGRESS_EVERY)
            pending = [(a, text) for a in self.attempts() if (text := a.progress_to_write()) is not None]
            if not pending:
                continue
            try:
                await self.store.write_progress([(a.task.id, a.task.attempt, text) for a, text in pending])
            except DatabaseError as exc:
                log.debug("writing progress failed, will try again: %s", exc)
                continue
            for attempt, text in pending:
                attempt.progress_written = text

    # -- claiming ---------------------------------------------------------------------------------

    async def claim_loop(self, lane: Lane, send: trio.MemorySendChannel[Attempt]) -> None:
        """Claim work for the lane's free slots until stop_claiming(); closes `send` so its
        workers drain and stop.

        Slots are reserved before the claim is sent and the unused ones returned after,
        so the process never holds more tasks than it has slots to run them.
        """
        scope = trio.CancelScope()
        self._claim_scopes.append(scope)
        if self._claiming_stopped:
            scope.cancel()
        async with send:
            with scope:
                while True:
                    await lane.slots.acquire()  # at least one free slot
                    reserved = 1
                    while reserved < MAX_CLAIM:
                        try:
                            lane.slots.acquire_nowait()
                        except trio.WouldBlock:
                            break
                        reserved += 1
                    lane.signal.clear()
                    task_types = self._claimable_types()
                    skip = self._skip()
                    queues = await self._queues_to_claim(lane)
                    attempts = await self._claim(reserved, task_types, skip, queues)
                    for _ in range(reserved - len(attempts)):
                        lane.slots.release()
                    for attempt in attempts:
                        if self._recent_cancels.pop(attempt.key, "absent") is None:
                            # Cancelled (or deleted) before its claim landed here: never started,
                            # it ends cancelled at once (a deleted row takes no outcome).
                            attempt.cancelled = True
                        self._attempts[attempt.key] = attempt
                        send.send_nowait(attempt)
                    if len(attempts) < reserved:
                        await self._wait_for_work(lane, task_types, skip)

    async def _queues_to_claim(self, lane: Lane) -> tuple[str, ...] | None:
        """The lane's own queues; for a lane of every queue, the one queue waiting if only one
        is (the cheaper claim), else None (every queue, queue by queue)."""
        if lane.queues is not None:
            return lane.queues
        now = trio.current_time()
        if now - lane.waiting_seen_at > WAITING_QUEUES_TTL:
            lane.waiting_seen_at = now
            try:
                lane.waiting = tuple(await self.store.waiting_queues())
            except DatabaseError as exc:
                log.debug("listing the waiting queues failed: %s", exc)
                lane.waiting = ()
        return lane.waiting if len(lane.waiting) == 1 else None

    async def _claim(self, wanted: int, task_types: list[str], skip: list[int],
                     queues: tuple[str, ...] | None) -> list[Attempt]:
        # Shielded: a claim that committed must reach the workers, or its tasks
        # would sit leased to us until the lease ran out. Bounded all the same, so a
        # database that hangs cannot hold shutdown: what it claimed is then rescued.
        sent_at = trio.current_time()
        tasks = []
        with trio.CancelScope(shield=True, deadline=sent_at + max(1.0, min(self.settings.lease_seconds, CLAIM_LIMIT))):
            try:
                tasks = await self.store.claim(wanted, task_types, self.settings.lease_seconds, skip, queues)
            except DatabaseError as exc:
                log.debug("claiming failed, will try again: %s", exc)
                tasks = []
        self.claims += 1
        self.claimed += len(tasks)
        deadline = lease_deadline(sent_at, self.settings.lease_seconds)
        return [Attempt(task, deadline) for task in tasks]

    async def _wait_for_work(self, lane: Lane, task_types: list[str], skip: list[int]) -> None:
        try:
            until_due = await self.store.seconds_until_due(task_types, skip, lane.queues)
        except DatabaseError as exc:
            log.debug("reading the next due time failed: %s", exc)
            until_due = None
        if until_due is not None and until_due <= 0:
            # Work is due that this claim did not get: perhaps in a queue that started to
            # wait since the lane last looked (or claimed by another process meanwhile).
            lane.waiting_seen_at = -math.inf
        wait = POLL_INTERVAL if until_due is None else min(POLL_INTERVAL, max(MIN_WAIT, until_due))
        with trio.move_on_after(wait):
            await lane.signal.wait()

    # -- working ----------------------------------------------------------------------------------

    async def work_loop(self, lane: Lane, receive: trio.MemoryReceiveChannel[Attempt]) -> None:
        """Run the lane's claimed attempts one at a time until its claim loop closes the channel."""
        async with receive:
            async for attempt in receive:
                try:
                    await self._run(attempt)
                finally:
                    lane.slots.release()

    async def _run(self, attempt: Attempt) -> None:
        task = attempt.task
        if attempt.lease_lost:
            self._settle_without_outcome(attempt)
            return
        if attempt.cancelled:
            await self.store.record(outcomes.cancelled(attempt, "cancelled before it started"))
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
        if attempt.lease_lost or ended.lease_ran_out or ended.no_thread:
            self._settle_without_outcome(attempt, no_thread=ended.no_thread)
            return
        if attempt.cancelled and ended.error is not None:
            # (One that completed before the cancel reached it keeps its result.)
            log.info("task %d (%s) attempt %d cancelled while running", task.id, task.task_type, task.attempt)
            await self.store.record(outcomes.cancelled(attempt, "cancelled while running"))
            return
        try:
            outcome = outcomes.of(attempt, ended, self.settings)
        except BaseException as exc:  # noqa: BLE001  (describing must not cost the worker, nor the result)
            if isinstance(exc, trio.Cancelled):
                raise
            log.error("task %d attempt %d: describing its outcome failed: %s", *attempt.key, failures.error_type(exc))
            if ended.error is None:
                outcome = Outcome(task.id, task.attempt, TaskStatus.COMPLETED, result_json=ended.result_json)
            else:
                outcome = Outcome(task.id, task.attempt, TaskStatus.FAILED, error_json=jsontext.dumps(attempt_error(
                    "OutcomeNotDescribed", failures.error_type(exc), task.attempt)))
        outcome.progress_json = attempt.progress_to_write()
        outcomes.log(attempt, outcome)
        # Handed over, not awaited: the Store writes outcomes in batches, and calls
        # back once written; until then the heartbeat keeps renewing the lease.
        await self.store.record(outcome)

    def _settle_without_outcome(self, attempt: Attempt, *, no_thread: bool = False) -> None:
        self._attempts.pop(attempt.key, None)
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
