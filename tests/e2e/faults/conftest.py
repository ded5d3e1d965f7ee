"""Harness for the fault-injection suite: real `python -m taskd` processes against a real
PostgreSQL, with the faults injected from outside.

- `launch_taskd(url, *args, **env)`: start_taskd on any database URL, with the recording
  file of the `record` handler (tests/e2e/handlers.py) set for every process.
- `private_pg`: a PostgreSQL cluster of the test's own (pgserver's binaries, a free TCP port on
  127.0.0.1) that the test may stop, start and restart without touching the shared server.
- `tcp_proxy(url)`: a byte-forwarding proxy in front of a database; `pause()` is a network
  partition (sockets stay open, nothing moves), `resume()` ends it, `cut()` closes every
  connection.
- `Recording`: the executions the handlers wrote down (start, end or cancelled, per process),
  with the duplicates and the overlapping executions of one task.
- Database helpers: read the tasks table directly, wait until every task has finished.

Every wait here is bounded; every helper fails with what it saw.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import ROOT, TaskdProcess, free_port

RECORD_ENV = "TASKD_TEST_RECORD"
UNFINISHED = ("pending", "running", "retrying")

# -- what the test reports ------------------------------------------------------------------------


def report(test: str, **measured: Any) -> None:
    """One line of what a test measured (shown with -s, or on failure)."""
    fields = "  ".join(f"{name}={value}" for name, value in measured.items())
    print(f"\n[faults] {test}: {fields}", flush=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets fixtures know at teardown whether the test failed (to print whole server logs then).
    outcome = yield
    result = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{result.when}", result)


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
               for when in ("setup", "call"))


# -- the database, read directly --------------------------------------------------------------------

DB_TIMEOUT = 10.0


def db_fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on a connection of its own (bounded); raises what the driver raised."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url, timeout=DB_TIMEOUT)
        try:
            return await conn.fetch(query, *args, timeout=DB_TIMEOUT)
        finally:
            await conn.close(timeout=DB_TIMEOUT)

    return asyncio.run(run())


def db_try_fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record] | None:
    """db_fetch, or None while the database cannot be reached (restarting, connection killed)."""
    try:
        return db_fetch(url, query, *args)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
            asyncpg.exceptions._base.InternalClientError):
        return None


@dataclasses.dataclass(frozen=True)
class TaskRow:
    id: int
    task_type: str
    status: str
    attempts: int
    crashes: int
    errors: list[dict[str, Any]]
    last_error: dict[str, Any] | None
    finished_at: float | None  # unix time

    @property
    def error_types(self) -> list[str]:
        return [str(error.get("type")) for error in self.errors]


def task_rows(url: str) -> dict[int, TaskRow]:
    """Every task's final state, read from taskd.tasks."""
    rows = db_fetch(url, "SELECT id, task_type, status, attempts, crashes, errors::text, last_error::text,"
                         " extract(epoch FROM finished_at)::float8 AS finished_at"
                         " FROM taskd.tasks ORDER BY id")
    return {
        row["id"]: TaskRow(row["id"], row["task_type"], row["status"], row["attempts"], row["crashes"],
                           json.loads(row["errors"]), json.loads(row["last_error"]) if row["last_error"] else None,
                           row["finished_at"])
        for row in rows
    }


def status_counts(url: str) -> collections.Counter[str] | None:
    rows = db_try_fetch(url, "SELECT status, count(*) AS n FROM taskd.tasks GROUP BY status")
    return None if rows is None else collections.Counter({row["status"]: row["n"] for row in rows})


def wait_all_finished(url: str, total: int, timeout: float, *, what: str = "",
                      watch: Sequence[TaskdProcess] = ()) -> collections.Counter[str]:
    """Wait until the table holds at least `total` tasks and none is pending, running or retrying.
    (At least: a submit whose answer the client never got may still have inserted its task.)

    Fails at once if a watched process died meanwhile, else after `timeout` with the counts seen.
    """
    deadline = time.monotonic() + timeout
    counts: collections.Counter[str] | None = None
    while time.monotonic() < deadline:
        counts = status_counts(url)
        if counts is not None and sum(counts.values()) >= total and not any(counts[s] for s in UNFINISHED):
            return counts
        dead = [p for p in watch if p.proc.poll() is not None]
        if dead:
            raise AssertionError(f"taskd on port {dead[0].port} exited with {dead[0].proc.returncode} "
                                 f"while waiting for {what or 'the tasks'} (counts {counts})")
        time.sleep(0.2)
    raise AssertionError(f"{what or 'tasks'} not all finished after {timeout}s: counts {dict(counts or {})}, "
                         f"expected {total} tasks in all")


def completed_count(url: str) -> int:
    counts = status_counts(url)
    return -1 if counts is None else counts["completed"]


def ready_status(server: TaskdProcess) -> int | None:
    """GET /ready's status, or None if the server did not answer."""
    try:
        return server.http.get("/ready", timeout=5).status_code
    except httpx.TransportError:
        return None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, *,
             watch: Sequence[TaskdProcess] = (), interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy (returned); fail after timeout or if a watched process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        dead = [p for p in watch if p.proc.poll() is not None]
        if dead:
            raise AssertionError(f"taskd on port {dead[0].port} exited with {dead[0].proc.returncode} "
                                 f"while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- submitting -----------------------------------------------------------------------------------


def submit_batch(server: TaskdProcess, tasks: Sequence[dict[str, Any]]) -> list[int]:
    """POST /tasks/batch in chunks of 1,000; the ids in submission order."""
    ids: list[int] = []
    for start in range(0, len(tasks), 1000):
        response = server.http.post("/tasks/batch", json={"tasks": list(tasks[start:start + 1000])})
        assert response.status_code == 201, response.text
        ids += response.json()["ids"]
    return ids


def record_tasks(count: int, seconds: float = 0.0, **extra: Any) -> list[dict[str, Any]]:
    return [{"task_type": "record", "payload": {"seconds": seconds}, **extra} for _ in range(count)]


class HttpProbe:
    """A client that keeps submitting and reading in a thread while a fault is injected,
    counting every answer by status (and transport errors apart)."""

    def __init__(self, servers: Sequence[TaskdProcess]) -> None:
        self.servers = list(servers)
        self.statuses: collections.Counter[int] = collections.Counter()
        self.transport_errors: collections.Counter[str] = collections.Counter()
        self.bad: list[str] = []  # every answer >= 500 other than 503, with its body
        self.submitted: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HttpProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the HTTP probe did not stop"

    def _note(self, method: str, path: str, response: httpx.Response) -> None:
        self.statuses[response.status_code] += 1
        if response.status_code >= 500 and response.status_code != 503:
            self.bad.append(f"{method} {path} -> {response.status_code} {response.text[:300]}")

    def _run(self) -> None:
        clients = [httpx.Client(base_url=s.url, timeout=15) for s in self.servers]
        try:
            turn = 0
            while not self._stop.is_set():
                client = clients[turn % len(clients)]
                turn += 1
                calls: list[tuple[str, str, dict[str, Any]]] = [
                    ("POST", "/tasks", {"json": {"task_type": "record", "payload": {"seconds": 0}}}),
                    ("GET", "/stats", {}),
                ]
                if self.submitted:
                    calls.append(("GET", f"/tasks/{self.submitted[-1]}", {}))
                for method, path, kwargs in calls:
                    try:
                        response = client.request(method, path, **kwargs)
                    except httpx.TransportError as exc:
                        self.transport_errors[type(exc).__name__] += 1
                        continue
                    self._note(method, path, response)
                    if method == "POST" and response.status_code == 201:
                        self.submitted.append(response.json()["id"])
                self._stop.wait(0.02)
        finally:
            for client in clients:
                client.close()


# -- what the handlers recorded ---------------------------------------------------------------------


@dataclasses.dataclass
class Execution:
    """One run of a handler: from its start line to its end or cancelled line (None: never
    finished, its process died)."""

    task_id: int
    attempt: int
    pid: int
    token: str
    start: float
    finish: float | None = None
    how: str | None = None  # "end", "cancelled" or None

    @property
    def ended(self) -> bool:
        return self.how == "end"

    def until(self, open_until: float) -> float:
        return self.finish if self.finish is not None else open_until

    def overlaps(self, other: Execution, open_until: Callable[[Execution], float]) -> bool:
        return self.start < other.until(open_until(other)) and other.start < self.until(open_until(self))

    def intersects(self, start: float, end: float, open_until: float = float("inf")) -> bool:
        return self.start < end and start < self.until(open_until)

    def __str__(self) -> str:
        return (f"task {self.task_id} attempt {self.attempt} pid {self.pid} "
                f"{self.start:.3f}..{'?' if self.finish is None else f'{self.finish:.3f}'} {self.how}")


class Recording:
    """The lines the recording handlers wrote, as executions grouped by task."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.executions: list[Execution] = []
        self.unpaired: list[str] = []
        open_runs: dict[str, Execution] = {}
        text = path.read_text() if path.exists() else ""
        # A reader racing a writer can see the first bytes of a line being appended (a read is
        # not atomic against a write): only lines already ended by their newline count.
        for line in text.split("\n")[:-1]:
            kind, task_id, attempt, pid, at, token = line.split()
            if kind == "start":
                run = Execution(int(task_id), int(attempt), int(pid), token, float(at))
                open_runs[token] = run
                self.executions.append(run)
            elif token in open_runs:
                run = open_runs.pop(token)
                run.finish, run.how = float(at), kind
            else:
                self.unpaired.append(line)
        self.by_task: dict[int, list[Execution]] = collections.defaultdict(list)
        for run in sorted(self.executions, key=lambda r: r.start):
            self.by_task[run.task_id].append(run)

    def runs(self, task_id: int) -> list[Execution]:
        return self.by_task.get(task_id, [])

    def on_pid(self, pid: int) -> list[Execution]:
        return [run for run in self.executions if run.pid == pid]

    def duplicated(self) -> dict[int, list[Execution]]:
        """Tasks that ran more than once."""
        return {task_id: runs for task_id, runs in self.by_task.items() if len(runs) > 1}

    def overlapping(self, open_until: Callable[[Execution], float] = lambda run: float("inf"),
                    ) -> list[tuple[Execution, Execution]]:
        """Pairs of executions of one task that ran at the same time (an unfinished one counts
        as running until open_until(it))."""
        pairs = []
        for runs in self.by_task.values():
            for i, first in enumerate(runs):
                for second in runs[i + 1:]:
                    if first.overlaps(second, open_until):
                        pairs.append((first, second))
        return pairs

    def histogram(self) -> dict[int, int]:
        """Number of tasks by number of executions."""
        return dict(sorted(collections.Counter(len(runs) for runs in self.by_task.values()).items()))


@pytest.fixture
def record_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "executions.log"


# -- taskd processes on any database ----------------------------------------------------------------


@pytest.fixture
def launch_taskd(record_path: pathlib.Path, request: pytest.FixtureRequest,
                 ) -> Iterator[Callable[..., TaskdProcess]]:
    """launch_taskd(url, *args, wait=True, **env) -> a taskd process on that database, recording
    executions to record_path; every one is killed afterwards."""
    started: list[TaskdProcess] = []

    def start(url: str, *args: str, wait: bool = True, **env: Any) -> TaskdProcess:
        full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        full_env.update({"DATABASE_URL": url, "TASK_MODULES": "tests.e2e.handlers", "PYTHONUNBUFFERED": "1",
                         RECORD_ENV: str(record_path)})
        full_env.update({k: str(v) for k, v in env.items()})
        process = TaskdProcess(full_env, list(args), ROOT)
        started.append(process)
        return process.wait_ready(60) if wait else process

    yield start
    failed = _failed(request)
    for process in started:
        process.close()
        lines = process.lines
        shown = lines if failed or os.environ.get("TASKD_FAULTS_FULL_LOG") else lines[-12:]
        print(f"--- taskd on port {process.port} (pid {process.proc.pid}, exit {process.proc.returncode}, "
              f"{len(lines)} lines{'' if failed else ', the last 12'}) ---\n{''.join(shown)}")


def tracebacks(process: TaskdProcess) -> int:
    return process.output.count("Traceback")


# -- a PostgreSQL cluster of the test's own ---------------------------------------------------------


class PrivateCluster:
    """A PostgreSQL cluster made with pgserver's bundled binaries, listening on 127.0.0.1 only.

    Running as root (as here), initdb and postgres refuse to run; like pgserver, they then run
    as the unprivileged system user `pgserver` (created if missing), in a folder it owns.
    """

    SYSTEM_USER = "pgserver"

    def __init__(self) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.base = pathlib.Path(tempfile.mkdtemp(prefix="taskd-faults-pg-"))
        self.pgdata = self.base / "pgdata"
        self.logfile = self.base / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.user: str | None = None
        self.running = False
        if os.geteuid() == 0:
            self._prepare_for_system_user()
        self._command("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "--encoding=utf8",
                      "--no-sync", timeout=120)

    def _prepare_for_system_user(self) -> None:
        import pwd
        import stat

        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(self.SYSTEM_USER)
        # What pgserver itself does before running its binaries as another user.
        ensure_prefix_permissions(self.bin)
        ensure_folder_permissions(self.bin, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(self.bin.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam(self.SYSTEM_USER)
        self.base.chmod(0o755)  # mkdtemp made it 0700; tests (root) read the log, the user writes here
        os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self.user = self.SYSTEM_USER

    def _command(self, exe: str, *args: str, timeout: float) -> None:
        # Output to a file, not a pipe: pg_ctl's postgres child inherits the descriptors and
        # would hold a pipe open for its whole life.
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run([str(self.bin / exe), *args], stdout=out, stderr=subprocess.STDOUT,
                                    user=self.user, timeout=timeout, check=False)
            if result.returncode != 0:
                out.seek(0)
                raise AssertionError(f"{exe} {' '.join(args)} exited {result.returncode}:\n{out.read()}\n"
                                     f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "".join(self.logfile.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.base} -c fsync=off -c full_page_writes=off "
                   f"-c max_connections=200")
        self._command("pg_ctl", "-D", str(self.pgdata), "-l", str(self.logfile), "-w", "-t", "60",
                      "-o", options, "start", timeout=90)
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" rolls back open transactions and closes every connection;
        "immediate" is a crash (recovery at the next start)."""
        self._command("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", mode, "stop", timeout=90)
        self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        if self.running:
            try:
                self.stop("immediate")
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                print(f"stopping the private cluster failed: {exc}")
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivateCluster]:
    """A running PostgreSQL cluster of this test's own: url, stop(), start(), restart()."""
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


# -- a TCP proxy that can partition the network -----------------------------------------------------


class _Pair:
    """A client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self.closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv()
            except OSError:
                pass
            sock.close()


class TcpProxy:
    """Forwards every connection made to 127.0.0.1:port to the upstream (host, port) or Unix socket.

    pause(): a partition; no byte moves either way and no connection is accepted, but every
    socket stays open (what was in flight is held and delivered on resume()).
    cut(): closes every connection at once (new ones are still accepted).
    """

    def __init__(self, upstream: tuple[str, int] | str) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self.accepted = 0
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._acceptor.join(5)
        self.cut()
        self._listener.close()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(self.upstream)
        else:
            sock = socket.create_connection(self.upstream, timeout=5)
        sock.settimeout(None)
        return sock

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            if not self._flowing.wait(0.1):
                continue  # partitioned: connections wait in the backlog, unanswered
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while not self._flowing.wait(0.1):  # partitioned: hold the bytes
                    if pair.closed:
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            pair.close()


def proxy_target(url: str) -> tuple[tuple[str, int] | str, Callable[[int], str]]:
    """Where a database URL points (TCP address or Unix socket path), and a function giving the
    same URL through a proxy listening on 127.0.0.1:<port>."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    target: tuple[str, int] | str = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
    userinfo = urllib.parse.quote(parts.username or "postgres")
    if parts.password:
        userinfo += ":" + urllib.parse.quote(parts.password)

    def through(proxy_port: int) -> str:
        return urllib.parse.urlunsplit(("postgresql", f"{userinfo}@127.0.0.1:{proxy_port}", parts.path, "", ""))

    return target, through


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str], tuple[TcpProxy, str]]]:
    """tcp_proxy(database_url) -> (proxy, the URL to reach that database through it)."""
    proxies: list[TcpProxy] = []

    def make(url: str) -> tuple[TcpProxy, str]:
        target, through = proxy_target(url)
        proxy = TcpProxy(target)
        proxies.append(proxy)
        return proxy, through(proxy.port)

    yield make
    for proxy in proxies:
        proxy.close()
