"""Steering without a database: QUEUES and the slot split, submit-time checks of queue,
expiry and keys, unique_for keys, progress and cancel as a handler sees them."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import trio

from taskd.config import Settings, parse_settings
from taskd.errors import ConfigError, InvalidTask
from taskd.models import TaskStatus, WorkerGauge
from taskd.registry import Registry, TaskContext
from taskd.workers import WorkerPool

from .fakes import FakeStore


def test_queues_split_the_slots_and_workers_default_to_their_sum() -> None:
    settings = parse_settings({"QUEUES": "default=40, emails=10"})
    assert settings.queues == (("default", 40), ("emails", 10)) and settings.worker_pool_size == 50
    assert parse_settings({"QUEUES": "a=2", "WORKER_POOL_SIZE": "2"}).worker_pool_size == 2
    assert parse_settings({"QUEUES": "a=2", "WORKER_POOL_SIZE": "0"}).worker_pool_size == 0, "API only"
    with pytest.raises(ConfigError, match="QUEUES.*add up to 2.*5"):
        parse_settings({"QUEUES": "a=2", "WORKER_POOL_SIZE": "5"})
    for bad in ("emails", "Emails=3", "a=0", "a=1,a=2", "a=x", ""):
        with pytest.raises(ConfigError, match="QUEUES"):
            parse_settings({"QUEUES": bad})


def registry_with(**options: Any) -> Registry:
    registry = Registry()

    @registry.task("job", **options)
    async def job(payload: Any, ctx: TaskContext) -> Any:
        return payload

    return registry


def test_queue_expiry_and_key_are_checked_at_submit() -> None:
    registry, settings = registry_with(), Settings()
    now = dt.datetime.now(dt.UTC)
    assert registry.new_task(settings, "job", {}).queue == "default"
    assert registry.new_task(settings, "job", {}, queue="a.b-c_9").queue == "a.b-c_9"
    refused = [
        dict(queue="Emails"), dict(queue="x" * 65), dict(queue=""),
        dict(expires_at=now - dt.timedelta(seconds=1)),
        dict(expires_at=now + dt.timedelta(hours=1), expires_in_seconds=5),
        dict(run_at=now + dt.timedelta(hours=2), expires_at=now + dt.timedelta(hours=1)),
        dict(delay_seconds=60, expires_in_seconds=30),
        dict(expires_in_seconds=0), dict(idempotency_key=""), dict(idempotency_key="k" * 201),
        dict(idempotency_key="a\x00b"),
    ]
    for options in refused:
        with pytest.raises(InvalidTask):
            registry.new_task(settings, "job", {}, **options)  # type: ignore[arg-type]
    task = registry.new_task(settings, "job", {}, delay_seconds=10, expires_in_seconds=60)
    assert (task.expires_in_seconds, task.expires_at) == (60.0, None)


def test_the_request_digest_tells_bodies_apart_but_not_key_order() -> None:
    registry, settings = registry_with(), Settings()

    def digest(payload: Any, **options: Any) -> str | None:
        return registry.new_task(settings, "job", payload, idempotency_key="k", **options).idempotency_hash

    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
    assert digest({"a": 1}) != digest({"a": 2}) != digest({"a": 1}, priority=3)
    assert registry.new_task(settings, "job", {}).idempotency_hash is None
    # Digested as sent, before defaults: processes with other settings agree on a repeat.
    other = Settings(max_retries=9, task_timeout=5)
    assert registry.new_task(other, "job", {"a": 1}, idempotency_key="k").idempotency_hash == digest({"a": 1})


def test_unique_for_derives_one_key_per_type_payload_and_window() -> None:
    registry, settings = registry_with(unique_for=3600), Settings()
    one = registry.new_task(settings, "job", {"x": 1})
    assert one.idempotency_key and one.idempotency_key == registry.new_task(settings, "job", {"x": 1}).idempotency_key
    assert one.idempotency_key != registry.new_task(settings, "job", {"x": 2}).idempotency_key
    assert registry.new_task(settings, "job", {"x": 1}, idempotency_key="mine").idempotency_key == "mine"
    with pytest.raises(ValueError, match="unique_for"):
        registry_with(unique_for=0)
    with pytest.raises(ValueError, match="queue"):
        registry_with(queue="Bad Queue")


def test_progress_is_checked_kept_as_json_and_awaitable() -> None:
    ctx = TaskContext(1, "job", 1, 3)
    assert ctx.latest_progress() is None and not ctx.cancelled()
    ctx.progress(0.5, "half")  # a plain def calls it
    progress = json.loads(ctx.latest_progress() or "")
    assert (progress["fraction"], progress["message"]) == (0.5, "half") and progress["updated_at"]
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError):
            ctx.progress(bad)  # type: ignore[arg-type]

    async def from_async() -> None:
        await ctx.progress(1, "done\x00")  # an async handler awaits it; NUL is escaped, not refused

    trio.run(from_async)
    assert json.loads(ctx.latest_progress() or "")["message"] == "done\\x00"
    ctx.mark_cancelled()
    assert ctx.cancelled()


async def test_each_queue_runs_in_its_own_slots(autojump_clock: trio.abc.Clock) -> None:
    registry, running, most = Registry(), {"a": 0, "b": 0}, {"a": 0, "b": 0}

    @registry.task("work")
    async def work(payload: Any, ctx: TaskContext) -> None:
        queue = payload["queue"]
        running[queue] += 1
        most[queue] = max(most[queue], running[queue])
        await trio.sleep(1)
        running[queue] -= 1

    store = FakeStore()
    for i in range(30):
        queue = "a" if i < 20 else "b"
        store.add("work", {"queue": queue}, queue=queue)
    settings = Settings(worker_pool_size=5, queues=(("a", 2), ("b", 3)))
    pool = WorkerPool(store, registry, settings, WorkerGauge(5))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        pool.start_claiming(nursery, pool.start_workers(nursery))
        with trio.fail_after(100):
            await store.finished_event.wait()
        pool.stop_claiming()
    assert most == {"a": 2, "b": 3}, "each queue uses its slots, and only its own"
    assert all(row["status"] == TaskStatus.COMPLETED for row in store.tasks.values())


async def test_progress_is_written_at_most_once_a_second_and_kept_with_the_outcome(
        autojump_clock: trio.abc.Clock) -> None:
    registry = Registry()

    @registry.task("steps")
    async def steps(payload: Any, ctx: TaskContext) -> str:
        for i in range(1, 11):
            await ctx.progress(i / 10, f"{i}")
            await trio.sleep(0.25)
        return "done"

    store = FakeStore()
    task_id = store.add("steps", {})
    pool = WorkerPool(store, registry, Settings(worker_pool_size=1), WorkerGauge(1))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        pool.start_claiming(nursery, pool.start_workers(nursery))
        nursery.start_soon(pool.progress_loop)
        with trio.fail_after(100):
            await store.finished_event.wait()
        nursery.cancel_scope.cancel()
    written = [json.loads(text)["message"] for _, _, text in store.progress]
    assert 1 <= len(written) <= 3, written  # 2.5 s of steps, one write a second at most
    assert store.tasks[task_id]["progress"]["message"] == "10", "the last progress arrives with the outcome"


async def test_a_cancel_the_notice_missed_is_caught_by_the_heartbeat(autojump_clock: trio.abc.Clock) -> None:
    registry = Registry()

    @registry.task("forever")
    async def forever(payload: Any, ctx: TaskContext) -> None:
        await trio.sleep_forever()

    store = FakeStore()
    task_id = store.add("forever", {})
    pool = WorkerPool(store, registry, Settings(worker_pool_size=1, lease_seconds=3), WorkerGauge(1))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        pool.start_claiming(nursery, pool.start_workers(nursery))
        nursery.start_soon(pool.heartbeat_loop)
        await trio.sleep(0.5)
        store.request_cancel(task_id, notify=False)
        with trio.fail_after(1.5):  # the next beat, lease / 3 later
            await store.finished_event.wait()
        nursery.cancel_scope.cancel()
    assert store.tasks[task_id]["status"] == "cancelled"
    assert store.tasks[task_id]["errors"][-1]["type"] == "Cancelled"


def test_fail_and_retry_are_found_inside_exception_groups() -> None:
    from taskd.control import Fail, Retry, steering

    fail, soon, later = Fail("bad"), Retry(after=1), Retry(after=5)
    assert steering(fail) is fail and steering(ValueError()) is None
    assert steering(BaseExceptionGroup("g", [ValueError(), ExceptionGroup("h", [fail])])) is fail
    assert steering(ExceptionGroup("g", [soon, ExceptionGroup("h", [later])])) is later
    assert steering(ExceptionGroup("g", [soon, ValueError()])) is None, "a snooze only if nothing else failed"
    deep: BaseException = soon
    for _ in range(5000):
        deep = ExceptionGroup("g", [deep])
    assert steering(deep) is None, "bounded: a group nested too deep steers nothing"


async def test_a_fail_or_retry_raised_in_a_nursery_child_steers_the_task(autojump_clock: trio.abc.Clock) -> None:
    from taskd.control import Fail, Retry

    registry = Registry()

    @registry.task("child_fails")
    async def child_fails(payload: Any, ctx: TaskContext) -> None:
        async def child() -> None:
            raise Fail("bad input") if payload["fail"] else Retry(after=7)

        if ctx.attempt > 1:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)

    store = FakeStore()
    failed, snoozed = store.add("child_fails", {"fail": True}), store.add("child_fails", {"fail": False}, max_retries=0)
    pool = WorkerPool(store, registry, Settings(worker_pool_size=2), WorkerGauge(2))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        pool.start_claiming(nursery, pool.start_workers(nursery))
        with trio.fail_after(100):
            await store.finished_event.wait()
        pool.stop_claiming()
    assert (store.tasks[failed]["status"], store.tasks[failed]["attempts"]) == ("failed", 1)
    assert (store.tasks[snoozed]["status"], store.tasks[snoozed]["attempts"]) == ("completed", 2)
    assert store.outcomes[0].snoozed or store.outcomes[1].snoozed
