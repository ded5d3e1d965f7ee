"""Periodic housekeeping: heartbeats that renew this process's leases, the rescue
of tasks whose process died (their lease ran out), and fresh planner statistics
after a burst.

The server starts these loops; this module opens no nursery.
Imports taskd.store, taskd.config, taskd.models, taskd.errors.
"""

from __future__ import annotations

import logging

import trio

from taskd.config import Settings
from taskd.errors import DatabaseError
from taskd.models import TaskStatus, WorkerGauge
from taskd.store import Store

log = logging.getLogger("taskd.maintenance")


def heartbeat_interval(lease_seconds: float) -> float:
    """Renew well before expiry: three tries per lease."""
    return lease_seconds / 3


def rescue_interval(lease_seconds: float) -> float:
    return min(5.0, max(0.2, lease_seconds / 2))


async def heartbeat_loop(store: Store, settings: Settings, gauge: WorkerGauge) -> None:
    """Renew every lease this process holds, and its row in the process table, forever."""
    while True:
        try:
            await store.heartbeat(settings.lease_seconds, gauge.size, gauge.busy)
        except DatabaseError as exc:
            log.warning("heartbeat failed (leases expire in at most %gs): %s", settings.lease_seconds, exc)
        await trio.sleep(heartbeat_interval(settings.lease_seconds))


async def rescue_loop(store: Store, settings: Settings) -> None:
    """Requeue or fail tasks whose process stopped renewing their lease, forever."""
    while True:
        try:
            rescued = await store.rescue_expired()
            for task_id, status in rescued:
                verb = "failed (no retries left)" if status == TaskStatus.FAILED else "requeued"
                log.warning("task %d: its process's lease expired; %s", task_id, verb)
            await store.prune_processes(older_than=max(60.0, 10 * settings.lease_seconds))
        except DatabaseError as exc:
            log.warning("rescuing expired leases failed: %s", exc)
        await trio.sleep(rescue_interval(settings.lease_seconds))


STATISTICS_INTERVAL = 1.0


async def statistics_loop(store: Store) -> None:
    """Keep the task table's statistics fresh: with stale ones (a new database, a
    burst of work) the planner picks plans ten times slower for the outcome writes
    (measured: 10-24 ms instead of 2 ms per batch of 400), and autovacuum looks only
    once a minute."""
    while True:
        try:
            if await store.refresh_statistics():
                log.debug("analyzed taskd.tasks")
        except DatabaseError as exc:
            log.warning("refreshing statistics failed: %s", exc)
        await trio.sleep(STATISTICS_INTERVAL)
