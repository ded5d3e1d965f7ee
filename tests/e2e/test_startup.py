"""`python -m taskd` at start-up: a DATABASE_URL it cannot use is one line and status 2,
a password is never printed, and SIGTERM/SIGINT while waiting for the database is a
clean stop (status 0, one line, no traceback)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from .conftest import ROOT, TaskdProcess, free_port, wait_until

Start = Callable[..., TaskdProcess]
USER_SECRET = "userinfo-s3cret-7b1e"
QUERY_SECRET = "query-s3cret-c04a"


def child_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TASK_MODULES", "WAIT_FOR_DB")}
    env.update({"PYTHONUNBUFFERED": "1", **overrides})
    return env


@pytest.mark.parametrize("port", ["99999", "abc", "0"])
def test_a_database_url_with_a_bad_port_is_one_line_and_status_2(port: str, tmp_path: pathlib.Path) -> None:
    url = f"postgresql://u:{USER_SECRET}@127.0.0.1:{port}/x?password={QUERY_SECRET}"
    result = subprocess.run([sys.executable, "-m", "taskd", "--database-url", url], env=child_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("taskd: invalid DATABASE_URL: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert USER_SECRET not in result.stderr and QUERY_SECRET not in result.stderr


def test_a_password_in_the_query_is_never_shown(start_taskd: Start, database_url: str) -> None:
    separator = "&" if "?" in database_url else "?"
    url = f"{database_url}{separator}password={QUERY_SECRET}&sslpassword={QUERY_SECRET}"
    server = start_taskd(DATABASE_URL=url)
    assert "password=***" in server.output
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert QUERY_SECRET not in server.output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_waiting_for_the_database_is_a_clean_stop(
        processes: list[TaskdProcess], signum: signal.Signals) -> None:
    closed = free_port()  # bound and released: nothing listens there
    url = f"postgresql://u:{USER_SECRET}@127.0.0.1:{closed}/x?password={QUERY_SECRET}"
    server = TaskdProcess(child_env(DATABASE_URL=url), ["--wait-for-db"], ROOT)
    processes.append(server)
    wait_until(lambda: "waiting for the database at" in server.output, timeout=30, what="the waiting line")
    assert server.output.count("waiting for the database") == 1, "one warning, not one per attempt"
    assert f"postgresql://u:***@127.0.0.1:{closed}/x?password=***" in server.output
    server.signal(signum)
    assert server.wait_exit(timeout=10) == 0
    assert "Traceback" not in server.output
    assert server.lines[-1] == f"taskd: stopped by {signum.name} while waiting for the database\n"
    assert USER_SECRET not in server.output and QUERY_SECRET not in server.output
