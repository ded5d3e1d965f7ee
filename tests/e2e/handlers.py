"""Task handlers the end-to-end tests load into the server with TASK_MODULES=tests.e2e.handlers."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
import uuid
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


# -- the fault-injection suite (tests/e2e/faults) -------------------------------------------------
#
# `record` and `sync_hang` append one line per execution start and finish to the file named by
# TASKD_TEST_RECORD: "<kind> <task id> <attempt> <pid> <unix time> <execution token>", where kind
# is start, end (the handler finished) or cancelled (trio cancelled it). The token pairs a start
# with its finish even when the same attempt number runs twice (an attempt released uncounted).
# The rest are poison: each misbehaves in one way a handler can, and must fail only its attempt.

RECORD_ENV = "TASKD_TEST_RECORD"


def _record_line(kind: str, ctx: taskd.TaskContext, token: str) -> None:
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    line = f"{kind} {ctx.task_id} {ctx.attempt} {os.getpid()} {time.time():.6f} {token}\n"
    # One write() of one whole line on an O_APPEND descriptor: lines from several processes
    # never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@taskd.task("record")
async def record(payload: dict[str, Any], ctx: taskd.TaskContext) -> dict[str, int]:
    """Sleeps payload.seconds (default 0), writing a start line and an end (or cancelled) line."""
    token = uuid.uuid4().hex[:12]
    _record_line("start", ctx, token)
    try:
        await trio.sleep(payload.get("seconds", 0))
    except trio.Cancelled:
        _record_line("cancelled", ctx, token)
        raise
    _record_line("end", ctx, token)
    return {"task_id": ctx.task_id}


@taskd.task("sync_hang")
def sync_hang(payload: dict[str, Any], ctx: taskd.TaskContext) -> dict[str, int]:
    """A plain def that blocks its thread for payload.seconds (recorded like `record`)."""
    token = uuid.uuid4().hex[:12]
    _record_line("start", ctx, token)
    time.sleep(payload["seconds"])
    _record_line("end", ctx, token)
    return {"task_id": ctx.task_id}


@taskd.task("exit_process")
async def exit_process(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    """Takes down whatever process runs it, at once, without cleanup."""
    _record_line("start", ctx, uuid.uuid4().hex[:12])
    os._exit(3)


@taskd.task("raise_nul")
async def raise_nul(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    """An error message PostgreSQL's text and jsonb refuse as is: a NUL and a lone surrogate."""
    raise ValueError("bad\x00byte \udc80")


@taskd.task("raise_group_on_cancel")
async def raise_group_on_cancel(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    """Hangs; when the attempt's timeout cancels it, one child raises instead, so the handler
    ends in BaseExceptionGroup(Cancelled, ValueError)."""

    async def raise_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            raise ValueError("raised while being cancelled") from None  # noqa: ASYNC120

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        nursery.start_soon(raise_when_cancelled)


@taskd.task("raise_keyboard_interrupt")
async def raise_keyboard_interrupt(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    raise KeyboardInterrupt


@taskd.task("raise_base_exception")
async def raise_base_exception(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    raise BaseException("x")


class UnprintableError(Exception):
    """An exception that cannot be turned into text."""

    def __str__(self) -> str:
        raise RuntimeError("this exception refuses to be printed")

    def __repr__(self) -> str:
        raise RuntimeError("this exception refuses to be printed")


@taskd.task("raise_unprintable")
async def raise_unprintable(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    raise UnprintableError()


@taskd.task("return_garbage")
async def return_garbage(payload: dict[str, Any], ctx: taskd.TaskContext) -> set[int]:
    """A result that is not JSON."""
    return {1, 2, 3}


@taskd.task("return_nan")
async def return_nan(payload: dict[str, Any], ctx: taskd.TaskContext) -> float:
    """A result JSON text can carry but jsonb refuses."""
    return float("nan")


@taskd.task("kill_own_group")
def kill_own_group(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    """Signals its whole process group, as a handler cleaning up its own children might."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


@taskd.task("swallow_cancel")
async def swallow_cancel(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    """Cannot be cancelled: the bug of a handler that catches everything (here, shielded sleeps)."""
    while True:
        with trio.CancelScope(shield=True):
            await trio.sleep(0.1)


@taskd.task("spawn_and_wait")
def spawn_and_wait(payload: dict[str, Any], ctx: taskd.TaskContext) -> None:
    """Starts a subprocess of its own (its pid written to payload.pidfile) and waits."""
    child = subprocess.Popen(["sleep", "60"])
    pathlib.Path(payload["pidfile"]).write_text(str(child.pid))
    time.sleep(60)


@taskd.task("control")
async def control(payload: dict[str, Any], ctx: taskd.TaskContext) -> str:
    """Raises taskd.Fail or taskd.Retry(after=12), as payload.do says."""
    if payload.get("do") == "fail":
        raise taskd.Fail("told to fail")
    if payload.get("do") == "retry":
        raise taskd.Retry(after=12)
    return "done"


# -- steering (queues, cancel, progress, uniqueness) ----------------------------------------------


def _touch(directory: str | None, name: str) -> None:
    if directory:
        (pathlib.Path(directory) / name).touch()


@taskd.task("hold")
async def hold(payload: dict[str, Any], ctx: taskd.TaskContext) -> dict[str, int]:
    """Writes payload.dir/start-<id>-<pid> and waits until payload.dir/release exists (or
    payload.seconds pass), then writes end-<id>: a test sees what runs where and for how long."""
    directory = payload.get("dir")
    _touch(directory, f"start-{ctx.task_id}-{os.getpid()}")
    with trio.move_on_after(payload.get("seconds", 3600)):
        release = trio.Path(directory or "/nonexistent", "release")
        while not await release.exists():  # noqa: ASYNC110  (the test process creates the file)
            await trio.sleep(0.02)
    _touch(directory, f"end-{ctx.task_id}")
    return {"task_id": ctx.task_id, "pid": os.getpid()}


@taskd.task("emails_default", queue="emails", priority=5, max_retries=1)
async def emails_default(payload: dict[str, Any], ctx: taskd.TaskContext) -> str:
    """Carries decorator defaults: queue emails, priority 5, max_retries 1."""
    return "sent"


@taskd.task("progress_async")
async def progress_async(payload: dict[str, Any], ctx: taskd.TaskContext) -> str:
    """Reports progress in payload.steps steps, payload.pause seconds apart."""
    steps = payload.get("steps", 4)
    for step in range(1, steps + 1):
        await ctx.progress(step / steps, f"step {step} of {steps}")
        await trio.sleep(payload.get("pause", 0.5))
    return "done"


@taskd.task("progress_sync")
def progress_sync(payload: dict[str, Any], ctx: taskd.TaskContext) -> str:
    """Like progress_async, from a plain def (a thread)."""
    steps = payload.get("steps", 4)
    for step in range(1, steps + 1):
        ctx.progress(step / steps, f"sync step {step} of {steps}")
        time.sleep(payload.get("pause", 0.5))
    return "done"


@taskd.task("cooperative_sync")
def cooperative_sync(payload: dict[str, Any], ctx: taskd.TaskContext) -> str:
    """A plain def that checks ctx.cancelled() and stops early, writing payload.dir/stopped-<id>."""
    _touch(payload.get("dir"), f"start-{ctx.task_id}-{os.getpid()}")
    deadline = time.monotonic() + payload.get("seconds", 60)
    while time.monotonic() < deadline:
        if ctx.cancelled():
            _touch(payload.get("dir"), f"stopped-{ctx.task_id}")
            return "stopped"
        time.sleep(0.02)
    return "ran out"


@taskd.task("unique_report", unique_for=3600)
async def unique_report(payload: dict[str, Any], ctx: taskd.TaskContext) -> str:
    """Queued once per hour per payload."""
    return "reported"
