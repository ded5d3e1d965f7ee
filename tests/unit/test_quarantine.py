"""Quarantine runs one attempt in a child process: its crash is its own, and is reported as such.
These start real child processes (no database)."""

from __future__ import annotations

import json
import pathlib

import trio

from taskd import failures
from taskd.models import ClaimedTask
from taskd.quarantine import QuarantinedFailure, run_quarantined

MODULES = ("tests.e2e.handlers",)


def _task(task_type: str, payload_json: str = "{}") -> ClaimedTask:
    return ClaimedTask(7, task_type, payload_json, 3, 3, 30.0, crashes=2)


async def test_a_result_comes_back_from_the_child() -> None:
    assert await run_quarantined(_task("echo", '{"a": [1, 2]}'), MODULES) == '{"a":[1,2]}'


async def test_the_handlers_own_exception_comes_back_described() -> None:
    try:
        await run_quarantined(_task("raise_nul"), MODULES)
    except QuarantinedFailure as exc:
        assert exc.described["type"] == "ValueError" and "\\x00" in exc.described["message"]
    else:
        raise AssertionError("the handler raised")


async def test_a_child_that_dies_is_a_crash_and_signalling_its_group_cannot_reach_taskd() -> None:
    for task_type, says in [("exit_process", "exited with status 3"), ("kill_own_group", "killed by SIGKILL")]:
        try:
            await run_quarantined(_task(task_type), MODULES)
        except failures.Crashed as exc:
            assert says in str(exc)
        else:
            raise AssertionError(f"{task_type} crashed its child")
    # Still here: the child had a session of its own, so killpg() reached only the child.


async def test_a_timeout_kills_the_child_at_once() -> None:
    started = trio.current_time()
    with trio.move_on_after(1):
        await run_quarantined(_task("sleep", '{"seconds": 30}'), MODULES)
    assert trio.current_time() - started < 3


def _alive(pid: int) -> bool:
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie left for init to reap is dead


async def test_a_handler_running_longer_than_trios_idle_thread_timeout_is_not_killed() -> None:
    # trio forks from worker threads that exit after 10 s idle; nothing may tie the child to them.
    assert await run_quarantined(_task("sleep", '{"seconds": 11}'), MODULES) == '{"slept":11}'


async def test_a_timeout_kills_what_the_handler_started_too(tmp_path: pathlib.Path) -> None:
    pidfile = tmp_path / "pid"
    with trio.move_on_after(3):
        await run_quarantined(_task("spawn_and_wait", json.dumps({"pidfile": str(pidfile)})), MODULES)
    grandchild = int(pidfile.read_text())
    with trio.fail_after(2):
        while _alive(grandchild):  # noqa: ASYNC110  (another process's state)
            await trio.sleep(0.05)


async def test_fail_and_retry_keep_their_meaning_in_quarantine() -> None:
    import taskd

    try:
        await run_quarantined(_task("control", '{"do": "fail"}'), MODULES)
    except QuarantinedFailure as exc:
        assert exc.final and exc.described["type"] == "Fail"
    else:
        raise AssertionError("the handler raised Fail")
    try:
        await run_quarantined(_task("control", '{"do": "retry"}'), MODULES)
    except taskd.Retry as snooze:
        assert snooze.after == 12
    else:
        raise AssertionError("the handler raised Retry")
