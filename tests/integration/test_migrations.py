"""Safe upgrades on a real PostgreSQL: the refusal of a newer schema before anything is applied,
migrations that run outside a transaction (CREATE INDEX CONCURRENTLY) and survive being cut off,
the migration lock taken without waiting inside a statement, and rows with a status a later
release added, read by this one without errors and never claimed."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import trio
import trio_asyncio

from taskd import db, migrations, sql
from taskd.errors import DatabaseError, SchemaTooNew
from taskd.migrations import apply_migrations
from taskd.models import NewTask, TaskStatus, UnknownStatus
from taskd.store import Store

LOCK_KEY = 499851160420  # as in sql/queries/migrations.sql
FOREIGN = "integration_paused_by_newer"  # a status "a later release" adds


def write_migrations(root: pathlib.Path, *bodies: str) -> list[sql.Migration]:
    """Migration files 0001.. under root/migrations, loaded the way taskd loads its own."""
    folder = root / "migrations"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.sql"):
        old.unlink()
    for version, body in enumerate(bodies, start=1):
        (folder / f"{version:04d}_step{version}.sql").write_text(body)
    return sql.load_migrations(root)


async def raw(url: str, work: Callable[[asyncpg.Connection], Any]) -> Any:
    """Run work(conn) on a plain asyncpg connection of the test's own."""
    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return await trio_asyncio.aio_as_trio(run)()


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return await conn.fetch(query, *args)

    return await raw(url, work)


@pytest.fixture
async def migrator(aio_loop: object, empty_database_url: str) -> AsyncIterator[db.Connection]:
    """The connection a starting process migrates on, in a database with no taskd schema."""
    conn = await db.connect(empty_database_url, server_settings={"deadlock_timeout": "100ms"})
    try:
        yield conn
    finally:
        await conn.close()


TABLE = "CREATE SCHEMA IF NOT EXISTS taskd; CREATE TABLE taskd.probe (x int NOT NULL);"
ROWS = "INSERT INTO taskd.probe SELECT g % 5 FROM generate_series(1, 2000) g;"
UNIQUE_X = "-- taskd: no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS probe_x_key ON taskd.probe (x);\n"


async def ledger(url: str) -> list[int]:
    return [r["version"] for r in await fetch(url, "SELECT version FROM taskd.migrations ORDER BY version")]


async def index_state(url: str, name: str) -> bool | None:
    """Whether the index is valid (None: there is none)."""
    rows = await fetch(url, "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                            "WHERE c.relname = $1", name)
    return rows[0]["indisvalid"] if rows else None


# -- a newer schema ----------------------------------------------------------------------------------


async def test_a_newer_schema_is_refused_before_anything_is_applied(
        migrator: db.Connection, empty_database_url: str, tmp_path: pathlib.Path) -> None:
    first, second = write_migrations(tmp_path, TABLE, "CREATE TABLE taskd.second (y int);")
    assert await apply_migrations(migrator, [first]) == [1]
    await fetch(empty_database_url, "INSERT INTO taskd.migrations (version, name) VALUES (3, 'from_the_future')")

    with pytest.raises(SchemaTooNew) as caught:
        await apply_migrations(migrator, [first, second])
    assert (caught.value.database_version, caught.value.known_version) == (3, 2)
    assert await ledger(empty_database_url) == [1, 3]
    assert await fetch(empty_database_url, "SELECT to_regclass('taskd.second') AS t") == [(None,)], \
        "migration 2 was not applied"
    held = await fetch(empty_database_url, "SELECT pg_try_advisory_lock($1) AS ok", LOCK_KEY)
    assert held[0]["ok"], "the migration lock was released"


async def test_the_shipped_migrations_refuse_a_ledger_from_a_later_release(
        migrator: db.Connection, empty_database_url: str) -> None:
    shipped = len(sql.migrations())
    assert await apply_migrations(migrator) == list(range(1, shipped + 1))
    await fetch(empty_database_url, "INSERT INTO taskd.migrations (version, name) VALUES ($1, 'next')", shipped + 1)
    with pytest.raises(SchemaTooNew, match=f"at version {shipped + 1}, newer than this taskd \\({shipped}\\)"):
        await apply_migrations(migrator)


# -- outside a transaction -----------------------------------------------------------------------------


async def test_a_no_transaction_migration_builds_its_index_concurrently_and_is_recorded(
        migrator: db.Connection, empty_database_url: str, tmp_path: pathlib.Path) -> None:
    body = ("-- taskd: no-transaction\n"
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS probe_x_idx ON taskd.probe (x);\n"
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS probe_x_desc_idx ON taskd.probe (x DESC);\n")
    assert await apply_migrations(migrator, write_migrations(tmp_path, TABLE, ROWS, body)) == [1, 2, 3]
    assert await index_state(empty_database_url, "probe_x_idx") is True
    assert await index_state(empty_database_url, "probe_x_desc_idx") is True
    assert await ledger(empty_database_url) == [1, 2, 3]


async def test_a_migration_cut_off_halfway_is_not_recorded_and_runs_again_from_the_start(
        migrator: db.Connection, empty_database_url: str, tmp_path: pathlib.Path) -> None:
    broken = ("-- taskd: no-transaction\n"
              "CREATE INDEX CONCURRENTLY IF NOT EXISTS probe_x_idx ON taskd.probe (x);\n"
              "ALTER TABLE taskd.probe ADD COLUMN IF NOT EXISTS y int CHECK (y > 0) DEFAULT 0;\n")
    with pytest.raises(DatabaseError, match="check"):
        await apply_migrations(migrator, write_migrations(tmp_path, TABLE, ROWS, broken))
    assert await ledger(empty_database_url) == [1, 2], "a migration is recorded only once all of it ran"
    assert await index_state(empty_database_url, "probe_x_idx") is True, "its first statement ran"

    fixed = broken.replace("DEFAULT 0", "DEFAULT 1")
    assert await apply_migrations(migrator, write_migrations(tmp_path, TABLE, ROWS, fixed)) == [3]
    assert await ledger(empty_database_url) == [1, 2, 3]


async def test_an_index_left_invalid_by_an_interrupted_build_is_dropped_and_built_again(
        migrator: db.Connection, empty_database_url: str, tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # A unique index over duplicates fails after the catalog entry is made: the build
    # leaves an INVALID index behind, as a build cut off by a crash or a kill does.
    with pytest.raises(DatabaseError, match="UniqueViolation|duplicate"):
        await apply_migrations(migrator, write_migrations(tmp_path, TABLE, ROWS, UNIQUE_X))
    assert await index_state(empty_database_url, "probe_x_key") is False
    assert await ledger(empty_database_url) == [1, 2]

    await fetch(empty_database_url, "DELETE FROM taskd.probe WHERE ctid NOT IN "
                                    "(SELECT min(ctid) FROM taskd.probe GROUP BY x)")
    with caplog.at_level(logging.WARNING, logger="taskd.migrations"):
        assert await apply_migrations(migrator, write_migrations(tmp_path, TABLE, ROWS, UNIQUE_X)) == [3]
    assert await index_state(empty_database_url, "probe_x_key") is True, "IF NOT EXISTS alone would skip it"
    assert any("left INVALID" in r.getMessage() and "probe_x_key" in r.getMessage() for r in caplog.records)
    unique = await fetch(empty_database_url, "SELECT count(*) AS n FROM pg_index i JOIN pg_class c "
                                             "ON c.oid = i.indexrelid WHERE c.relname = 'probe_x_key' "
                                             "AND i.indisunique AND i.indisvalid")
    assert unique[0]["n"] == 1


# -- the lock ----------------------------------------------------------------------------------------------


async def lock_holders(url: str) -> int:
    rows = await fetch(url, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted "
                            "AND objid = ($1::bigint & 4294967295)::oid AND database = "
                            "(SELECT oid FROM pg_database WHERE datname = current_database())", LOCK_KEY)
    return int(rows[0]["n"])


async def wait_for(predicate: Callable[[], Any]) -> None:
    """Until predicate() is true; the caller bounds the wait."""
    while not await predicate():  # noqa: ASYNC110  (the condition is in the database or the log)
        await trio.sleep(0.02)


async def test_a_process_waits_for_the_lock_without_waiting_inside_a_statement(
        migrator: db.Connection, empty_database_url: str, tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    plans = write_migrations(tmp_path, TABLE)
    holder = await db.connect(empty_database_url)
    try:
        await holder.execute_script(f"SELECT pg_advisory_lock({LOCK_KEY})")
        done = trio.Event()
        result: list[list[int]] = []

        async def migrate() -> None:
            result.append(await apply_migrations(migrator, plans))
            done.set()

        with caplog.at_level(logging.INFO, logger="taskd.migrations"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(migrate)

                async def told() -> bool:
                    return any("another process is migrating" in r.getMessage() for r in caplog.records)

                with trio.fail_after(20):
                    await wait_for(told)
                blocked = await fetch(empty_database_url, "SELECT count(*) AS n FROM pg_locks "
                                                          "WHERE locktype = 'advisory' AND NOT granted")
                assert blocked[0]["n"] == 0, "nobody waits for the lock inside a statement"
                assert not done.is_set()
                await holder.execute_script(f"SELECT pg_advisory_unlock({LOCK_KEY})")
                with trio.fail_after(20):
                    await done.wait()
        assert result == [[1]]
    finally:
        await holder.close()


async def test_a_concurrent_build_deadlocked_with_an_older_process_waiting_for_the_lock_runs_again(
        migrator: db.Connection, empty_database_url: str, tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A process of an earlier release waits for the lock inside its statement; the index build
    must outwait that statement's snapshot while it waits for the build's lock. PostgreSQL fails
    the build (the later waiter) as a deadlock; it is run again once the waiter got through."""
    slow_index = ("-- taskd: no-transaction\n"
                  "SELECT pg_sleep(1);\n"
                  "CREATE INDEX CONCURRENTLY IF NOT EXISTS probe_slow_idx ON taskd.probe (x);\n")
    plans = write_migrations(tmp_path, TABLE, ROWS, slow_index)
    assert await apply_migrations(migrator, plans[:2]) == [1, 2]
    waiter_done: list[str] = []

    async def old_release_start() -> None:
        async def work(conn: asyncpg.Connection) -> None:
            await conn.execute("SET deadlock_timeout = '100ms'")
            await conn.execute(f"SELECT pg_advisory_lock({LOCK_KEY})")  # what taskd before this release does
            await conn.execute(f"SELECT pg_advisory_unlock({LOCK_KEY})")
            waiter_done.append("got the lock")

        await raw(empty_database_url, work)

    result: list[list[int]] = []

    async def migrate() -> None:
        result.append(await apply_migrations(migrator, plans))

    with caplog.at_level(logging.WARNING, logger="taskd.migrations"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(migrate)

            async def locked() -> bool:
                return await lock_holders(empty_database_url) == 1

            with trio.fail_after(20):
                await wait_for(locked)
            nursery.start_soon(old_release_start)
    assert result == [[3]] and waiter_done == ["got the lock"]
    assert await index_state(empty_database_url, "probe_slow_idx") is True
    stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert stopped and "Deadlock" in stopped[0], caplog.text
    assert migrations.NO_TRANSACTION_RETRIES >= 1


# -- statuses a later release added ------------------------------------------------------------------------


async def add_foreign_status(url: str) -> tuple[int, int]:
    """What a later release's migration might do: allow a new status, and write a row with it
    (due, in the default queue, of a type this process handles); and one plain pending row."""
    async def work(conn: asyncpg.Connection) -> tuple[int, int]:
        allowed = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'tasks_status_check'")
        await conn.execute("ALTER TABLE taskd.tasks DROP CONSTRAINT tasks_status_check")
        await conn.execute("ALTER TABLE taskd.tasks ADD CONSTRAINT tasks_status_check "
                           + allowed.replace("'expired'::text", f"'expired'::text, '{FOREIGN}'::text"))
        foreign = await conn.fetchval(
            "INSERT INTO taskd.tasks (task_type, status, max_retries, timeout_seconds, run_at) "
            "VALUES ('echo', $1, 3, 30, now() - interval '1 minute') RETURNING id", FOREIGN)
        plain = await conn.fetchval(
            "INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds) VALUES ('echo', 3, 30) RETURNING id")
        return int(foreign), int(plain)

    return await raw(url, work)


async def test_rows_with_a_status_from_a_later_release_are_read_as_they_are_and_never_claimed(
        store: Store, database_url: str) -> None:
    foreign, plain = await add_foreign_status(database_url)

    claimed = await store.claim(10, ["echo"], 30)
    assert [c.id for c in claimed] == [plain], "the claim takes only statuses it knows"
    assert await store.claim(10, ["echo"], 30) == []

    task = await store.get(foreign)
    assert task is not None and isinstance(task.status, UnknownStatus) and task.status.value == FOREIGN
    assert not task.finished
    summaries = await store.list_summaries(status=None, task_type=None, before_id=None, limit=10)
    assert [(s.id, s.status) for s in summaries] == [(plain, TaskStatus.RUNNING), (foreign, FOREIGN)]
    page = await store.list_tasks(status=None, task_type=None, before_id=None, limit=10)
    assert [t.status for t in page] == [TaskStatus.RUNNING, FOREIGN]
    assert await store.list_summaries(status="pending", task_type=None, before_id=None, limit=10) == []

    assert await store.cancel(foreign) == (False, task)
    assert await store.retry(foreign) == (False, task)
    assert await store.expire_due() == [] and await store.rescue_expired() == []
    untouched = await fetch(database_url, "SELECT status, attempts FROM taskd.tasks WHERE id = $1", foreign)
    assert [tuple(r) for r in untouched] == [(FOREIGN, 0)]
    assert await store.delete(foreign) == FOREIGN


async def test_a_repeated_idempotent_submit_reports_the_holders_unknown_status(
        store: Store, database_url: str) -> None:
    await add_foreign_status(database_url)
    task = NewTask("echo", "{}", 3, 30.0, idempotency_key="upgrade-key", idempotency_hash="digest")
    first = await store.submit(task)
    await fetch(database_url, "UPDATE taskd.tasks SET status = $1 WHERE id = $2", FOREIGN, first.id)
    again = await store.submit(task)
    assert (again.id, again.created, again.status) == (first.id, False, FOREIGN)
