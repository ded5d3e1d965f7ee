import logging
from typing import Any

import pytest
import trio

from taskd import builtin_tasks, jsontext
from taskd.config import Settings
from taskd.control import Fail
from taskd.errors import InvalidTask
from taskd.registry import Registry, TaskContext, default_registry


def ctx(attempt: int = 1) -> TaskContext:
    return TaskContext(1, "t", attempt, 3)


def test_context_logger_tags_records_with_the_task_id(caplog: pytest.LogCaptureFixture) -> None:
    context = TaskContext(42, "resize", 2, 3)
    with caplog.at_level(logging.INFO, logger="taskd.task.resize"):
        context.logger.info("working")
    (record,) = caplog.records
    assert record.name == "taskd.task.resize" and record.task_id == 42  # type: ignore[attr-defined]


def test_builtins_are_registered() -> None:
    assert {"echo", "sleep", "data_processing"} <= set(default_registry.names())
    assert default_registry.get("data_processing").is_async is False  # type: ignore[union-attr]
    assert default_registry.get("echo").is_async is True  # type: ignore[union-attr]


def test_defaults_resolve_task_then_handler_then_settings() -> None:
    registry = Registry()

    @registry.task("resize", timeout=30, max_retries=5)
    async def resize(payload: object, ctx: TaskContext) -> None: ...

    @registry.task()
    async def plain(payload: object, ctx: TaskContext) -> None: ...

    settings = Settings(max_retries=2, task_timeout=99)
    assert registry.new_task(settings, "resize", {}).max_retries == 5
    assert registry.new_task(settings, "resize", {}).timeout_seconds == 30
    assert registry.new_task(settings, "resize", {}, max_retries=0, timeout_seconds=1).max_retries == 0
    assert registry.new_task(settings, "plain", {}).max_retries == 2
    assert registry.new_task(settings, "plain", {}).timeout_seconds == 99


def test_unknown_type_lists_known_types() -> None:
    with pytest.raises(InvalidTask, match="unknown task_type 'nope'; known types: .*data_processing, echo, sleep"):
        default_registry.new_task(Settings(), "nope", {})


@pytest.mark.parametrize("payload", [{"x": float("nan")}, {"x": float("inf")}, {"s": "a\x00b"}])
def test_payloads_postgres_cannot_store_are_rejected(payload: object) -> None:
    with pytest.raises(InvalidTask, match="payload"):
        default_registry.new_task(Settings(), "echo", payload)


def test_registering_a_name_twice_is_an_error() -> None:
    registry = Registry()
    registry.register("a", lambda p, c: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", lambda p, c: 1)


def test_jsontext_round_trips_unicode() -> None:
    assert jsontext.loads(jsontext.dumps({"é": ["ü", 1, None]})) == {"é": ["ü", 1, None]}


def test_data_processing_counts_and_hashes() -> None:
    out = builtin_tasks.data_processing({"data": "hello world\nfoo"}, ctx())
    assert out == {"characters": 15, "words": 3, "lines": 2, "upper": "HELLO WORLD\nFOO",
                   "sha256": "e607eb8eb0e2262aebaf46f2ea1b98f718e8fa7ed9c61472f05027fc1ac42439"}
    assert builtin_tasks.data_processing({"data": ["a b", "c"]}, ctx())["lines"] == 2
    with pytest.raises(Fail):  # a row another producer wrote: failed at once, no retries
        builtin_tasks.data_processing({"data": 5}, ctx())


async def test_sleep_validates_and_sleeps(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    assert await builtin_tasks.sleep({"seconds": 2.5}, ctx()) == {"slept": 2.5}
    assert trio.current_time() - start == pytest.approx(2.5)
    for bad in ({"seconds": 3601}, {"seconds": -1}, {"seconds": "1"}, {"seconds": True}):
        with pytest.raises(Fail):
            await builtin_tasks.sleep(bad, ctx())


def test_built_ins_refuse_a_bad_payload_at_submit_time() -> None:
    for task_type, payload in [("sleep", {"seconds": -1}), ("sleep", {"seconds": "1"}),
                               ("data_processing", {"data": 5}), ("data_processing", {})]:
        with pytest.raises(InvalidTask) as refused:
            default_registry.new_task(Settings(), task_type, payload)
        assert refused.value.field == "payload" and task_type in refused.value.message
    assert default_registry.new_task(Settings(), "sleep", {"seconds": 0.5}).task_type == "sleep"


async def test_echo_returns_payload() -> None:
    assert await builtin_tasks.echo({"a": [1]}, ctx()) == {"a": [1]}


def test_enqueue_validates_and_takes_limits_like_the_api() -> None:
    from taskd import client

    registry = Registry()

    @registry.task("picky", timeout=12, max_retries=7)
    async def picky(payload: Any, ctx: TaskContext) -> None:
        return None

    server = Settings(max_retries=1, task_timeout=99)
    task = client.prepare("picky", {"a": 1}, settings=server, registry=registry)
    assert (task.max_retries, task.timeout_seconds) == (7, 12.0), "the handler's limits, not 3 and 300"
    registry.register("plain", lambda payload, ctx: None)
    plain = client.prepare("plain", {}, settings=server, registry=registry)
    assert (plain.max_retries, plain.timeout_seconds) == (1, 99.0), "then the server's settings"
    for bad in [dict(payload=[1, 2]), dict(payload="text"), dict(payload={"x": float("nan")}),
                dict(payload={"x": "\x00"}), dict(max_retries=-1), dict(max_retries=True), dict(timeout_seconds=0),
                dict(task_type="nope"), dict(task_type="")]:
        args = {"task_type": "picky", "payload": {}, **bad}
        with pytest.raises(InvalidTask):
            client.prepare(args.pop("task_type"), args.pop("payload"), settings=server, registry=registry, **args)


def test_enqueue_reads_the_server_settings_from_the_environment(tmp_path: Any, monkeypatch: Any) -> None:
    from taskd import client
    from taskd.config import load_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MAX_RETRIES=9\n")
    monkeypatch.setenv("TASK_TIMEOUT", "42")
    settings = load_settings()
    assert (settings.max_retries, settings.task_timeout) == (9, 42.0)
    task = client.prepare("echo", {}, settings=settings)
    assert (task.max_retries, task.timeout_seconds) == (9, 42.0)


def test_priority_comes_from_the_task_then_the_handler_then_zero() -> None:
    registry = Registry()

    @registry.task("urgent", priority=50)
    async def urgent(payload: Any, ctx: TaskContext) -> None:
        return None

    registry.register("plain", lambda payload, ctx: None)
    server = Settings()
    assert registry.new_task(server, "urgent", {}).priority == 50
    assert registry.new_task(server, "urgent", {}, priority=-3).priority == -3
    assert registry.new_task(server, "plain", {}).priority == 0
    for bad in (101, -101, True, 1.5):
        with pytest.raises(InvalidTask):
            registry.new_task(server, "plain", {}, priority=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        registry.register("loud", lambda payload, ctx: None, priority=1000)
