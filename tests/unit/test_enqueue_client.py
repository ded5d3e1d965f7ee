"""The Python side of taskd.enqueue() (issue 8, item 4): what the clients check before the
database does, how the database's refusals come back as taskd's errors, the statement
the sync client sends, and the unique_for key as PostgreSQL derives it. No database."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import re
from typing import Any

import pytest

from taskd import client, sql, sync_client
from taskd.config import Settings
from taskd.errors import IdempotencyConflict, InvalidTask
from taskd.registry import Registry, _jsonb_text, unique_key

UTC = dt.UTC


def registry_with_validator() -> Registry:
    registry = Registry()

    def check(payload: Any) -> None:
        if "to" not in payload:
            raise ValueError("payload.to is missing")

    registry.register("mail", lambda payload, ctx: None, validate=check)
    return registry


def test_arguments_are_in_the_order_of_the_named_query() -> None:
    when = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    args = client.enqueue_arguments("report", {"day": 1}, queue="mail", priority=5, run_at=when, delay_seconds=None,
                                    expires_at=None, expires_in_seconds=60, max_retries=2, timeout_seconds=30,
                                    idempotency_key="k")
    assert args == ("report", '{"day":1}', "mail", 5, when, None, None, 60.0, 2, 30.0, "k")
    assert all(type(a) is float for a in (args[7], args[9])), "seconds go as floats, as the API reads them"
    # Nothing given is NULL, which the function reads as "not given"; no payload is {}.
    assert client.enqueue_arguments("report") == ("report", "{}") + (None,) * 9
    text = sql.queries()["task_enqueue"].text
    assert [f"${n}" in text for n in range(1, 12)] == [True] * 11 and "$12" not in text


@pytest.mark.parametrize(("options", "field"), [
    ({"task_type": 7}, "task_type"),
    ({"payload": [1, 2]}, "payload"),
    ({"payload": "text"}, "payload"),
    ({"payload": {"x": float("nan")}}, "payload"),
    ({"payload": {"x": "\x00"}}, "payload"),
    ({"max_retries": True}, "max_retries"),
    ({"max_retries": 2.0}, "max_retries"),
    ({"priority": "5"}, "priority"),
    ({"timeout_seconds": False}, "timeout_seconds"),
    ({"delay_seconds": "10"}, "delay_seconds"),
    ({"expires_in_seconds": [1]}, "expires_in_seconds"),
    ({"run_at": dt.datetime(2031, 1, 2)}, "run_at"),  # no offset: which time would it be?
    ({"expires_at": "2031-01-02T03:04:05Z"}, "expires_at"),
    ({"queue": b"mail"}, "queue"),
    ({"idempotency_key": "a\x00b"}, "idempotency_key"),
    ({"task_type": "mail", "payload": {}}, "payload"),  # the handler's validate= runs here
])
def test_what_sql_cannot_see_is_refused_before_it_is_sent(options: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"task_type": "report", "payload": {}, **options}
    with pytest.raises(InvalidTask) as refused:
        client.enqueue_arguments(args.pop("task_type"), args.pop("payload"), registry=registry_with_validator(),
                                 **args)
    assert refused.value.field == field


def test_a_type_this_process_does_not_know_is_left_to_the_database() -> None:
    assert client.enqueue_arguments("only_the_server_knows", {"a": 1})[0] == "only_the_server_knows"
    assert client.enqueue_arguments("mail", {"to": "x"}, registry=registry_with_validator())[1] == '{"to":"x"}'


def test_numbers_out_of_every_range_are_clamped_for_the_database_to_refuse() -> None:
    args = client.enqueue_arguments("report", max_retries=10**30, priority=-(10**30), timeout_seconds=10**400,
                                    delay_seconds=-(10**400))
    assert (args[8], args[3]) == (2**63 - 1, -(2**63)), "within bigint, still out of every rule's range"
    assert (args[9], args[5]) == (math.inf, -math.inf)


class AsyncpgLike(Exception):
    """What asyncpg raises: the fields on the exception."""

    def __init__(self, sqlstate: str, message: str, column_name: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.sqlstate, self.message, self.column_name, self.detail = sqlstate, message, column_name, detail


class Diag:
    def __init__(self, message: str, column: str | None, detail: str | None) -> None:
        self.message_primary, self.column_name, self.message_detail = message, column, detail


class PsycopgLike(Exception):
    """What psycopg raises: the fields in exc.diag."""

    def __init__(self, sqlstate: str, message: str, column: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.diag = Diag(message, column, detail)


class DjangoLike(Exception):
    """Django's DataError: the driver's error is its __cause__."""


@pytest.mark.parametrize("kind", [AsyncpgLike, PsycopgLike])
def test_refusals_come_back_as_taskds_errors(kind: type[Any]) -> None:
    invalid = client.enqueue_error(kind("22023", "invalid_task: priority must be a whole number from -100 to 100",
                                        "priority"), None)
    assert isinstance(invalid, InvalidTask)
    assert (invalid.field, invalid.message) == ("priority", "priority must be a whole number from -100 to 100")
    conflict = client.enqueue_error(kind("P0409", "idempotency_conflict: ...", "idempotency_key", "task_id=42"), "k")
    assert isinstance(conflict, IdempotencyConflict) and (conflict.key, conflict.task_id) == ("k", 42)
    # Anything else is not taskd's to translate: the caller sees the driver's own error.
    assert client.enqueue_error(kind("22023", "invalid input syntax for type json"), None) is None
    assert client.enqueue_error(kind("23505", "duplicate key"), None) is None
    assert client.enqueue_error(ValueError("no sqlstate"), None) is None


def test_a_wrapped_driver_error_is_found_through_its_cause() -> None:
    try:
        try:
            raise PsycopgLike("22023", "invalid_task: queue must be ...", "queue")
        except PsycopgLike as exc:
            raise DjangoLike("wrapped") from exc
    except DjangoLike as wrapped:
        error = client.enqueue_error(wrapped, None)
    assert isinstance(error, InvalidTask) and error.field == "queue"


class FakeCursor:
    def __init__(self, fail: Exception | None = None) -> None:
        self.executed: list[tuple[str, tuple[Any, ...]]] = []
        self.fail = fail

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, text: str, args: tuple[Any, ...]) -> None:
        if self.fail is not None:
            raise self.fail
        self.executed.append((text, args))

    def fetchone(self) -> tuple[int]:
        return (17,)


class FakeConnection:
    def __init__(self, cursor: FakeCursor) -> None:
        self._cursor = cursor

    def cursor(self) -> FakeCursor:
        return self._cursor


def test_the_sync_client_sends_task_enqueue_with_pyformat_placeholders() -> None:
    cursor = FakeCursor()
    assert sync_client.enqueue_sync(FakeConnection(cursor), "report", {"a": 1}, priority=3) == 17
    assert sync_client.enqueue_sync(cursor, "report") == 17  # a cursor works as well
    (text, args), (_, bare) = cursor.executed
    assert text == re.sub(r"\$\d+", "%s", sql.queries()["task_enqueue"].text)
    assert text.count("%s") == len(args) == 11 and "$" not in text
    assert args[:4] == ("report", '{"a":1}', None, 3) and bare[1] == "{}"


def test_the_sync_client_raises_taskds_errors() -> None:
    refused = FakeCursor(PsycopgLike("22023", "invalid_task: unknown task_type 'x'; known types: echo", "task_type"))
    with pytest.raises(InvalidTask, match="unknown task_type") as caught:
        sync_client.enqueue_sync(FakeConnection(refused), "x")
    assert caught.value.field == "task_type"
    other = FakeCursor(PsycopgLike("57014", "canceling statement due to statement timeout"))
    with pytest.raises(PsycopgLike):
        sync_client.enqueue_sync(FakeConnection(other), "x")


def test_prepare_digests_whole_seconds_as_the_api_reads_them() -> None:
    registry = Registry()
    registry.register("job", lambda payload, ctx: None)

    def digest(**options: Any) -> str | None:
        return client.prepare("job", {}, idempotency_key="k", settings=Settings(), registry=registry,
                              **options).idempotency_hash

    # The API reads 30 as 30.0 and the SQL function takes float8: all three must agree.
    assert digest(timeout_seconds=30) == digest(timeout_seconds=30.0)
    assert digest(delay_seconds=5, expires_in_seconds=60) == digest(delay_seconds=5.0, expires_in_seconds=60.0)


# -- unique_for: the key PostgreSQL derives, derived in Python ------------------------------------

# Written by PostgreSQL 15 from the payload text below:
# SELECT jsonb_build_object('payload', <text>::jsonb, 'task_type', 'report')::text
PAYLOAD_TEXT = (r'{"bb": [1.50, "x\n\"é\\\\\u0001", null, true, 1e2, 1.5e-7, -0.0, 12345678901234567890],'
                r' "a": {}, "é": [], "ab": 2.5E+3, "z": 0, "aaa": 1}')
POSTGRES_TEXT = (r'{"payload": {"a": {}, "z": 0, "ab": 2500, "bb": [1.50, "x\n\"é\\\\\u0001", null, true, 100, '
                 r'0.00000015, 0.0, 12345678901234567890], "é": [], "aaa": 1}, "task_type": "report"}')


def test_jsonb_text_is_written_as_postgresql_writes_it() -> None:
    value = {"payload": json.loads(PAYLOAD_TEXT, parse_float=decimal.Decimal), "task_type": "report"}
    assert _jsonb_text(value) == POSTGRES_TEXT


def test_the_unique_key_is_type_payload_and_window() -> None:
    import hashlib

    digest = hashlib.sha256(POSTGRES_TEXT.encode()).hexdigest()
    assert unique_key("report", PAYLOAD_TEXT, 3600, 7200.5) == f"unique:2:{digest}"
    assert unique_key("report", PAYLOAD_TEXT, 3600, 10799.9) == f"unique:2:{digest}"
    assert unique_key("report", PAYLOAD_TEXT, 3600, 10800.0) == f"unique:3:{digest}"
    assert unique_key("other", PAYLOAD_TEXT, 3600, 7200) != f"unique:2:{digest}"


def test_new_task_derives_its_unique_for_key_with_unique_key(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry()
    registry.register("report", lambda payload, ctx: None, unique_for=60)
    monkeypatch.setattr("taskd.registry.time.time", lambda: 1_000_000.0)
    task = registry.new_task(Settings(), "report", {"b": 1.5, "a": [1, "é"]})
    assert task.idempotency_key == unique_key("report", task.payload_json, 60, 1_000_000.0)
    assert task.idempotency_key.startswith(f"unique:{1_000_000 // 60}:")
    assert task.idempotency_hash == "unique_for"
