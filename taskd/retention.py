"""Retention: finished tasks are deleted once older than their status's setting
(RETENTION_COMPLETED, RETENTION_FAILED, RETENTION_CANCELLED, the last for expired too).

Every process runs the prune loop; each batch takes an advisory lock for its own
statement only, so at most one process deletes at any moment and a process that finds
the lock taken leaves the run to the other. A run deletes in small batches, taking
turns between the statuses so one status's backlog cannot starve the others, until
nothing is due or its time budget is spent; then it yields: until the next run, or
only briefly while rows are still due (a backlog, say after retention was shortened).
What is due is decided by the database's clock.

The server starts the loop; this module opens no nursery.
Imports taskd.store, taskd.config, taskd.errors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import trio

from taskd.config import Settings
from taskd.errors import DatabaseError, DatabaseUnavailable
from taskd.store import Store

log = logging.getLogger("taskd.retention")

PRUNE_BATCH = 1000  # rows per statement: each its own short transaction
MIN_BATCH = 100
PRUNE_BUDGET = 1.5  # seconds one run may spend deleting (checked between batches)
BACKLOG_PAUSE = 1.0  # seconds between runs while rows are still due
MAX_INTERVAL = 60.0
MIN_INTERVAL = 1.0


def retention_rules(settings: Settings) -> tuple[tuple[str, float], ...]:
    """(final status, seconds kept) for every status that is pruned at all (0 keeps forever)."""
    rules = (("completed", settings.retention_completed), ("failed", settings.retention_failed),
             ("cancelled", settings.retention_cancelled), ("expired", settings.retention_cancelled))
    return tuple((status, keep) for status, keep in rules if keep > 0)


def prune_interval(rules: tuple[tuple[str, float], ...]) -> float:
    """Seconds between runs: a minute, or half the shortest retention if that is less
    (at least a second), so a row outlives its retention by at most about half of it."""
    return min(MAX_INTERVAL, max(MIN_INTERVAL, min(keep for _, keep in rules) / 2))


@dataclasses.dataclass
class PruneRun:
    """What one run did."""

    deleted: dict[str, int]
    batches: list[int] = dataclasses.field(default_factory=list)  # rows each statement deleted
    backlog: bool = False  # stopped by its budget while rows may still be due
    lost_lock: bool = False  # another process was pruning
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


async def prune_once(store: Store, rules: tuple[tuple[str, float], ...], *, budget: float = PRUNE_BUDGET,
                     batch: int = PRUNE_BATCH) -> PruneRun:
    """One run: batches, a status at a time in turn, until nothing is due, `budget`
    seconds are spent, or another process holds the lock."""
    start = trio.current_time()
    deadline = start + budget
    run = PruneRun(deleted=dict.fromkeys((status for status, _ in rules), 0))
    size = batch
    after: dict[str, dt.datetime | None] = dict.fromkeys(run.deleted)
    due = list(rules)
    try:
        while due:
            for rule in list(due):
                if trio.current_time() >= deadline:
                    run.backlog = True
                    return run
                status, keep = rule
                began = trio.current_time()
                result = await store.prune_finished(status, keep, size, after[status])
                if not result.locked:
                    run.lost_lock = True
                    return run
                run.batches.append(result.deleted)
                run.deleted[status] += result.deleted
                if result.deleted < size:
                    due.remove(rule)  # what a batch skipped (held by someone) waits for the next run
                else:
                    after[status] = result.reached
                took = trio.current_time() - began
                # Slow statements hold their rows longer, and a slow run does little between
                # checks of its budget: smaller batches then, back to full size once quick.
                if took > budget / 4:
                    size = max(MIN_BATCH, size // 2)
                elif took < budget / 20:
                    size = min(batch, size * 2)
        return run
    finally:
        run.elapsed = trio.current_time() - start


async def prune_loop(store: Store, settings: Settings, *, budget: float = PRUNE_BUDGET,
                     batch: int = PRUNE_BATCH) -> None:
    """Delete finished tasks past their retention, forever (returns at once if every
    retention is 0)."""
    rules = retention_rules(settings)
    if not rules:
        return
    every = prune_interval(rules)
    while True:
        pause = every
        try:
            run = await prune_once(store, rules, budget=budget, batch=batch)
            if run.backlog:
                pause = min(every, BACKLOG_PAUSE)
            if run.total:
                per_status = ", ".join(f"{status} {n:,}" for status, n in run.deleted.items() if n)
                log.info("pruned %s finished tasks in %.2fs (%s)%s", f"{run.total:,}", run.elapsed, per_status,
                         f"; more are due, continuing in {pause:g}s" if run.backlog else "")
        except DatabaseUnavailable as exc:
            log.debug("pruning finished tasks failed: %s", exc)  # the outage is reported once, by the store
        except DatabaseError as exc:
            log.error("pruning finished tasks failed: %s", exc)
        await trio.sleep(pause)
