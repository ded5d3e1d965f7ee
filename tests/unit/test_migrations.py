"""Safe upgrades without a database: how migrations are planned (in a transaction, or statement by
statement), the refusal of a newer schema, and statuses from a later release read as they are."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pytest

from taskd import builtin_tasks, migrations, sql  # noqa: F401  (builtin_tasks registers the built-in types)
from taskd.config import Settings
from taskd.errors import SchemaTooNew, SqlFileError
from taskd.http import create_app
from taskd.migrations import MigrationPlan, check_not_newer, plan_migration, split_statements
from taskd.models import CANCELLABLE, FINISHED, RETRYABLE, Task, TaskStatus, TaskSummary, UnknownStatus, WorkerGauge
from taskd.registry import default_registry
from taskd.rows import parse_status

from .fakes import FakeStore

MARKER = "-- taskd: no-transaction"


def plan(text: str, version: int = 9) -> MigrationPlan:
    return plan_migration(sql.Migration(version, "probe", text.strip()))


# -- planning ------------------------------------------------------------------------------------


def test_a_migration_runs_in_a_transaction_unless_its_first_line_says_otherwise() -> None:
    body = "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON taskd.tasks (id);"
    assert plan(body).transactional
    assert plan(f"-- a comment\n{MARKER}\n{body}").transactional, "only the first line counts"
    outside = plan(f"{MARKER}\n{body}")
    assert not outside.transactional and outside.statements == (f"{MARKER}\n{body}",)
    assert outside.indexes == ("a_idx",)
    assert not plan(f"--taskd:no-transaction  \n{body}").transactional


def test_statements_split_at_semicolons_outside_quotes_and_comments() -> None:
    text = """-- taskd: no-transaction
-- a comment; with a semicolon
CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON taskd.tasks (task_type) WHERE task_type <> 'x;y''z';
/* a block; /* nested; */ still comment; */
COMMENT ON INDEX taskd.a_idx IS 'it''s; fine';
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS b_idx ON taskd.tasks ("odd;name");
;
-- trailing comment without a semicolon
"""
    split = split_statements(text, "x.sql")
    assert [s for s, _ in split] == [
        "-- taskd: no-transaction\n-- a comment; with a semicolon\nCREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx "
        "ON taskd.tasks (task_type) WHERE task_type <> 'x;y''z';",
        "/* a block; /* nested; */ still comment; */\nCOMMENT ON INDEX taskd.a_idx IS 'it''s; fine';",
        'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS b_idx ON taskd.tasks ("odd;name");',
    ]
    assert [code.split()[0] for _, code in split] == ["CREATE", "COMMENT", "CREATE"], "comments blanked out"
    assert plan(text).indexes == ("a_idx", "b_idx")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("CREATE FUNCTION taskd.f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;", "dollar-quoted"),
        ("CREATE FUNCTION taskd.f() RETURNS int LANGUAGE sql AS $body$ SELECT 1 $body$;", "dollar-quoted"),
        ("COMMENT ON TABLE taskd.tasks IS E'it\\'s';", "E'' strings"),
        ("CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON taskd.tasks (id)", "does not end with ';'"),
        ("COMMENT ON TABLE taskd.tasks IS 'never closed;", "quote is never closed"),
        ("/* never closed; CREATE INDEX a_idx ON taskd.tasks (id);", "comment is never closed"),
        ("CREATE INDEX CONCURRENTLY a_idx ON taskd.tasks (id);", "IF NOT EXISTS"),
        ("CREATE UNIQUE INDEX a_idx ON taskd.tasks (id);", "IF NOT EXISTS"),
        ("CREATE INDEX CONCURRENTLY ON taskd.tasks (id);", "IF NOT EXISTS"),
        ('CREATE INDEX CONCURRENTLY IF NOT EXISTS "A_idx" ON taskd.tasks (id);', "plain lower-case identifier"),
        ("DROP INDEX CONCURRENTLY taskd.a_idx;", "IF EXISTS"),
        ("-- only a comment", "no statements"),
    ],
)
def test_a_no_transaction_migration_that_cannot_run_twice_safely_is_refused(body: str, problem: str) -> None:
    with pytest.raises(SqlFileError, match=problem) as caught:
        plan(f"{MARKER}\n{body}")
    assert str(caught.value).startswith("0009_probe.sql: ")


def test_the_same_text_in_a_transaction_is_left_to_postgresql() -> None:
    body = "CREATE FUNCTION taskd.f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;"
    planned = plan(body)
    assert planned.transactional and planned.text == body and planned.statements == ()


def test_every_shipped_migration_can_be_planned() -> None:
    plans = [plan_migration(m) for m in sql.migrations()]
    assert [p.version for p in plans] == list(range(1, len(plans) + 1))
    for planned in plans:
        if not planned.transactional:
            assert planned.statements, planned.label


def test_the_migration_queries_are_declared() -> None:
    assert migrations.QUERIES_USED <= set(sql.queries())


# -- a newer schema --------------------------------------------------------------------------------


def test_a_database_ahead_of_this_release_is_refused_with_one_line() -> None:
    plans = [plan(f"SELECT {v};", v) for v in (1, 2, 3)]
    check_not_newer({1, 2}, plans)
    check_not_newer({1, 2, 3}, plans)
    with pytest.raises(SchemaTooNew) as caught:
        check_not_newer({1, 2, 3, 4, 5}, plans)
    assert str(caught.value) == ("the database's schema is at version 5, newer than this taskd (3): upgrade "
                                 "taskd, or point it at another database")
    assert (caught.value.database_version, caught.value.known_version) == (5, 3)


# -- statuses a later release added -------------------------------------------------------------------


def test_an_unknown_status_is_read_as_it_is_and_belongs_to_no_set(caplog: pytest.LogCaptureFixture) -> None:
    assert parse_status("running") is TaskStatus.RUNNING
    with caplog.at_level(logging.WARNING, logger="taskd.rows"):
        first = parse_status("unit_test_waiting_on_parent")
        again = parse_status("unit_test_waiting_on_parent")
    assert isinstance(first, UnknownStatus) and first == again == "unit_test_waiting_on_parent"
    assert first.value == "unit_test_waiting_on_parent" and json.dumps(first) == '"unit_test_waiting_on_parent"'
    assert first not in FINISHED | CANCELLABLE | RETRYABLE
    warnings = [r for r in caplog.records if "unit_test_waiting_on_parent" in r.getMessage()]
    assert len(warnings) == 1, "one warning per status, not one per row"


class NewerRowsStore(FakeStore):
    """The fake store, holding rows whose status a later release wrote."""

    foreign = "unit_test_paused_by_newer"

    def _task(self, row: dict[str, Any]) -> Task:
        if row["status"] != self.foreign:
            return super()._task(row)
        return dataclasses.replace(super()._task({**row, "status": "pending"}), status=parse_status(row["status"]))

    def _summary(self, row: dict[str, Any]) -> TaskSummary:
        if row["status"] != self.foreign:
            return super()._summary(row)
        return dataclasses.replace(super()._summary({**row, "status": "pending"}),
                                   status=parse_status(row["status"]))


async def test_the_api_reports_an_unknown_status_as_it_is() -> None:
    store = NewerRowsStore()
    foreign = store.add("echo", {"n": 1})
    store.tasks[foreign]["status"] = NewerRowsStore.foreign
    plain = store.add("echo", {"n": 2})
    client = create_app(store, default_registry, Settings(), WorkerGauge(5)).test_client()  # type: ignore[arg-type]

    one = await client.get(f"/tasks/{foreign}")
    assert one.status_code == 200 and (await one.get_json())["status"] == NewerRowsStore.foreign
    listed = await client.get("/tasks")
    assert listed.status_code == 200
    assert [(t["id"], t["status"]) for t in (await listed.get_json())["items"]] == [
        (plain, "pending"), (foreign, NewerRowsStore.foreign)]
    full = await client.get("/tasks?full=true")
    assert full.status_code == 200
    assert [t["status"] for t in (await full.get_json())["items"]] == ["pending", NewerRowsStore.foreign]
    result = await client.get(f"/tasks/{foreign}/result")
    assert result.status_code == 202 and (await result.get_json())["status"] == NewerRowsStore.foreign
