"""Submit N echo tasks over HTTP with C at a time, wait until all are finished, print JSON.

    python -m loadtest.performance --url http://127.0.0.1:8000 -n 2000 -c 50

Measures what a client sees: submit latency (p99, p50, mean), requests per minute while
submitting, tasks per second from the first submit until /stats shows them all finished,
and the share that completed (each task's result is read after the clock has stopped).
The client is httpx, as an application would use. Each of the C workers has its own
one-connection AsyncClient: sharing one pool among 50 concurrent requests costs httpx
(httpcore 1.0) ~10 ms of CPU per request, and the test would measure the client.
httpx is still far from free, so for the server's ceiling use loadtest.bench.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import ssl
import sys
import time
from typing import Any

import httpx

from loadtest.report import git_revision, latency_ms, machine, progress, rounded, versions

POLL_INTERVAL = 0.1
RESULT_WAIT = 5  # seconds a result request may wait on the server for a straggler


async def finished_count(client: httpx.AsyncClient) -> int:
    counts = (await client.get("/stats")).raise_for_status().json()["counts"]
    return int(counts["completed"]) + int(counts["failed"])


@functools.cache
def _tls() -> ssl.SSLContext:
    # Building one costs ~50 ms of CPU (it loads the CA bundle); share it among the clients.
    return ssl.create_default_context()


def new_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30.0, limits=httpx.Limits(max_connections=1),
                             verify=_tls())


async def submit_all(url: str, n: int, c: int) -> tuple[list[int], list[float], list[str]]:
    """Submit n echo tasks, c in flight: (ids, latencies in s, errors)."""
    ids: list[int] = []
    latencies: list[float] = []
    errors: list[str] = []
    remaining = iter(range(n))

    async def worker() -> None:
        async with new_client(url) as client:
            await submit_each(client)

    async def submit_each(client: httpx.AsyncClient) -> None:
        for i in remaining:  # the shared iterator hands each index to exactly one worker
            began = time.perf_counter()
            try:
                response = await client.post("/tasks", json={"task_type": "echo", "payload": {"i": i}})
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - began)
            if response.status_code == 201:
                ids.append(response.json()["id"])
            else:
                errors.append(f"{response.status_code}: {response.text[:200]}")

    async with asyncio.TaskGroup() as group:
        for _ in range(c):
            group.create_task(worker())
    return ids, latencies, errors


async def wait_finished(client: httpx.AsyncClient, baseline: int, count: int) -> None:
    """Until /stats has `count` more finished tasks than at `baseline` (other clients' tasks
    would count too: run this against a server nobody else is using)."""
    last_report = time.monotonic()
    while (done := await finished_count(client) - baseline) < count:
        if time.monotonic() - last_report >= 2:
            progress(f"  {done} of {count} finished")
            last_report = time.monotonic()
        await asyncio.sleep(POLL_INTERVAL)


async def statuses(url: str, ids: list[int], c: int) -> dict[str, int]:
    """Each task's final status, read c at a time."""
    found: dict[str, int] = {}
    remaining = iter(ids)

    async def worker() -> None:
        async with new_client(url) as client:
            for task_id in remaining:
                await read_one(client, task_id)

    async def read_one(client: httpx.AsyncClient, task_id: int) -> None:
        response = await client.get(f"/tasks/{task_id}/result", params={"wait": RESULT_WAIT})
        status = response.json().get("status", str(response.status_code))
        found[status] = found.get(status, 0) + 1

    async with asyncio.TaskGroup() as group:
        for _ in range(c):
            group.create_task(worker())
    return found


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url, n, c = args.url.rstrip("/"), args.n, args.c
    async with new_client(url) as client:
        baseline = await finished_count(client)
        progress(f"submitting {n} echo tasks to {url}, {c} at a time")
        start = time.perf_counter()
        ids, latencies, errors = await submit_all(url, n, c)
        submitted = time.perf_counter()
        progress(f"submitted {len(ids)} in {submitted - start:.2f}s; waiting for them to finish")
        try:
            async with asyncio.timeout(args.timeout):
                await wait_finished(client, baseline, len(ids))
        except TimeoutError:
            sys.exit(f"not all {len(ids)} tasks finished within {args.timeout:g}s")
        finished = time.perf_counter()
        outcome = await statuses(url, ids, c) if args.verify else None
    submit_s, total_s = submitted - start, finished - start
    return {
        "tasks": n,
        "concurrency": c,
        "submitted": len(ids),
        "submit_errors": len(errors),
        "first_errors": errors[:5],
        "requests_per_minute": rounded(len(latencies) / submit_s * 60),
        "submit_latency_ms": latency_ms(latencies),
        "end_to_end_tasks_per_second": rounded(len(ids) / total_s),
        "outcome": outcome,
        "success_rate": round(outcome.get("completed", 0) / n, 4) if outcome is not None else None,
        "elapsed": {"submit_s": round(submit_s, 3), "until_all_finished_s": round(total_s, 3)},
        "url": url,
        "machine": machine(),
        "versions": versions(),
        "git_revision": git_revision(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.performance", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the taskd server (default %(default)s)")
    parser.add_argument("-n", type=int, default=2000, help="tasks to submit (default %(default)s)")
    parser.add_argument("-c", type=int, default=50, help="requests in flight (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this many seconds")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reading each task's result afterwards (success_rate is then null)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.c < 1:
        parser.error("-n and -c must be at least 1")
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
