"""`python -m taskd` as a subprocess: HTTP from outside, signals, kill -9, embedded mode."""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import asyncpg
import httpx

from tests.conftest import _admin, with_database

from .conftest import ROOT, TaskdProcess, counts, free_port, submit, wait_until

Start = Callable[..., TaskdProcess]


def test_submit_run_and_read_results_over_http(start_taskd: Start) -> None:
    server = start_taskd()
    assert "docs http://127.0.0.1" in server.output and "workers 50" in server.output
    first = submit(server, "echo", {"hello": "world"})
    assert first == 1, "ids start at 1 on a new database"
    response = server.http.get(f"/tasks/{first}/result", params={"wait": 10})
    assert response.status_code == 200 and response.json()["result"] == {"hello": "world"}
    proc = submit(server, "data_processing", {"data": ["a b", "c"]})
    result = server.http.get(f"/tasks/{proc}/result?wait=10").json()["result"]
    assert (result["words"], result["lines"], result["upper"]) == (3, 2, "A B\nC")
    task = server.http.get(f"/tasks/{proc}").json()
    assert task["status"] == "completed" and task["attempts"] == 1
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    tasks = [{"task_type": "echo", "payload": {"i": i}} for i in range(20)]
    batch = server.http.post("/tasks/batch", json={"tasks": tasks})
    assert batch.status_code == 201 and batch.json()["count"] == 20
    wait_until(lambda: counts(server)["completed"] == 22, what="22 completed")
    listing = server.http.get("/tasks", params={"limit": 5, "task_type": "echo"}).json()
    assert len(listing["items"]) == 5 and listing["next_cursor"]
    stats = server.http.get("/stats").json()
    assert stats["total"] == 22 and stats["success_rate"] == 1.0 and stats["workers"]["size"] == 50
    detailed = server.http.get("/stats/detailed").json()
    assert {t["task_type"] for t in detailed["by_type"]} == {"echo", "data_processing"}
    assert len(detailed["processes"]) == 1
    assert server.http.get("/ready").status_code == 200
    assert server.http.get("/docs").status_code == 200
    assert "/tasks/{task_id}/result" in server.http.get("/openapi.json").json()["paths"]


def test_bad_input_never_yields_a_500_or_writes_anything(start_taskd: Start) -> None:
    server = start_taskd()
    cases = [
        (dict(content=b"{nope", headers={"Content-Type": "application/json"}), 400),
        (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415),
        (dict(json={"task_type": "nope"}), 422),
        (dict(json={"task_type": "echo", "payload": "text"}), 422),
    ]
    for kwargs, status in cases:
        response = server.http.post("/tasks", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert set(response.json()["error"]) == {"code", "message", "details"}
    # Too large: the server answers from the headers, before the body is read.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2000000\r\n\r\n{}")
        reply = b""
        while b"}}" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        # Linger like a real client: hypercorn logs a harmless traceback when a peer
        # slams the socket shut while the response is being sent.
        time.sleep(0.2)
    assert reply.startswith(b"HTTP/1.1 413") and b'"code":"request_entity_too_large"' in reply, reply
    assert b"connection: close" in reply.lower(), "the unread body makes the connection unusable"
    # A rejected request must not leave its keep-alive connection stuck: the next one is
    # answered. (Answering 415 before reading the body made ~3% of next requests hang.)
    for _ in range(200):
        assert server.http.post("/tasks", content=b"x", headers={"Content-Type": "text/plain"},
                                timeout=5).status_code == 415
        assert server.http.post("/tasks", json={"task_type": "nope"}, timeout=5).status_code == 422
    response = server.http.post("/tasks/batch", json={"tasks": [{"task_type": "echo"}, {"task_type": "x"}]})
    assert response.status_code == 422 and response.json()["error"]["details"]["index"] == 1
    for path in ("/tasks/1", "/tasks/abc", "/tasks/1/result", "/tasks/99999999999999999999"):
        assert server.http.get(path).status_code == 404
    assert counts(server) == {"scheduled": 0, "pending": 0, "running": 0, "retrying": 0, "completed": 0, "failed": 0,
                             "cancelled": 0, "expired": 0}
    assert "Traceback" not in server.output


def test_reliability_500_tasks_with_failing_first_attempts_all_complete(start_taskd: Start) -> None:
    server = start_taskd(RETRY_DELAY="0.05", LOG_LEVEL="WARNING")
    rng = random.Random(7)
    fail_times = [rng.choice([0, 0, 0, 0, 0, 0, 0, 1, 1, 2]) for _ in range(500)]
    ids: list[int] = []
    for start in range(0, 500, 100):
        chunk = [{"task_type": "flaky", "payload": {"fail_times": f}} for f in fail_times[start:start + 100]]
        ids += server.http.post("/tasks/batch", json={"tasks": chunk}).json()["ids"]
    wait_until(lambda: counts(server)["completed"] == 500, timeout=120, what="500 completed")
    assert counts(server)["failed"] == 0
    for task_id, fails in zip(ids, fail_times, strict=True):
        task = server.http.get(f"/tasks/{task_id}").json()
        assert task["attempts"] == fails + 1
        assert [e["type"] for e in task["errors"]] == ["ConnectionError"] * fails
    by_type = {t["task_type"]: t for t in server.http.get("/stats/detailed").json()["by_type"]}
    assert by_type["flaky"]["retry_success_rate"] == 1.0
    assert sum(f > 0 for f in fail_times) > 100


def test_delete_cancels_a_running_task(start_taskd: Start, tmp_path: pathlib.Path) -> None:
    server = start_taskd()
    running = submit(server, "wait_for_file", {"path": str(tmp_path / "never")})
    wait_until(lambda: server.http.get(f"/tasks/{running}").json()["status"] == "running", what="running")
    assert server.http.delete(f"/tasks/{running}").status_code == 204
    assert server.http.get(f"/tasks/{running}").status_code == 404
    wait_until(lambda: server.http.get("/stats").json()["workers"]["busy"] == 0, what="worker freed")
    wait_until(lambda: "deleted while running" in server.output, what="the deletion logged")


def test_sigterm_mid_work_exits_0_releases_tasks_and_a_restart_finishes_them(
    start_taskd: Start, tmp_path: pathlib.Path
) -> None:
    gate = tmp_path / "gate"
    server = start_taskd(SHUTDOWN_GRACE="0.5")
    ids = [submit(server, "wait_for_file", {"path": str(gate)}) for _ in range(10)]
    wait_until(lambda: counts(server)["running"] == 10, what="10 running")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0, server.output
    gate.touch()
    server = start_taskd()
    for task_id in ids:
        # The attempt cut short by shutdown did not count.
        task = server.http.get(f"/tasks/{task_id}/result?wait=20").json()
        assert task["status"] == "completed", task
        assert server.http.get(f"/tasks/{task_id}").json()["attempts"] == 1


def test_sigterm_lets_running_tasks_finish_within_the_grace(start_taskd: Start) -> None:
    server = start_taskd(SHUTDOWN_GRACE="20")
    ids = [submit(server, "sleep", {"seconds": 1.5}) for _ in range(5)]
    wait_until(lambda: counts(server)["running"] == 5, what="5 running")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    server = start_taskd("--workers", "0")
    assert counts(server) == {"scheduled": 0, "pending": 0, "running": 0, "retrying": 0, "completed": 5, "failed": 0,
                             "cancelled": 0, "expired": 0}
    assert all(server.http.get(f"/tasks/{i}").json()["attempts"] == 1 for i in ids)


def test_a_second_signal_cuts_the_grace_to_zero(start_taskd: Start, tmp_path: pathlib.Path) -> None:
    server = start_taskd(SHUTDOWN_GRACE="600")
    submit(server, "wait_for_file", {"path": str(tmp_path / "never")})
    wait_until(lambda: counts(server)["running"] == 1, what="running")
    server.signal(signal.SIGTERM)
    time.sleep(1)
    assert server.proc.poll() is None, "still inside its grace period"
    server.signal(signal.SIGINT)
    assert server.wait_exit(15) == 0
    server = start_taskd("--workers", "0")
    assert counts(server)["pending"] == 1 and counts(server)["running"] == 0


def test_kill_9_mid_work_loses_nothing(start_taskd: Start, tmp_path: pathlib.Path) -> None:
    gate = tmp_path / "gate"
    server = start_taskd(LEASE_SECONDS="1.5")
    ids = [submit(server, "wait_for_file", {"path": str(gate)}) for _ in range(20)]
    done = [submit(server, "echo", {"i": i}) for i in range(5)]
    wait_until(lambda: counts(server)["running"] == 20, what="20 running")
    server.signal(signal.SIGKILL)
    assert server.wait_exit(10) == -signal.SIGKILL
    gate.touch()
    server = start_taskd(LEASE_SECONDS="1.5")
    for task_id in ids:
        assert server.http.get(f"/tasks/{task_id}/result?wait=30").json()["status"] == "completed"
        task = server.http.get(f"/tasks/{task_id}").json()
        assert task["attempts"] == 2, "the attempt that died counts"
        assert [e["type"] for e in task["errors"]] == ["LeaseExpired"]
    assert all(server.http.get(f"/tasks/{i}").json()["attempts"] == 1 for i in done)
    assert counts(server) == {"scheduled": 0, "pending": 0, "running": 0, "retrying": 0, "completed": 25, "failed": 0,
                             "cancelled": 0, "expired": 0}


def test_embedded_database_when_no_url_is_set(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DATA_DIR"] = str(tmp_path / "data")
    server = TaskdProcess(env, [], ROOT)
    try:
        server.wait_ready(120)
        assert "embedded PostgreSQL in" in server.output
        task_id = server.http.post("/tasks", json={"task_type": "echo", "payload": {"kept": 1}}).json()["id"]
        assert server.http.get(f"/tasks/{task_id}/result?wait=10").json()["result"] == {"kept": 1}
        server.signal(signal.SIGTERM)
        assert server.wait_exit(60) == 0
    finally:
        server.close()
    assert (tmp_path / "data" / "pgdata" / "PG_VERSION").exists()
    again = TaskdProcess(env, [], ROOT)
    try:
        again.wait_ready(120)
        assert again.http.get(f"/tasks/{task_id}").json()["status"] == "completed", "data survives restarts"
        again.signal(signal.SIGTERM)
        assert again.wait_exit(60) == 0
    finally:
        again.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "taskd", *args], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_unreachable_database_exits_1_with_one_line() -> None:
    result = run_cli("--port", str(free_port()), env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot reach the database" in result.stderr, result.stderr


def test_invalid_setting_exits_2_with_one_line() -> None:
    result = run_cli(env={"RETRY_DELAY": "soon"})
    assert result.returncode == 2
    assert result.stderr.strip() == "taskd: invalid RETRY_DELAY: must be a number of seconds, got 'soon'"


def test_port_in_use_exits_1_with_one_line(database_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("--port", str(port), env={"DATABASE_URL": database_url})
    assert result.returncode == 1
    assert "address is in use" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_wait_for_db_keeps_trying_until_the_database_appears(start_taskd: Start, server_url: str) -> None:
    name = f"taskd_late_{os.getpid()}"
    _admin(server_url, f"DROP DATABASE IF EXISTS {name}")
    try:
        server = start_taskd("--wait-for-db", wait=False, DATABASE_URL=with_database(server_url, name))
        wait_until(lambda: "waiting for the database" in server.output, what="a waiting message")
        assert server.proc.poll() is None
        _admin(server_url, f"CREATE DATABASE {name}")
        server.wait_ready(30)
        assert httpx.get(f"{server.url}/ready").status_code == 200
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
    finally:
        _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_http_workers_share_the_port_and_stop_together(start_taskd: Start) -> None:
    server = start_taskd("--http-workers", "3")
    wait_until(lambda: len(server.http.get("/stats/detailed").json()["processes"]) == 3, what="3 processes")
    clients = [httpx.Client(base_url=server.url) for _ in range(6)]  # separate connections
    try:
        ids = [c.post("/tasks", json={"task_type": "echo", "payload": {"i": i}}).json()["id"]
               for i in range(10) for c in clients]
    finally:
        for c in clients:
            c.close()
    assert len(set(ids)) == 60
    wait_until(lambda: counts(server)["completed"] == 60, what="60 completed")
    processes = server.http.get("/stats/detailed").json()["processes"]
    assert sorted(p["workers"] for p in processes) == [0, 0, 50], "only the first process runs tasks"
    children = [int(p["pid"]) for p in processes if p["workers"] == 0]
    server.signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0
    for pid in children:
        wait_until(lambda pid=pid: not _alive(pid), timeout=10, what=f"child {pid} gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_scheduled_task_starts_not_before_its_time_and_within_a_second_after(
        start_taskd: Start, database_url: str) -> None:
    server = start_taskd()
    task_id = submit(server, "echo", {"x": 1}, delay_seconds=2)
    shown = server.http.get(f"/tasks/{task_id}").json()
    assert shown["status"] == "scheduled" and shown["run_at"] is not None
    assert [t["id"] for t in server.http.get("/tasks", params={"status": "scheduled"}).json()["items"]] == [task_id]
    assert server.http.get("/stats").json()["counts"]["scheduled"] == 1
    assert server.http.get(f"/tasks/{task_id}/result", params={"wait": 10}).status_code == 200

    async def lateness() -> float:
        conn = await asyncpg.connect(database_url)
        try:
            return float(await conn.fetchval("SELECT extract(epoch FROM started_at - run_at) FROM taskd.tasks "
                                             "WHERE id = $1", task_id))
        finally:
            await conn.close()

    late = asyncio.run(lateness())
    print(f"scheduled task started {late * 1000:.0f} ms after its run_at")
    assert 0 <= late < 1.0
