"""taskd: a PostgreSQL-backed task queue server.

Register handlers with `@taskd.task("name")`; enqueue from your own asyncpg
connection or transaction with `await taskd.enqueue(conn, "name", payload)`.
"""

from taskd.client import enqueue, enqueue_many, prepare
from taskd.control import Fail, Retry
from taskd.registry import TaskContext, task

__all__ = ["Fail", "Retry", "TaskContext", "enqueue", "enqueue_many", "prepare", "task"]
__version__ = "0.1.0"
