"""Publishing this process's defaults where the SQL function taskd.enqueue reads them:
the server settings and limits (taskd.settings) and each registered handler's defaults
(taskd.task_types). Published at every start, so there is one rule for defaults however a
task is enqueued: the task's own values, then its handler's, then the server settings.
When processes with other settings or handlers share the database, the last one to start
wins (row by row; a type only another process registered stays known).

Also declares task_enqueue, which taskd.client and taskd.sync_client run on a caller's
connection. Imports taskd.store.core, taskd.registry, taskd.control, taskd.config and taskd.errors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from taskd.config import Settings
from taskd.control import MAX_DELAY_SECONDS
from taskd.errors import DatabaseUnavailable
from taskd.registry import (
    MAX_KEY_CHARS,
    MAX_RETRIES_LIMIT,
    MAX_TIMEOUT,
    MAX_TYPE_CHARS,
    PRIORITY_RANGE,
    QUEUE_NAME,
    QUEUE_RULE,
    Handler,
)
from taskd.store.core import StoreCore

log = logging.getLogger("taskd.store")

# QUEUE_NAME is matched whole in Python (fullmatch); PostgreSQL's ~ finds a match anywhere.
QUEUE_PATTERN_SQL = f"^(?:{QUEUE_NAME.pattern})$"


class EnqueueDefaults(StoreCore):
    queries_used = StoreCore.queries_used | {"enqueue_defaults_publish", "task_enqueue"}

    async def publish_defaults(self, settings: Settings, handlers: Iterable[Handler]) -> bool:
        """Write this process's settings, limits and handlers' defaults for taskd.enqueue().

        False if the database went away meanwhile: the process serves all the same (the API
        and the workers do not read these), and SQL enqueues keep the defaults published before."""
        ordered = sorted(handlers, key=lambda h: h.name)
        try:
            await self._pool.run(
                self._q["enqueue_defaults_publish"], self.process_id, settings.max_retries, settings.task_timeout,
                MAX_RETRIES_LIMIT, MAX_TIMEOUT, float(MAX_DELAY_SECONDS), PRIORITY_RANGE[0], PRIORITY_RANGE[1],
                MAX_TYPE_CHARS, MAX_KEY_CHARS, QUEUE_PATTERN_SQL, QUEUE_RULE,
                [h.name for h in ordered], [h.queue for h in ordered], [h.priority for h in ordered],
                [h.max_retries for h in ordered], [None if h.timeout is None else float(h.timeout) for h in ordered],
                [h.unique_for for h in ordered], [h.validate is not None for h in ordered])
        except DatabaseUnavailable as exc:
            log.warning("could not publish this process's settings and task types for taskd.enqueue() (SQL "
                        "enqueues keep the ones published before; they are published again at the next start): %s",
                        exc)
            return False
        log.debug("published settings and %d task types for taskd.enqueue()", len(ordered))
        return True
