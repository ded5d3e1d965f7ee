"""Apply sql/migrations at start-up: each once, in its own transaction, under an
advisory lock so that several processes may start at once.

Imports taskd.db and taskd.sql.
"""

from __future__ import annotations

import logging

from taskd import sql
from taskd.db import Connection

log = logging.getLogger("taskd.migrations")


async def apply_migrations(conn: Connection) -> list[int]:
    """Bring the database's taskd schema up to date; returns the versions applied now."""
    queries = sql.queries()
    applied_now: list[int] = []
    await conn.run(queries["migration_lock"])
    try:
        await conn.run(queries["migration_prepare"])
        done = {row["version"] for row in await conn.run(queries["migration_applied"])}
        for migration in sql.migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute_script(migration.text)
                await conn.run(queries["migration_record"], migration.version, migration.name)
            log.info("applied migration %04d_%s", migration.version, migration.name)
            applied_now.append(migration.version)
    finally:
        await conn.run(queries["migration_unlock"])
    return applied_now
