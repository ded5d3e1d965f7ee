"""The Store: the only place that speaks SQL.

The HTTP layer and the workers meet here and nowhere else. One class, assembled from
parts that each own their queries: the core (connections, submitting, claiming,
finishing, leases, signals), tasks (reads and control), queues, and stats.
"""

from __future__ import annotations

from taskd.store.core import (
    CANCEL_CHANNEL,
    CLAIMER_SETTINGS,
    FINISHER_SETTINGS,
    NEW_WORK_CHANNEL,
    WorkSignal,
    new_process_id,
)
from taskd.store.defaults import EnqueueDefaults
from taskd.store.inserts import Runner, insert_args, insert_tasks
from taskd.store.queues import QueueControl
from taskd.store.retention import PruneBatch, Retention
from taskd.store.stats import StatsReads
from taskd.store.tasks import TaskControl

__all__ = [
    "CANCEL_CHANNEL", "CLAIMER_SETTINGS", "FINISHER_SETTINGS", "NEW_WORK_CHANNEL", "QUERIES_USED", "Store",
    "PruneBatch", "Runner", "WorkSignal", "insert_args", "insert_tasks", "new_process_id",
]


class Store(TaskControl, QueueControl, StatsReads, Retention, EnqueueDefaults):
    """Every SQL statement taskd runs, one method per named query."""

    queries_used = (TaskControl.queries_used | QueueControl.queries_used | StatsReads.queries_used
                    | Retention.queries_used | EnqueueDefaults.queries_used)


QUERIES_USED = Store.queries_used
