"""Run `python -m taskd` as a subprocess on a free port and talk HTTP to it."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TaskdProcess:
    """One `python -m taskd` child: its output, its URL, and ways to stop it."""

    def __init__(self, env: dict[str, str], args: list[str], cwd: pathlib.Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskd", "--port", str(self.port), *args],
            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 60) -> TaskdProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith("taskd: API") for line in self.lines):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"taskd exited with {self.proc.returncode}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"taskd did not start in {timeout}s:\n{self.output}")

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"taskd did not exit in {timeout}s:\n{self.output}") from None
        self._reader.join(5)
        return code

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def start_taskd(database_url: str) -> Iterator[Callable[..., TaskdProcess]]:
    """start_taskd(*args, **env) -> a ready server on the test's database; all are stopped afterwards."""
    started: list[TaskdProcess] = []

    def start(*args: str, wait: bool = True, cwd: pathlib.Path = ROOT, **env: Any) -> TaskdProcess:
        full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
        full_env.update({"DATABASE_URL": database_url, "TASK_MODULES": "tests.e2e.handlers",
                         "PYTHONUNBUFFERED": "1"})
        full_env.update({k: str(v) for k, v in env.items()})
        full_env = {k: v for k, v in full_env.items() if v != "<unset>"}
        process = TaskdProcess(full_env, list(args), cwd)
        started.append(process)
        return process.wait_ready() if wait else process

    yield start
    for process in started:
        process.close()
        # Shown by pytest only when the test failed: what each server said.
        print(f"--- output of taskd on port {process.port} ---\n{process.output}")


def wait_until(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def counts(server: TaskdProcess) -> dict[str, int]:
    return server.http.get("/stats").json()["counts"]


def submit(server: TaskdProcess, task_type: str, payload: dict[str, Any] | None = None, **extra: Any) -> int:
    """POST one task, insisting on 201; its id."""
    response = server.http.post("/tasks", json={"task_type": task_type, "payload": payload or {}, **extra})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def get_task(server: TaskdProcess, task_id: int) -> dict[str, Any]:
    """GET one task, insisting on 200."""
    response = server.http.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture
def processes() -> Iterator[list[TaskdProcess]]:
    """TaskdProcess objects a test started itself: closed at its end, their output printed."""
    started: list[TaskdProcess] = []
    yield started
    for process in started:
        process.close()
        print(f"--- output of taskd on port {process.port} ---\n{process.output}")


def execute(url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    """One statement on a connection of the test's own (rows written as another producer would)."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(statement, *args)
        finally:
            await conn.close()

    return asyncio.run(run())
