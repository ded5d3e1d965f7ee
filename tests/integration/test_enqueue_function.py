"""The SQL function taskd.enqueue() on real PostgreSQL (issue 8, item 4): it joins the
caller's transaction, refuses what POST /tasks refuses with the same messages, takes its
defaults from the handler and then the server settings as published, is idempotent under
concurrency, wakes the workers, and makes the same row (and the same idempotency and
unique_for keys) as the API; the Python clients call it."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import trio
import trio_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskd
from taskd import (
    builtin_tasks,  # noqa: F401  (registers the built-in types)
    client,
    jsontext,
)
from taskd.config import Settings
from taskd.errors import DatabaseUnavailable, IdempotencyConflict, InvalidTask
from taskd.http import create_app
from taskd.models import WorkerGauge
from taskd.registry import Registry, default_registry, unique_key
from taskd.store import Store

UTC = dt.UTC
BUILTIN = ("data_processing", "echo", "sleep")
# Columns that differ between two tasks made from one request at different moments.
MOMENTS = {"id", "created_at", "run_at", "expires_at", "idempotency_key"}


@contextlib.contextmanager
def connect(url: str, **options: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, **options) as conn:
        yield conn


class Raw(str):
    """A payload sent as this JSON text, as it is."""


def call(conn: psycopg.Connection[Any], task_type: Any, payload: Any = None, **options: Any) -> int:
    """SELECT taskd.enqueue(...) with named arguments, as any driver would send it (None: NULL)."""
    named = "".join(f", {name} => %s" for name in options)
    text = payload if payload is None or isinstance(payload, Raw) else json.dumps(payload)
    row = conn.execute(f"SELECT taskd.enqueue(%s, %s::jsonb{named})",  # type: ignore[call-overload]
                       [task_type, text, *options.values()]).fetchone()
    return int(row[0])


def task_row(conn: psycopg.Connection[Any], task_id: int) -> dict[str, Any]:
    cursor = conn.execute("SELECT * FROM taskd.tasks WHERE id = %s", [task_id])
    names = [column.name for column in cursor.description or ()]
    row = cursor.fetchone()
    assert row is not None, f"no task {task_id}"
    return dict(zip(names, row, strict=True))


def count_tasks(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM taskd.tasks").fetchone()
        return int(row[0])


def with_handlers(**handlers: dict[str, Any]) -> Registry:
    """The built-in types, plus a handler per keyword with those defaults."""
    registry = Registry()
    for handler in default_registry:
        if handler.name in BUILTIN:
            registry.register(handler.name, handler.fn, validate=handler.validate)
    for name, defaults in handlers.items():
        registry.register(name, lambda payload, ctx: None, **defaults)
    return registry


# -- transactions, notification ----------------------------------------------------------------------


async def test_a_rolled_back_enqueue_leaves_nothing_and_a_committed_one_wakes_and_is_claimed(store: Store) -> None:
    signal = store.work_signal()
    with connect(store.url) as conn:
        with conn.transaction(force_rollback=True):
            gone = taskd.enqueue_sync(conn, "echo", {"rolled": "back"})
            assert task_row(conn, gone)["payload"] == {"rolled": "back"}  # there, inside the transaction
        assert count_tasks(store.url) == 0
        signal.clear()
        with conn.transaction():
            kept = call(conn, "echo", {"kept": True})
        with trio.fail_after(5):
            await signal.wait()  # the NOTIFY of the insert trigger, delivered at commit
    (claimed,) = await store.claim(5, ["echo"], 30)
    assert (claimed.id, json.loads(claimed.payload_json)) == (kept, {"kept": True})


def test_delays_and_expiry_count_from_the_call_not_from_the_start_of_the_transaction(database_url: str) -> None:
    with connect(database_url) as conn:
        conn.execute("SELECT pg_sleep(0.5)")  # the caller's transaction has been open a while
        row = task_row(conn, call(conn, "echo", delay_seconds=10, expires_in_seconds=20))
    assert row["run_at"] - row["created_at"] >= dt.timedelta(seconds=10.5)
    assert row["expires_at"] - row["run_at"] == dt.timedelta(seconds=10)


# -- every refusal, with the API's messages ----------------------------------------------------------

LATER = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"task_type": ""}, "task_type", "task_type must be a string of 1 to 200 characters"),
    ({"task_type": "x" * 201}, "task_type", "task_type must be a string of 1 to 200 characters"),
    ({"payload": [1]}, "payload", "payload must be a JSON object, not "),
    ({"payload": "text"}, "payload", "payload must be a JSON object, not "),
    ({"max_retries": -1}, "max_retries", "max_retries must be a whole number from 0 to 1000"),
    ({"max_retries": 1001}, "max_retries", "max_retries must be a whole number from 0 to 1000"),
    ({"timeout_seconds": 0}, "timeout_seconds", "timeout_seconds must be > 0 and <= 604800"),
    ({"timeout_seconds": 604800.5}, "timeout_seconds", "timeout_seconds must be > 0 and <= 604800"),
    ({"priority": 101}, "priority", "priority must be a whole number from -100 to 100"),
    ({"priority": -(2**40)}, "priority", "priority must be a whole number from -100 to 100"),
    ({"run_at": LATER, "delay_seconds": 5}, "run_at", "give run_at or delay_seconds, not both"),
    ({"delay_seconds": -1}, "delay_seconds", "delay_seconds must be from 0 to 31536000"),
    ({"delay_seconds": 31536001}, "delay_seconds", "delay_seconds must be from 0 to 31536000"),
    ({"queue": "Bad Queue"}, "queue", "queue must be 1 to 64 of a-z, 0-9, '_', '.' and '-'"),
    ({"queue": "q" * 65}, "queue", "queue must be 1 to 64 of a-z, 0-9, '_', '.' and '-'"),
    ({"queue": "mail\n"}, "queue", "queue must be 1 to 64 of a-z, 0-9, '_', '.' and '-'"),
    ({"expires_at": LATER, "expires_in_seconds": 5}, "expires_at", "give expires_at or expires_in_seconds, not both"),
    ({"expires_in_seconds": 0}, "expires_in_seconds", "expires_in_seconds must be > 0 and <= 31536000"),
    ({"expires_at": dt.datetime(2001, 1, 1, tzinfo=UTC)}, "expires_at", "expires_at is in the past"),
    ({"run_at": LATER, "expires_at": LATER}, "expires_at", "the task would expire before it may start"),
    ({"delay_seconds": 20, "expires_in_seconds": 10}, "expires_in_seconds", "the task would expire before"),
    ({"idempotency_key": ""}, "idempotency_key", "idempotency_key must be 1 to 200 characters (no NUL)"),
    ({"idempotency_key": "k" * 201}, "idempotency_key", "idempotency_key must be 1 to 200 characters (no NUL)"),
    ({"task_type": "nope"}, "task_type", "unknown task_type 'nope'; known types: data_processing, echo, sleep"),
]
# Only SQL can send these: a NULL type, JSON null, NaN and infinities, times Python cannot hold.
SQL_ONLY_REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"task_type": None}, "task_type", "task_type must be a string of 1 to 200 characters"),
    ({"payload": Raw("null")}, "payload", "payload must be a JSON object, not null"),
    ({"timeout_seconds": float("nan")}, "timeout_seconds", "timeout_seconds must be > 0"),
    ({"timeout_seconds": float("inf")}, "timeout_seconds", "timeout_seconds must be > 0"),
    ({"delay_seconds": float("nan")}, "delay_seconds", "delay_seconds must be from 0"),
    ({"expires_in_seconds": float("nan")}, "expires_in_seconds", "expires_in_seconds must be > 0"),
    ({"run_at": "infinity"}, "run_at", "run_at is out of range"),
    ({"run_at": "10000-01-01T00:00:00Z"}, "run_at", "run_at is out of range"),
    ({"expires_at": "-infinity"}, "expires_at", "expires_at is out of range"),
]


@pytest.mark.parametrize(("options", "field", "message"), REFUSALS + SQL_ONLY_REFUSALS)
def test_every_invalid_argument_is_refused_naming_it(database_url: str, options: dict[str, Any], field: str,
                                                     message: str) -> None:
    args = {"task_type": "echo", "payload": {}, **options}
    with connect(database_url) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
            call(conn, args.pop("task_type"), args.pop("payload"), **args)
    assert refused.value.sqlstate == "22023" and refused.value.diag.column_name == field
    assert (refused.value.diag.message_primary or "").startswith(f"invalid_task: {message}")
    assert count_tasks(database_url) == 0


@pytest.mark.parametrize(("options", "field", "message"), REFUSALS)
def test_the_refusals_are_the_apis_own(options: dict[str, Any], field: str, message: str) -> None:
    args = {"task_type": "echo", "payload": {}, **options}
    with pytest.raises(InvalidTask) as python:
        default_registry.new_task(Settings(), args.pop("task_type"), args.pop("payload"), **args)
    assert python.value.field == field and python.value.message.startswith(message)


def test_the_sync_client_raises_invalid_task_with_the_field(database_url: str) -> None:
    with connect(database_url) as conn, pytest.raises(InvalidTask) as refused:
        taskd.enqueue_sync(conn, "echo", {}, priority=500)
    assert refused.value.field == "priority" and refused.value.message.startswith("priority must be")


# -- idempotency ---------------------------------------------------------------------------------------


def test_an_idempotency_key_finds_its_task_or_reports_a_conflict(database_url: str) -> None:
    with connect(database_url) as conn:
        first = call(conn, "echo", {"a": 1}, idempotency_key="k", priority=3)
        conn.commit()
        assert call(conn, "echo", {"a": 1}, idempotency_key="k", priority=3) == first
        with pytest.raises(psycopg.Error) as conflict:
            call(conn, "echo", {"a": 2}, idempotency_key="k", priority=3)
        conn.rollback()
        assert conflict.value.sqlstate == "P0409" and conflict.value.diag.message_detail == f"task_id={first}"
        assert (conflict.value.diag.message_primary or "").startswith("idempotency_conflict: idempotency key 'k'")
        # The request as given, before defaults, as the API digests it: 0 is not "none given".
        with pytest.raises(IdempotencyConflict) as python:
            taskd.enqueue_sync(conn, "echo", {"a": 1}, idempotency_key="k", priority=3, max_retries=3)
        assert (python.value.key, python.value.task_id) == ("k", first)
    assert count_tasks(database_url) == 1


@pytest.mark.parametrize("holder_commits", [True, False])
def test_concurrent_duplicates_make_exactly_one_task(database_url: str, holder_commits: bool) -> None:
    """Seven callers send one key while an eighth holds it uncommitted: they wait for it, then
    find its task (or, if it rolls back, one of them makes it and the others find that one)."""
    results: list[int] = []
    errors: list[BaseException] = []

    def repeat() -> None:
        try:
            with connect(database_url, autocommit=True) as conn:
                results.append(call(conn, "echo", {"n": 1}, idempotency_key="race"))
        except BaseException as exc:
            errors.append(exc)

    with connect(database_url) as holder, connect(database_url, autocommit=True) as watcher:
        held = call(holder, "echo", {"n": 1}, idempotency_key="race")
        threads = [threading.Thread(target=repeat) for _ in range(7)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every one of them blocked on the holder's row
            waiting = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND wait_event_type = 'Lock'").fetchone()[0]
            if waiting == 7:
                break
            time.sleep(0.02)
        assert waiting == 7
        if holder_commits:
            holder.commit()
        else:
            holder.rollback()
        for thread in threads:
            thread.join(30)
    assert errors == []
    with connect(database_url) as conn:
        rows = conn.execute("SELECT id FROM taskd.tasks WHERE idempotency_key = 'race'").fetchall()
    assert len(rows) == 1 and count_tasks(database_url) == 1
    assert set(results) == {rows[0][0]} and (rows[0][0] == held) == holder_commits


# -- defaults: the handler's, then the server's settings, as published ----------------------------------


async def test_defaults_come_from_the_handler_then_the_server_settings_last_start_wins(store: Store) -> None:
    registry = with_handlers(mail={"queue": "emails", "priority": 5, "max_retries": 1, "timeout": 12},
                             plain={})
    await store.publish_defaults(Settings(max_retries=9, task_timeout=42), registry)
    columns = ("queue", "priority", "max_retries", "timeout_seconds")
    with connect(store.url) as conn:
        mail, plain = call(conn, "mail"), call(conn, "plain")
        given = call(conn, "mail", queue="urgent", priority=-1, max_retries=0, timeout_seconds=1.5)
        assert [task_row(conn, mail)[c] for c in columns] == ["emails", 5, 1, 12.0]
        assert [task_row(conn, plain)[c] for c in columns] == ["default", 0, 9, 42.0]
        assert [task_row(conn, given)[c] for c in columns] == ["urgent", -1, 0, 1.5]
        assert conn.execute("SELECT published_by FROM taskd.settings").fetchone()[0] == store.process_id
        conn.commit()
    # Another process starts with other settings and another handler for mail: it wins.
    await store.publish_defaults(Settings(max_retries=2, task_timeout=7), with_handlers(mail={"priority": 7}))
    with connect(store.url) as conn:
        assert [task_row(conn, call(conn, "mail"))[c] for c in columns] == ["default", 7, 2, 7.0]
        assert task_row(conn, call(conn, "plain"))["max_retries"] == 2, "plain stays known"


async def test_a_start_that_cannot_publish_warns_and_serves_on(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    async def unavailable(*args: Any) -> None:
        raise DatabaseUnavailable("ConnectionDoesNotExistError: connection was closed in the middle of operation")

    monkeypatch.setattr(store._pool, "run", unavailable)
    assert await store.publish_defaults(Settings(max_retries=9), with_handlers()) is False
    assert "could not publish this process's settings" in caplog.text
    monkeypatch.undo()
    assert await store.publish_defaults(Settings(max_retries=9), with_handlers()) is True


async def test_the_migration_seeds_what_this_release_publishes(store: Store) -> None:
    def published() -> tuple[Any, Any]:
        with connect(store.url) as conn:
            settings_row = conn.execute("SELECT * FROM taskd.settings").fetchall()
            types = conn.execute("SELECT task_type, queue, priority, max_retries, timeout_seconds, unique_for, "
                                 "validates_in_python FROM taskd.task_types ORDER BY 1").fetchall()
            return [row[1:-2] for row in settings_row], types

    seeded = published()
    await store.publish_defaults(Settings(), with_handlers())
    assert published() == seeded


# -- parity with the HTTP API -------------------------------------------------------------------------

REQUESTS: list[dict[str, Any]] = [
    {"task_type": "mail", "payload": {"to": "a@example.com"}},
    {"task_type": "plain", "payload": {"n": 1.5}, "priority": -3, "queue": "q.1", "max_retries": 0,
     "timeout_seconds": 7.5},
    {"task_type": "plain", "run_at": "2031-01-02T03:04:05.123456+01:00", "expires_at": "2031-01-03T00:00:00Z"},
    {"task_type": "plain", "delay_seconds": 30, "expires_in_seconds": 90},
    {"task_type": "plain", "payload": {"é": "ü\n\"", "list": [1, 2.5, None, True, 1e-7], "nested": {"b": 1, "a": 2}},
     "idempotency_key": "parity"},
]


def as_sql_options(body: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in body.items() if k not in ("task_type", "payload")}
    for name in ("run_at", "expires_at"):
        if name in options:
            options[name] = dt.datetime.fromisoformat(options[name])
    return options


async def test_the_api_and_the_function_make_the_same_row(store: Store) -> None:
    registry = with_handlers(mail={"queue": "emails", "priority": 5, "max_retries": 1, "timeout": 12}, plain={})
    server = Settings(max_retries=9, task_timeout=42)
    await store.publish_defaults(server, registry)
    http = create_app(store, registry, server, WorkerGauge(0)).test_client()
    with connect(store.url, autocommit=True) as conn:
        for body in REQUESTS:
            response = await http.post("/tasks", json=body)
            assert response.status_code == 201, await response.get_data()
            api = task_row(conn, (await response.get_json())["id"])
            options = as_sql_options(body)
            if "idempotency_key" in options:
                options["idempotency_key"] = "parity-sql"  # a key of its own: a new task, the same digest
            ours = task_row(conn, call(conn, body["task_type"], body.get("payload", {}), **options))
            assert {k: v for k, v in ours.items() if k not in MOMENTS} == {
                k: v for k, v in api.items() if k not in MOMENTS}, body
            for name in ("run_at", "expires_at"):
                if api[name] is None or name in body:
                    assert ours[name] == api[name], (name, body)
                else:  # relative to now: the same distance from the moment each was made
                    assert abs((ours[name] - ours["created_at"]) - (api[name] - api["created_at"])) < dt.timedelta(
                        seconds=1)
        # One key through both ways: the same request finds the API's task, another conflicts.
        keyed = REQUESTS[-1]
        api_id = (await (await http.post("/tasks", json=keyed)).get_json())["id"]
        assert call(conn, "plain", keyed["payload"], idempotency_key="parity") == api_id
        with pytest.raises(psycopg.Error) as conflict:
            call(conn, "plain", {"other": 1}, idempotency_key="parity")
        assert conflict.value.sqlstate == "P0409"
        repeat = await http.post("/tasks", json={**keyed, "idempotency_key": "parity-sql"})
        assert repeat.status_code == 200, "and the API finds the function's"


async def test_unique_for_finds_the_same_job_either_way(store: Store) -> None:
    to_edge = 3600 - time.time() % 3600  # the window is a fixed hour of the clock: keep clear of its edge
    if to_edge < 10:
        await trio.sleep(to_edge + 0.5)
    registry = with_handlers(report={"unique_for": 3600})
    await store.publish_defaults(Settings(), registry)
    http = create_app(store, registry, Settings(), WorkerGauge(0)).test_client()
    payload = {"day": "2031-01-02", "n": [1.5, 100, 2.5e16, -0.0, "é\t"], "b": {"y": 1, "x": 2}}
    with connect(store.url, autocommit=True) as conn:
        first = await http.post("/tasks", json={"task_type": "report", "payload": payload})
        assert first.status_code == 201
        report_id = (await first.get_json())["id"]
        reordered = Raw(json.dumps(dict(reversed(list(payload.items())))))
        assert call(conn, "report", reordered) == report_id
        other = call(conn, "report", {"day": "2031-01-03"})
        assert other != report_id
        again = await http.post("/tasks", json={"task_type": "report", "payload": {"day": "2031-01-03"}})
        assert again.status_code == 200 and (await again.get_json())["id"] == other
        row = task_row(conn, report_id)
        assert row["idempotency_key"] == unique_key("report", json.dumps(payload), 3600, time.time())
        assert call(conn, "report", payload, idempotency_key="mine") not in (report_id, other)
    assert count_tasks(store.url) == 3


# -- the request digest and the unique key, property-tested against Python ---------------------------

TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=6)
# jsonb keeps no trace of -0.0 or of the float-ness of 1e16 and beyond (see python_json in the
# migration): the request digest cannot tell them apart from 0 and whole numbers.
DIGESTIBLE_FLOATS = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: abs(f) < 1e16
                                                                            and str(f) != "-0.0")
ANY_FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def payloads(floats: st.SearchStrategy[float]) -> st.SearchStrategy[dict[str, Any]]:
    scalars = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | floats | TEXT
    values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
                          max_leaves=10)
    return st.dictionaries(TEXT, values, max_size=4)


TIMES = st.datetimes(dt.datetime(2030, 1, 1), dt.datetime(2100, 1, 1),
                     timezones=st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=-5, minutes=-30))]))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=payloads(DIGESTIBLE_FLOATS), priority=st.none() | st.integers(-100, 100),
       max_retries=st.none() | st.integers(0, 1000), timeout=st.none() | st.floats(0.001, 604800),
       queue=st.none() | st.from_regex(r"[a-z0-9_.-]{1,64}", fullmatch=True), run_at=st.none() | TIMES,
       expires_in=st.none() | st.floats(1e-3, 31536000))
def test_the_request_digest_is_the_apis(digest_url: str, payload: dict[str, Any], priority: int | None,
                                        max_retries: int | None, timeout: float | None, queue: str | None,
                                        run_at: dt.datetime | None, expires_in: float | None) -> None:
    expires_at = None if run_at is None or expires_in is not None else run_at + dt.timedelta(days=1)
    python = default_registry.new_task(Settings(), "echo", payload, priority=priority, max_retries=max_retries,
                                       timeout_seconds=timeout, queue=queue, run_at=run_at, expires_at=expires_at,
                                       expires_in_seconds=None if run_at is not None else expires_in,
                                       idempotency_key="k")
    with connect(digest_url) as conn:
        digest = conn.execute(
            "SELECT taskd.request_digest(%s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s)",
            ["echo", json.dumps(payload), max_retries, timeout, priority, queue, run_at, None, expires_at,
             None if run_at is not None else expires_in]).fetchone()[0]
    assert digest == python.idempotency_hash


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=payloads(ANY_FLOATS), task_type=st.text(min_size=1, max_size=20).filter(lambda t: "\x00" not in t),
       window=st.sampled_from([1.0, 60, 3600, 86400 * 7]))
def test_the_unique_key_is_pythons_for_any_payload(digest_url: str, payload: dict[str, Any], task_type: str,
                                                   window: float) -> None:
    at = dt.datetime(2031, 5, 6, 7, 8, 9, 500000, tzinfo=UTC)
    text = jsontext.dumps(payload)
    with connect(digest_url) as conn:
        key = conn.execute("SELECT taskd.unique_key(%s, %s::jsonb, %s, %s)",
                           [task_type, text, window, at]).fetchone()[0]
    assert key == unique_key(task_type, text, window, at.timestamp())


@pytest.fixture(scope="module")
def digest_url(server_url: str, template_db: str) -> Iterator[str]:
    """One database for the property tests' many examples (they only read)."""
    from tests.conftest import scratch_database

    with scratch_database(server_url, "taskd_digest", template_db) as url:
        yield url


# -- the Python clients ---------------------------------------------------------------------------------


async def test_taskd_enqueue_calls_the_function(store: Store) -> None:
    await store.publish_defaults(Settings(max_retries=9, task_timeout=42), with_handlers())

    async def in_asyncio() -> list[Any]:
        conn = await asyncpg.connect(store.url)
        try:
            made = await taskd.enqueue(conn, "echo", {"a": 1}, idempotency_key="k")
            again = await taskd.enqueue(conn, "echo", {"a": 1}, idempotency_key="k")
            errors = []
            for bad in ({"priority": 500}, {"idempotency_key": "k", "payload": {"a": 2}},
                        {"task_type": "sleep", "payload": {"seconds": -1}}):
                args = {"task_type": "echo", "payload": {}, **bad}
                try:
                    await taskd.enqueue(conn, args.pop("task_type"), args.pop("payload"), **args)
                except (InvalidTask, IdempotencyConflict) as exc:
                    errors.append(exc)
            return [made, again, *errors]
        finally:
            await conn.close()

    made, again, priority, conflict, validated = await trio_asyncio.aio_as_trio(in_asyncio)()
    assert made == again
    assert isinstance(priority, InvalidTask) and priority.field == "priority"
    assert isinstance(conflict, IdempotencyConflict) and conflict.task_id == made
    assert isinstance(validated, InvalidTask) and "payload does not fit sleep" in validated.message
    with connect(store.url) as conn:
        row = task_row(conn, made)
        assert (row["max_retries"], row["timeout_seconds"]) == (9, 42.0), "the published settings, not 3 and 300"
        # Plain SQL cannot run sleep's Python validator: it takes what the client refused, and says so.
        validates = conn.execute("SELECT validates_in_python FROM taskd.task_types WHERE task_type = 'sleep'")
        assert validates.fetchone()[0] is True
        assert task_row(conn, call(conn, "sleep", {"seconds": -1}))["payload"] == {"seconds": -1}


async def test_enqueue_many_agrees_with_the_function_when_settings_agree(store: Store) -> None:
    to_edge = 3600 - time.time() % 3600  # report's unique_for window: keep clear of its edge
    if to_edge < 10:
        await trio.sleep(to_edge + 0.5)
    registry = with_handlers(mail={"queue": "emails", "priority": 5, "timeout": 12}, report={"unique_for": 3600})
    server = Settings(max_retries=9, task_timeout=42)
    await store.publish_defaults(server, registry)
    requests: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("mail", {"to": "x"}, {}), ("echo", {"n": 1}, {"priority": 2, "delay_seconds": 30, "timeout_seconds": 5}),
        ("echo", {}, {"run_at": LATER, "expires_at": LATER + dt.timedelta(hours=1), "idempotency_key": "m"}),
        ("report", {"day": 1}, {}),
    ]
    prepared = [client.prepare(t, p, settings=server, registry=registry, **o) for t, p, o in requests]

    async def in_asyncio() -> tuple[list[int], list[int]]:
        conn = await asyncpg.connect(store.url)
        try:
            batch = await taskd.enqueue_many(conn, prepared)
            single = [await taskd.enqueue(conn, t, p, **{**o, "idempotency_key": None}) for t, p, o in requests[:3]]
            # The same key and request, or the same unique_for job: the batch's own task.
            found = [await taskd.enqueue(conn, *requests[2][:2], **requests[2][2]),
                     await taskd.enqueue(conn, *requests[3][:2])]
            return batch, single + found
        finally:
            await conn.close()

    batch, single = await trio_asyncio.aio_as_trio(in_asyncio)()
    assert single[3:] == batch[2:]
    with connect(store.url) as conn:
        for many, one in zip(batch[:3], single[:3], strict=True):
            a, b = task_row(conn, many), task_row(conn, one)
            assert {k: v for k, v in a.items() if k not in MOMENTS | {"idempotency_hash"}} == {
                k: v for k, v in b.items() if k not in MOMENTS | {"idempotency_hash"}}
