"""The connections the Store runs its named queries on: a dedicated connection per hot
loop, and the shared pool, both telling the one OutageLog how the database is doing.
A connection that failed in a way that leaves its state unknown is dropped, never
reused; the next call opens a new one. Queries themselves belong to the Store.

Imports taskd.db, taskd.sql, taskd.outage and taskd.errors.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import trio

from taskd import db, sql
from taskd.errors import DatabaseError, DatabaseUnavailable
from taskd.outage import OutageLog


class Dedicated:
    """A connection for one role; a connection that failed is dropped, and the next call
    opens a new one. Calls take turns: a connection runs one statement at a time, and
    several loops may share a role (each queue's claim loop; the heartbeat and the
    progress writer)."""

    def __init__(self, url: str, role: str, outage: OutageLog, server_settings: dict[str, str] | None = None) -> None:
        self._url = url
        self.role = role
        self._outage = outage
        self._server_settings = server_settings
        self._conn: db.Connection | None = None
        self._turn = trio.Lock()

    async def get(self) -> db.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            try:
                self._conn = await db.connect(self._url, server_settings=self._server_settings)
            except DatabaseUnavailable as exc:
                self._outage.failed(self.role, exc)
                raise
        return self._conn

    async def run(self, query: sql.Query, *args: Any) -> Any:
        async with self._turn:
            return await self._run(query, *args)

    async def _run(self, query: sql.Query, *args: Any) -> Any:
        conn = await self.get()
        try:
            result = await conn.run(query, *args)
        except DatabaseUnavailable as exc:
            self._outage.failed(self.role, exc)
            await self.close()
            raise
        except BaseException:
            # Cancelled mid-statement, or refused: a connection whose state is not
            # known to be clean is never reused.
            if conn.is_closed() or not is_refusal(sys.exc_info()[1]):
                await self.close()
            raise
        self._outage.succeeded()
        return result

    def is_lost(self) -> bool:
        """Was this connection open and then lost?"""
        return self._conn is None or self._conn.is_closed()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def is_refusal(exc: BaseException | None) -> bool:
    """A statement the server refused leaves its connection usable."""
    return isinstance(exc, DatabaseError) and not isinstance(exc, DatabaseUnavailable)


class TrackedPool:
    """The shared pool, reporting outages like the dedicated connections do."""

    def __init__(self, pool: db.Pool, outage: OutageLog) -> None:
        self._pool = pool
        self._outage = outage

    async def run(self, query: sql.Query, *args: Any) -> Any:
        try:
            result = await self._pool.run(query, *args)
        except DatabaseUnavailable as exc:
            self._outage.failed("pool", exc)
            raise
        self._outage.succeeded()
        return result

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[db.Connection]:
        """A pooled connection in a transaction (see db.Pool.transaction)."""
        try:
            async with self._pool.transaction() as conn:
                yield conn
        except DatabaseUnavailable as exc:
            self._outage.failed("pool", exc)
            raise
        self._outage.succeeded()

    def usage(self) -> dict[str, int]:
        return self._pool.usage()

    async def close(self) -> None:
        await self._pool.close()
