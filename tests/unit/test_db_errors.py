"""Every driver error is classified in one place, and an outage is told once."""

from __future__ import annotations

import logging
import ssl

import asyncpg
import pytest

from taskd.db import classify
from taskd.errors import DatabaseError, DatabaseUnavailable
from taskd.outage import OutageLog


def _postgres_error(sqlstate: str) -> asyncpg.PostgresError:
    cls = asyncpg.PostgresError.get_message_class_for_sqlstate(sqlstate)
    return cls(f"server says {sqlstate}")


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions._base.InternalClientError("cannot switch to state 12; another operation is in progress"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("connection is closed"),
    ConnectionResetError("reset by peer"),
    OSError("connection refused"),
    TimeoutError(),
    _postgres_error("57P01"),  # admin shutdown: a restart
    _postgres_error("57P03"),  # cannot connect now: starting up
    _postgres_error("53300"),  # too many connections
    _postgres_error("08006"),  # connection failure
    _postgres_error("40001"),  # serialization failure: try again
    _postgres_error("3D000"),  # the database does not exist yet
    _postgres_error("55P03"),  # lock_timeout: another session held the row a while
    _postgres_error("25006"),  # read-only: a primary demoted during a failover
    ssl.SSLEOFError("EOF in violation of protocol"),  # the server went away mid-handshake
], ids=lambda e: type(e).__name__)
def test_what_a_retry_can_fix_is_unavailable(exc: BaseException) -> None:
    assert isinstance(classify(exc), DatabaseUnavailable)


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions._base.DataError("invalid input for query argument $1: 'x' (an integer is required)"),
    asyncpg.exceptions.ClientConfigurationError("sslmode verify-full needs a root certificate"),
    ssl.SSLError("bad key password"),
    _postgres_error("23505"),  # unique violation
    _postgres_error("22P02"),  # invalid text representation
    _postgres_error("42P01"),  # undefined table
    _postgres_error("28P01"),  # a wrong password will not fix itself
], ids=lambda e: type(e).__name__)
def test_what_a_retry_cannot_fix_is_a_refusal(exc: BaseException) -> None:
    mapped = classify(exc)
    assert isinstance(mapped, DatabaseError) and not isinstance(mapped, DatabaseUnavailable)


def test_errors_that_are_not_the_drivers_are_left_alone() -> None:
    assert classify(KeyError("x")) is None and classify(ZeroDivisionError()) is None


def test_an_outage_is_one_warning_reminders_with_backoff_and_one_line_at_the_end(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = OutageLog(clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger="taskd.database"):
        for second in range(0, 60):  # every loop fails every second for a minute
            now[0] = float(second)
            for where in ("claimer", "heartbeat", "outcome writer", "pool"):
                outage.failed(where, "connection refused")
        now[0] = 60.0
        outage.succeeded()
        outage.succeeded()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings[0].startswith("database unavailable (claimer")
    assert [w.split(" after")[0] for w in warnings[1:-1]] == ["database still unavailable"] * 3  # at 5, 15, 35 s
    assert warnings[-1] == "database reachable again after 60.0s"
    assert outage.outages == 1 and not outage.down


def test_connections_learning_of_a_restart_after_recovery_are_not_a_new_outage(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = OutageLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="taskd.database"):
        outage.failed("claimer", "closed")
        now[0] = 1.0
        outage.succeeded()
        now[0] = 1.5
        outage.failed("heartbeat", "closed")  # its connection is found dead on its next use
        now[0] = 1.6
        outage.succeeded()
    assert len(caplog.records) == 2 and outage.outages == 1


def test_a_second_outage_soon_after_the_first_is_still_told(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = OutageLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="taskd.database"):
        outage.failed("claimer", "refused")
        now[0] = 2.0
        outage.succeeded()
        for tick in range(30):  # down again 1 s later, for 3 s
            now[0] = 3.0 + tick / 10
            outage.failed("claimer", "refused")
        outage.succeeded()
    assert [r.getMessage().split(" (")[0].split(" after")[0] for r in caplog.records] == [
        "database unavailable", "database reachable again", "database unavailable", "database reachable again"]
    assert outage.outages == 2
