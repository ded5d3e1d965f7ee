"""Task handlers the end-to-end tests load into the server with TASK_MODULES=tests.e2e.handlers."""

from __future__ import annotations

from typing import Any

import trio

import taskd


@taskd.task("flaky")
async def flaky(payload: dict[str, Any], ctx: taskd.TaskContext) -> dict[str, int]:
    """Fails its first payload.fail_times attempts, then succeeds."""
    if ctx.attempt <= payload.get("fail_times", 0):
        raise ConnectionError(f"simulated failure on attempt {ctx.attempt}")
    return {"succeeded_on_attempt": ctx.attempt}


@taskd.task("wait_for_file")
async def wait_for_file(payload: dict[str, Any], ctx: taskd.TaskContext) -> str:
    """Runs until the file named in payload.path exists: a task the test decides when to end."""
    path = trio.Path(payload["path"])
    while not await path.exists():  # noqa: ASYNC110  (another process creates the file)
        await trio.sleep(0.05)
    return "released"
