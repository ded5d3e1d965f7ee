"""The Store: the only place that speaks SQL, and the "new work" signal.

The HTTP layer and the workers meet here and nowhere else. Hot paths hold
dedicated connections and batch: concurrent submits are coalesced into one
multi-row INSERT, outcomes of many attempts into one fenced UPDATE, and one
claim statement fetches work for every free worker slot. LISTEN/NOTIFY wakes
idle claimers and cancels deleted running tasks in whichever process runs them.

Imports taskd.db, taskd.connections (the connections it runs queries on), taskd.rows
(rows as models), taskd.sql, taskd.migrations, taskd.models, taskd.errors, taskd.jsontext.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import trio

from taskd import db, jsontext, sql
from taskd.coalescer import Coalescer
from taskd.connections import Dedicated, TrackedPool
from taskd.errors import DatabaseError, DatabaseUnavailable, SqlFileError
from taskd.migrations import apply_migrations
from taskd.models import ClaimedTask, NewTask, Outcome, Task, TaskPage, TaskStatus, TaskSummary, attempt_error
from taskd.outage import OutageLog
from taskd.rows import summary_from_row, task_from_row

log = logging.getLogger("taskd.store")

NEW_WORK_CHANNEL = "taskd_new"
CANCEL_CHANNEL = "taskd_cancel"
INSERT_BATCH = 500
INSERT_WINDOW = 0.002
FINISH_BATCH = 500
FINISH_WINDOW = 0.002
TIMINGS_WINDOW_SECONDS = 3600.0
TIMELINE_SECONDS = 900.0

# The claimer's session. A claim lost to a database crash leaves its tasks pending
# (or runs one again): at-least-once either way, so claims need not wait for their
# commit to reach the disk. And the claim must walk the runnable index in claim
# order whatever the statistics say: on a table not yet analyzed (a new database,
# a sudden burst) the planner otherwise sorts every runnable row on each claim
# (measured: 16 ms instead of 1.7 ms per claim of 50 with 20,000 waiting).
CLAIMER_SETTINGS = {
    "synchronous_commit": "off",
    "enable_sort": "off",
    "enable_bitmapscan": "off",
    "enable_seqscan": "off",
}

# The outcome writer's session (and the heartbeat's): look each row up by primary
# key, never join a batch against a scan, whatever the statistics say (they lag
# behind a queue whose rows all change status within seconds).
FINISHER_SETTINGS = {
    "enable_seqscan": "off",
    "enable_bitmapscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}

QUERIES_USED = frozenset({
    "task_insert_many", "task_claim_many", "task_next_due", "task_finish_many", "task_release_many",
    "task_extend_leases", "task_rescue_expired", "task_get", "task_list", "task_list_sizes", "task_list_full",
    "task_delete",
    "process_heartbeat", "process_remove", "process_list_live", "process_prune",
    "stats_counts", "stats_recent", "stats_by_type", "stats_timings_by_type", "stats_timeline", "db_ping",
    "migration_lock", "migration_unlock", "migration_prepare", "migration_applied", "migration_record",
})


def new_process_id() -> str:
    """A name for this process in leases and the process table, unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class Store:
    """Every SQL statement taskd runs, one method per named query."""

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
        self._new_work = trio.Event()
        self._cancel_callbacks: list[Callable[[int], None]] = []
        self._written_callbacks: list[Callable[[Sequence[Outcome], set[tuple[int, int]]], None]] = []
        self._outcome_retries_stopped = False
        self._finish_events: dict[int, trio.Event] = {}
        # Past the driver's own timeouts (connect, then the statement), so a hung database
        # reaches a client as the driver's timeout: unavailable, 503.
        self.inserts: Coalescer[NewTask, int] = Coalescer(
            self._insert_batch, max_items=INSERT_BATCH, window=INSERT_WINDOW, name="inserter",
            flush_timeout=db.CONNECT_TIMEOUT + db.COMMAND_TIMEOUT + 10.0)
        # No flush timeout: an outcome is kept and retried until the database takes
        # it or its fence refuses it; shutdown bounds the wait from outside.
        self.finishes: Coalescer[Outcome, bool] = Coalescer(
            self._finish_batch, max_items=FINISH_BATCH, window=FINISH_WINDOW, name="finisher",
            flush_timeout=math.inf)

    # -- life cycle -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, pool_size: int, process_id: str | None = None) -> Store:
        """Connect, apply migrations and start listening; the caller closes it."""
        missing = QUERIES_USED - set(sql.queries())
        if missing:
            raise SqlFileError(f"queries missing from sql/: {', '.join(sorted(missing))}")
        conn = await db.connect(url)
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
            self._new_work.set()

    async def close(self) -> None:
        """Close every connection (shielded and bounded inside db)."""
        for dedicated in (self._inserter, self._claimer, self._finisher, self._heartbeat, self._listener):
            await dedicated.close()
        await self._pool.close()

    # -- signals ----------------------------------------------------------------------------------

    def _on_new_work(self, _payload: str) -> None:
        self._new_work.set()

    def _on_cancel(self, payload: str) -> None:
        try:
            task_id = int(payload)
        except ValueError:
            return
        for callback in self._cancel_callbacks:
            callback(task_id)
        self._signal_finished([task_id])

    def on_cancel(self, callback: Callable[[int], None]) -> None:
        """Call callback(task_id) when a running task is deleted, in any process."""
        self._cancel_callbacks.append(callback)

    async def wait_for_work(self) -> None:
        """Return when new tasks were inserted since the last call (callers bound it with a timeout)."""
        await self._new_work.wait()

    def wake_claimer(self) -> None:
        """Make the claimer look for work now (something it had to skip became claimable)."""
        self._new_work.set()

    def clear_new_work(self) -> None:
        """Forget notifications received so far; call just before claiming."""
        if self._new_work.is_set():
            self._new_work = trio.Event()

    def _signal_finished(self, task_ids: Sequence[int]) -> None:
        for task_id in task_ids:
            event = self._finish_events.pop(task_id, None)
            if event is not None:
                event.set()

    # -- submitting -------------------------------------------------------------------------------

    async def submit(self, task: NewTask) -> int:
        """Insert one task, coalesced with concurrent submits into one statement; returns its id."""
        try:
            return await self.inserts.submit(task)
        except trio.TooSlowError:
            raise DatabaseUnavailable("the database did not answer in time") from None

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[int]:
        """Insert tasks in one statement, all or nothing; ids in the order given."""
        rows = await self._pool.run(self._q["task_insert_many"], *_insert_args(tasks))
        return sorted(row["id"] for row in rows)

    async def _insert_batch(self, tasks: Sequence[NewTask]) -> Sequence[int | BaseException]:
        try:
            rows = await self._inserter.run(self._q["task_insert_many"], *_insert_args(tasks))
            return sorted(row["id"] for row in rows)
        except DatabaseUnavailable:
            raise
        except DatabaseError:
            if len(tasks) == 1:
                raise
        # One bad row failed the batch: insert one by one so each request gets its own answer.
        results: list[int | BaseException] = []
        for task in tasks:
            try:
                rows = await self._inserter.run(self._q["task_insert_many"], *_insert_args([task]))
                results.append(rows[0]["id"])
            except DatabaseError as exc:
                results.append(exc)
        return results

    # -- claiming and finishing -------------------------------------------------------------------

    async def claim(self, limit: int, task_types: Sequence[str], lease_seconds: float,
                    skip: Sequence[int] = ()) -> list[ClaimedTask]:
        """Lease up to `limit` runnable tasks of the given types, except those in `skip`, to this process."""
        rows = await self._claimer.run(
            self._q["task_claim_many"], self.process_id, limit, list(task_types), lease_seconds, list(skip))
        return [
            ClaimedTask(row["id"], row["task_type"], row["payload"], row["attempts"],
                        row["max_retries"], row["timeout_seconds"], row["crashes"], row["snoozes"])
            for row in rows
        ]

    async def seconds_until_due(self, task_types: Sequence[str], skip: Sequence[int] = ()) -> float | None:
        """Seconds until the next waiting task of these types (not in `skip`) is due, by the
        database's clock (zero or less: due now; None: nothing is waiting)."""
        return await self._claimer.run(self._q["task_next_due"], list(task_types), list(skip))

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
            if (o.task_id, o.attempt) not in written:
                log.warning("task %d attempt %d finished after this process lost its lease (or the task was "
                            "deleted); outcome discarded", o.task_id, o.attempt)
        for callback in self._written_callbacks:
            callback(outcomes, written)
        self._signal_finished([o.task_id for o in outcomes if o.status != TaskStatus.RETRYING])
        return [(o.task_id, o.attempt) in written for o in outcomes]

    async def _write_outcomes(self, outcomes: Sequence[Outcome]) -> set[tuple[int, int]]:
        """One fenced statement; the (id, attempt) pairs written. Retries while the database
        is unreachable, however long: the lease fence turns away what is stale by the time
        it is back, and everything else must be kept (shutdown bounds the wait)."""
        args = (
            self.process_id,
            [o.task_id for o in outcomes],
            [o.attempt for o in outcomes],
            [o.status.value for o in outcomes],
            [o.result_json for o in outcomes],
            [o.error_json for o in outcomes],
            [o.retry_delay for o in outcomes],
            [o.crashed for o in outcomes],
            [o.snoozed for o in outcomes],
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
            await runner.run(self._q["task_release_many"], self.process_id,
                             [c[0] for c in claims], [c[1] for c in claims])

    # -- leases and processes ---------------------------------------------------------------------

    async def heartbeat(
        self, lease_seconds: float, held: Sequence[tuple[int, int]], workers: int, busy: int
    ) -> set[tuple[int, int]]:
        """Renew the leases of the held (task id, attempt) pairs and record that this process
        is alive; returns the pairs whose lease was renewed."""
        rows = await self._heartbeat.run(self._q["task_extend_leases"], self.process_id, lease_seconds,
                                         [h[0] for h in held], [h[1] for h in held])
        await self._heartbeat.run(self._q["process_heartbeat"], self.process_id, socket.gethostname(),
                                  os.getpid(), workers, busy)
        return {(row["id"], row["attempts"]) for row in rows}

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
            self._new_work.set()
        return [(row["id"], TaskStatus(row["status"])) for row in rows]

    async def prune_processes(self, older_than: float) -> None:
        await self._pool.run(self._q["process_prune"], older_than)

    async def live_processes(self, seen_within: float) -> list[dict[str, Any]]:
        rows = await self._pool.run(self._q["process_list_live"], seen_within)
        return [dict(row) for row in rows]

    # -- reading ----------------------------------------------------------------------------------

    async def get(self, task_id: int) -> Task | None:
        row = await self._pool.run(self._q["task_get"], task_id)
        return None if row is None else task_from_row(row)

    async def list_summaries(
        self, *, status: str | None, task_type: str | None, before_id: int | None, limit: int
    ) -> list[TaskSummary]:
        """Up to `limit` task summaries, newest first; payloads, results and error histories are not read."""
        rows = await self._pool.run(self._q["task_list"], status, task_type, before_id, limit)
        return [summary_from_row(row) for row in rows]

    async def list_tasks(
        self, *, status: str | None, task_type: str | None, before_id: int | None, limit: int,
        max_bytes: int | None = None,
    ) -> TaskPage:
        """Up to `limit` full tasks, newest first, cut short once their JSON would pass
        `max_bytes` (but never empty while any is left)."""
        # Sizes first, so what this process fetches is bounded by max_bytes (plus
        # one row, should the first alone be larger), not by limit x the largest row.
        sizes = await self._pool.run(self._q["task_list_sizes"], status, task_type, before_id, limit)
        chosen: list[int] = []
        total = 0
        for row in sizes:
            total += row["json_bytes"]
            if chosen and max_bytes is not None and total > max_bytes:
                break
            chosen.append(row["id"])
        more = len(chosen) < len(sizes) or len(sizes) == limit
        rows = await self._pool.run(self._q["task_list_full"], chosen) if chosen else []
        return TaskPage([task_from_row(row) for row in rows], chosen[-1] if more else None)

    async def delete(self, task_id: int) -> TaskStatus | None:
        """Delete a task; returns the status it had, None if there was none."""
        status = await self._pool.run(self._q["task_delete"], task_id)
        if status is None:
            return None
        self._signal_finished([task_id])
        return TaskStatus(status)

    async def wait_finished(self, task_id: int, seconds: float) -> Task | None:
        """The task once it is completed or failed, or as it is after `seconds`."""
        deadline = trio.current_time() + seconds
        # Registered before reading, so a finish between the read and the wait is not
        # missed; the short poll covers tasks finished by other processes.
        event = self._finish_events.setdefault(task_id, trio.Event())
        try:
            while True:
                task = await self.get(task_id)
                remaining = deadline - trio.current_time()
                if task is None or task.finished or remaining <= 0:
                    return task
                with trio.move_on_after(min(remaining, 0.25)):
                    await event.wait()
                if event.is_set():
                    event = self._finish_events.setdefault(task_id, trio.Event())
        finally:
            # Drop the registration unless another waiter still shares it.
            if self._finish_events.get(task_id) is event and not event.statistics().tasks_waiting:
                del self._finish_events[task_id]

    async def ping(self) -> bool:
        try:
            with trio.fail_after(2):
                return await self._pool.run(self._q["db_ping"]) is True
        except (DatabaseError, trio.TooSlowError):
            return False

    def pool_usage(self) -> dict[str, int]:
        return self._pool.usage()

    async def counts(self) -> dict[str, int]:
        rows = await self._pool.run(self._q["stats_counts"])
        counts = {status.value: 0 for status in TaskStatus}
        counts.update({row["status"]: row["n"] for row in rows})
        return counts

    async def recent(self, seconds: float) -> dict[str, int]:
        row = await self._pool.run(self._q["stats_recent"], seconds)
        return {"completed": row["completed"], "failed": row["failed"]}

    async def by_type(self) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._pool.run(self._q["stats_by_type"])]

    async def timings_by_type(self, seconds: float = TIMINGS_WINDOW_SECONDS) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._pool.run(self._q["stats_timings_by_type"], seconds)]

    async def timeline(self, seconds: float = TIMELINE_SECONDS) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._pool.run(self._q["stats_timeline"], seconds)]


def _insert_args(tasks: Sequence[NewTask]) -> tuple[list[Any], ...]:
    return (
        [t.task_type for t in tasks],
        [t.payload_json for t in tasks],
        [t.max_retries for t in tasks],
        [t.timeout_seconds for t in tasks],
        [t.priority for t in tasks],
        [t.run_at for t in tasks],
        [t.delay_seconds for t in tasks],
    )


def _unstorable(outcome: Outcome, exc: Exception) -> Outcome:
    """The attempt's outcome could not be stored (the database refused its result):
    record the attempt as failed instead, retried if retries remain."""
    error = jsontext.dumps(attempt_error(
        "OutcomeNotStored", f"the database refused this attempt's outcome: {str(exc)[:1000]}", outcome.attempt))
    status = TaskStatus.RETRYING if outcome.may_retry else TaskStatus.FAILED
    return Outcome(outcome.task_id, outcome.attempt, status, error_json=error, retry_delay=outcome.retry_delay)
