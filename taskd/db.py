"""The only module that imports asyncpg. Every call crosses into asyncio through
trio_asyncio.aio_as_trio (one crossing per call: each costs ~300 µs of CPU, so
callers batch), and asyncpg's errors come out as taskd's.

Imports taskd.sql and taskd.errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
import trio
import trio_asyncio

from taskd.errors import DatabaseError, DatabaseUnavailable
from taskd.sql import Query

log = logging.getLogger("taskd.db")

CLOSE_TIMEOUT = 5.0
_METHOD = {"one": "fetchrow", "many": "fetch", "val": "fetchval", "exec": "execute"}
# Errors that mean the connection or server is gone rather than the statement wrong.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    ConnectionError,
    TimeoutError,
)


@contextlib.contextmanager
def _translated() -> Any:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"{type(exc).__name__}: {exc}") from exc


async def _run(target: Any, query: Query, args: Sequence[Any]) -> Any:
    method = getattr(target, _METHOD[query.kind])
    with _translated():
        return await trio_asyncio.aio_as_trio(method)(query.text, *args)


class Connection:
    """One dedicated connection, for a hot loop that batches its work."""

    def __init__(self, raw: asyncpg.Connection) -> None:
        self._raw = raw

    async def run(self, query: Query, *args: Any) -> Any:
        """Run a named query the way its kind says (row, rows, value or status)."""
        return await _run(self._raw, query, args)

    async def execute_script(self, text: str) -> None:
        """Run SQL text with no parameters (migrations)."""
        with _translated():
            await trio_asyncio.aio_as_trio(self._raw.execute)(text)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Run the block in a transaction, rolled back if it raises."""
        await self.execute_script("BEGIN")
        try:
            yield
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await self.execute_script("ROLLBACK")
            raise
        await self.execute_script("COMMIT")

    async def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call callback(payload) for each NOTIFY on channel; it runs on the trio thread and must not block."""

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            callback(payload)

        with _translated():
            await trio_asyncio.aio_as_trio(self._raw.add_listener)(channel, on_notify)

    def is_closed(self) -> bool:
        return self._raw.is_closed()

    async def close(self) -> None:
        """Close, shielded and bounded, so cleanup finishes even while cancelled."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
            try:
                await trio_asyncio.aio_as_trio(self._raw.close)()
            except Exception as exc:  # closing a broken connection may fail; it is gone either way
                log.debug("closing a connection failed: %s", exc)
        if scope.cancelled_caught:
            self._raw.terminate()


class Pool:
    """A small pool for HTTP reads and housekeeping; each call acquires, runs and releases in one crossing."""

    def __init__(self, raw: asyncpg.Pool) -> None:
        self._raw = raw

    async def run(self, query: Query, *args: Any) -> Any:
        return await _run(self._raw, query, args)

    def usage(self) -> dict[str, int]:
        size = self._raw.get_size()
        return {"size": size, "idle": self._raw.get_idle_size(), "max": self._raw.get_max_size()}

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
            try:
                await trio_asyncio.aio_as_trio(self._raw.close)()
            except Exception as exc:
                log.debug("closing the pool failed: %s", exc)
        if scope.cancelled_caught:
            self._raw.terminate()


# A statement that runs longer than this is cancelled (and reported as the database
# being unavailable), so a hung connection cannot hold a loop, or shutdown, forever.
COMMAND_TIMEOUT = 60.0


async def connect(
    url: str, *, connect_timeout: float = 10.0, server_settings: dict[str, str] | None = None,
    command_timeout: float = COMMAND_TIMEOUT,
) -> Connection:
    """Open one dedicated connection (with session settings, if given)."""
    with _translated():
        raw = await trio_asyncio.aio_as_trio(asyncpg.connect)(
            url, timeout=connect_timeout, server_settings=server_settings, command_timeout=command_timeout)
    return Connection(raw)


async def create_pool(url: str, *, size: int, connect_timeout: float = 10.0) -> Pool:
    """Open a pool of up to `size` connections (two kept open)."""
    with _translated():
        raw = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
            url, min_size=min(2, size), max_size=size, timeout=connect_timeout, command_timeout=COMMAND_TIMEOUT
        )
    return Pool(raw)
