"""Start-up: waiting for the database (told in the log with backoff), and SIGTERM/SIGINT
before serving ending in one line and status 0. Real signals to this process; trio's
autojump clock instead of real waiting."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
from collections.abc import Callable

import pytest
import trio
import trio.lowlevel
import trio.testing

from taskd import cli, startup
from taskd.config import Settings
from taskd.embedded import EmbeddedDatabase
from taskd.errors import DatabaseError, DatabaseUnavailable, StartupCancelled

URL = "postgresql://u:userinfo-secret@127.0.0.1:1/x?password=query-secret"
STOPS = [signal.SIGTERM, signal.SIGINT]


class FakeStore:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class FlakyDatabase:
    """Store.open's stand-in: unreachable until `up_at` (trio time), then opens a FakeStore."""

    def __init__(self, up_at: float = float("inf"), *, on_attempt: Callable[[int], None] | None = None) -> None:
        self.up_at = up_at
        self.attempts: list[float] = []
        self.on_attempt = on_attempt
        self.store = FakeStore()

    async def open(self, url: str, *, pool_size: int) -> FakeStore:
        assert url == URL and pool_size == 10
        self.attempts.append(trio.current_time())
        if self.on_attempt is not None:
            self.on_attempt(len(self.attempts))
        await trio.lowlevel.checkpoint()
        if trio.current_time() < self.up_at:
            raise DatabaseUnavailable("ConnectionRefusedError: [Errno 111] Connect call failed")
        return self.store


def waiting_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "taskd.startup"]


async def test_waits_with_one_warning_then_reminders_at_growing_intervals(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "taskd.startup")
    start = trio.current_time()
    database = FlakyDatabase(up_at=start + 200)
    store = await startup.open_store(Settings(wait_for_db=True), URL, connect=database.open)
    assert store is database.store
    lines = waiting_lines(caplog)
    assert lines[0].startswith("waiting for the database at postgresql://u:***@127.0.0.1:1/x?password=***: ")
    assert "Connect call failed" in lines[0]
    # Reminders 5, 10, 20, 40, 80 s apart (give or take one retry), then the connected line.
    reminders = [line for line in lines if line.startswith("still waiting")]
    assert 4 <= len(reminders) <= 5, lines
    shown = "postgresql://u:***@127.0.0.1:1/x?password=***"
    assert lines[-1].startswith(f"connected to the database at {shown} after 3 min")
    assert not any("secret" in line for line in lines)
    # Attempts back off to one every 5 s rather than hammering the server.
    gaps = [b - a for a, b in zip(database.attempts, database.attempts[1:], strict=False)]
    assert gaps[0] == pytest.approx(0.5) and max(gaps) == pytest.approx(startup.RETRY_MAX)
    assert len(database.attempts) < 50


def test_reminders_double_up_to_every_five_minutes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "taskd.startup")
    wait_log = startup.WaitLog("postgresql://h/db")
    logged_at = []
    for second in range(0, 4 * 3600):  # one failed attempt a second for four hours
        before = len(caplog.records)
        wait_log.failed(float(second), "refused")
        if len(caplog.records) > before:
            logged_at.append(second)
    gaps = [b - a for a, b in zip(logged_at, logged_at[1:], strict=False)]
    assert gaps[:7] == [5, 10, 20, 40, 80, 160, 300] and set(gaps[6:]) == {300}
    assert caplog.records[-1].getMessage().startswith("still waiting for the database at postgresql://h/db (")


async def test_connected_at_once_logs_nothing(autojump_clock: trio.testing.MockClock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "taskd.startup")
    database = FlakyDatabase(up_at=0)
    assert await startup.open_store(Settings(wait_for_db=True), URL, connect=database.open) is database.store
    assert waiting_lines(caplog) == []


async def test_without_wait_for_db_the_first_failure_is_raised(autojump_clock: trio.testing.MockClock) -> None:
    database = FlakyDatabase()
    with pytest.raises(DatabaseUnavailable):
        await startup.open_store(Settings(), URL, connect=database.open)
    assert len(database.attempts) == 1


async def test_a_database_that_refuses_is_not_waited_for(autojump_clock: trio.testing.MockClock) -> None:
    async def refuse(url: str, *, pool_size: int) -> FakeStore:
        raise DatabaseError("InsufficientPrivilegeError: permission denied for schema taskd")

    with pytest.raises(DatabaseError, match="permission denied"):
        await startup.open_store(Settings(wait_for_db=True), URL, connect=refuse)


@pytest.mark.parametrize("signum", STOPS)
async def test_a_signal_while_waiting_stops_the_wait(autojump_clock: trio.testing.MockClock,
                                                     signum: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in STOPS}

    def signal_on_third(attempt: int) -> None:
        if attempt == 3:
            os.kill(os.getpid(), signum)

    database = FlakyDatabase(on_attempt=signal_on_third)
    with pytest.raises(StartupCancelled, match=f"stopped by {signum.name} while waiting for the database"):
        await startup.open_store(Settings(wait_for_db=True), URL, connect=database.open)
    assert len(database.attempts) == 3
    assert {s: signal.getsignal(s) for s in STOPS} == before, "the usual handlers are back"


@pytest.mark.parametrize("signum", STOPS)
async def test_a_signal_cuts_a_hung_attempt_short(autojump_clock: trio.testing.MockClock,
                                                  signum: signal.Signals) -> None:
    async def hang(url: str, *, pool_size: int) -> FakeStore:
        os.kill(os.getpid(), signum)
        await trio.sleep(3600)  # a connect to a host that drops packets, say
        raise AssertionError("not cancelled")

    start = trio.current_time()
    with pytest.raises(StartupCancelled, match="while connecting to the database"):
        await startup.open_store(Settings(), URL, connect=hang)
    assert trio.current_time() - start < 1


async def test_a_signal_as_the_connection_is_made_still_stops(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()

    async def connect_then_signal(url: str, *, pool_size: int) -> FakeStore:
        os.kill(os.getpid(), signal.SIGTERM)
        return store  # no checkpoint after the signal: the scope's cancel lands too late

    with pytest.raises(StartupCancelled, match="SIGTERM"):
        await startup.open_store(Settings(), URL, connect=connect_then_signal)
    assert store.closed


async def test_an_attempt_failing_because_it_was_cancelled_reports_the_stop(
        autojump_clock: trio.testing.MockClock) -> None:
    async def fail_when_cancelled(url: str, *, pool_size: int) -> FakeStore:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await trio.sleep(3600)
        except trio.Cancelled:
            raise DatabaseUnavailable("connection closed") from None
        raise AssertionError("not cancelled")

    with pytest.raises(StartupCancelled):
        await startup.open_store(Settings(), URL, connect=fail_when_cancelled)


# -- the CLI: a signal at any point of start-up is one line and status 0 ----------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "TASK_MODULES", "WAIT_FOR_DB", "HTTP_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def one_clean_stop(capsys: pytest.CaptureFixture[str], info: pytest.ExceptionInfo[SystemExit]) -> str:
    assert info.value.code == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("signum", STOPS)
def test_signal_while_the_embedded_database_starts_stops_it_cleanly(
        cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path,
        signum: signal.Signals) -> None:
    stops: list[str] = []

    def start_embedded(data_dir: pathlib.Path) -> EmbeddedDatabase:
        os.kill(os.getpid(), signum)  # held back until the start is over, not dropped
        for _ in range(1000):
            pass  # bytecodes for a handler to run in, as initdb and pg_ctl would give it
        return EmbeddedDatabase(pgdata=data_dir / "pgdata", url="postgresql://postgres@/postgres?host=/tmp/x",
                                stop=lambda: stops.append("stopped"))

    cli_env.setattr("taskd.embedded.start_embedded", start_embedded)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        cli.main(["--log-level", "ERROR"])
    err = one_clean_stop(capsys, info)
    assert f"stopped by {signum.name} while the embedded PostgreSQL was starting" in err
    assert stops == ["stopped"]
    assert signal.getsignal(signal.SIGTERM) == before and signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_ctrl_c_that_kills_initdb_too_is_still_a_clean_stop(
        cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def start_embedded(data_dir: pathlib.Path) -> EmbeddedDatabase:
        os.kill(os.getpid(), signal.SIGINT)
        raise DatabaseUnavailable("could not start the embedded PostgreSQL: initdb was interrupted")

    cli_env.setattr("taskd.embedded.start_embedded", start_embedded)
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert "stopped by SIGINT" in one_clean_stop(capsys, info)


def test_sigterm_before_the_database_is_touched_stops_cleanly(
        cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def import_and_be_stopped(settings: Settings, registry: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # a slow import of the user's task modules, say
        for _ in range(1000):
            pass

    cli_env.setattr(cli, "import_task_modules", import_and_be_stopped)
    with pytest.raises(SystemExit) as info:
        cli.main(["--database-url", "postgresql://u@127.0.0.1:1/x"])
    assert "stopped by SIGTERM during start-up" in one_clean_stop(capsys, info)


@pytest.mark.parametrize("signum", STOPS)
def test_signal_inside_trio_before_the_server_listens_stops_cleanly(
        cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: signal.Signals) -> None:
    async def serve(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signum)  # SIGTERM is made to mean what SIGINT does: trio's KeyboardInterrupt
        await trio.sleep(5)
        raise AssertionError("the signal did not stop start-up")

    cli_env.setattr("taskd.server.serve", serve)
    with pytest.raises(SystemExit) as info:
        cli.main(["--database-url", "postgresql://u@127.0.0.1:1/x", "--log-level", "ERROR"])
    assert f"stopped by {signum.name} during start-up" in one_clean_stop(capsys, info)


def test_startup_cancelled_from_the_server_is_one_line_and_status_0(
        cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    async def serve(*args: object, **kwargs: object) -> None:
        raise StartupCancelled("stopped by SIGTERM while waiting for the database")

    cli_env.setattr("taskd.server.serve", serve)
    with pytest.raises(SystemExit) as info:
        cli.main(["--database-url", "postgresql://u@127.0.0.1:1/x"])
    assert one_clean_stop(capsys, info) == "taskd: stopped by SIGTERM while waiting for the database\n"
