"""The only module that imports asyncpg. Every call crosses into asyncio through
trio_asyncio.aio_as_trio (one crossing per call: each costs ~300 µs of CPU, so
callers batch), and every error the driver raises comes out classified, here
and nowhere else, as one of taskd's:

- DatabaseUnavailable: try again later (the server is down, restarting, out of
  connections, or the connection broke; asyncpg may report a connection closed
  under it as InternalClientError, "another operation is in progress").
- DatabaseError: the database, or the driver before sending, refused this
  statement; sending it again will not help.

A connection that raised anything but a server-side refusal is in an unknown
state and is closed by its owner, never reused.
Imports taskd.sql and taskd.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import asyncpg
import trio
import trio_asyncio

from taskd.errors import DatabaseError, DatabaseUnavailable
from taskd.sql import Query

log = logging.getLogger("taskd.db")

CLOSE_TIMEOUT = 5.0
_METHOD = {"one": "fetchrow", "many": "fetch", "val": "fetchval", "exec": "execute"}

# SQLSTATE classes and codes that say "not now" rather than "not this statement":
# connection exceptions, insufficient resources, operator intervention (shutdown,
# cancel, cannot connect now), and the transaction rollbacks a retry resolves.
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
# Also: a lock wait or an idle transaction timed out (55P03, 25P03), a primary
# demoted to read-only during a failover (25006), and no such database (3D000: one
# being created is waited for). A wrong password (28P01) is not: it will not fix itself.
_UNAVAILABLE_CODES = frozenset({"40001", "40P01", "55P03", "25P03", "25006", "3D000"})


def _is_unavailable_state(sqlstate: str | None) -> bool:
    if not sqlstate:
        return False
    return sqlstate[:2] in _UNAVAILABLE_CLASSES or sqlstate in _UNAVAILABLE_CODES


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def classify(exc: BaseException) -> DatabaseError | None:
    """taskd's error for something the driver raised, or None if it is not the driver's."""
    if isinstance(exc, asyncpg.PostgresError):
        if _is_unavailable_state(getattr(exc, "sqlstate", None)):
            return DatabaseUnavailable(_describe(exc))
        return DatabaseError(_describe(exc))
    # Client-side refusals: an argument the driver cannot encode, a bad setting.
    if isinstance(exc, asyncpg.exceptions._base.DataError | asyncpg.exceptions.ClientConfigurationError):
        return DatabaseError(_describe(exc))
    # The rest of the driver's own errors leave the connection in an unknown state:
    # a closed connection, a protocol error after the server went away (asyncpg
    # issue 1069), an operation already in progress. All mean "reconnect and retry".
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions._base.InternalClientError):
        return DatabaseUnavailable(_describe(exc))
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
                                                            | ssl.SSLSyscallError):
        return DatabaseError(_describe(exc))  # a bad certificate, key or key password: a setting to fix
    if isinstance(exc, OSError | ConnectionError | TimeoutError | asyncio.TimeoutError | EOFError):
        return DatabaseUnavailable(_describe(exc) or "connection failed")
    return None


def route_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Send what the asyncio loop reports on its own (a connection's future nobody awaits
    any more, as when a connect is cancelled at shutdown) to taskd's log: a dropped
    connection is routine there, and must not add traceback lines to a one-line exit."""

    def handle(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is None or classify(exc) is not None:
            log.debug("asyncio: %s (%r)", context.get("message"), exc)
        else:
            log.warning("asyncio: %s: %s", context.get("message"), _describe(exc))

    loop.set_exception_handler(handle)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        mapped = classify(exc)
        if mapped is None:
            raise
        raise mapped from exc


async def _run(target: Any, query: Query, args: Sequence[Any], command_timeout: float | None = None) -> Any:
    method = getattr(target, _METHOD[query.kind])
    with _translated():
        if command_timeout is None:
            return await trio_asyncio.aio_as_trio(method)(query.text, *args)
        return await trio_asyncio.aio_as_trio(method)(query.text, *args, timeout=command_timeout)


class Connection:
    """One dedicated connection, for a hot loop that batches its work."""

    def __init__(self, raw: asyncpg.Connection) -> None:
        self._raw = raw

    async def run(self, query: Query, *args: Any, command_timeout: float | None = None) -> Any:
        """Run a named query the way its kind says (row, rows, value or status);
        `command_timeout` replaces the connection's for this one."""
        return await _run(self._raw, query, args, command_timeout)

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
        try:
            return await _run(self._raw, query, args)
        except DatabaseUnavailable:
            # After a restart every idle connection is dead too: have them all
            # replaced on their next use rather than failing one request each.
            with contextlib.suppress(Exception):
                await trio_asyncio.aio_as_trio(self._raw.expire_connections)()
            raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A pooled connection in a transaction for the block: committed at its end, rolled
        back if it raises; the connection goes back to the pool either way (closed, if the
        rollback could not finish)."""
        with _translated():
            raw = await trio_asyncio.aio_as_trio(self._raw.acquire)()
        conn = Connection(raw)
        try:
            async with conn.transaction():
                yield conn
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
                try:
                    await trio_asyncio.aio_as_trio(self._raw.release)(raw)
                except Exception as exc:  # a broken connection: the pool replaces it
                    log.debug("releasing a connection failed: %s", exc)
            if scope.cancelled_caught:
                raw.terminate()

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


CONNECT_TIMEOUT = 10.0


async def connect(
    url: str, *, connect_timeout: float = CONNECT_TIMEOUT, server_settings: dict[str, str] | None = None,
    command_timeout: float = COMMAND_TIMEOUT,
) -> Connection:
    """Open one dedicated connection (with session settings, if given)."""
    with _translated(), _url_checked():
        raw = await trio_asyncio.aio_as_trio(asyncpg.connect)(
            url, timeout=connect_timeout, server_settings=server_settings, command_timeout=command_timeout)
    return Connection(raw)


@contextlib.contextmanager
def _url_checked() -> Iterator[None]:
    # asyncpg parses the URL itself and raises plain ValueErrors for what it cannot read.
    try:
        yield
    except (ValueError, TypeError, UnicodeError, OverflowError, IndexError) as exc:
        if classify(exc) is not None:
            raise
        raise DatabaseError(f"invalid database URL: {_describe(exc)}") from exc


async def create_pool(url: str, *, size: int, connect_timeout: float = CONNECT_TIMEOUT) -> Pool:
    """Open a pool of up to `size` connections (two kept open)."""
    with _translated(), _url_checked():
        raw = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
            url, min_size=min(2, size), max_size=size, timeout=connect_timeout, command_timeout=COMMAND_TIMEOUT,
            # Listings and bulk filters take optional filters ($n IS NULL OR col = $n): only a
            # plan made with the values can pick the index a given filter needs, and a cached
            # generic plan would walk the whole history instead. (Planning costs ~0.1 ms.)
            # JIT compiling costs ~25 ms, more than any of these reads takes (GET /queues's
            # estimate crossed jit_above_cost: measured 22.7 ms p50 with it, 0.8 ms without).
            server_settings={"plan_cache_mode": "force_custom_plan", "jit": "off"},
        )
    return Pool(raw)
