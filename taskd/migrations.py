"""Apply sql/migrations at start-up: each once, under an advisory lock so that several
processes (of this release and of others) may start at once; and refuse, before applying
anything, a schema that a later release migrated past what this one knows.

A migration runs in a transaction of its own, unless its first line is

    -- taskd: no-transaction

Its statements then run one by one outside any transaction (CREATE INDEX CONCURRENTLY
cannot run inside one), still under the lock, and it is recorded only once all of them
succeeded. So it may be cut off halfway and run again from the start: every statement
must be safe to repeat (IF NOT EXISTS, IF EXISTS; checked here for CREATE INDEX and DROP
INDEX), and an index that a cut-off CREATE INDEX CONCURRENTLY left INVALID, which IF NOT
EXISTS would skip, is dropped before the rerun. Such a file is split at each ';' outside
quotes and comments, so it may hold no dollar-quoted bodies and no E'' strings.

Imports taskd.db, taskd.sql and taskd.errors.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence

import trio

from taskd import sql
from taskd.db import Connection
from taskd.errors import DatabaseUnavailable, SchemaTooNew, SqlFileError
from taskd.sql import Migration, Query

log = logging.getLogger("taskd.migrations")

QUERIES_USED = frozenset({
    "migration_lock", "migration_unlock", "migration_prepare", "migration_applied", "migration_record",
    "migration_invalid_indexes",
})

_NO_TRANSACTION = re.compile(r"--\s*taskd:\s*no-transaction\s*")
_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")
_CREATE_INDEX = re.compile(r"CREATE\s+(UNIQUE\s+)?INDEX\b", re.IGNORECASE)
_CREATE_INDEX_PARTS = re.compile(
    r"CREATE\s+(UNIQUE\s+)?INDEX\s+(CONCURRENTLY\s+)?(?P<if_not_exists>IF\s+NOT\s+EXISTS\s+)?(?P<name>\S+)\s+ON\s",
    re.IGNORECASE)
_DROP_INDEX = re.compile(r"DROP\s+INDEX\s+(CONCURRENTLY\s+)?(?P<if_exists>IF\s+EXISTS\s)?", re.IGNORECASE)
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Waiting for another process's migrations: polled (see migration_lock), soon at first.
LOCK_POLL_FIRST = 0.05
LOCK_POLL_MAX = 1.0
# A no-transaction migration that PostgreSQL stopped while the connection lived on (a
# deadlock with a process of an earlier release waiting for the lock inside a statement,
# which CREATE INDEX CONCURRENTLY must outwait) is run again this many times, after
# letting the waiters through.
NO_TRANSACTION_RETRIES = 2
RETRY_PAUSE = 0.5
# For the connection that migrates (db.connect(..., command_timeout=...)): an index build on a
# large table outlasts db.COMMAND_TIMEOUT (CREATE INDEX CONCURRENTLY took 1.8 s per million
# finished rows here), and a build cut off by a timeout only starts over at the next start.
MIGRATION_COMMAND_TIMEOUT = 6 * 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationPlan:
    """A migration as it will run: in one transaction, or statement by statement."""

    version: int
    name: str
    text: str
    transactional: bool
    statements: tuple[str, ...] = ()  # no-transaction only: run one by one, in order
    indexes: tuple[str, ...] = ()  # the indexes it creates: INVALID leftovers are dropped before it runs

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


def plan_migration(migration: Migration) -> MigrationPlan:
    """How a migration runs; a no-transaction file that cannot be split safely is a SqlFileError."""
    first_line = migration.text.splitlines()[0] if migration.text else ""
    if not _NO_TRANSACTION.fullmatch(first_line.strip()):
        return MigrationPlan(migration.version, migration.name, migration.text, transactional=True)
    origin = f"{migration.version:04d}_{migration.name}.sql"
    statements: list[str] = []
    indexes: list[str] = []
    for text, code in split_statements(migration.text, origin):
        index = _rerunnable_index(code, origin)
        if index is not None:
            indexes.append(index)
        statements.append(text)
    if not statements:
        raise SqlFileError(f"{origin}: a no-transaction migration with no statements")
    return MigrationPlan(migration.version, migration.name, migration.text, transactional=False,
                         statements=tuple(statements), indexes=tuple(indexes))


def split_statements(text: str, origin: str) -> list[tuple[str, str]]:
    """Each ';'-terminated statement of text: (as written, its code with comments blanked out).

    Reads quotes ('...' and "..." with doubled quotes inside) and comments (--, nested /* */)
    so that a ';' inside them does not split; refuses what it does not read: dollar quotes
    and E'' strings (backslash escapes). Statements with no code are left out."""
    statements: list[tuple[str, str]] = []
    start = 0
    code: list[str] = []
    has_code = False
    i, end = 0, len(text)
    while i < end:
        char = text[i]
        if text.startswith("--", i):
            newline = text.find("\n", i)
            i = end if newline < 0 else newline
            code.append(" ")
        elif text.startswith("/*", i):
            i = _block_comment_end(text, i, origin)
            code.append(" ")
        elif char in "'\"":
            if char == "'" and _is_escape_string(text, i):
                raise SqlFileError(f"{origin}: E'' strings are not allowed in a no-transaction migration "
                                   "(write the string without backslash escapes)")
            close = _quote_end(text, i, origin)
            code.append(text[i:close])
            has_code = True
            i = close
        elif char == "$" and _DOLLAR_QUOTE.match(text, i):
            raise SqlFileError(f"{origin}: dollar-quoted bodies ($$ ... $$) are not allowed in a no-transaction "
                               "migration; put functions in a migration that runs in a transaction")
        elif char == ";":
            if has_code:
                statements.append((text[start:i + 1].strip(), "".join(code).strip() + ";"))
            start, code, has_code = i + 1, [], False
            i += 1
        else:
            code.append(char)
            has_code = has_code or not char.isspace()
            i += 1
    if has_code:
        raise SqlFileError(f"{origin}: the last statement does not end with ';'")
    return statements


def _block_comment_end(text: str, i: int, origin: str) -> int:
    depth, j = 1, i + 2
    while depth:
        if j >= len(text):
            raise SqlFileError(f"{origin}: a /* comment is never closed")
        if text.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif text.startswith("*/", j):
            depth, j = depth - 1, j + 2
        else:
            j += 1
    return j


def _quote_end(text: str, i: int, origin: str) -> int:
    """The index just past the quote opened at i."""
    quote, j = text[i], i + 1
    while True:
        j = text.find(quote, j)
        if j < 0:
            raise SqlFileError(f"{origin}: a {quote} quote is never closed")
        if text.startswith(quote, j + 1):  # a doubled quote stands for one
            j += 2
            continue
        return j + 1


def _is_escape_string(text: str, i: int) -> bool:
    if i == 0 or text[i - 1] not in "eE":
        return False
    return i == 1 or not (text[i - 2].isalnum() or text[i - 2] in "_$")


def _rerunnable_index(code: str, origin: str) -> str | None:
    """The index a CREATE INDEX statement creates; refuses index statements that could not run twice."""
    drop = _DROP_INDEX.match(code)
    if drop and not drop["if_exists"]:
        raise SqlFileError(f"{origin}: write DROP INDEX ... IF EXISTS in a no-transaction migration: it may "
                           f"run again after an interruption ({_shorten(code)})")
    if not _CREATE_INDEX.match(code):
        return None
    parts = _CREATE_INDEX_PARTS.match(code)
    if parts is None or not parts["if_not_exists"]:
        raise SqlFileError(f"{origin}: write CREATE INDEX [CONCURRENTLY] IF NOT EXISTS <name> ON ... in a "
                           f"no-transaction migration: it may run again after an interruption ({_shorten(code)})")
    if not _PLAIN_NAME.fullmatch(parts["name"]):
        raise SqlFileError(f"{origin}: name the index with a plain lower-case identifier, not {parts['name']!r} "
                           "(its INVALID leftover is looked up by that name)")
    return parts["name"]


def _shorten(code: str) -> str:
    flat = " ".join(code.split())
    return flat if len(flat) <= 80 else flat[:77] + "..."


def check_not_newer(applied: set[int], plans: Sequence[MigrationPlan]) -> None:
    """Raise SchemaTooNew if the database holds a migration this release does not have."""
    known = {plan.version for plan in plans}
    if applied - known:
        raise SchemaTooNew(max(applied), max(known, default=0))


async def apply_migrations(conn: Connection, migrations: Sequence[Migration] | None = None) -> list[int]:
    """Bring the database's taskd schema up to date with `migrations` (default: the shipped
    ones); returns the versions applied now. Raises SchemaTooNew, having applied nothing,
    when a later release migrated the database further."""
    plans = [plan_migration(m) for m in (sql.migrations() if migrations is None else migrations)]
    queries = sql.queries()
    applied_now: list[int] = []
    retries = NO_TRANSACTION_RETRIES
    while True:
        await _take_lock(conn, queries)
        try:
            stopped = await _apply_pending(conn, queries, plans, applied_now, may_retry=retries > 0)
        finally:
            if not conn.is_closed():  # a lost session took its lock with it
                await conn.run(queries["migration_unlock"])
        if stopped is None:
            return applied_now
        retries -= 1
        await trio.sleep(RETRY_PAUSE)


async def _take_lock(conn: Connection, queries: Mapping[str, Query]) -> None:
    delay = LOCK_POLL_FIRST
    told = False
    while not await conn.run(queries["migration_lock"]):
        if not told:
            log.info("another process is migrating the database; waiting for it to finish")
            told = True
        await trio.sleep(delay)
        delay = min(2 * delay, LOCK_POLL_MAX)


async def _apply_pending(conn: Connection, queries: Mapping[str, Query], plans: Sequence[MigrationPlan],
                         applied_now: list[int], *, may_retry: bool) -> MigrationPlan | None:
    """Apply what is missing, under the lock; the no-transaction migration to run again, if one stopped."""
    await conn.run(queries["migration_prepare"])
    done = {row["version"] for row in await conn.run(queries["migration_applied"])}
    check_not_newer(done, plans)
    for plan in plans:
        if plan.version in done:
            continue
        if plan.transactional:
            async with conn.transaction():
                await conn.execute_script(plan.text)
                await conn.run(queries["migration_record"], plan.version, plan.name)
        else:
            try:
                await _apply_outside_transaction(conn, queries, plan)
            except DatabaseUnavailable as exc:
                if conn.is_closed() or not may_retry:
                    raise
                log.warning("migration %s stopped (%s); letting processes that wait for the migration lock "
                            "through, then running it again", plan.label, exc)
                return plan
        log.info("applied migration %s", plan.label)
        applied_now.append(plan.version)
    return None


async def _apply_outside_transaction(conn: Connection, queries: Mapping[str, Query], plan: MigrationPlan) -> None:
    if plan.indexes:
        for row in await conn.run(queries["migration_invalid_indexes"], list(plan.indexes)):
            log.warning("migration %s: dropping index %s, left INVALID by an interrupted run, to build it again",
                        plan.label, row["name"])
            await conn.execute_script(row["drop_statement"])
    for statement in plan.statements:
        await conn.execute_script(statement)
    await conn.run(queries["migration_record"], plan.version, plan.name)
