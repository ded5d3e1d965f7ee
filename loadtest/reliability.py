"""Retries under load: submit N `flaky` tasks, about 30% planned to fail their first one or
two attempts, wait for all of them, and check that each ran exactly as often as planned.

    python -m taskd --task-modules loadtest.flaky_tasks --retry-delay 0.2 --port 8000 &
    python -m loadtest.reliability --url http://127.0.0.1:8000 -n 500

Prints JSON: completed and failed counts, tasks that needed retries, total attempts (and
the attempts the plan implies), success rates, and the tasks whose attempts, errors or
final status differ from their plan. With the default --retry-delay of 5 s a retried
task takes 2.5-15 s more; the smaller delay above keeps the run short.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import ssl
import sys
import time
from typing import Any

import httpx

from loadtest.report import git_revision, machine, progress, rounded, versions

RESULT_WAIT = 10  # seconds each result request may wait on the server


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()  # ~50 ms of CPU to build: share one


def new_client(url: str) -> httpx.AsyncClient:
    # One connection per worker: httpx's pool gets expensive with many requests waiting on it.
    return httpx.AsyncClient(base_url=url, timeout=RESULT_WAIT + 30, limits=httpx.Limits(max_connections=1),
                             verify=_tls())


def plan(n: int, share: float, seed: int) -> list[int]:
    """fail_times per task: 0 for most, 1 or 2 for about `share` of them."""
    rng = random.Random(seed)
    return [rng.choice((1, 2)) if rng.random() < share else 0 for _ in range(n)]


async def each(url: str, items: list[Any], c: int, work: Any) -> None:
    """Run `await work(client, item)` for every item, c at a time."""
    remaining = iter(items)

    async def worker() -> None:
        async with new_client(url) as client:
            for item in remaining:  # shared: each item goes to one worker
                await work(client, item)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(c, len(items)) or 1):
            group.create_task(worker())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url, c = args.url.rstrip("/"), args.c
    fail_times = plan(args.n, args.fail_share, args.seed)
    ids: dict[int, int] = {}  # task id -> fail_times
    submit_errors: list[str] = []

    async def submit(client: httpx.AsyncClient, planned: int) -> None:
        response = await client.post("/tasks", json={"task_type": "flaky", "payload": {"fail_times": planned}})
        if response.status_code == 201:
            ids[response.json()["id"]] = planned
        else:
            submit_errors.append(f"{response.status_code}: {response.text[:300]}")

    progress(f"submitting {args.n} flaky tasks ({sum(1 for f in fail_times if f)} planned to fail first) to {url}")
    start = time.perf_counter()
    await each(url, fail_times, c, submit)
    if submit_errors and not ids:
        sys.exit(f"every submit failed, e.g. {submit_errors[0]}\n"
                 "(start the server with --task-modules loadtest.flaky_tasks)")

    tasks: dict[int, dict[str, Any]] = {}

    async def wait_for(client: httpx.AsyncClient, task_id: int) -> None:
        while (await client.get(f"/tasks/{task_id}/result", params={"wait": RESULT_WAIT})).status_code != 200:
            pass  # 202: not finished within RESULT_WAIT; ask again

    async def read(client: httpx.AsyncClient, task_id: int) -> None:
        tasks[task_id] = (await client.get(f"/tasks/{task_id}")).json()

    progress(f"waiting for {len(ids)} tasks (at most {args.timeout:g}s)")
    try:
        async with asyncio.timeout(args.timeout):
            await each(url, list(ids), c, wait_for)
    except TimeoutError:
        progress("gave up waiting; reporting the tasks as they are")
    elapsed = time.perf_counter() - start
    await each(url, list(ids), c, read)
    return summarize(ids, tasks, submit_errors, elapsed) | {
        "url": url, "seed": args.seed, "machine": machine(), "versions": versions(),
        "git_revision": git_revision()}


def summarize(ids: dict[int, int], tasks: dict[int, dict[str, Any]], submit_errors: list[str],
              elapsed: float) -> dict[str, Any]:
    status = {task_id: t["status"] for task_id, t in tasks.items()}
    attempts = {task_id: int(t["attempts"]) for task_id, t in tasks.items()}
    retried = [task_id for task_id, a in attempts.items() if a > 1]
    planned_retries = [task_id for task_id, f in ids.items() if f]
    # A task that went as planned: completed on attempt fail_times + 1, one error per failure.
    off_plan = [
        {"id": task_id, "fail_times": f, "status": status.get(task_id), "attempts": attempts.get(task_id),
         "errors": len(tasks[task_id]["errors"]) if task_id in tasks else None}
        for task_id, f in ids.items()
        if status.get(task_id) != "completed" or attempts.get(task_id) != f + 1
        or len(tasks[task_id]["errors"]) != f
    ]
    completed = sum(1 for s in status.values() if s == "completed")
    retried_completed = sum(1 for task_id in retried if status[task_id] == "completed")
    return {
        "tasks": len(ids) + len(submit_errors),
        "submitted": len(ids),
        "submit_errors": len(submit_errors),
        "completed": completed,
        "failed": sum(1 for s in status.values() if s == "failed"),
        "unfinished": sum(1 for s in status.values() if s not in ("completed", "failed")),
        "planned_to_fail_first": len(planned_retries),
        "needed_retries": len(retried),
        "total_attempts": sum(attempts.values()),
        "planned_attempts": sum(f + 1 for f in ids.values()),
        "success_rate": round(completed / len(ids), 4) if ids else None,
        "retry_success_rate": round(retried_completed / len(retried), 4) if retried else None,
        "off_plan": len(off_plan),
        "off_plan_examples": off_plan[:5],
        "first_submit_errors": submit_errors[:3],
        "elapsed_s": rounded(elapsed, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the taskd server (default %(default)s)")
    parser.add_argument("-n", type=int, default=500, help="tasks to submit (default %(default)s)")
    parser.add_argument("-c", type=int, default=20, help="requests in flight (default %(default)s)")
    parser.add_argument("--fail-share", type=float, default=0.3, help="share planned to fail first (default 0.3)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the plan (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this many seconds")
    args = parser.parse_args(argv)
    if args.n < 1 or args.c < 1 or not 0 <= args.fail_share <= 1:
        parser.error("-n and -c must be at least 1, --fail-share between 0 and 1")
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
