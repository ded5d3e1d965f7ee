"""The `flaky` task type for loadtest.reliability: it fails its first payload["fail_times"]
attempts and then succeeds, so every retry the server makes is one the test planned.

Load it into the server under test:

    python -m taskd --task-modules loadtest.flaky_tasks --retry-delay 0.2
"""

from __future__ import annotations

from typing import Any

import taskd


class PlannedFailure(RuntimeError):
    """A failure the reliability test asked for."""


@taskd.task("flaky")
async def flaky(payload: Any, ctx: taskd.TaskContext) -> dict[str, int]:
    fail_times = int(payload.get("fail_times", 0)) if isinstance(payload, dict) else 0
    if ctx.attempt <= fail_times:
        raise PlannedFailure(f"planned failure {ctx.attempt} of {fail_times}")
    return {"attempt": ctx.attempt, "fail_times": fail_times}
