"""The attempt's scope is a wall: whatever a handler raises or returns, and whatever a row
holds, becomes that attempt's outcome, and the loops go on. A property test throws
arbitrary exceptions and arbitrary JSON at the worker pool."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskd import failures, jsontext
from taskd.config import Settings
from taskd.errors import DatabaseUnavailable
from taskd.models import WorkerGauge
from taskd.registry import Registry, TaskContext
from taskd.workers import WorkerPool

from .fakes import FakeStore


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no __str__ for you")


class Weird(BaseException):
    pass


class Hostile(ExceptionGroup):  # type: ignore[type-arg]
    """A group whose members cannot be read, and whose cause is a property that raises."""

    @property
    def exceptions(self) -> Any:  # type: ignore[override]
        raise RuntimeError("no members for you")

    @property
    def __cause__(self) -> Any:  # type: ignore[override]
        raise SystemExit("nor a cause")


def _exception(kind: str, message: str) -> BaseException:
    return {
        "value": lambda: ValueError(message),
        "keyboard": lambda: KeyboardInterrupt(message),
        "exit": lambda: SystemExit(message),
        "base": lambda: BaseException(message),
        "weird": lambda: Weird(message),
        "unprintable": lambda: Unprintable(),
        "group": lambda: ExceptionGroup(message, [ValueError(message), TypeError("t")]),
        "basegroup": lambda: BaseExceptionGroup(message, [KeyboardInterrupt(), ValueError(message)]),
        "hostile": lambda: Hostile(message, [ValueError(message)]),
    }[kind]()


EXCEPTION_KINDS = ["value", "keyboard", "exit", "base", "weird", "unprintable", "group", "basegroup", "hostile"]
NASTY_TEXT = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF,
                                            categories=None), max_size=30) | st.sampled_from(
    ["nul\x00here", "lone \udc80 surrogate", "\ud800", ""])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)
# What a handler may do: raise something, return JSON, or return something that is not JSON.
BEHAVIOUR = st.one_of(
    st.tuples(st.just("raise"), st.sampled_from(EXCEPTION_KINDS), NASTY_TEXT),
    st.tuples(st.just("return"), JSON),
    st.tuples(st.just("garbage"), st.sampled_from(["set", "nan", "object", "nul", "surrogate"])),
)


def _storable(value: Any) -> bool:
    try:
        jsontext.dumps(value)
    except jsontext.NotJsonError:
        return False  # a NUL in a returned string: refused, and the attempt fails with ResultNotJSON
    return True


def _garbage(kind: str) -> Any:
    return {"set": {1, 2}, "nan": float("nan"), "object": object(), "nul": "a\x00b",
            "surrogate": "\udcff"}[kind]


def _registry(behaviours: dict[int, Any]) -> Registry:
    registry = Registry()

    @registry.task("act")
    async def act(payload: Any, ctx: TaskContext) -> Any:
        await trio.sleep(0.01)
        what = behaviours[payload["i"]]
        if what[0] == "raise":
            raise _exception(what[1], what[2])
        if what[0] == "garbage":
            return _garbage(what[1])
        return what[1]

    @registry.task("fine")
    async def fine(payload: Any, ctx: TaskContext) -> Any:
        await trio.sleep(0.01)
        return "ok"

    return registry


def _start(nursery: trio.Nursery, pool: WorkerPool, *, heartbeat: bool = False) -> None:
    """The claim loop and one worker loop per slot, as the server starts them."""
    pool.start_claiming(nursery, pool.start_workers(nursery))
    if heartbeat:
        nursery.start_soon(pool.heartbeat_loop)


async def _drain(store: FakeStore, registry: Registry, size: int = 3) -> WorkerPool:
    pool = WorkerPool(store, registry, Settings(worker_pool_size=size, max_threads=4, retry_delay=0.5),  # type: ignore[arg-type]
                      WorkerGauge(size))
    async with trio.open_nursery() as nursery:
        _start(nursery, pool)
        with trio.fail_after(10_000):
            await store.finished_event.wait()
        pool.stop_claiming()
    return pool


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(BEHAVIOUR, min_size=1, max_size=6), st.lists(JSON, min_size=1, max_size=3))
def test_any_handler_behaviour_or_payload_becomes_an_outcome_and_the_loops_survive(
        behaviours: list[Any], payload_extras: list[Any]) -> None:
    store = FakeStore()
    acting = {store.add("act", {"i": i, "extra": payload_extras[i % len(payload_extras)]}, max_retries=1): b
              for i, b in enumerate(behaviours)}
    innocent = [store.add("fine", {}) for _ in range(3)]
    trio.run(_drain, store, _registry({i: b for i, b in enumerate(behaviours)}),
             clock=trio.testing.MockClock(autojump_threshold=0))
    for task_id, behaviour in acting.items():
        row = store.tasks[task_id]
        expected = "completed" if behaviour[0] == "return" and _storable(behaviour[1]) else "failed"
        assert row["status"] == expected, (behaviour, row)
        for error in row["errors"]:
            assert isinstance(error["type"], str) and isinstance(error["message"], str)
            jsontext.dumps(error)  # storable as it is: NUL and surrogates escaped
    assert all(store.tasks[i]["status"] == "completed" for i in innocent)


def test_describing_an_error_raised_beside_a_huge_group_is_quick() -> None:
    # A plain-def handler can raise this from its thread; describing it runs on the loop.
    try:
        try:
            raise ExceptionGroup("many", [ValueError(i) for i in range(300_000)])
        except ExceptionGroup:
            raise RuntimeError("while handling a huge group")  # noqa: B904  (the context is the point)
    except RuntimeError as exc:
        error = exc
    started = time.perf_counter()
    described = json.loads(failures.describe_json(error, 1))
    assert time.perf_counter() - started < 0.2
    assert described["type"] == "RuntimeError" and "caused by ExceptionGroup" in described["traceback"]


def test_describing_never_raises_and_escapes_what_jsonb_refuses() -> None:
    group = BaseExceptionGroup("g", [Unprintable(), KeyboardInterrupt()])
    group = BaseExceptionGroup("g", [Unprintable(), KeyboardInterrupt()])
    for exc in [Unprintable(), ValueError("a\x00b \udc80"), group]:
        text = failures.describe_json(exc, 1)
        described = json.loads(text)
        assert described["type"] and isinstance(described["message"], str)
    assert json.loads(failures.describe_json(ValueError("a\x00b \udc80"), 1))["message"] == "a\\x00b \\udc80"
    assert "unprintable Unprintable" in failures.error_message(Unprintable())


async def test_a_group_raised_while_the_timeout_cancels_is_a_timeout(autojump_clock: trio.abc.Clock) -> None:
    registry = Registry()

    @registry.task("group_on_cancel")
    async def group_on_cancel(payload: Any, ctx: TaskContext) -> None:
        async def raise_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                raise ValueError("cleanup failed") from None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(raise_when_cancelled)
            nursery.start_soon(trio.sleep_forever)

    store = FakeStore()
    poison = store.add("group_on_cancel", {}, max_retries=0, timeout=2)
    await _drain(store, registry)
    error = store.tasks[poison]["errors"][0]
    assert store.tasks[poison]["status"] == "failed" and error["type"] == "AttemptTimeout"
    assert "ValueError: cleanup failed" in error["message"]


async def test_a_payload_that_cannot_be_decoded_fails_only_its_task(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    deep = store.add("fine", {}, max_retries=3)
    store.tasks[deep]["payload_json"] = "[" * 100_000 + "]" * 100_000  # another producer wrote it
    good = store.add("fine", {})
    await _drain(store, _registry({}))
    assert store.tasks[deep]["status"] == "failed" and store.tasks[deep]["attempts"] == 1, "not retried"
    assert store.tasks[deep]["errors"][0]["type"] == "PayloadUnreadable"
    assert store.tasks[good]["status"] == "completed"


class FlakyHeartbeatStore(FakeStore):
    """Heartbeats fail while `down` is set; outcomes wait for `write()` when `hold` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hold = False
        self.held_outcomes: list[Any] = []

    async def heartbeat(self, lease: float, held: Any, workers: int, busy: int) -> set[tuple[int, int]]:
        if self.down:
            await trio.sleep(0.1)
            raise DatabaseUnavailable("connection refused")
        return await super().heartbeat(lease, held, workers, busy)

    async def release(self, claims: Any, *, from_heartbeat: bool = False) -> None:
        if self.down:
            raise DatabaseUnavailable("connection refused")
        await super().release(claims, from_heartbeat=from_heartbeat)

    async def record(self, outcome: Any) -> None:
        if self.hold:
            self.held_outcomes.append(outcome)
        else:
            await super().record(outcome)

    async def write(self) -> None:
        outcomes, self.held_outcomes = self.held_outcomes, []
        for outcome in outcomes:
            await super().record(outcome)


def _lease_registry(log: list[Any]) -> Registry:
    registry = Registry()

    @registry.task("long")
    async def long(payload: Any, ctx: TaskContext) -> Any:
        log.append(("start", ctx.task_id, ctx.attempt))
        await trio.sleep(payload["seconds"])
        log.append(("end", ctx.task_id, ctx.attempt))
        return "done"

    return registry


async def test_an_attempt_cut_off_from_the_database_stops_before_its_lease_runs_out_then_is_released(
        autojump_clock: trio.abc.Clock) -> None:
    store, log = FlakyHeartbeatStore(), []
    task_id = store.add("long", {"seconds": 100}, max_retries=0, timeout=1000)
    pool = WorkerPool(store, _lease_registry(log), Settings(worker_pool_size=1, lease_seconds=3),  # type: ignore[arg-type]
                      WorkerGauge(1))
    async with trio.open_nursery() as nursery:
        _start(nursery, pool, heartbeat=True)
        await trio.sleep(0.5)
        assert pool.gauge.busy == 1
        store.down = True
        # The claim was sent at 0: the local deadline is a margin (lease/4) before the row's.
        await trio.sleep(2.2 - trio.current_time())
        assert pool.gauge.busy == 1, "still inside its lease"
        await trio.sleep(0.1)
        assert pool.gauge.busy == 0, "cancelled once the local lease deadline passed, before the row's at 3 s"
        assert store.outcomes == [] and pool.unfinished() == [(task_id, 1)]
        store.down = False
        with trio.fail_after(5):
            while not store.released:  # noqa: ASYNC110  (polled state of a fake)
                await trio.sleep(0.1)
        assert store.released == [(task_id, 1)]
        pool.stop_claiming()
        nursery.cancel_scope.cancel()
    assert log[0] == ("start", task_id, 1) and ("end", task_id, 1) not in log


async def test_a_lease_is_renewed_until_the_outcome_is_written_not_handed_over(
        autojump_clock: trio.abc.Clock) -> None:
    store, log = FlakyHeartbeatStore(), []
    task_id = store.add("long", {"seconds": 1}, max_retries=0, timeout=1000)
    store.hold = True  # the outcome writer is slow (an outage, a long batch)
    pool = WorkerPool(store, _lease_registry(log), Settings(worker_pool_size=1, lease_seconds=3),  # type: ignore[arg-type]
                      WorkerGauge(1))
    async with trio.open_nursery() as nursery:
        _start(nursery, pool, heartbeat=True)
        await trio.sleep(20)  # far past the lease: renewed all along
        assert len(store.held_outcomes) == 1 and (task_id, 1) in store.heartbeats[-1]
        assert [a.key for a in pool.attempts()] == [(task_id, 1)]
        await store.write()
        assert pool.attempts() == [] and store.tasks[task_id]["status"] == "completed"
        await trio.sleep(2)
        assert (task_id, 1) not in store.heartbeats[-1]
        pool.stop_claiming()
        nursery.cancel_scope.cancel()


async def test_a_hung_thread_keeps_its_tasks_next_attempt_out_of_this_process() -> None:
    release = threading.Event()
    registry = Registry()
    runs: list[int] = []

    @registry.task("stuck")
    def stuck(payload: Any, ctx: TaskContext) -> str:
        runs.append(ctx.attempt)
        release.wait(10)
        return "late"

    store = FakeStore()
    task_id = store.add("stuck", {}, max_retries=3, timeout=0.2)
    pool = WorkerPool(store, registry, Settings(worker_pool_size=1, max_threads=4, retry_delay=0),  # type: ignore[arg-type]
                      WorkerGauge(1))
    try:
        async with trio.open_nursery() as nursery:
            _start(nursery, pool)
            with trio.fail_after(5):
                while store.tasks[task_id]["status"] != "retrying":  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await trio.sleep(0.5)  # due again at once, yet not claimed here while its thread runs
            assert runs == [1] and pool.threads.by_task[task_id] == 1
            assert any(task_id in skip for skip in store.skips)
            release.set()
            with trio.fail_after(5):
                while len(runs) < 2:  # noqa: ASYNC110  (a thread appends)
                    await trio.sleep(0.01)
            pool.stop_claiming()
            nursery.cancel_scope.cancel()
    finally:
        release.set()


async def test_groups_nested_thousands_deep_or_sharing_members_fail_only_their_attempt(
        autojump_clock: trio.abc.Clock) -> None:
    registry = Registry()

    @registry.task("deep_group")
    async def deep_group(payload: Any, ctx: TaskContext) -> None:
        group: BaseException = ValueError("leaf")
        for level in range(3000):
            group = ExceptionGroup(f"level {level}", [group])
        raise group

    @registry.task("wide_group")
    async def wide_group(payload: Any, ctx: TaskContext) -> None:
        group: BaseException = ValueError("leaf")
        for _ in range(12):  # 5**12 members if walked naively
            group = ExceptionGroup("x", [group] * 5)
        raise group

    @registry.task("hostile_on_timeout")
    async def hostile_on_timeout(payload: Any, ctx: TaskContext) -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise Hostile("cleanup", [ValueError("x")])

    store = FakeStore()
    deep, wide = store.add("deep_group", {}, max_retries=0), store.add("wide_group", {}, max_retries=0)
    hostile = store.add("hostile_on_timeout", {}, max_retries=0, timeout=1)
    fine = store.add("fine", {})
    registry.register("fine", _registry({}).get("fine").fn)  # type: ignore[union-attr]
    started = time.perf_counter()
    await _drain(store, registry)
    assert time.perf_counter() - started < 5, "describing is bounded, not exponential"
    assert [store.tasks[i]["status"] for i in (deep, wide, hostile, fine)] == ["failed"] * 3 + ["completed"]
    assert store.tasks[hostile]["errors"][0]["type"] == "AttemptTimeout"
    assert store.tasks[deep]["errors"][0]["type"] == "ExceptionGroup"


def test_a_renewal_that_lands_after_the_deadline_fired_does_not_revive_the_attempt() -> None:
    async def main() -> None:
        from taskd.attempts import Attempt
        from taskd.models import ClaimedTask

        attempt = Attempt(ClaimedTask(1, "x", "{}", 1, 0, 100.0), lease_deadline=trio.current_time() + 1)
        scope = trio.CancelScope(deadline=attempt.lease_deadline)
        attempt.scope = scope
        with scope:
            await trio.sleep(5)
        assert scope.cancel_called
        attempt.extend_lease(trio.current_time() + 30)  # the reply of a renewal sent before the deadline
        assert attempt.lease_deadline <= trio.current_time(), "still past: the attempt was cut off"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_handler_that_swallows_cancellation_stops_holding_its_lease(autojump_clock: trio.abc.Clock) -> None:
    registry = Registry()

    give_up = trio.Event()

    @registry.task("stubborn")
    async def stubborn(payload: Any, ctx: TaskContext) -> None:
        while not give_up.is_set():  # the handler's bug: it cannot be stopped (until the test lets it)
            with trio.CancelScope(shield=True):
                await trio.sleep(1)

    store = FakeStore()
    task_id = store.add("stubborn", {}, timeout=2)
    pool = WorkerPool(store, registry, Settings(worker_pool_size=1, lease_seconds=3),  # type: ignore[arg-type]
                      WorkerGauge(1))
    async with trio.open_nursery() as nursery:
        try:
            _start(nursery, pool, heartbeat=True)
            await trio.sleep(1.5)  # between beats (every lease/3 = 1 s)
            assert (task_id, 1) in store.heartbeats[-1], store.heartbeats
            await trio.sleep(10)  # cancelled at 2 s by its timeout, still running
            assert (task_id, 1) not in store.heartbeats[-1], "its lease is left to run out, for another process"
            assert pool.gauge.busy == 1
        finally:
            give_up.set()  # else a failed assertion would leave the test waiting on the handler forever
            nursery.cancel_scope.cancel()


async def test_abandoned_threads_hold_other_plain_def_tasks_back_but_never_time_them_out() -> None:
    release = threading.Event()
    registry = Registry()

    @registry.task("hung")
    def hung(payload: Any, ctx: TaskContext) -> None:
        release.wait(10)

    @registry.task("quick")
    def quick(payload: Any, ctx: TaskContext) -> str:
        return "ran"

    store = FakeStore()
    hung_ids = [store.add("hung", {}, max_retries=0, timeout=0.2) for _ in range(2)]
    quick_ids = [store.add("quick", {}, max_retries=0, timeout=0.2) for _ in range(4)]
    pool = WorkerPool(store, registry, Settings(worker_pool_size=2, max_threads=2),  # type: ignore[arg-type]
                      WorkerGauge(2))
    try:
        async with trio.open_nursery() as nursery:
            _start(nursery, pool)
            await trio.sleep(1)  # the hung ones timed out; their threads hold both places
            assert pool.threads.limiter.available_tokens == 0
            assert all(store.tasks[i]["status"] == "pending" for i in quick_ids), "not claimed while no thread is free"
            release.set()
            with trio.fail_after(5):
                await store.finished_event.wait()
            pool.stop_claiming()
    finally:
        release.set()
    assert [store.tasks[i]["status"] for i in hung_ids] == ["failed", "failed"]
    assert [store.tasks[i]["result"] for i in quick_ids] == ["ran"] * 4


async def test_this_process_own_rescue_leaves_alone_what_it_still_answers_for(autojump_clock: trio.abc.Clock) -> None:
    store, log = FlakyHeartbeatStore(), []
    writing = store.add("long", {"seconds": 1}, timeout=1000)
    running = store.add("long", {"seconds": 100}, timeout=1000)
    store.hold = True  # the first one's outcome waits for the writer
    pool = WorkerPool(store, _lease_registry(log), Settings(worker_pool_size=2, lease_seconds=3),  # type: ignore[arg-type]
                      WorkerGauge(2))
    async with trio.open_nursery() as nursery:
        _start(nursery, pool)
        await trio.sleep(2)
        assert len(store.held_outcomes) == 1
        assert pool.handing_back() == [writing, running], "with the writer, and still running"
        nursery.cancel_scope.cancel()


async def test_fail_ends_the_task_at_once_and_retry_snoozes_without_spending_a_retry(
        autojump_clock: trio.abc.Clock) -> None:
    import taskd

    registry = Registry()
    runs: list[tuple[int, float]] = []

    @registry.task("give_up")
    async def give_up(payload: Any, ctx: TaskContext) -> None:
        raise taskd.Fail("bad input: no such user")

    @registry.task("poll")
    async def poll(payload: Any, ctx: TaskContext) -> str:
        runs.append((ctx.attempt, trio.current_time()))
        if ctx.attempt <= 4:
            raise taskd.Retry(after=30)
        return "ready"

    store = FakeStore()
    failed = store.add("give_up", {}, max_retries=5)
    snoozing = store.add("poll", {}, max_retries=0)  # four snoozes, and no retry to spend
    await _drain(store, registry)
    assert (store.tasks[failed]["status"], store.tasks[failed]["attempts"]) == ("failed", 1)
    assert store.tasks[failed]["errors"][0]["type"] == "Fail"
    row = store.tasks[snoozing]
    assert (row["status"], row["result"], row["attempts"], row["snoozes"], row["errors"]) == (
        "completed", "ready", 5, 4, [])
    gaps = [later - earlier for (_, earlier), (_, later) in zip(runs, runs[1:], strict=False)]
    assert all(30 <= gap < 33 for gap in gaps), gaps


def test_retry_takes_a_bounded_delay() -> None:
    import pytest

    import taskd

    for bad in (-1, 31_536_001, True, "soon"):
        with pytest.raises(ValueError):
            taskd.Retry(after=bad)  # type: ignore[arg-type]
