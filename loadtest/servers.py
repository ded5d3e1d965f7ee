"""Start and stop the servers the bench measures, and the throw-away databases behind them.

A server is `python -m taskd` (or loadtest.bare_app) as a child process on a free port,
its output in a log file, its resident memory sampled while it runs; SIGTERM stops it,
as an operator would. A `source` tree (loadtest.compare's other revision) runs taskd from
that checkout instead of this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import psutil

from loadtest.rawhttp import HttpError, get_json_status
from loadtest.report import REPO, progress

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0  # taskd's shutdown grace is 30 s; a clean stop after a drain is much quicker
RSS_INTERVAL = 0.1
_started = itertools.count(1)


def free_port(ports: range | None = None) -> int:
    """A port nobody listens on: the first free one in `ports`, else one the OS picks."""
    for port in ports or (0,):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError(f"no free port in {ports}")


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: pathlib.Path
    rss_peak: int = 0
    started_at: float = 0.0  # perf_counter when the process was spawned
    rss_now: int = 0

    @property
    def rss_peak_mb(self) -> float:
        return round(self.rss_peak / 2**20, 1)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_problems(self) -> dict[str, Any] | None:
        """Warnings, errors and tracebacks the server logged: a count and the first few."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        words = (" WARNING ", " ERROR ", "Traceback")
        found = [line for line in lines if any(word in line for word in words)]
        return {"count": len(found), "first": found[:3]} if found else None

    async def sample_rss(self) -> None:
        """Keep the peak RSS until cancelled; a single process, as taskd serves with no forks."""
        try:
            process = psutil.Process(self.proc.pid)
            while True:
                self.rss_now = process.memory_info().rss
                self.rss_peak = max(self.rss_peak, self.rss_now)
                await asyncio.sleep(RSS_INTERVAL)
        except psutil.Error:
            return


@contextlib.asynccontextmanager
async def running(name: str, argv: Sequence[str], logs: pathlib.Path, port: int,
                  env: dict[str, str] | None = None, cwd: pathlib.Path = REPO) -> AsyncIterator[Server]:
    """Run `python <argv>` in cwd until the block ends; ready once GET /health answers 200."""
    log_path = logs / f"{next(_started):02d}-{name}-{port}.log"
    server = Server(name, _spawn(argv, log_path, env, cwd), f"http://127.0.0.1:{port}", log_path,
                    started_at=time.perf_counter())
    sampler = asyncio.create_task(server.sample_rss())
    try:
        await _wait_ready(server)
        yield server
    finally:
        sampler.cancel()
        await stop(server)


def _spawn(argv: Sequence[str], log_path: pathlib.Path, env: dict[str, str] | None,
           cwd: pathlib.Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})


async def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(HttpError, OSError):
            status, _ = await get_json_status(server.url, "/health")
            if status == 200:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{server.name} not ready after {READY_TIMEOUT:g}s:\n{server.log_tail()}")


async def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(server.proc.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            progress(f"  {server.name} ignored SIGTERM for {STOP_TIMEOUT:g}s; killing it")
            server.proc.kill()
            await asyncio.to_thread(server.proc.wait)
    if server.proc.returncode not in (0, -signal.SIGTERM):
        progress(f"  {server.name} exited with {server.proc.returncode}; log tail:\n{server.log_tail()}")


def taskd(database_url: str, logs: pathlib.Path, *, workers: int = 50, extra: Sequence[str] = (),
          ports: range | None = None, source: pathlib.Path | None = None,
          ) -> contextlib.AbstractAsyncContextManager[Server]:
    port = free_port(ports)
    argv = ["-m", "taskd", "--port", str(port), "--workers", str(workers), *extra]
    # WARNING: INFO logs a line per retried task, which would cost the server CPU we are measuring.
    env = {"DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
    if source is None:
        return running("taskd", argv, logs, port, env)
    # `-m` puts the working directory first on sys.path, ahead of the venv's editable install
    # of this checkout (its finder is appended to sys.meta_path, so it is asked last); the
    # PYTHONPATH entry covers anything the server spawns with another working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    return running("taskd", argv, logs, port, env, cwd=source)


def bare(logs: pathlib.Path, ports: range | None = None) -> contextlib.AbstractAsyncContextManager[Server]:
    port = free_port(ports)
    return running("bare", ["-m", "loadtest.bare_app", "--port", str(port)], logs, port)


# -- databases --------------------------------------------------------------------------------------


def database_name(url: str) -> str:
    name = urllib.parse.urlsplit(url).path.lstrip("/")
    # The name is spliced into DROP/CREATE DATABASE, so only plain identifiers are accepted.
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"the bench database name must be a plain lower-case identifier, got {name!r}")
    return name


def with_database(url: str, name: str) -> str:
    return urllib.parse.urlsplit(url)._replace(path=f"/{name}").geturl()


async def recreate_database(url: str) -> None:
    """Drop (disconnecting anyone still in it) and create the database named in url."""
    name = database_name(url)
    admin = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def drop_database(url: str) -> None:
    admin = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database_name(url)}" WITH (FORCE)')
    finally:
        await admin.close()


async def migrate(database_url: str, logs: pathlib.Path, ports: range | None = None,
                  source: pathlib.Path | None = None) -> None:
    """Create taskd's schema the way taskd does it: start it once with no workers, then stop it."""
    async with taskd(database_url, logs, workers=0, ports=ports, source=source):
        pass
