"""Upgrades from outside: the previous release's code (exported with `git archive`) keeps working
beside this one on one database while this one migrates it; this release refuses a schema newer
than itself (one line, status 2); rows with a status a later release added are served, not 500s;
and the migrations the previous release shipped are never edited."""

from __future__ import annotations

import collections
import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
from typing import NoReturn

import pytest

from taskd import sql

from .conftest import ROOT, TaskdProcess, counts, execute, free_port, get_task, submit, wait_until

# The commit before issue 8's work: the release whose processes meet this one's on a database.
PREVIOUS_RELEASE = "cd13255"
FOREIGN = "e2e_paused_by_newer"


def unavailable(reason: str) -> NoReturn:
    """Skip, except in CI, where a skipped upgrade test would hide a broken guarantee."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the upgrade test must run there)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The previous release's tree, exported from git (the repository is not touched)."""
    git = shutil.which("git")
    if git is None:
        unavailable("git is not installed")
    found = subprocess.run([git, "rev-parse", "--verify", "--quiet", f"{PREVIOUS_RELEASE}^{{commit}}"], cwd=ROOT,
                           capture_output=True, text=True)
    if found.returncode != 0:
        unavailable(f"revision {PREVIOUS_RELEASE} is not in this repository (a shallow clone?)")
    archive = subprocess.run([git, "archive", "--format=tar", found.stdout.strip()], cwd=ROOT, capture_output=True,
                             check=True).stdout
    tree = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    imported = subprocess.run([sys.executable, "-c", "import taskd, tests.e2e.handlers as h; print(taskd.__file__); "
                               "print(h.__file__)"], cwd=tree, env=release_env(tree), capture_output=True, text=True,
                              check=True).stdout.split()
    assert all(pathlib.Path(p).resolve().is_relative_to(tree.resolve()) for p in imported), imported
    return tree


def release_env(tree: pathlib.Path | None, **settings: str) -> dict[str, str]:
    """The environment of a taskd child: the previous release's from `tree` (None: this one)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "TASK_MODULES", "WAIT_FOR_DB", "QUEUES", "WORKER_POOL_SIZE")}
    if tree is not None:
        # `-m` puts the working directory first on sys.path, ahead of the venv's editable
        # install of this checkout; PYTHONPATH covers what the server spawns elsewhere.
        env["PYTHONPATH"] = str(tree)
    env.update({"PYTHONUNBUFFERED": "1", "TASK_MODULES": "tests.e2e.handlers", **settings})
    return env


def ledger(url: str) -> list[int]:
    return [r["version"] for r in execute(url, "SELECT version FROM taskd.migrations ORDER BY version")]


def executions(record: pathlib.Path) -> dict[str, dict[int, list[int]]]:
    """kind -> task id -> the pids of the processes that wrote that line for it."""
    seen: dict[str, dict[int, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    if record.exists():
        for line in record.read_text().splitlines():
            kind, task_id, _attempt, pid, *_ = line.split()
            seen[kind][int(task_id)].append(int(pid))
    return seen


def assert_clean(process: TaskdProcess, name: str) -> None:
    assert process.proc.poll() is None, f"the {name} release's process exited:\n{process.output}"
    process.http.close()  # an idle keep-alive connection would hold the graceful stop for its timeout
    process.signal(signal.SIGTERM)
    assert process.wait_exit() == 0, process.output
    assert "Traceback" not in process.output, f"the {name} release logged a traceback:\n{process.output}"
    assert " ERROR " not in process.output, f"the {name} release logged an error:\n{process.output}"


def test_the_previous_release_keeps_working_beside_this_one_on_one_database(
        previous_release: pathlib.Path, empty_database_url: str, tmp_path: pathlib.Path,
        processes: list[TaskdProcess]) -> None:
    record = tmp_path / "executions"
    common = {"DATABASE_URL": empty_database_url, "TASKD_TEST_RECORD": str(record)}
    old = TaskdProcess(release_env(previous_release, **common, QUEUES="shared=4,to_old=4"), [], previous_release)
    processes.append(old)
    old.wait_ready()
    old_versions = sorted(int(p.name[:4]) for p in (previous_release / "sql" / "migrations").glob("*.sql"))
    assert ledger(empty_database_url) == old_versions

    before = [submit(old, "record", {"seconds": 0.02}, queue="shared") for _ in range(20)]
    # Work in flight while this release migrates the database under the old one.
    in_flight = [submit(old, "record", {"seconds": 1.0}, queue="shared") for _ in range(4)]
    wait_until(lambda: all(i in executions(record)["start"] for i in in_flight), what="the old release running")

    new = TaskdProcess(release_env(None, **common, QUEUES="shared=4,to_new=4"), [], ROOT)
    processes.append(new)
    new.wait_ready()
    assert ledger(empty_database_url) == [m.version for m in sql.migrations()]

    after = {
        "old->shared": [submit(old, "record", {"seconds": 0.02}, queue="shared") for _ in range(20)],
        "old->to_new": [submit(old, "record", {"seconds": 0.02}, queue="to_new") for _ in range(10)],
        "new->shared": [submit(new, "record", {"seconds": 0.02}, queue="shared") for _ in range(20)],
        "new->to_old": [submit(new, "record", {"seconds": 0.02}, queue="to_old") for _ in range(10)],
    }
    every = before + in_flight + [i for ids in after.values() for i in ids]
    wait_until(lambda: set(every) <= set(executions(record)["end"]), timeout=60, what="every task to run")

    seen = executions(record)
    twice = {i: pids for i, pids in seen["start"].items() if len(pids) != 1}
    assert not twice, f"tasks started more than once: {twice}"
    assert all(len(seen["end"][i]) == 1 for i in every) and not seen["cancelled"]
    assert {pid for i in after["old->to_new"] for pid in seen["end"][i]} == {new.proc.pid}
    assert {pid for i in after["new->to_old"] for pid in seen["end"][i]} == {old.proc.pid}, \
        "the old release keeps claiming after the upgrade"
    for task_id in every:  # each release reads what the other wrote
        for server in (old, new):
            task = get_task(server, task_id)
            assert (task["status"], task["attempts"]) == ("completed", 1), task
    for server in (old, new):  # the counts include what the other release did
        wait_until(lambda s=server: counts(s).get("completed") == len(every), timeout=10,
                   what=f"/stats on port {server.port} to count every task")
        assert server.http.get("/stats/detailed").status_code == 200

    assert_clean(old, "previous")
    assert_clean(new, "new")


@pytest.mark.parametrize("wait_for_db", ["false", "true"])
def test_a_schema_newer_than_this_taskd_is_refused_with_one_line_and_status_2(
        database_url: str, tmp_path: pathlib.Path, wait_for_db: str) -> None:
    known = len(sql.migrations())
    execute(database_url, "INSERT INTO taskd.migrations (version, name) VALUES ($1, 'from_the_future')", known + 1)
    env = release_env(None, DATABASE_URL=database_url, WAIT_FOR_DB=wait_for_db)
    result = subprocess.run([sys.executable, "-m", "taskd", "--port", str(free_port())], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"taskd: the database's schema is at version {known + 1}, newer than this taskd ({known}): upgrade taskd, "
        "or point it at another database"), result.stderr
    assert "Traceback" not in result.stderr and "taskd: API" not in result.stdout
    assert ledger(database_url) == [*range(1, known + 1), known + 1]


def test_rows_with_a_status_from_a_later_release_are_served_not_500(
        database_url: str, processes: list[TaskdProcess]) -> None:
    allowed = execute(database_url, "SELECT pg_get_constraintdef(oid) AS c FROM pg_constraint "
                                    "WHERE conname = 'tasks_status_check'")[0]["c"]
    execute(database_url, "ALTER TABLE taskd.tasks DROP CONSTRAINT tasks_status_check")
    execute(database_url, "ALTER TABLE taskd.tasks ADD CONSTRAINT tasks_status_check "
                          + allowed.replace("'expired'::text", f"'expired'::text, '{FOREIGN}'::text"))
    (foreign,) = [r["id"] for r in execute(
        database_url, "INSERT INTO taskd.tasks (task_type, status, max_retries, timeout_seconds, run_at) "
                      "VALUES ('echo', $1, 3, 30, now() - interval '1 minute') RETURNING id", FOREIGN)]
    server = TaskdProcess(release_env(None, DATABASE_URL=database_url), [], ROOT)
    processes.append(server)
    server.wait_ready()

    assert get_task(server, foreign)["status"] == FOREIGN
    plain = submit(server, "echo", {"n": 1})
    wait_until(lambda: get_task(server, plain)["status"] == "completed", what="a plain task to complete")
    listed = server.http.get("/tasks")
    assert listed.status_code == 200
    assert [(t["id"], t["status"]) for t in listed.json()["items"]] == [(plain, "completed"), (foreign, FOREIGN)]
    assert [t["status"] for t in server.http.get("/tasks", params={"full": "true"}).json()["items"]] == [
        "completed", FOREIGN]
    result = server.http.get(f"/tasks/{foreign}/result")
    assert (result.status_code, result.json()["status"]) == (202, FOREIGN)
    for path in ("/stats", "/stats/detailed", "/queues"):
        response = server.http.get(path)
        assert response.status_code == 200, (path, response.text)
    cancel = server.http.post(f"/tasks/{foreign}/cancel")
    assert cancel.status_code == 409 and FOREIGN in cancel.json()["error"]["message"]
    assert server.http.post(f"/tasks/{foreign}/retry").status_code == 409
    row = execute(database_url, "SELECT status, attempts FROM taskd.tasks WHERE id = $1", foreign)
    assert [tuple(r) for r in row] == [(FOREIGN, 0)], "never claimed, cancelled or retried"
    assert server.http.delete(f"/tasks/{foreign}").status_code == 204
    assert f"tasks with status '{FOREIGN}'" in server.output
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0 and "Traceback" not in server.output


def test_the_migrations_the_previous_release_shipped_are_unchanged(previous_release: pathlib.Path) -> None:
    """A database the previous release migrated never runs an edited file again: changing one
    makes upgraded databases differ from new ones. Change the schema in a new migration."""
    shipped = {m.version: m for m in sql.migrations()}
    for path in sorted((previous_release / "sql" / "migrations").glob("*.sql")):
        version = int(path.name[:4])
        assert version in shipped, f"{path.name} is gone"
        assert f"{version:04d}_{shipped[version].name}.sql" == path.name, f"{path.name} was renamed"
        assert shipped[version].text == path.read_text(encoding="utf-8").strip(), f"{path.name} was edited"
