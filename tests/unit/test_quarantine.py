"""Quarantine runs one attempt in a child process: its crash is its own, and is reported as such.
These start real child processes (no database)."""

from __future__ import annotations

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
