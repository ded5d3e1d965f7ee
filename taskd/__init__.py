"""taskd: a PostgreSQL-backed task queue server.

Register handlers with `@taskd.task("name")`; enqueue from your own asyncpg
connection or transaction with `await taskd.enqueue(conn, "name", payload)`.
"""

from taskd.enqueue import enqueue
from taskd.registry import TaskContext, task

__all__ = ["TaskContext", "enqueue", "task"]
__version__ = "0.1.0"
