"""Periodic housekeeping: the rescue of tasks whose process died (their lease ran
out), ending waiting tasks past their expiry, forgetting processes long gone, and
keeping the counts that /stats reads (folded each second, checked hourly). (Heartbeats belong to the worker pool,
which knows what it holds.)

The server starts these loops; this module opens no nursery.
Imports taskd.store, taskd.attempts, taskd.config, taskd.models, taskd.errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from taskd.attempts import QUARANTINE_AFTER_CRASHES
from taskd.config import Settings
from taskd.errors import DatabaseError, DatabaseUnavailable
from taskd.models import TaskStatus
from taskd.store import Store

log = logging.getLogger("taskd.maintenance")


def rescue_fail_at(max_crashes: int) -> int:
    """The crash count at which a rescue alone fails a task: only well past quarantine (by
    then its processes died under it even there), never before it had its chance there."""
    return max(QUARANTINE_AFTER_CRASHES + max_crashes, 2 * max_crashes)


def rescue_interval(lease_seconds: float) -> float:
    return min(5.0, max(0.2, lease_seconds / 2))


async def rescue_loop(store: Store, settings: Settings, keep: Callable[[], Sequence[int]] = tuple) -> None:
    """Requeue tasks whose process stopped renewing their lease, forever; `keep()` names
    this process's own cut-off attempts, which it hands back itself."""
    while True:
        try:
            rescued = await store.rescue_expired(keep(), fail_at=rescue_fail_at(settings.max_crashes))
            for task_id, status in rescued:
                if status == TaskStatus.FAILED:
                    log.warning("task %d: its process died under it again, quarantine included; failed", task_id)
                else:
                    log.warning("task %d: its process's lease expired; requeued (a crash, not a retry)", task_id)
            await store.prune_processes(older_than=max(60.0, 10 * settings.lease_seconds))
        except DatabaseUnavailable as exc:
            log.debug("rescuing expired leases failed: %s", exc)  # the outage is reported once, by the store
        except DatabaseError as exc:
            log.error("rescuing expired leases failed: %s", exc)
        await trio.sleep(rescue_interval(settings.lease_seconds))



EXPIRY_EVERY = 1.0


async def expiry_loop(store: Store, every: float = EXPIRY_EVERY) -> None:
    """End waiting tasks whose expiry passed as expired, forever. (The claim never takes an
    expired task anyway: this only makes its status say so, within a second.)"""
    while True:
        try:
            expired = await store.expire_due()
            if expired:
                log.info("%d tasks expired before they could start: %s", len(expired),
                         ", ".join(map(str, expired[:20])) + (" ..." if len(expired) > 20 else ""))
        except DatabaseUnavailable as exc:
            log.debug("expiring tasks failed: %s", exc)
        except DatabaseError as exc:
            log.error("expiring tasks failed: %s", exc)
        await trio.sleep(every)


COUNTS_EVERY = 1.0
COUNTS_CHECK_EVERY = 3600.0


async def counts_loop(store: Store, every: float = COUNTS_EVERY, check_every: float = COUNTS_CHECK_EVERY) -> None:
    """Fold the count deltas into the totals every `every` seconds (one process at a time;
    reads are exact without it, it only keeps them short), and now and then check the
    totals against a full count of the table, forever."""
    next_check = trio.current_time()  # at once: the first process after the migration fills the totals
    while True:
        try:
            await store.fold_counts()
            if trio.current_time() >= next_check:
                next_check = trio.current_time() + check_every
                off = await store.check_counts(check_every)
                if off:
                    log.warning("the kept task counts were off by %d (something changed taskd.tasks without its "
                                "triggers, such as TRUNCATE); corrected", off)
        except DatabaseUnavailable as exc:
            log.debug("keeping the counts failed: %s", exc)
        except DatabaseError as exc:
            log.error("keeping the counts failed: %s", exc)
        await trio.sleep(every)
