"""Quarantine: run one attempt in a child process of its own.

A task whose process died under it more than once may be what kills processes
(`os._exit`, a segfault in an extension, memory blown up). Its next attempts run
here, in `python -m taskd.quarantine`, where a crash costs only that attempt and
says so: the child's death is the attempt's outcome, counted as a crash.

The parent writes one JSON request to the child's stdin; the child imports the
handler modules, runs the handler, and writes one JSON line with the result or
the error to the stdout it was started with (the handler's own prints go to
stderr). A timeout or a cancel kills the child, so even a plain-`def` handler
stops for real here.
Imports taskd.builtin_tasks, taskd.registry, taskd.failures, taskd.jsontext, taskd.models.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import trio
import trio_asyncio

from taskd import failures
from taskd.control import Fail, Retry, steering
from taskd.models import ClaimedTask

PARENT_CHECK_SECONDS = 0.5


class QuarantinedFailure(Exception):
    """The handler failed inside the quarantine process; `described` is its error as stored,
    `final` whether it raised taskd.Fail (no retries)."""

    def __init__(self, described: dict[str, Any], *, final: bool = False) -> None:
        super().__init__(str(described.get("message", "")))
        self.described = described
        self.final = final


async def _kill(process: trio.Process) -> None:
    # At once, not SIGTERM and a grace: a cancelled attempt must stop before its lease
    # can run out, and a handler in quarantine is not trusted to clean up. The whole
    # session's group: whatever the handler started goes with it.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.kill()


def _crash_message(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the quarantine process running this attempt was killed by {name}"
    return f"the quarantine process running this attempt exited with status {returncode} without an outcome"


async def run_quarantined(task: ClaimedTask, task_modules: tuple[str, ...]) -> str:
    """Run the attempt in a child process; its result as JSON text, or raises
    QuarantinedFailure (the handler failed) or failures.Crashed (the child died)."""
    request = json.dumps({
        "sys_path": sys.path, "task_modules": list(task_modules), "task_type": task.task_type,
        "task_id": task.id, "attempt": task.attempt, "max_retries": task.max_retries,
        "payload_json": task.payload_json, "parent": os.getpid(),
    }).encode()
    # A session of its own: a handler that signals its process group (to clean up its
    # own children, say) cannot reach taskd, and a Ctrl-C at the terminal reaches only
    # taskd, which then stops the child as its shutdown says.
    proc = await trio.run_process([sys.executable, "-m", "taskd.quarantine"], stdin=request,
                                  capture_stdout=True, stderr=None, check=False, deliver_cancel=_kill,
                                  start_new_session=True)
    reply = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    outcome = None
    if proc.returncode == 0 and reply:
        try:
            outcome = json.loads(reply[-1])
        except ValueError:
            outcome = None
    if not isinstance(outcome, dict):
        raise failures.Crashed(_crash_message(proc.returncode or 0))
    if "retry_after" in outcome:
        raise Retry(after=float(outcome["retry_after"]))
    if "error" in outcome:
        raise QuarantinedFailure(outcome["error"], final=bool(outcome.get("final")))
    return str(outcome["result_json"])


async def _with_asyncio_loop(fn: Any, payload: Any, ctx: Any) -> Any:
    """Run the handler with an asyncio loop beside trio, as in the server; its own
    exception comes out as it was raised, not wrapped in the loop's nursery group."""
    raised: list[BaseException] = []
    result = None
    async with trio_asyncio.open_loop():
        try:
            result = await fn(payload, ctx)
        except BaseException as exc:  # noqa: BLE001  (re-raised below, outside the loop's nursery)
            raised.append(exc)
    if raised:
        raise raised[0]
    return result


def _bind_to_parent(parent: int) -> None:
    """The parent alone decides when this child stops: SIGTERM and SIGINT, which a service
    manager or a terminal sends the whole group or cgroup, are caught and dropped (taskd
    cancels the child after its own grace; the handler's own subprocesses, if any, get the
    default back when they exec); and the child exits when taskd is gone, so it never runs
    on beside the attempt that replaces it after a kill -9. (Not PR_SET_PDEATHSIG: that
    follows the thread that forked the child, and trio forks from worker threads that
    exit when idle.)"""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: None)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="taskd-parent-watch", daemon=True).start()


def _child() -> int:
    """The child's side: one request in, one outcome line out."""
    reply = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever the handler prints goes to stderr, not into the reply
    request = json.loads(sys.stdin.read())
    _bind_to_parent(request["parent"])
    for entry in request["sys_path"]:
        if entry not in sys.path:
            sys.path.append(entry)
    from taskd import builtin_tasks  # noqa: F401  (registers the built-in types)
    from taskd.registry import TaskContext, default_registry

    for name in request["task_modules"]:
        importlib.import_module(name)
    handler = default_registry.get(request["task_type"])
    ctx = TaskContext(request["task_id"], request["task_type"], request["attempt"], request["max_retries"])
    try:
        if handler is None:
            raise LookupError(f"task type {request['task_type']!r} is not registered in the quarantine process")
        payload = failures.decode_payload(request["payload_json"])
        if handler.is_async:
            result = trio.run(_with_asyncio_loop, handler.fn, payload, ctx)
        else:
            result = handler.fn(payload, ctx)
        outcome: dict[str, Any] = {"result_json": failures.encode_result(result)}
    except BaseException as exc:  # noqa: BLE001  (whatever the handler raises is the attempt's outcome)
        control = steering(exc)
        if isinstance(control, Retry):
            outcome = {"retry_after": control.after}
        else:
            outcome = {"error": failures.describe_error(exc, request["attempt"]), "final": isinstance(control, Fail)}
    reply.write(json.dumps(outcome) + "\n")
    reply.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child())
