"""The Store's core: its connections, the hot paths of submitting, claiming and finishing,
leases, and the "new work" and cancel signals.

Hot paths hold
dedicated connections and batch: concurrent submits are coalesced into one
multi-row INSERT, outcomes of many attempts into one fenced UPDATE, and one
claim statement fetches work for every free worker slot. LISTEN/NOTIFY wakes
idle claimers and cancels running tasks (deleted, or cancelled on request) in whichever
process runs them.

Imports taskd.db, taskd.connections (the connections it runs queries on), taskd.store.inserts,
taskd.sql, taskd.migrations, taskd.models, taskd.errors, taskd.jsontext.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from typing import Self

import trio

from taskd import db, jsontext, sql
from taskd.coalescer import Coalescer
from taskd.connections import Dedicated, TrackedPool
from taskd.errors import DatabaseError, DatabaseUnavailable, SqlFileError
from taskd.migrations import MIGRATION_COMMAND_TIMEOUT, apply_migrations
from taskd.models import ClaimedTask, NewTask, Outcome, Submitted, TaskStatus, attempt_error
from taskd.outage import OutageLog
from taskd.store.inserts import insert_tasks, or_null

log = logging.getLogger("taskd.store")

NEW_WORK_CHANNEL = "taskd_new"
CANCEL_CHANNEL = "taskd_cancel"
INSERT_BATCH = 500
INSERT_WINDOW = 0.002
FINISH_BATCH = 500
FINISH_WINDOW = 0.002
EXPIRE_BATCH = 1000

# The claimer's session. A claim lost to a database crash leaves its tasks pending
# (or runs one again): at-least-once either way, so claims need not wait for their
# commit to reach the disk. And the claim must walk the runnable index in claim
# order whatever the statistics say: on a table not yet analyzed (a new database,
# a sudden burst) the planner otherwise sorts every runnable row on each claim
# (measured: 16 ms instead of 1.7 ms per claim of 50 with 20,000 waiting).
# JIT stays off: a scan these settings penalise (the few rows of taskd.queues, read for
# the paused ones) makes a cheap plan look costly enough to compile, and compiling
# costs 200 ms on every claim (measured).
CLAIMER_SETTINGS = {
    "synchronous_commit": "off",
    "enable_sort": "off",
    "enable_bitmapscan": "off",
    "enable_seqscan": "off",
    # The claimed rows are few: update them by primary key, never by hashing or merging
    # against a scan. (On a new database, with taskd.queues not yet analyzed, the cached
    # generic plan hashed the whole runnable set on every claim: half the drain rate.)
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    "jit": "off",
}

# The outcome writer's session (and the heartbeat's): look each row up by primary
# key, never join a batch against a scan, whatever the statistics say (they lag
# behind a queue whose rows all change status within seconds).
FINISHER_SETTINGS = {
    "jit": "off",  # as for the claimer: a penalised scan must not make a plan look worth compiling
    "enable_seqscan": "off",
    "enable_bitmapscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}

CORE_QUERIES = frozenset({
    "task_insert_many", "task_insert_keyed", "task_by_idempotency_keys", "task_claim_many", "task_claim_queue",
    "task_waiting_queues", "task_next_due",
    "task_finish_many", "task_release_many", "task_extend_leases", "task_progress_many", "task_rescue_expired",
    "task_expire",
    "process_heartbeat", "process_remove", "process_prune",
    "migration_lock", "migration_unlock", "migration_prepare", "migration_applied", "migration_record",
    "migration_invalid_indexes",
})


def new_process_id() -> str:
    """A name for this process in leases and the process table, unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class WorkSignal:
    """Wakes one claim loop when new work may be there: tasks inserted, a queue resumed,
    or something it had to skip became claimable."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        """Forget notices received so far; call just before claiming."""
        if self._event.is_set():
            self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class StoreCore:
    """The connections, the hot paths and the signals; the Store adds the reads and controls."""

    queries_used: frozenset[str] = CORE_QUERIES

    def __init__(self, url: str, pool: db.Pool, *, process_id: str) -> None:
        self.url = url
        self.process_id = process_id
        self.outage = OutageLog()
        self._pool = TrackedPool(pool, self.outage)
        self._q = sql.queries()
        self._inserter = Dedicated(url, "inserter", self.outage)
        self._claimer = Dedicated(url, "claimer", self.outage, CLAIMER_SETTINGS)
        self._finisher = Dedicated(url, "outcome writer", self.outage, FINISHER_SETTINGS)
        # Its own connection, so HTTP reads filling the pool cannot make leases lapse.
        self._heartbeat = Dedicated(url, "heartbeat", self.outage, FINISHER_SETTINGS)
        self._listener = Dedicated(url, "listener", self.outage)
        self._signals: list[WorkSignal] = []
        self._keyed_slots = trio.CapacityLimiter(max(1, pool.usage()["max"] // 2))
        self._cancel_callbacks: list[Callable[[int, int], None]] = []
        self._written_callbacks: list[Callable[[Sequence[Outcome], set[tuple[int, int]]], None]] = []
        self._outcome_retries_stopped = False
        self._finish_events: dict[int, trio.Event] = {}
        # Past the driver's own timeouts (connect, then the statement), so a hung database
        # reaches a client as the driver's timeout: unavailable, 503.
        self.inserts: Coalescer[NewTask, Submitted] = Coalescer(
            self._insert_batch, max_items=INSERT_BATCH, window=INSERT_WINDOW, name="inserter",
            flush_timeout=db.CONNECT_TIMEOUT + db.COMMAND_TIMEOUT + 10.0)
        # No flush timeout: an outcome is kept and retried until the database takes
        # it or its fence refuses it; shutdown bounds the wait from outside.
        self.finishes: Coalescer[Outcome, bool] = Coalescer(
            self._finish_batch, max_items=FINISH_BATCH, window=FINISH_WINDOW, name="finisher",
            flush_timeout=math.inf)

    # -- life cycle -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, pool_size: int, process_id: str | None = None) -> Self:
        """Connect, apply migrations and start listening; the caller closes it."""
        missing = cls.queries_used - set(sql.queries())
        if missing:
            raise SqlFileError(f"queries missing from sql/: {', '.join(sorted(missing))}")
        # A concurrent index build on a big table takes minutes, not the usual statement limit.
        # (A role's own statement or lock timeout would fail such a build at every start.)
        conn = await db.connect(url, command_timeout=MIGRATION_COMMAND_TIMEOUT,
                                server_settings={"statement_timeout": "0", "lock_timeout": "0"})
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        pool = await db.create_pool(url, size=pool_size)
        store = cls(url, pool, process_id=process_id or new_process_id())
        try:
            await store._start_listening()
        except BaseException:
            await store.close()
            raise
        return store

    async def _start_listening(self) -> None:
        conn = await self._listener.get()
        await conn.listen(NEW_WORK_CHANNEL, self._on_new_work)
        await conn.listen(CANCEL_CHANNEL, self._on_cancel)

    async def keep_listening(self, check_every: float = 1.0) -> None:
        """Re-LISTEN after the listening connection is lost (a database restart), forever.

        Notifications sent meanwhile are gone, so the claimer is woken to look for
        itself; a running task deleted meanwhile is cancelled at the next heartbeat,
        which finds its row gone."""
        while True:
            await trio.sleep(check_every)
            if not self._listener.is_lost():
                continue
            try:
                await self._listener.close()
                await self._start_listening()
            except DatabaseError as exc:
                log.debug("listening again failed: %s", exc)
                continue
            log.info("listening for new work again")
            self.wake_claimer()

    async def close(self) -> None:
        """Close every connection (shielded and bounded inside db)."""
        for dedicated in (self._inserter, self._claimer, self._finisher, self._heartbeat, self._listener):
            await dedicated.close()
        await self._pool.close()

    # -- signals ----------------------------------------------------------------------------------

    def _on_new_work(self, _payload: str) -> None:
        self.wake_claimer()

    def _on_cancel(self, payload: str) -> None:
        task_id, _, attempt = payload.partition(":")
        try:
            key = (int(task_id), int(attempt))
        except ValueError:
            return
        for callback in self._cancel_callbacks:
            callback(*key)
        self._signal_finished([key[0]])

    def on_cancel(self, callback: Callable[[int, int], None]) -> None:
        """Call callback(task_id, attempt) when a running attempt's task is deleted or its cancel
        is asked for, in any process."""
        self._cancel_callbacks.append(callback)

    def work_signal(self) -> WorkSignal:
        """A signal for one claim loop, set whenever new work may be there."""
        signal = WorkSignal()
        self._signals.append(signal)
        return signal

    def wake_claimer(self) -> None:
        """Make every claim loop look for work now."""
        for signal in self._signals:
            signal.set()

    def _signal_finished(self, task_ids: Sequence[int]) -> None:
        for task_id in task_ids:
            event = self._finish_events.pop(task_id, None)
            if event is not None:
                event.set()

    # -- submitting -------------------------------------------------------------------------------

    async def submit(self, task: NewTask) -> Submitted:
        """Insert one task, coalesced with concurrent submits into one statement. A task whose
        idempotency key is taken is not inserted: the task holding the key is returned
        (created False), or IdempotencyConflict raised if another request made it."""
        if task.idempotency_key is not None:
            # On a pooled connection of its own: the insert waits while another transaction
            # holds the same key uncommitted (an application's, through taskd.enqueue), and
            # the submits coalesced on the inserter must not wait with it. At most half the
            # pool at once, so keys held a long time cannot take the reads' connections too.
            async with self._keyed_slots:
                (result,) = await insert_tasks(self._pool, self._q, [task])
            if isinstance(result, BaseException):
                raise result
            return result
        try:
            return await self.inserts.submit(task)
        except trio.TooSlowError:
            raise DatabaseUnavailable("the database did not answer in time") from None

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[Submitted]:
        """Insert tasks in one transaction, all or nothing (IdempotencyConflict if any key was
        used by another request); in the order given."""
        if not any(t.idempotency_key is not None for t in tasks):
            # One statement is all or nothing by itself: no transaction to open and close.
            results = await insert_tasks(self._pool, self._q, tasks)
        else:
            # A conflict is found after the statement: the transaction takes the batch back.
            async with self._pool.transaction() as conn:
                results = await insert_tasks(conn, self._q, tasks)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
        return [r for r in results if isinstance(r, Submitted)]

    async def _insert_batch(self, tasks: Sequence[NewTask]) -> Sequence[Submitted | BaseException]:
        try:
            return await insert_tasks(self._inserter, self._q, tasks)
        except DatabaseUnavailable:
            raise
        except DatabaseError:
            if len(tasks) == 1:
                raise
        # One bad row failed the batch: insert one by one so each request gets its own answer.
        results: list[Submitted | BaseException] = []
        for task in tasks:
            try:
                results.extend(await insert_tasks(self._inserter, self._q, [task]))
            except DatabaseError as exc:
                results.append(exc)
        return results

    # -- claiming and finishing -------------------------------------------------------------------

    async def claim(self, limit: int, task_types: Sequence[str], lease_seconds: float,
                    skip: Sequence[int] = (), queues: Sequence[str] | None = None) -> list[ClaimedTask]:
        """Lease up to `limit` runnable tasks of the given types and queues (None: any queue not
        paused), except those in `skip`, to this process."""
        if queues is not None and len(queues) == 1:
            rows = await self._claimer.run(self._q["task_claim_queue"], self.process_id, limit, list(task_types),
                                           lease_seconds, list(skip), queues[0])
        else:
            rows = await self._claimer.run(
                self._q["task_claim_many"], self.process_id, limit, list(task_types), lease_seconds, list(skip),
                None if queues is None else list(queues))
        return [
            ClaimedTask(row["id"], row["task_type"], row["payload"], row["attempts"],
                        row["max_retries"], row["timeout_seconds"], row["crashes"], row["snoozes"],
                        row["attempts_forgiven"])
            for row in rows
        ]

    async def waiting_queues(self) -> list[str]:
        """The queues that hold waiting tasks, paused ones included."""
        return [row["queue"] for row in await self._claimer.run(self._q["task_waiting_queues"])]

    async def seconds_until_due(self, task_types: Sequence[str], skip: Sequence[int] = (),
                                queues: Sequence[str] | None = None) -> float | None:
        """Seconds until the next task the same claim could take falls due, by the database's
        clock (zero or less: due now; None: nothing is waiting)."""
        return await self._claimer.run(self._q["task_next_due"], list(task_types), list(skip),
                                       None if queues is None else list(queues))

    async def record(self, outcome: Outcome) -> None:
        """Hand an attempt's outcome to the next batch without waiting for it to be written."""
        await self.finishes.put(outcome)

    async def flush_outcomes(self) -> None:
        """Wait until every outcome handed over so far is written."""
        await self.finishes.wait_idle()

    def on_outcomes_written(self, callback: Callable[[Sequence[Outcome], set[tuple[int, int]]], None]) -> None:
        """Call callback(outcomes, written) after each batch: `written` holds the (task id,
        attempt) pairs stored; the rest were turned away by the lease fence."""
        self._written_callbacks.append(callback)

    async def _finish_batch(self, outcomes: Sequence[Outcome]) -> Sequence[bool]:
        try:
            written = await self._write_outcomes(outcomes)
        except DatabaseUnavailable:
            log.error("%d outcomes not written: the database is unavailable and taskd is stopping; their tasks "
                      "will be rescued once their leases run out", len(outcomes))
            return [False] * len(outcomes)
        except DatabaseError as exc:
            # A row the database will not take fails the whole statement: write one by
            # one, so the others are kept and the refused one becomes a failed attempt.
            log.error("writing %d outcomes failed (%s); writing them one by one", len(outcomes), exc)
            written = set()
            for outcome in outcomes:
                try:
                    written |= await self._write_outcomes([outcome])
                except DatabaseError as refused:
                    log.error("task %d attempt %d: the database refused its outcome; recorded as a failed "
                              "attempt: %s", outcome.task_id, outcome.attempt, refused)
                    try:
                        written |= await self._write_outcomes([_unstorable(outcome, refused)])
                    except DatabaseError as again:
                        # Left running: its lease runs out and the task is rescued.
                        log.error("task %d attempt %d: could not record the refusal either: %s",
                                  outcome.task_id, outcome.attempt, again)
        for o in outcomes:
            if (o.task_id, o.attempt) in written:
                continue
            if o.status == TaskStatus.CANCELLED:
                log.info("task %d was deleted while running; cancelled", o.task_id)
            else:
                log.warning("task %d attempt %d finished after this process lost its lease (or the task was "
                            "deleted); outcome discarded", o.task_id, o.attempt)
        for callback in self._written_callbacks:
            callback(outcomes, written)
        if any(o.status == TaskStatus.RETRYING and (o.task_id, o.attempt) in written for o in outcomes):
            # The claim loops may be asleep until a later due time, or the fallback poll:
            # a retry due sooner must wake them to look again.
            self.wake_claimer()
        self._signal_finished([o.task_id for o in outcomes if o.status != TaskStatus.RETRYING])
        return [(o.task_id, o.attempt) in written for o in outcomes]

    async def _write_outcomes(self, outcomes: Sequence[Outcome]) -> set[tuple[int, int]]:
        """One fenced statement; the (id, attempt) pairs written. Retries while the database
        is unreachable, however long: the lease fence turns away what is stale by the time
        it is back, and everything else must be kept (shutdown bounds the wait)."""
        # In id order, as every statement that updates several tasks: two of them locking the
        # same rows in different orders deadlock (measured: the heartbeat and this writer).
        batch = sorted(outcomes, key=_task_id)
        args = (
            self.process_id,
            [o.task_id for o in batch],
            [o.attempt for o in batch],
            [o.status for o in batch],
            or_null([o.result_json for o in batch]),
            or_null([o.error_json for o in batch]),
            [o.retry_delay for o in batch],
            [o.crashed for o in batch],
            [o.snoozed for o in batch],
            or_null([o.progress_json for o in batch]),
        )
        delay = 0.1
        while True:
            try:
                rows = await self._finisher.run(self._q["task_finish_many"], *args)
                return {(row["id"], row["attempts"]) for row in rows}
            except DatabaseUnavailable:
                if self._outcome_retries_stopped:
                    raise
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def stop_retrying_outcomes(self) -> None:
        """Shutdown gave up waiting for the database: fail outcome writes instead of retrying."""
        self._outcome_retries_stopped = True

    async def release(self, claims: Sequence[tuple[int, int]], *, from_heartbeat: bool = False) -> None:
        """Return claimed, unfinished (task id, attempt) pairs to pending without counting the attempt
        (on the heartbeat's own connection when the heartbeat loop asks, so a busy pool cannot delay it)."""
        if claims:
            runner = self._heartbeat if from_heartbeat else self._pool
            claims = sorted(claims)  # id order: see _write_outcomes
            await runner.run(self._q["task_release_many"], self.process_id,
                             [c[0] for c in claims], [c[1] for c in claims])

    # -- leases and processes ---------------------------------------------------------------------

    async def heartbeat(
        self, lease_seconds: float, held: Sequence[tuple[int, int]], workers: int, busy: int
    ) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
        """Renew the leases of the held (task id, attempt) pairs and record that this process
        is alive; returns the pairs whose lease was renewed, and those of them whose cancel
        was asked for."""
        held = sorted(held)  # id order: see _write_outcomes
        rows = await self._heartbeat.run(self._q["task_extend_leases"], self.process_id, lease_seconds,
                                         [h[0] for h in held], [h[1] for h in held])
        await self._heartbeat.run(self._q["process_heartbeat"], self.process_id, socket.gethostname(),
                                  os.getpid(), workers, busy)
        renewed = {(row["id"], row["attempts"]) for row in rows}
        return renewed, {(row["id"], row["attempts"]) for row in rows if row["cancel_requested"]}

    async def write_progress(self, progress: Sequence[tuple[int, int, str]]) -> None:
        """Store handlers' latest progress, (task id, attempt, JSON text) each, in one statement,
        on the heartbeat's connection (HTTP reads filling the pool cannot hold it up)."""
        if progress:
            progress = sorted(progress)  # id order: see _write_outcomes
            await self._heartbeat.run(self._q["task_progress_many"], self.process_id, [p[0] for p in progress],
                                      [p[1] for p in progress], [p[2] for p in progress])

    async def expire_due(self, limit: int = EXPIRE_BATCH) -> list[int]:
        """End waiting tasks past their expiry as expired (at most `limit`); their ids."""
        rows = await self._pool.run(self._q["task_expire"], limit)
        self._signal_finished([row["id"] for row in rows])
        return [row["id"] for row in rows]

    async def remove_process(self) -> None:
        await self._pool.run(self._q["process_remove"], self.process_id)

    async def rescue_expired(
        self, keep: Sequence[int] = (), *, fail_at: int = 1_000_000
    ) -> list[tuple[int, TaskStatus]]:
        """Requeue tasks whose lease ran out, except this process's own in `keep` (it still
        answers for those), failing those at their `fail_at`th crash; returns (id, new status) pairs."""
        rows = await self._pool.run(self._q["task_rescue_expired"], self.process_id, list(keep), fail_at)
        self._signal_finished([row["id"] for row in rows if row["status"] == TaskStatus.FAILED])
        if rows:
            self.wake_claimer()
        return [(row["id"], TaskStatus(row["status"])) for row in rows]

    async def prune_processes(self, older_than: float) -> None:
        await self._pool.run(self._q["process_prune"], older_than)


def _task_id(outcome: Outcome) -> int:
    return outcome.task_id


def _unstorable(outcome: Outcome, exc: Exception) -> Outcome:
    """The attempt's outcome could not be stored (the database refused its result):
    record the attempt as failed instead, retried if retries remain."""
    error = jsontext.dumps(attempt_error(
        "OutcomeNotStored", f"the database refused this attempt's outcome: {str(exc)[:1000]}", outcome.attempt))
    status = TaskStatus.RETRYING if outcome.may_retry else TaskStatus.FAILED
    return Outcome(outcome.task_id, outcome.attempt, status, error_json=error, retry_delay=outcome.retry_delay)
