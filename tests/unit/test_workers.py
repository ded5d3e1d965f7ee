import random
from typing import Any

import pytest
import trio

from taskd.config import Settings
from taskd.models import TaskStatus, WorkerGauge
from taskd.outcomes import retry_delay
from taskd.registry import Registry, TaskContext
from taskd.workers import WorkerPool

from .fakes import FakeStore


def make_registry(log: list[Any]) -> Registry:
    registry = Registry()

    @registry.task("ok")
    async def ok(payload: Any, ctx: TaskContext) -> Any:
        log.append(("ok", ctx.task_id, ctx.attempt))
        await trio.sleep(payload.get("seconds", 0))
        return payload

    @registry.task("flaky")
    async def flaky(payload: Any, ctx: TaskContext) -> str:
        if ctx.attempt <= payload["fail_times"]:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return "finally"

    @registry.task("hang")
    async def hang(payload: Any, ctx: TaskContext) -> None:
        await trio.sleep_forever()

    @registry.task("garbage")
    async def garbage(payload: Any, ctx: TaskContext) -> object:
        return object()

    @registry.task("sync")
    def sync(payload: Any, ctx: TaskContext) -> int:
        return payload["n"] * 2

    return registry


def new_pool(store: FakeStore, size: int, registry: Registry | None = None, **settings: Any) -> WorkerPool:
    return WorkerPool(store, registry or make_registry([]), Settings(worker_pool_size=size, **settings),  # type: ignore[arg-type]
                      WorkerGauge(size))


def start_pool(nursery: trio.Nursery, pool: WorkerPool) -> None:
    """Start the claim loop and the worker loops as the server does."""
    pool.start_claiming(nursery, pool.start_workers(nursery))


async def run_pool(store: FakeStore, registry: Registry, settings: Settings, until: trio.Event) -> WorkerPool:
    pool = WorkerPool(store, registry, settings, WorkerGauge(settings.worker_pool_size))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        start_pool(nursery, pool)
        with trio.fail_after(3600):
            await until.wait()
        pool.stop_claiming()
    return pool


def test_retry_delay_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 5), (2, 10), (3, 20), (10, 600)]:
        delays = [retry_delay(attempt, 5, 600, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not constant


async def test_claimer_never_asks_for_more_than_free_slots(autojump_clock: trio.abc.Clock) -> None:
    store, log = FakeStore(), []
    for i in range(30):
        store.add("ok", {"seconds": 1 + i % 4})  # uneven, so slots free up a few at a time
    await run_pool(store, make_registry(log), Settings(worker_pool_size=4), store.finished_event)
    asks = list(zip(store.claim_requests, store.running_at_claim, strict=True))
    assert all(limit + running <= 4 for limit, running in asks), asks
    assert any(running > 0 for _, running in asks), "some claims happened while tasks still ran"
    assert len(log) == 30 and len(store.outcomes) == 30


async def test_failures_retry_with_backoff_then_complete(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    task_id = store.add("flaky", {"fail_times": 2}, max_retries=3)
    await run_pool(store, make_registry([]), Settings(worker_pool_size=2, retry_delay=10), store.finished_event)
    row = store.tasks[task_id]
    assert (row["status"], row["attempts"], row["result"]) == ("completed", 3, "finally")
    assert [e["type"] for e in row["errors"]] == ["ConnectionError", "ConnectionError"]
    assert row["errors"][0]["message"] == "attempt 1 failed" and "Traceback" in row["errors"][0]["traceback"]
    assert [o.status for o in store.outcomes] == [TaskStatus.RETRYING, TaskStatus.RETRYING, TaskStatus.COMPLETED]
    assert 5 <= store.outcomes[0].retry_delay <= 10 and 10 <= store.outcomes[1].retry_delay <= 20


async def test_retries_run_out_then_fail(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    task_id = store.add("flaky", {"fail_times": 9}, max_retries=1)
    await run_pool(store, make_registry([]), Settings(worker_pool_size=1, retry_delay=1), store.finished_event)
    assert (store.tasks[task_id]["status"], store.tasks[task_id]["attempts"]) == ("failed", 2)


async def test_timeout_and_garbage_results_fail_the_attempt_not_the_worker(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    hang = store.add("hang", {}, max_retries=0, timeout=5)
    garbage = store.add("garbage", {}, max_retries=0)
    good = store.add("ok", {"n": 21}, max_retries=0)
    await run_pool(store, make_registry([]), Settings(worker_pool_size=1), store.finished_event)
    assert store.tasks[hang]["status"] == "failed"
    assert store.tasks[hang]["errors"][0]["type"] == "AttemptTimeout"
    assert "timeout of 5s" in store.tasks[hang]["errors"][0]["message"]
    assert store.tasks[garbage]["errors"][0]["type"] == "ResultNotJSON"
    assert "not JSON-serialisable" in store.tasks[garbage]["errors"][0]["message"]
    assert (store.tasks[good]["status"], store.tasks[good]["result"]) == ("completed", {"n": 21})


async def test_deleting_a_running_task_cancels_only_its_attempt(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    hang = store.add("hang", {}, timeout=1000)
    pool = new_pool(store, 2)
    async with trio.open_nursery() as nursery:
        start_pool(nursery, pool)
        await trio.sleep(1)
        assert pool.gauge.busy == 1
        store.cancel(hang)
        await trio.sleep(1)
        assert pool.gauge.busy == 0 and pool.unfinished() == []
        ok = store.add("ok", {})
        await trio.sleep(1)
        assert store.tasks[ok]["status"] == "completed"
        pool.stop_claiming()
    assert store.outcomes[-1].task_id == ok


async def test_new_work_wakes_an_idle_claimer_before_the_poll(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    pool = new_pool(store, 1)
    async with trio.open_nursery() as nursery:
        start_pool(nursery, pool)
        await trio.sleep(10)
        claims_before = len(store.claim_requests)
        store.add("ok", {})
        await trio.sleep(0.01)  # far below the 2 s poll
        assert len(store.claim_requests) > claims_before
        assert store.outcomes and store.outcomes[0].status == TaskStatus.COMPLETED
        pool.stop_claiming()


async def test_cancelled_work_stays_held_for_release(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    ids = [store.add("hang", {}, timeout=1000) for _ in range(3)]
    pool = new_pool(store, 2)
    async with trio.open_nursery() as nursery:
        start_pool(nursery, pool)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert sorted(pool.unfinished()) == [(ids[0], 1), (ids[1], 1)]
    assert store.outcomes == []


@pytest.mark.parametrize("size", [1, 3])
async def test_sync_handlers_run_in_threads(size: int) -> None:
    store = FakeStore()
    ids = [store.add("sync", {"n": i}) for i in range(5)]
    await run_pool(store, make_registry([]), Settings(worker_pool_size=size), store.finished_event)
    assert [store.tasks[i]["result"] for i in ids] == [0, 2, 4, 6, 8]


async def test_heartbeat_renews_what_is_held_and_cancels_a_lost_lease(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    kept, lost = store.add("hang", {}, timeout=1000), store.add("hang", {}, timeout=1000)
    pool = new_pool(store, 2, lease_seconds=3)
    async with trio.open_nursery() as nursery:
        start_pool(nursery, pool)
        nursery.start_soon(pool.heartbeat_loop)
        await trio.sleep(2)
        assert sorted(store.heartbeats[-1]) == [(kept, 1), (lost, 1)] and pool.gauge.busy == 2
        store.tasks[lost]["attempts"] = 2  # rescued after an expired lease and claimed elsewhere
        await trio.sleep(3)  # a beat to notice, one more to hand it back
        assert [a.key for a in pool.attempts()] == [(kept, 1)] and pool.gauge.busy == 1
        assert pool.unfinished() == [(kept, 1)] and store.released == [(lost, 1)], "handed back, fenced"
        assert store.tasks[lost]["status"] == "running", "the fence kept the newer attempt's row"
        nursery.cancel_scope.cancel()
    assert store.outcomes == [], "the lost attempt records nothing"


async def test_a_task_cancelled_before_its_claim_lands_never_runs(autojump_clock: trio.abc.Clock) -> None:
    store, log = FakeStore(), []
    task_id = store.add("ok", {})
    pool = new_pool(store, 1, registry=make_registry(log))
    pool._cancel_running(task_id, 1)  # the notice overtakes the claim
    async with trio.open_nursery() as nursery:
        start_pool(nursery, pool)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert log == [] and pool.unfinished() == []
    assert store.tasks[task_id]["status"] == "cancelled"


async def test_a_notice_for_another_attempt_leaves_this_one_alone(autojump_clock: trio.abc.Clock) -> None:
    """A cancelled task may be retried by hand: the old attempt's notice must not stop the new one."""
    store, log = FakeStore(), []
    task_id = store.add("ok", {})
    store.tasks[task_id]["attempts"] = 3  # attempt 4 is next
    pool = new_pool(store, 1, registry=make_registry(log))
    pool._cancel_running(task_id, 3)
    await run_pool(store, make_registry(log), Settings(worker_pool_size=1), store.finished_event)
    assert log == [("ok", task_id, 4)] and store.tasks[task_id]["status"] == "completed"


async def test_a_result_postgres_cannot_store_fails_the_attempt(autojump_clock: trio.abc.Clock) -> None:
    registry = make_registry([])

    @registry.task("surrogate")
    async def surrogate(payload: Any, ctx: TaskContext) -> str:
        return b"caf\xe9".decode("utf-8", "surrogateescape")  # as os.listdir may return

    store = FakeStore()
    task_id = store.add("surrogate", {}, max_retries=0)
    await run_pool(store, registry, Settings(worker_pool_size=1), store.finished_event)
    assert store.tasks[task_id]["status"] == "failed"
    assert "not valid UTF-8" in store.tasks[task_id]["errors"][0]["message"]
