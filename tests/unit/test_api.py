import dataclasses
import json
from typing import Any

import pytest

from taskd import builtin_tasks  # noqa: F401  (registers the built-in types)
from taskd.config import Settings
from taskd.http import create_app
from taskd.http import tasks as http_tasks
from taskd.models import Task, WorkerGauge
from taskd.registry import default_registry

from .fakes import FakeStore

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def client(store: FakeStore) -> Any:
    app = create_app(store, default_registry, Settings(max_body_bytes=4096), WorkerGauge(50))  # type: ignore[arg-type]
    return app.test_client()


async def post(client: Any, path: str, body: Any, headers: dict[str, str] = JSON) -> Any:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return await client.post(path, data=data, headers=headers)


async def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status
    body = await response.get_json()
    assert set(body["error"]) == {"code", "message", "details"}
    return body["error"]


async def test_priority_is_taken_on_submit_and_shown(client: Any, store: FakeStore) -> None:
    response = await post(client, "/tasks", {"task_type": "echo", "priority": 7})
    assert response.status_code == 201 and store.submitted[-1].priority == 7
    batch = await post(client, "/tasks/batch", {"tasks": [{"task_type": "echo", "priority": -100},
                                                          {"task_type": "echo"}]})
    assert batch.status_code == 201 and [t.priority for t in store.submitted[-2:]] == [-100, 0]
    assert (await (await client.get("/tasks/1")).get_json())["priority"] == 7
    listed = (await (await client.get("/tasks")).get_json())["items"]
    assert [t["priority"] for t in listed] == [0, -100, 7]


async def test_a_start_time_is_run_at_with_an_offset_or_delay_seconds_not_both(client: Any, store: FakeStore) -> None:
    ok = await post(client, "/tasks", {"task_type": "echo", "run_at": "2031-01-02T03:04:05+01:00"})
    assert ok.status_code == 201 and store.submitted[-1].run_at is not None
    assert store.submitted[-1].run_at.isoformat() == "2031-01-02T02:04:05+00:00", "the same instant, in UTC"
    assert (await post(client, "/tasks", {"task_type": "echo", "delay_seconds": 2.5})).status_code == 201
    assert store.submitted[-1].delay_seconds == 2.5 and store.submitted[-1].run_at is None
    assert (await ok.get_json())["status"] == "scheduled", "as GET will report it"
    for bad in [{"run_at": "2031-01-02T03:04:05"}, {"run_at": "soon"}, {"run_at": "1700000000"},
                {"run_at": "0001-01-01T00:00:00+01:00"}, {"run_at": "9999-12-31T23:00:00-05:00"},
                {"delay_seconds": -1}, {"delay_seconds": 31_536_001},
                {"run_at": "2031-01-02T03:04:05Z", "delay_seconds": 1}]:
        await error_of(await post(client, "/tasks", {"task_type": "echo", **bad}), 422)
    assert len(store.submitted) == 2


async def test_submit_returns_201_with_location(client: Any, store: FakeStore) -> None:
    response = await post(client, "/tasks", {"task_type": "echo", "payload": {"a": 1}, "max_retries": 0})
    assert response.status_code == 201
    body = await response.get_json()
    assert body == {"id": 1, "task_type": "echo", "status": "pending", "url": "/tasks/1"}
    assert response.headers["Location"] == "/tasks/1"
    assert store.submitted[0].max_retries == 0 and store.submitted[0].payload_json == '{"a":1}'


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b'{"task_type": "echo",', JSON, 400, "malformed_json"),
        (b"task_type=echo", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
        (b'{"task_type": "echo"}', {}, 415, "unsupported_media_type"),
        (b'{"task_type": "nope"}', JSON, 422, "invalid_task"),
        (b'{"task_type": "echo", "payload": [1]}', JSON, 422, "invalid_request"),
        (b'{"task_type": "echo", "max_retries": -1}', JSON, 422, "invalid_request"),
        (b'{"task_type": "echo", "max_retries": "3"}', JSON, 422, "invalid_request"),
        (b'{"task_type": "echo", "timeout_seconds": 0}', JSON, 422, "invalid_request"),
        (b'{"task_type": "echo", "priority": 101}', JSON, 422, "invalid_request"),
        (b'{"task_type": "echo", "priority": true}', JSON, 422, "invalid_request"),
        (b'{"task_type": "echo", "queue_name": "x"}', JSON, 422, "invalid_request"),
        (b'{"task_type": "echo", "payload": {"s": "\\u0000"}}', JSON, 422, "invalid_task"),
        (b'[]', JSON, 422, "invalid_request"),
        (b'{"payload": {}}', JSON, 422, "invalid_request"),
        (b'{"task_type": "echo", "payload": {"x": "' + b"y" * 5000 + b'"}}', JSON, 413, "request_entity_too_large"),
    ],
)
async def test_bad_submissions_get_a_json_4xx_and_write_nothing(
    client: Any, store: FakeStore, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    error = await error_of(await post(client, "/tasks", body, headers), status)
    assert error["code"] == code
    assert store.submitted == []


async def test_unknown_type_message_lists_known_types(client: Any) -> None:
    error = await error_of(await post(client, "/tasks", {"task_type": "resize"}), 422)
    assert "known types" in error["message"] and "echo" in error["message"]


async def test_batch_is_all_or_nothing_and_names_the_bad_index(client: Any, store: FakeStore) -> None:
    tasks = [{"task_type": "echo"}] * 3 + [{"task_type": "nope"}]
    error = await error_of(await post(client, "/tasks/batch", {"tasks": tasks}), 422)
    assert error["details"]["index"] == 3 and error["message"].startswith("tasks[3]")
    error = await error_of(await post(client, "/tasks/batch", {"tasks": [{"task_type": "echo"}, {"x": 1}]}), 422)
    assert error["details"][0]["loc"].startswith("tasks.1")
    assert store.submitted == []
    await error_of(await post(client, "/tasks/batch", {"tasks": []}), 422)
    await error_of(await post(client, "/tasks/batch", {"tasks": [{"task_type": "echo"}] * 1001}), 413)
    tasks = [{"task_type": "echo", "payload": {"i": i}} for i in range(3)]
    response = await post(client, "/tasks/batch", {"tasks": tasks})
    assert response.status_code == 201
    assert await response.get_json() == {"ids": [1, 2, 3], "count": 3, "created": [True, True, True]}


async def test_batch_over_1000_items_is_rejected() -> None:
    app = create_app(FakeStore(), default_registry, Settings(), WorkerGauge(1))  # type: ignore[arg-type]
    response = await post(app.test_client(), "/tasks/batch", {"tasks": [{"task_type": "echo"}] * 1001})
    error = await error_of(response, 422)
    assert "1000" in error["message"]


@pytest.mark.parametrize("path", ["/tasks/999", "/tasks/abc", "/tasks/0", "/tasks/99999999999999999999",
                                  "/tasks/-1", "/tasks/999/result", "/nowhere"])
async def test_unknown_ids_and_paths_are_404(client: Any, path: str) -> None:
    await error_of(await client.get(path), 404)


async def test_delete_unknown_is_404_and_known_is_204(client: Any, store: FakeStore) -> None:
    await error_of(await client.delete("/tasks/5"), 404)
    task_id = store.add("echo", {})
    assert (await client.delete(f"/tasks/{task_id}")).status_code == 204
    await error_of(await client.get(f"/tasks/{task_id}"), 404)


async def test_result_is_202_until_finished_then_200(client: Any, store: FakeStore) -> None:
    task_id = store.add("echo", {})
    response = await client.get(f"/tasks/{task_id}/result")
    assert response.status_code == 202 and (await response.get_json())["status"] == "pending"
    store.tasks[task_id].update(status="completed", result={"ok": True})
    response = await client.get(f"/tasks/{task_id}/result?wait=1")
    assert response.status_code == 200
    assert await response.get_json() == {"id": task_id, "status": "completed", "result": {"ok": True}}
    for bad in ("-1", "61", "soon"):
        await error_of(await client.get(f"/tasks/{task_id}/result?wait={bad}"), 422)


async def test_list_filters_and_pages_with_a_cursor(client: Any, store: FakeStore) -> None:
    for i in range(5):
        store.add("echo" if i % 2 else "sleep", {"i": i})
    page = await (await client.get("/tasks?limit=2")).get_json()
    assert [t["id"] for t in page["items"]] == [5, 4] and page["next_cursor"] == "4"
    page = await (await client.get(f"/tasks?limit=2&cursor={page['next_cursor']}")).get_json()
    assert [t["id"] for t in page["items"]] == [3, 2]
    page = await (await client.get("/tasks?task_type=echo")).get_json()
    assert [t["id"] for t in page["items"]] == [4, 2] and page["next_cursor"] is None
    for bad in ("status=done", "limit=0", "limit=1001", "cursor=x", "cursor=-3", "cursor=%C2%B2",
                "cursor=99999999999999999999", "task_type=%00"):
        await error_of(await client.get(f"/tasks?{bad}"), 422)


SUMMARY_KEYS = {"id", "task_type", "status", "attempts", "max_retries", "crashes", "created_at", "started_at",
                "finished_at", "last_error", "priority", "run_at", "queue"}
FULL_KEYS = {"id", "task_type", "status", "payload", "result", "attempts", "max_retries", "crashes",
             "timeout_seconds", "created_at", "started_at", "finished_at", "last_error", "errors", "priority",
             "run_at", "queue", "expires_at", "idempotency_key", "cancel_requested_at", "progress"}


async def test_list_gives_summaries_by_default_and_full_tasks_on_request(client: Any, store: FakeStore) -> None:
    store.add("echo", {"big": "x" * 1000})
    failed = store.add("echo", {"i": 2})
    store.tasks[failed].update(status="failed", errors=[
        {"type": "E1", "message": "first", "attempt": 1, "at": "t"},
        {"type": "E2", "message": "m" * 2000, "traceback": "tb", "attempt": 2, "at": "t"}])
    for query in ("", "?full=false"):
        items = (await (await client.get(f"/tasks{query}")).get_json())["items"]
        assert [set(t) for t in items] == [SUMMARY_KEYS] * 2
        assert items[0]["last_error"] == {"type": "E2", "message": "m" * 500} and items[1]["last_error"] is None
    items = (await (await client.get("/tasks?full=true")).get_json())["items"]
    assert [set(t) for t in items] == [FULL_KEYS] * 2
    assert items[1]["payload"] == {"big": "x" * 1000} and items[1]["crashes"] == 0
    assert [e["type"] for e in items[0]["errors"]] == ["E1", "E2"] and items[0]["last_error"]["traceback"] == "tb"
    for bad in ("1", "yes", "True", ""):
        error = await error_of(await client.get(f"/tasks?full={bad}"), 422)
        assert error["code"] == "invalid_query" and error["message"].startswith("full:")


async def test_a_full_page_is_cut_by_size_and_the_cursor_leads_on(
    client: Any, store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_tasks, "FULL_PAGE_BYTES", 2500)
    for i in range(5):
        store.add("echo", {"i": i, "pad": "p" * 1000})
    seen: list[int] = []
    cursor = ""
    while True:
        page = await (await client.get(f"/tasks?full=true&limit=4{cursor}")).get_json()
        assert 1 <= len(page["items"]) <= 2, "two rows of ~1 KB fit in 2.5 KB, a third does not"
        seen += [t["id"] for t in page["items"]]
        if page["next_cursor"] is None:
            break
        assert page["next_cursor"] == str(page["items"][-1]["id"])
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == [5, 4, 3, 2, 1]
    monkeypatch.setattr(http_tasks, "FULL_PAGE_BYTES", 10)
    page = await (await client.get("/tasks?full=true")).get_json()
    assert [t["id"] for t in page["items"]] == [5] and page["next_cursor"] == "5", "one row even if larger"


async def test_json_columns_pass_through_undecoded(
    client: Any, store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deeper than json.loads (or json.dumps) can go: a row another producer wrote.
    deep = "[" * 5000 + "]" * 5000
    task_id = store.add("echo", {})
    store.tasks[task_id]["status"] = "completed"
    real_get = store.get

    async def get(task_id: int) -> Task | None:
        task = await real_get(task_id)
        return task and dataclasses.replace(task, payload_json=deep, result_json=deep)

    monkeypatch.setattr(store, "get", get)
    monkeypatch.setattr(store, "wait_finished", lambda task_id, seconds: get(task_id))
    for path, key in ((f"/tasks/{task_id}", "payload"), (f"/tasks/{task_id}/result", "result")):
        response = await client.get(path)
        assert response.status_code == 200
        text = (await response.get_data()).decode()
        assert f'"{key}":{deep}' in text


async def test_stats_shape(client: Any, store: FakeStore) -> None:
    store.add("echo", {})
    body = await (await client.get("/stats")).get_json()
    assert body["counts"]["pending"] == 1 and body["total"] == 1
    assert body["workers"] == {"busy": 0, "size": 50}
    assert {"completed_last_60s", "success_rate", "uptime_seconds"} <= set(body)
    detailed = await (await client.get("/stats/detailed")).get_json()
    assert set(detailed) == {"by_type", "timeline", "database_pool", "processes"}


async def test_openapi_documents_every_route(client: Any) -> None:
    spec = await (await client.get("/openapi.json")).get_json()
    paths = spec["paths"]
    for path, methods in {
        "/tasks": {"post", "get"}, "/tasks/batch": {"post"}, "/tasks/{task_id}": {"get", "delete"},
        "/tasks/{task_id}/result": {"get"}, "/stats": {"get"}, "/stats/detailed": {"get"},
        "/health": {"get"}, "/ready": {"get"}, "/tasks/{task_id}/cancel": {"post"},
        "/tasks/{task_id}/retry": {"post"}, "/tasks/cancel": {"post"}, "/tasks/retry": {"post"},
        "/queues": {"get"}, "/queues/{name}/pause": {"post"}, "/queues/{name}/resume": {"post"},
    }.items():
        assert methods <= set(paths[path]), path
    assert {"200", "201", "409", "422"} <= set(paths["/tasks"]["post"]["responses"])
    assert {"200", "404", "409"} <= set(paths["/tasks/{task_id}/cancel"]["post"]["responses"])
    task_in = spec["components"]["schemas"]["TaskIn"]["properties"]
    assert {"queue", "expires_at", "expires_in_seconds", "idempotency_key"} <= set(task_in)
    assert "TaskIn" in json.dumps(paths["/tasks"]["post"])
    listing = paths["/tasks"]["get"]
    assert "full" in {p["name"] for p in listing["parameters"]} and "8 MB" in listing["description"]
    assert {"TaskSummaryOut", "TaskOut"} <= set(spec["components"]["schemas"])
    assert "crashes" in spec["components"]["schemas"]["TaskOut"]["properties"]
    for page in ("/docs", "/redoc"):
        assert (await client.get(page)).status_code == 200


async def test_wrong_method_is_405_json(client: Any) -> None:
    error = await error_of(await client.put("/tasks"), 405)
    assert error["code"] == "method_not_allowed"


async def test_bulk_filters_refuse_what_postgresql_cannot_take(client: Any) -> None:
    for path, body in [("/tasks/cancel", {"task_type": "a\u0000b"}), ("/tasks/retry", {"task_type": "a\u0000b"}),
                       ("/tasks/cancel", {"created_before": "0001-01-01T00:00:00+01:00"}),
                       ("/tasks/retry", {"finished_before": "9999-12-31T23:59:59-01:00"}),
                       ("/tasks/cancel", {"status": "completed"}), ("/tasks/retry", {"status": "pending"}),
                       ("/tasks/retry", {"nope": 1})]:
        response = await client.post(path, json=body)
        assert response.status_code == 422, (path, body, await response.get_data())

