"""taskd: a PostgreSQL-backed task queue server.

Register handlers with `@taskd.task("name")`; enqueue from your own asyncpg
connection or transaction with `await taskd.enqueue(conn, "name", payload)` (from a
psycopg one with `taskd.enqueue_sync(conn, "name", payload)`, from any driver with
the SQL function `taskd.enqueue('name', payload)`); steer
with `taskd.cancel`, `taskd.retry`, `taskd.pause_queue` and `taskd.resume_queue` the same way.
"""

from taskd.client import cancel, enqueue, enqueue_many, pause_queue, prepare, resume_queue, retry
from taskd.control import Fail, Retry
from taskd.registry import TaskContext, task
from taskd.sync_client import enqueue_sync

__all__ = ["Fail", "Retry", "TaskContext", "cancel", "enqueue", "enqueue_many", "enqueue_sync", "pause_queue",
           "prepare", "resume_queue", "retry", "task"]
__version__ = "0.1.0"
