"""Steering at submit time and after (issue 7), from outside: idempotent submits (20 concurrent
duplicates, batches), unique_for, expiry, and retry/cancel of one task or of every match."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx

from .conftest import TaskdProcess, counts, submit, wait_until
from .conftest import get_task as task

Start = Callable[..., TaskdProcess]
FINISHED = ("completed", "failed", "cancelled", "expired")


# -- helpers ------------------------------------------------------------------------------------------


def finished(server: TaskdProcess, task_id: int, timeout: float = 15) -> dict[str, Any]:
    """The task once it has ended (completed, failed, cancelled or expired)."""
    return wait_until(lambda: (t := task(server, task_id))["status"] in FINISHED and t, timeout,
                      f"task {task_id} to finish")


def all_tasks(server: TaskdProcess, **params: Any) -> list[dict[str, Any]]:
    response = server.http.get("/tasks", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return response.json()["items"]


def pause(server: TaskdProcess, queue: str) -> None:
    response = server.http.post(f"/queues/{queue}/pause")
    assert response.status_code == 200 and response.json()["paused"] is True, response.text


def resume(server: TaskdProcess, queue: str) -> None:
    response = server.http.post(f"/queues/{queue}/resume")
    assert response.status_code == 200 and response.json()["paused"] is False, response.text


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def rfc3339(seconds_from_now: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds_from_now)).isoformat()


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def burst(server: TaskdProcess, requests: list[tuple[dict[str, Any], dict[str, str]]]) -> list[httpx.Response]:
    """POST /tasks all the (body, headers) requests at once, each on its own connection, opened
    beforehand: they reach the server together and are coalesced into the same INSERTs."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            warm = await asyncio.gather(*(client.get("/ready") for _ in requests))
            assert all(r.status_code == 200 for r in warm)
            return list(await asyncio.gather(*(client.post("/tasks", json=body, headers=headers)
                                               for body, headers in requests)))

    return asyncio.run(run())


def assert_one_made_rest_repeated(responses: list[httpx.Response]) -> int:
    """Exactly one 201, the rest 200, all naming the same task; its id."""
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * (len(responses) - 1) + [201], [(r.status_code, r.text) for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1, ids
    task_id = ids.pop()
    for response in responses:
        assert response.headers["Location"] == f"/tasks/{task_id}"
        assert response.json() == {"id": task_id, "task_type": "echo", "status": "pending",
                                   "url": f"/tasks/{task_id}"}
    return task_id


# -- 1. idempotent POST /tasks ---------------------------------------------------------------------


def test_twenty_concurrent_duplicates_make_one_task_key_in_header_or_body(start_taskd: Start) -> None:
    server = start_taskd()
    pause(server, "held")  # the tasks stay pending: every answer can be compared whole
    body = {"task_type": "echo", "payload": {"n": 1}, "queue": "held"}

    by_header = burst(server, [(body, {"Idempotency-Key": "order-1"})] * 20)
    first = assert_one_made_rest_repeated(by_header)
    assert [t["id"] for t in all_tasks(server)] == [first]
    assert task(server, first)["idempotency_key"] == "order-1"

    by_body = burst(server, [({**body, "idempotency_key": "order-2"}, {})] * 20)
    second = assert_one_made_rest_repeated(by_body)
    assert second != first
    assert sorted(t["id"] for t in all_tasks(server)) == [first, second]
    assert task(server, second)["idempotency_key"] == "order-2"

    # The key is the same key wherever it is given: in the body now, it finds the header's task.
    again = server.http.post("/tasks", json={**body, "idempotency_key": "order-1"})
    assert again.status_code == 200 and again.json()["id"] == first, again.text
    both = server.http.post("/tasks", json={**body, "idempotency_key": "order-1"},
                            headers={"Idempotency-Key": "order-1"})
    assert both.status_code == 200 and both.json()["id"] == first, both.text

    # The same key with another body: a conflict naming the task, and nothing written.
    for other in ({**body, "payload": {"n": 2}}, {**body, "priority": 3}, {**body, "queue": "elsewhere"},
                  {**body, "task_type": "sleep", "payload": {"seconds": 0}}):
        conflict = server.http.post("/tasks", json=other, headers={"Idempotency-Key": "order-1"})
        assert conflict.status_code == 409, conflict.text
        assert error_code(conflict) == "idempotency_conflict"
        assert conflict.json()["error"]["details"] == {"key": "order-1", "task_id": first}
    conflict = server.http.post("/tasks", json={**body, "payload": {"n": 2}, "idempotency_key": "order-2"})
    assert conflict.status_code == 409 and error_code(conflict) == "idempotency_conflict", conflict.text

    # Header and body keys that differ, and keys of the wrong length: 422.
    differ = server.http.post("/tasks", json={**body, "idempotency_key": "order-1"},
                              headers={"Idempotency-Key": "order-9"})
    assert differ.status_code == 422, differ.text
    too_long = "k" * 201
    assert server.http.post("/tasks", json=body, headers={"Idempotency-Key": too_long}).status_code == 422
    assert server.http.post("/tasks", json={**body, "idempotency_key": too_long}).status_code == 422
    assert server.http.post("/tasks", json={**body, "idempotency_key": ""}).status_code == 422
    assert server.http.post("/tasks", json=body, headers={"Idempotency-Key": ""}).status_code == 422
    assert server.http.post("/tasks", json={**body, "idempotency_key": "a\u0000b"}).status_code == 422
    assert sorted(t["id"] for t in all_tasks(server)) == [first, second], "nothing written by a refused request"

    # 200 characters is still a key.
    longest = server.http.post("/tasks", json=body, headers={"Idempotency-Key": "k" * 200})
    assert longest.status_code == 201, longest.text
    assert task(server, longest.json()["id"])["idempotency_key"] == "k" * 200
    assert len(all_tasks(server)) == 3
    assert "Traceback" not in server.output


def test_concurrent_same_key_with_two_bodies_one_wins_the_others_conflict(start_taskd: Start) -> None:
    server = start_taskd()
    pause(server, "held")
    bodies = [{"task_type": "echo", "payload": {"body": which}, "queue": "held"} for which in ("a", "b")]
    responses = burst(server, [(bodies[i % 2], {"Idempotency-Key": "contested"}) for i in range(20)])
    made = [r for r in responses if r.status_code == 201]
    assert len(made) == 1, [(r.status_code, r.text) for r in responses]
    winner_id = made[0].json()["id"]
    winner_payload = task(server, winner_id)["payload"]
    for i, response in enumerate(responses):
        if bodies[i % 2]["payload"] == winner_payload:
            assert response.status_code in (200, 201) and response.json()["id"] == winner_id, response.text
        else:
            assert response.status_code == 409, response.text
            assert response.json()["error"]["details"] == {"key": "contested", "task_id": winner_id}
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201] + [409] * 10
    assert [t["id"] for t in all_tasks(server)] == [winner_id]


# -- 2. keys in batches ----------------------------------------------------------------------------


def test_batch_items_with_keys_repeat_within_and_across_batches_and_conflicts_insert_nothing(
    start_taskd: Start,
) -> None:
    server = start_taskd()
    pause(server, "held")

    def item(payload: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        return {"task_type": "echo", "payload": payload, "queue": "held",
                **({} if key is None else {"idempotency_key": key})}

    earlier = server.http.post("/tasks", json=item({"x": 0}), headers={"Idempotency-Key": "early"})
    assert earlier.status_code == 201, earlier.text
    early_id = earlier.json()["id"]

    batch = server.http.post("/tasks/batch", json={"tasks": [
        item({"x": 1}, "twin"), item({"x": 1}, "twin"), item({"x": 0}, "early"), item({"x": 2}), item({"x": 1}, "twin"),
    ]})
    assert batch.status_code == 201, batch.text
    result = batch.json()
    assert result["created"] == [True, False, False, True, False]
    ids = result["ids"]
    assert ids[0] == ids[1] == ids[4] and ids[2] == early_id
    assert len({ids[0], ids[2], ids[3]}) == 3 and ids[0] > early_id and ids[3] > early_id
    assert result["count"] == 5
    assert sorted(t["id"] for t in all_tasks(server)) == sorted({early_id, ids[0], ids[3]})
    assert task(server, ids[0])["idempotency_key"] == "twin" and task(server, ids[3])["idempotency_key"] is None

    # The whole batch again: nothing new but the item without a key.
    repeat = server.http.post("/tasks/batch", json={"tasks": [item({"x": 1}, "twin"), item({"x": 0}, "early")]})
    assert repeat.status_code == 201, repeat.text
    assert repeat.json()["created"] == [False, False] and repeat.json()["ids"] == [ids[0], early_id]
    before = sorted(t["id"] for t in all_tasks(server))
    assert len(before) == 3

    # An item whose key was used with another body: 409, and none of the batch is inserted
    # (not the new keyed item, not the plain one before it).
    conflict = server.http.post("/tasks/batch", json={"tasks": [
        item({"x": 3}), item({"x": 4}, "fresh"), item({"x": 99}, "early"), item({"x": 5}),
    ]})
    assert conflict.status_code == 409, conflict.text
    assert error_code(conflict) == "idempotency_conflict"
    assert conflict.json()["error"]["details"] == {"key": "early", "task_id": early_id}
    # Two items of one batch sharing a key with different bodies: the same.
    inner = server.http.post("/tasks/batch", json={"tasks": [item({"x": 6}, "pair"), item({"x": 7}, "pair")]})
    assert inner.status_code == 409 and error_code(inner) == "idempotency_conflict", inner.text
    assert sorted(t["id"] for t in all_tasks(server)) == before
    assert counts(server)["pending"] == 3
    # The keys those batches carried were not taken by them.
    for key, payload in (("fresh", {"x": 4}), ("pair", {"x": 7})):
        response = server.http.post("/tasks", json=item(payload, key))
        assert response.status_code == 201, response.text

    # The header is for single submits only.
    header = server.http.post("/tasks/batch", json={"tasks": [item({"x": 8})]}, headers={"Idempotency-Key": "h"})
    assert header.status_code == 422, header.text
    assert len(all_tasks(server)) == 5
    assert "Traceback" not in server.output


def read_http_response(sock: socket.socket, timeout: float) -> bytes:
    """One HTTP/1.1 response with a Content-Length (or what came before the timeout or EOF)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            if b"\r\n\r\n" in data:
                head, rest = data.split(b"\r\n\r\n", 1)
                lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")]
                if lengths and len(rest) >= lengths[0]:
                    return data
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except TimeoutError:
        return data


def test_a_batch_refused_for_its_idempotency_header_leaves_the_connection_usable(start_taskd: Start) -> None:
    """The 422 for an Idempotency-Key header on POST /tasks/batch must not leave the keep-alive
    connection stuck (as answering before the body is read can: see test_server's 415 case).
    A client whose body follows its headers a moment later, then sends its next request."""
    server = start_taskd("--workers", "0")
    body = b'{"tasks":[{"task_type":"echo","payload":{"pad":"' + b"x" * 2000 + b'"}}]}'
    head = (b"POST /tasks/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: h\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    for attempt in range(15):  # intermittent: about a third of the next requests hung (measured)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head)
            time.sleep(0.05)
            sock.sendall(body)
            refused = read_http_response(sock, 5)
            assert refused.startswith(b"HTTP/1.1 422 "), refused
            sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            following = read_http_response(sock, 3)
            assert following.startswith(b"HTTP/1.1 200 "), (
                f"connection {attempt + 1}: the request after the refused batch got {following!r}")
    assert counts(server)["pending"] == 0


def test_concurrent_batches_sharing_keys_in_any_order_each_make_every_keyed_task_once(start_taskd: Start) -> None:
    """Producers sending overlapping keyed batches at once, in different orders: each request
    is a plain 201 (nothing of the others' timing leaks out as an error), and every key makes
    one task. Three rounds of fresh keys, so the batches surely overlap in the database."""
    server = start_taskd()
    pause(server, "held")  # the tasks wait; the workers do not load the machine
    for round_ in range(3):
        keys = [f"key-{round_}-{i}" for i in range(1000)]
        bodies = {key: {"task_type": "echo", "payload": {"key": key}, "queue": "held", "idempotency_key": key}
                  for key in keys}
        orders = [keys, keys[::-1], keys, keys[::-1]]

        async def run(orders: list[list[str]], bodies: dict[str, dict[str, Any]]) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return list(await asyncio.gather(*(
                    client.post("/tasks/batch", json={"tasks": [bodies[k] for k in order]}) for order in orders)))

        responses = asyncio.run(run(orders, bodies))
        assert [r.status_code for r in responses] == [201] * 4, (round_, [r.text[:200] for r in responses])
        made: dict[str, int] = {}
        ids: dict[str, set[int]] = {key: set() for key in keys}
        for order, response in zip(orders, responses, strict=True):
            result = response.json()
            for key, task_id, created in zip(order, result["ids"], result["created"], strict=True):
                ids[key].add(task_id)
                made[key] = made.get(key, 0) + created
        assert all(len(found) == 1 for found in ids.values())
        assert set(made.values()) == {1}, "each key made its task in exactly one of the batches"
        assert counts(server)["pending"] == 1000 * (round_ + 1)


# -- 3. unique_for ---------------------------------------------------------------------------------


def test_unique_for_queues_one_task_per_payload_unless_a_key_is_given(start_taskd: Start) -> None:
    # unique_report's window is a fixed hour of the clock: keep clear of its edge.
    to_edge = 3600 - time.time() % 3600
    if to_edge < 10:
        time.sleep(to_edge + 0.5)
    server = start_taskd()
    report = {"task_type": "unique_report", "payload": {"day": "2031-01-02"}}

    first = server.http.post("/tasks", json=report)
    assert first.status_code == 201, first.text
    report_id = first.json()["id"]
    assert server.http.get(f"/tasks/{report_id}/result?wait=10").json()["result"] == "reported"
    second = server.http.post("/tasks", json=report)
    assert second.status_code == 200, second.text
    assert second.json()["id"] == report_id and second.headers["Location"] == f"/tasks/{report_id}"

    other = server.http.post("/tasks", json={**report, "payload": {"day": "2031-01-03"}})
    assert other.status_code == 201 and other.json()["id"] != report_id, other.text
    other_id = other.json()["id"]

    # An explicit key overrides the derived one: a new task, idempotent on that key.
    keyed = server.http.post("/tasks", json={**report, "idempotency_key": "mine"})
    assert keyed.status_code == 201 and keyed.json()["id"] not in (report_id, other_id), keyed.text
    keyed_id = keyed.json()["id"]
    assert task(server, keyed_id)["idempotency_key"] == "mine"
    again = server.http.post("/tasks", json=report, headers={"Idempotency-Key": "mine"})
    assert again.status_code == 200 and again.json()["id"] == keyed_id, again.text
    by_header = server.http.post("/tasks", json=report, headers={"Idempotency-Key": "theirs"})
    assert by_header.status_code == 201 and by_header.json()["id"] not in (report_id, other_id, keyed_id)

    # In a batch the same rule holds, item by item.
    batch = server.http.post("/tasks/batch", json={"tasks": [
        report, report, {**report, "payload": {"day": "2031-01-04"}}, {**report, "payload": {"day": "2031-01-04"}},
    ]})
    assert batch.status_code == 201, batch.text
    assert batch.json()["created"] == [False, False, True, False]
    ids = batch.json()["ids"]
    assert ids[:2] == [report_id, report_id] and ids[2] == ids[3] and ids[2] not in (report_id, other_id)
    assert len(all_tasks(server, task_type="unique_report")) == 5


# -- 4. expiry -------------------------------------------------------------------------------------


def test_a_task_not_started_before_its_expiry_ends_expired_and_never_runs(start_taskd: Start) -> None:
    server = start_taskd()
    pause(server, "x")
    doomed = submit(server, "echo", {"doomed": True}, queue="x", expires_in_seconds=1)
    kept = submit(server, "echo", {"kept": True}, queue="x", expires_in_seconds=3600)
    runs = submit(server, "echo", {"runs": True}, expires_in_seconds=3600)
    assert server.http.get(f"/tasks/{runs}/result?wait=10").json()["result"] == {"runs": True}
    waiting = task(server, doomed)
    assert waiting["status"] == "pending" and waiting["expires_at"] is not None
    assert 0.5 < (parse_time(waiting["expires_at"]) - parse_time(waiting["created_at"])).total_seconds() <= 1.0

    ended = finished(server, doomed, timeout=10)
    assert ended["status"] == "expired" and ended["attempts"] == 0 and ended["started_at"] is None
    # The sweep runs every second: it ends the task within a second or so of its expiry (the
    # database's own timestamps; 2.5 s leaves room for a loaded machine).
    late = (parse_time(ended["finished_at"]) - parse_time(ended["expires_at"])).total_seconds()
    assert 0 <= late <= 2.5, late
    assert ended["last_error"]["type"] == "Expired" and ended["errors"] == [ended["last_error"]]
    result = server.http.get(f"/tasks/{doomed}/result")
    assert result.status_code == 200, result.text
    assert result.json()["status"] == "expired" and result.json()["error"]["type"] == "Expired"
    assert "result" not in result.json() or result.json()["result"] is None

    # The queue runs again: the expired task stays expired (never claimed), the other one runs.
    resume(server, "x")
    assert server.http.get(f"/tasks/{kept}/result?wait=10").json()["result"] == {"kept": True}
    time.sleep(0.5)
    assert task(server, doomed)["status"] == "expired" and task(server, doomed)["attempts"] == 0
    stats = counts(server)
    assert stats["expired"] == 1 and stats["completed"] == 2
    queue_x = next(q for q in server.http.get("/queues").json()["items"] if q["name"] == "x")
    assert queue_x["counts"]["expired"] == 1 and queue_x["counts"]["completed"] == 1
    assert [t["id"] for t in all_tasks(server, status="expired")] == [doomed]
    assert server.http.post(f"/tasks/{doomed}/cancel").status_code == 409

    # Retried by hand, it has no expiry any more and runs.
    retried = server.http.post(f"/tasks/{doomed}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "pending" and retried.json()["expires_at"] is None
    assert server.http.get(f"/tasks/{doomed}/result?wait=10").json()["result"] == {"doomed": True}
    assert counts(server)["expired"] == 0


def test_expiry_validation(start_taskd: Start) -> None:
    server = start_taskd("--workers", "0")
    echo = {"task_type": "echo", "payload": {}}
    bad: list[dict[str, Any]] = [
        {"expires_at": rfc3339(-5)},
        {"expires_at": rfc3339(60), "expires_in_seconds": 60},
        {"run_at": rfc3339(120), "expires_at": rfc3339(60)},
        {"run_at": rfc3339(60), "expires_at": rfc3339(30)},
        {"run_at": (same := rfc3339(60)), "expires_at": same},  # expiring as it becomes due: no chance to run
        {"delay_seconds": 60, "expires_in_seconds": 30},
        {"delay_seconds": 60, "expires_at": rfc3339(30)},
        {"expires_in_seconds": 0},
        {"expires_in_seconds": -1},
        {"expires_at": "2031-01-02T03:04:05"},  # no offset
    ]
    for extra in bad:
        response = server.http.post("/tasks", json={**echo, **extra})
        assert response.status_code == 422, (extra, response.text)
        batch = server.http.post("/tasks/batch", json={"tasks": [echo, {**echo, **extra}]})
        assert batch.status_code == 422, (extra, batch.text)
    assert all(n == 0 for n in counts(server).values()), counts(server)
    # What is allowed: expiry after the start time.
    ok = server.http.post("/tasks", json={**echo, "delay_seconds": 30, "expires_in_seconds": 60})
    assert ok.status_code == 201 and ok.json()["status"] == "scheduled", ok.text
    ok = server.http.post("/tasks", json={**echo, "run_at": rfc3339(30), "expires_at": rfc3339(60)})
    assert ok.status_code == 201, ok.text
    assert counts(server)["scheduled"] == 2


# -- 5. retry one task -----------------------------------------------------------------------------


def test_retry_one_failed_task_runs_it_again_keeping_its_history(start_taskd: Start) -> None:
    server = start_taskd(RETRY_DELAY="0.05")
    failing = submit(server, "control", {"do": "fail"}, max_retries=3)
    first = finished(server, failing)
    assert first["status"] == "failed" and first["attempts"] == 1, first  # taskd.Fail: no retries spent
    assert [e["attempt"] for e in first["errors"]] == [1]

    retried = server.http.post(f"/tasks/{failing}/retry")
    assert retried.status_code == 200, retried.text
    body = retried.json()
    assert body["id"] == failing and body["status"] == "pending" and body["finished_at"] is None
    assert body["attempts"] == 1 and len(body["errors"]) == 1 and body["max_retries"] == 3
    again = finished(server, failing)
    assert again["status"] == "failed" and again["attempts"] == 2, again
    assert [e["attempt"] for e in again["errors"]] == [1, 2]
    assert [e["message"] for e in again["errors"]] == ["told to fail", "told to fail"]
    assert again["last_error"] == again["errors"][-1]
    assert server.http.get(f"/tasks/{failing}/result").json()["error"]["attempt"] == 2

    # Only a failed, cancelled or expired task can be retried.
    done = submit(server, "echo", {"a": 1})
    assert finished(server, done)["status"] == "completed"
    refused = server.http.post(f"/tasks/{done}/retry")
    assert refused.status_code == 409 and error_code(refused) == "not_retryable", refused.text
    assert task(server, done)["status"] == "completed" and task(server, done)["attempts"] == 1
    missing = server.http.post("/tasks/999999/retry")
    assert missing.status_code == 404 and error_code(missing) == "not_found", missing.text

    pause(server, "held")
    waiting = submit(server, "echo", {"b": 2}, queue="held")
    refused = server.http.post(f"/tasks/{waiting}/retry")
    assert refused.status_code == 409 and error_code(refused) == "not_retryable", refused.text
    assert server.http.post(f"/tasks/{waiting}/cancel").json()["status"] == "cancelled"
    assert server.http.post(f"/tasks/{waiting}/retry").json()["status"] == "pending"
    resume(server, "held")
    assert server.http.get(f"/tasks/{waiting}/result?wait=10").json()["result"] == {"b": 2}
    assert task(server, waiting)["attempts"] == 1


def test_retry_gives_a_fresh_retry_budget_and_attempt_numbers_keep_counting(start_taskd: Start) -> None:
    server = start_taskd(RETRY_DELAY="0.05")
    # Fails attempts 1 and 2 (its one retry spent); retried by hand, attempt 3 succeeds.
    twice = submit(server, "flaky", {"fail_times": 2}, max_retries=1)
    # Fails attempts 1-3: after the hand retry, attempt 3 fails and its fresh retry, attempt 4, succeeds.
    thrice = submit(server, "flaky", {"fail_times": 3}, max_retries=1)
    # With no retries at all, a hand retry is one more attempt.
    no_retries = submit(server, "flaky", {"fail_times": 2}, max_retries=0)
    for task_id in (twice, thrice, no_retries):
        ended = finished(server, task_id)
        assert ended["status"] == "failed", ended
    assert task(server, twice)["attempts"] == 2 and task(server, thrice)["attempts"] == 2
    assert task(server, no_retries)["attempts"] == 1

    for task_id in (twice, thrice, no_retries):
        response = server.http.post(f"/tasks/{task_id}/retry")
        assert response.status_code == 200 and response.json()["status"] == "pending", response.text

    assert server.http.get(f"/tasks/{twice}/result?wait=15").json()["result"] == {"succeeded_on_attempt": 3}
    assert server.http.get(f"/tasks/{thrice}/result?wait=15").json()["result"] == {"succeeded_on_attempt": 4}
    after = finished(server, no_retries)
    assert after["status"] == "failed" and after["attempts"] == 2, after
    for task_id, attempts, errors in ((twice, 3, [1, 2]), (thrice, 4, [1, 2, 3]), (no_retries, 2, [1, 2])):
        t = task(server, task_id)
        assert t["attempts"] == attempts, t
        assert [e["attempt"] for e in t["errors"]] == errors, t
        assert {e["type"] for e in t["errors"]} == {"ConnectionError"}


# -- 6. bulk retry and bulk cancel -----------------------------------------------------------------


def test_bulk_retry_retries_exactly_the_matching_tasks(start_taskd: Start) -> None:
    server = start_taskd(RETRY_DELAY="0.05")
    controls = [submit(server, "control", {"do": "fail", "i": i}) for i in range(3)]
    # Fails its one attempt; run again, it succeeds.
    flakies = [submit(server, "flaky", {"fail_times": 1, "i": i}, max_retries=0) for i in range(4)]
    done = submit(server, "echo", {})
    for task_id in [*controls, *flakies, done]:
        finished(server, task_id)
    assert counts(server)["failed"] == 7 and counts(server)["completed"] == 1

    response = server.http.post("/tasks/retry", json={"task_type": "flaky"})
    assert response.status_code == 200 and response.json() == {"retried": 4}, response.text
    for task_id in flakies:
        ended = finished(server, task_id)
        assert ended["status"] == "completed" and ended["result"] == {"succeeded_on_attempt": 2}, ended
    for task_id in controls:
        t = task(server, task_id)
        assert t["status"] == "failed" and t["attempts"] == 1, t
    assert task(server, done)["attempts"] == 1

    # Nothing of that type is left to retry; the filters combine.
    assert server.http.post("/tasks/retry", json={"task_type": "flaky"}).json() == {"retried": 0}
    assert server.http.post("/tasks/retry", json={"status": "cancelled"}).json() == {"retried": 0}
    assert server.http.post("/tasks/retry", json={"task_type": "control", "queue": "other"}).json() == {"retried": 0}
    assert server.http.post("/tasks/retry", json={"finished_before": rfc3339(-3600)}).json() == {"retried": 0}
    response = server.http.post("/tasks/retry", json={"status": "failed", "task_type": "control",
                                                      "finished_before": rfc3339(60)})
    assert response.status_code == 200 and response.json() == {"retried": 3}, response.text
    for task_id in controls:
        ended = finished(server, task_id)
        assert ended["status"] == "failed" and ended["attempts"] == 2, ended
    assert counts(server)["failed"] == 3 and counts(server)["completed"] == 5

    for bad in ({"status": "pending"}, {"status": "completed"}, {"status": "running"}, {"status": "nope"},
                {"unknown": 1}, {"queue": "Not A Queue"}, {"finished_before": "yesterday"}, {"task_type": ""}):
        response = server.http.post("/tasks/retry", json=bad)
        assert response.status_code == 422, (bad, response.text)
    assert counts(server)["failed"] == 3, "a refused filter retried nothing"


def test_bulk_cancel_cancels_exactly_the_matching_tasks(start_taskd: Start) -> None:
    server = start_taskd()
    pause(server, "q")
    pause(server, "other")
    in_q = [submit(server, "echo", {"i": i}, queue="q") for i in range(5)]
    in_other = [submit(server, "echo", {"i": i}, queue="other") for i in range(3)]
    scheduled = [submit(server, "echo", {"i": i}, queue="q", delay_seconds=600) for i in range(2)]
    scheduled_default = submit(server, "echo", {"s": 1}, delay_seconds=600)

    for bad in ({"status": "completed"}, {"status": "failed"}, {"status": "cancelled"}, {"status": "expired"},
                {"unknown": 1}, {"queue": "Not A Queue"}, {"created_before": "yesterday"}):
        response = server.http.post("/tasks/cancel", json=bad)
        assert response.status_code == 422, (bad, response.text)
    assert counts(server)["cancelled"] == 0, "a refused filter cancelled nothing"

    response = server.http.post("/tasks/cancel", json={"queue": "q", "status": "pending"})
    assert response.status_code == 200 and response.json() == {"cancelled": 5}, response.text
    for task_id in in_q:
        t = task(server, task_id)
        assert t["status"] == "cancelled" and t["last_error"]["type"] == "Cancelled", t
    assert {task(server, i)["status"] for i in [*in_other]} == {"pending"}
    assert {task(server, i)["status"] for i in [*scheduled, scheduled_default]} == {"scheduled"}

    response = server.http.post("/tasks/cancel", json={"queue": "q"})
    assert response.status_code == 200 and response.json() == {"cancelled": 2}, response.text
    assert {task(server, i)["status"] for i in scheduled} == {"cancelled"}
    assert server.http.post("/tasks/cancel", json={"queue": "q"}).json() == {"cancelled": 0}
    assert server.http.post("/tasks/cancel", json={"created_before": rfc3339(-3600)}).json() == {"cancelled": 0}

    stats = counts(server)
    assert stats["cancelled"] == 7 and stats["pending"] == 3 and stats["scheduled"] == 1, stats
    queue_q = next(q for q in server.http.get("/queues").json()["items"] if q["name"] == "q")
    assert queue_q["counts"]["cancelled"] == 7 and queue_q["counts"]["pending"] == 0

    # Cancelled tasks stay cancelled when their queue runs again; the other queue's run.
    resume(server, "q")
    resume(server, "other")
    for task_id in in_other:
        assert server.http.get(f"/tasks/{task_id}/result?wait=10").json()["status"] == "completed"
    for task_id in [*in_q, *scheduled]:
        t = task(server, task_id)
        assert t["status"] == "cancelled" and t["attempts"] == 0 and t["started_at"] is None, t
    assert task(server, scheduled_default)["status"] == "scheduled"
