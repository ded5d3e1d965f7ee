"""GET /tasks from outside (issue 6): full listings of large tasks stay bounded in the
server's memory and do not starve other clients; rows json.loads could not read are served."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Callable

import httpx

from taskd.schemas import FULL_PAGE_BYTES

from .conftest import TaskdProcess, execute

Start = Callable[..., TaskdProcess]
MB = 1024 * 1024


def peak_rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_concurrent_full_listings_stay_bounded_and_health_stays_quick(start_taskd: Start, database_url: str) -> None:
    # A type no handler serves (and no workers), so the tasks stay as they are.
    execute(database_url, """INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds, payload)
                             SELECT 'unhandled', 0, 30, jsonb_build_object('pad', repeat(md5(i::text), 32768))
                             FROM generate_series(1, 100) i""")
    server = start_taskd("--workers", "0")
    assert server.http.get("/tasks/1").status_code == 200  # warm: the pool's connections are open
    listings: list[httpx.Response] = []
    health_latencies: list[float] = []
    done = threading.Event()

    def list_full() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            listings.append(client.get("/tasks", params={"full": "true", "limit": 1000}))

    def poll_health() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not done.is_set():
                started = time.monotonic()
                assert client.get("/health").status_code == 200
                health_latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        readers = [threading.Thread(target=list_full) for _ in range(5)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(120)
    finally:
        done.set()
        poller.join(15)
    peak = peak_rss_mb(server.proc.pid)
    sizes = [len(r.content) for r in listings]
    print(f"\nfull listings: {len(listings)} x {[round(s / MB, 2) for s in sizes]} MB; peak RSS {peak:.1f} MB; "
          f"health: {len(health_latencies)} requests, max {max(health_latencies) * 1000:.0f} ms")
    assert len(listings) == 5 and all(r.status_code == 200 for r in listings)
    for response in listings:
        page = response.json()
        assert page["next_cursor"] == str(page["items"][-1]["id"]), "cut short, with a cursor to the rest"
        assert FULL_PAGE_BYTES - MB < len(response.content) <= FULL_PAGE_BYTES
    assert peak < 300, f"peak RSS {peak:.0f} MB"
    assert len(health_latencies) >= 5 and max(health_latencies) < 1.0


def test_a_payload_nested_5000_deep_is_served(start_taskd: Start, database_url: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    (row,) = execute(database_url, """INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds, payload)
                                      VALUES ('unhandled', 0, 30, $1::jsonb) RETURNING id""", deep)
    server = start_taskd("--workers", "0")
    response = server.http.get(f"/tasks/{row['id']}")
    assert response.status_code == 200 and f'"payload":{deep}' in response.text
    assert response.text.startswith(f'{{"id":{row["id"]},')
    summaries = server.http.get("/tasks").json()
    assert [t["id"] for t in summaries["items"]] == [row["id"]]
    full = server.http.get("/tasks", params={"full": "true"})
    assert full.status_code == 200 and f'"payload":{deep}' in full.text
