"""Steering in the Store, on real PostgreSQL: idempotent inserts (duplicates inside one
statement included), cancel requests and how every way an attempt can end honours them,
expiry, paused queues, and retries by hand."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest
import trio
import trio_asyncio

from taskd.errors import IdempotencyConflict
from taskd.models import NewTask, Outcome, Submitted, TaskStatus
from taskd.store import Store

from .plans import nodes
from .test_store import finish, raw


def new(key: str | None = None, body: str = "a", *, queue: str = "default", payload: str = "{}",
        expires_in: float | None = None, max_retries: int = 3) -> NewTask:
    return NewTask("echo", payload, max_retries, 30.0, queue=queue, idempotency_key=key,
                   idempotency_hash=None if key is None else body, expires_in_seconds=expires_in)


async def test_duplicate_keys_inside_one_statement_make_one_task(store: Store) -> None:
    results = await store._insert_batch([new("k", "a"), new(), new("k", "a"), new("k", "b"), new()])
    first, plain1, repeat, conflict, plain2 = results
    assert isinstance(first, Submitted) and first.created
    assert isinstance(repeat, Submitted) and (repeat.id, repeat.created) == (first.id, False)
    assert isinstance(conflict, IdempotencyConflict) and conflict.task_id == first.id
    assert isinstance(plain1, Submitted) and isinstance(plain2, Submitted) and plain1.id < plain2.id
    assert plain1.created and plain2.created
    (count,) = (await raw(store.url, "SELECT count(*) FROM taskd.tasks"))[0]
    assert count[0] == 3
    # Later, in its own statement: the key is still held.
    again = await store.submit(new("k", "a"))
    assert (again.id, again.created) == (first.id, False)
    with pytest.raises(IdempotencyConflict):
        await store.submit(new("k", "b"))


async def test_a_batch_with_a_conflicting_key_inserts_nothing(store: Store) -> None:
    (made,) = await store.submit_many([new("taken", "a")])
    with pytest.raises(IdempotencyConflict):
        await store.submit_many([new(), new("fresh", "a"), new("taken", "other body")])
    (rows,) = await raw(store.url, "SELECT id FROM taskd.tasks")
    assert [r[0] for r in rows] == [made.id], "the batch is all or nothing"
    both = await store.submit_many([new("fresh", "a"), new("taken", "a"), new("fresh", "a")])
    assert [(s.created, s.id == made.id) for s in both] == [(True, False), (False, True), (False, False)]
    assert both[0].id == both[2].id


async def test_a_cancel_request_turns_every_unfinished_end_into_cancelled(store: Store) -> None:
    ids = [s.id for s in await store.submit_many([new() for _ in range(5)])]
    await store.claim(5, ["echo"], 30)
    for task_id in ids:
        cancelled, task = await store.cancel(task_id)
        assert cancelled and task is not None and task.status == TaskStatus.RUNNING and task.cancel_requested_at
    renewed, asked = await store.heartbeat(30, [(i, 1) for i in ids], workers=5, busy=5)
    assert renewed == asked == {(i, 1) for i in ids}, "the heartbeat tells of the request (a notice can be lost)"
    await finish(store, Outcome(ids[0], 1, TaskStatus.RETRYING, error_json='{"type": "E"}', retry_delay=0))
    await finish(store, Outcome(ids[1], 1, TaskStatus.COMPLETED, result_json="1"))
    await finish(store, Outcome(ids[2], 1, TaskStatus.CANCELLED, error_json='{"type": "Cancelled"}'))
    await store.release([(ids[3], 1)])
    await raw(store.url, f"UPDATE taskd.tasks SET locked_until = now() - interval '1s' WHERE id = {ids[4]}")
    await store.rescue_expired()
    released = await store.get(ids[3])
    assert released is not None and released.last_error["type"] == "Cancelled", "released: cancelled, and says so"
    assert released.attempts == 1, "its attempt keeps its number: a notice naming it must not stop a later one"
    statuses = [(await store.get(i)).status for i in ids]  # type: ignore[union-attr]
    assert statuses == [TaskStatus.CANCELLED, TaskStatus.COMPLETED, TaskStatus.CANCELLED, TaskStatus.CANCELLED,
                        TaskStatus.CANCELLED]
    for task_id in ids:
        task = await store.get(task_id)
        assert task is not None and task.finished_at is not None
        cancelled, again = await store.cancel(task_id)
        assert not cancelled and again is not None and again.status == statuses[ids.index(task_id)]


async def test_a_waiting_task_is_cancelled_at_once_with_an_error(store: Store) -> None:
    (task,) = await store.submit_many([new()])
    cancelled, got = await store.cancel(task.id)
    assert cancelled and got is not None and got.status == TaskStatus.CANCELLED
    assert got.last_error["type"] == "Cancelled" and got.finished_at is not None
    assert await store.claim(5, ["echo"], 30) == []


async def test_expired_tasks_are_never_claimed_and_the_sweep_marks_them(store: Store) -> None:
    soon, later = await store.submit_many([new(expires_in=0.2), new(expires_in=3600)])
    await trio.sleep(0.3)
    claimed = await store.claim(5, ["echo"], 30)
    assert [c.id for c in claimed] == [later.id]
    assert await store.seconds_until_due(["echo"]) is None, "an expired task wakes no claimer"
    assert await store.expire_due() == [soon.id]
    task = await store.get(soon.id)
    assert task is not None and task.status == TaskStatus.EXPIRED and task.last_error["type"] == "Expired"
    assert await store.expire_due() == []


async def expiring(store: Store) -> dict[int, dt.datetime]:
    (rows,) = await raw(store.url, "SELECT task_id, expires_at FROM taskd.expiring")
    return {row[0]: row[1] for row in rows}


async def test_the_list_of_deadlines_holds_only_tasks_with_one_and_the_sweep_empties_it(store: Store) -> None:
    plain, ran, retried, held = await store.submit_many([new(), new(expires_in=0.3), new(expires_in=0.3),
                                                        new(expires_in=0.3)])
    assert set(await expiring(store)) == {ran.id, retried.id, held.id}, "a task without a deadline costs no entry"
    (claimed,) = await store.claim(1, ["echo"], 30)  # the oldest waiting with a deadline still ahead: `plain`
    assert claimed.id == plain.id
    await store.cancel(ran.id)  # ends before its deadline: its entry goes at the sweep, the task stays cancelled
    await store.cancel(retried.id)
    await store.retry(retried.id)  # back to pending with its deadline cleared: must not expire
    await trio.sleep(0.4)
    async with row_locked(store.url, held.id):
        # Due, waiting, but held by another transaction right now: skipped, and kept for next time.
        assert await store.expire_due() == []
        assert set(await expiring(store)) == {held.id}
    assert await store.expire_due() == [held.id]
    assert await expiring(store) == {}
    statuses = {t: (await store.get(t)).status for t in (ran.id, retried.id, held.id)}  # type: ignore[union-attr]
    assert statuses == {ran.id: TaskStatus.CANCELLED, retried.id: TaskStatus.PENDING, held.id: TaskStatus.EXPIRED}


async def test_the_expiry_sweep_reads_the_list_of_deadlines_not_the_task_table(store: Store) -> None:
    await raw(store.url, "INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds) "
                         "SELECT 'echo', 0, 30 FROM generate_series(1, 20000)")
    await raw(store.url, "ANALYZE taskd.tasks")
    (plan,) = await raw(store.url, "EXPLAIN (FORMAT JSON) " + store._q["task_expire"].text.replace("$1::int", "1000"))
    walked = nodes(json.loads(plan[0][0])[0]["Plan"])
    assert ("Index Scan", "expiring_due_idx") in [(n["Node Type"], n.get("Index Name")) for n in walked]
    assert not [n for n in walked if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"], walked


@contextlib.asynccontextmanager
async def row_locked(url: str, task_id: int) -> AsyncIterator[None]:
    """Task `task_id` locked FOR UPDATE by another connection's open transaction."""
    conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(url)
    try:
        await trio_asyncio.aio_as_trio(conn.execute)("BEGIN")
        await trio_asyncio.aio_as_trio(conn.execute)(f"SELECT 1 FROM taskd.tasks WHERE id = {int(task_id)} FOR UPDATE")
        yield
    finally:
        await trio_asyncio.aio_as_trio(conn.close)()


async def test_a_paused_queue_is_not_claimed_and_wakes_no_claimer(store: Store) -> None:
    signal = store.work_signal()
    queue = await store.set_paused("emails", True)
    assert queue["paused"] is True and queue["pending"] == 0
    mail, other = await store.submit_many([new(queue="emails"), new(queue="default")])
    assert [c.id for c in await store.claim(5, ["echo"], 30)] == [other.id]
    assert await store.seconds_until_due(["echo"]) is None
    assert await store.claim(5, ["echo"], 30, queues=["emails"]) == []
    signal.clear()
    resumed = await store.set_paused("emails", False)
    assert resumed["paused"] is False and resumed["pending"] == 1
    with trio.fail_after(2):
        await signal.wait()  # a resumed queue wakes the claimers
    assert [c.id for c in await store.claim(5, ["echo"], 30, queues=["emails"])] == [mail.id]
    names = {q["name"]: q for q in await store.queues()}
    assert names["emails"]["running"] == 1 and names["default"]["running"] == 1


async def test_a_retry_by_hand_gives_a_fresh_budget_and_keeps_counting_attempts(store: Store) -> None:
    (task,) = await store.submit_many([new(max_retries=1)])
    for attempt in (1, 2):
        (claimed,) = await store.claim(1, ["echo"], 30)
        assert claimed.retries_used == attempt - 1
        status = TaskStatus.RETRYING if attempt == 1 else TaskStatus.FAILED
        await finish(store, Outcome(task.id, attempt, status, error_json=f'{{"type": "E{attempt}"}}', retry_delay=0))
    retried, again = await store.retry(task.id)
    assert retried and again is not None and again.status == TaskStatus.PENDING and again.finished_at is None
    (claimed,) = await store.claim(1, ["echo"], 30)
    assert claimed.attempt == 3 and claimed.retries_used == 0 and claimed.max_retries == 1
    await finish(store, Outcome(task.id, 3, TaskStatus.COMPLETED, result_json='"ok"'))
    done = await store.get(task.id)
    assert done is not None and [e["type"] for e in done.errors] == ["E1", "E2"]
    retried, _ = await store.retry(task.id)
    assert not retried, "a completed task is not retried"


async def test_bulk_retry_and_cancel_match_exactly_their_filter(store: Store) -> None:
    await store.set_paused("held", True)
    waiting = await store.submit_many([new(queue="held") for _ in range(3)] + [new(queue="default")])
    failed = await store.submit_many([dataclasses.replace(new(max_retries=0), task_type=t)
                                      for t in ("echo", "echo", "sleep")])
    claimed = await store.claim(10, ["echo", "sleep"], 30)
    assert {c.id for c in claimed} == {waiting[3].id, *(f.id for f in failed)}
    for c in claimed:
        await finish(store, Outcome(c.id, 1, TaskStatus.FAILED, error_json='{"type": "E"}'))
    assert await store.cancel_where(status=None, task_type=None, queue="held", created_before=None) == 3
    assert await store.cancel_where(status=None, task_type=None, queue="held", created_before=None) == 0
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert await store.retry_where(status="failed", task_type="echo", queue=None, finished_before=future) == 3
    assert await store.retry_where(status="cancelled", task_type=None, queue="held", finished_before=None) == 3
    counts = await store.counts()
    assert (counts["pending"], counts["failed"], counts["cancelled"]) == (6, 1, 0)


async def test_a_cancel_request_notifies_the_attempt_once(store: Store) -> None:
    heard: list[tuple[int, int]] = []
    notified = trio.Event()
    store.on_cancel(lambda task_id, attempt: (heard.append((task_id, attempt)), notified.set()))
    (task,) = await store.submit_many([new()])
    await store.claim(1, ["echo"], 30)
    await store.cancel(task.id)
    await store.cancel(task.id)  # asked again: no second notice
    with trio.fail_after(2):
        await notified.wait()
    await trio.sleep(0.1)
    assert heard == [(task.id, 1)]


async def test_loops_sharing_a_dedicated_connection_take_turns(store: Store) -> None:
    """Each queue's claim loop claims on the one claimer connection (and the progress writer
    shares the heartbeat's): at the same time, they must take turns, not break it."""
    await store.submit_many([new(queue=q) for q in ("a", "b") * 50])
    got: dict[str, int] = {"a": 0, "b": 0}

    async def claim_all(queue: str) -> None:
        for _ in range(10):
            got[queue] += len(await store.claim(5, ["echo"], 30, queues=[queue]))
            await store.seconds_until_due(["echo"], queues=[queue])

    async def beat() -> None:
        for _ in range(10):
            await store.heartbeat(30, [], workers=1, busy=0)
            await store.write_progress([(1, 1, '{"fraction": 0.5}')])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim_all, "a")
        nursery.start_soon(claim_all, "b")
        nursery.start_soon(beat)
        nursery.start_soon(beat)
    assert got == {"a": 50, "b": 50}


async def test_a_retry_by_hand_forgives_crashes_and_a_new_attempt_starts_without_old_progress(store: Store) -> None:
    (task,) = await store.submit_many([new(max_retries=1)])
    await store.claim(1, ["echo"], 30)
    await raw(store.url, f"UPDATE taskd.tasks SET crashes = 2, max_retries = 0 WHERE id = {task.id}")
    await finish(store, Outcome(task.id, 1, TaskStatus.FAILED, error_json='{"type": "Crashed"}'))
    retried, again = await store.retry(task.id)
    assert retried and again is not None and again.crashes == 0
    (claimed,) = await store.claim(1, ["echo"], 30)
    assert claimed.crashes == 0 and claimed.retries_used == 0, "not quarantined, and a fresh budget"
    await store.write_progress([(task.id, 2, '{"fraction": 0.5, "message": "half", "updated_at": "x"}')])
    assert (await store.get(task.id)).progress_json is not None  # type: ignore[union-attr]
    await finish(store, Outcome(task.id, 2, TaskStatus.RETRYING, error_json='{"type": "E"}', retry_delay=0))
    await raw(store.url, f"UPDATE taskd.tasks SET max_retries = 1 WHERE id = {task.id}")
    (third,) = await store.claim(1, ["echo"], 30)
    assert third.attempt == 3 and (await store.get(task.id)).progress_json is None  # type: ignore[union-attr]


async def test_python_steers_through_the_callers_connection(store: Store) -> None:
    import asyncpg
    import trio_asyncio

    import taskd

    (done,) = await store.submit_many([new()])
    await store.claim(1, ["echo"], 30)
    await finish(store, Outcome(done.id, 1, TaskStatus.FAILED, error_json='{"type": "E"}'))

    async def in_asyncio() -> tuple[int, list[bool]]:
        conn = await asyncpg.connect(store.url)
        try:
            await taskd.pause_queue(conn, "mail")
            waiting = await taskd.enqueue(conn, "echo", {}, queue="mail", idempotency_key="k1")
            again = await taskd.enqueue(conn, "echo", {}, queue="mail", idempotency_key="k1")
            assert again == waiting
            return waiting, [await taskd.cancel(conn, waiting), await taskd.cancel(conn, waiting),
                             await taskd.retry(conn, done.id), await taskd.retry(conn, done.id)]
        finally:
            await conn.close()

    waiting, answers = await trio_asyncio.aio_as_trio(in_asyncio)()
    assert answers == [True, False, True, False]
    assert (await store.get(waiting)).status == TaskStatus.CANCELLED  # type: ignore[union-attr]
    assert (await store.get(done.id)).status == TaskStatus.PENDING  # type: ignore[union-attr]
    assert [q["paused"] for q in await store.queues("mail")] == [True]


@pytest.mark.parametrize("back", ["retry", "release", "rescue"])
async def test_a_deadline_that_passed_while_the_task_ran_ends_it_once_it_waits_again(store: Store, back: str) -> None:
    (task,) = await store.submit_many([new(expires_in=0.5)])
    (claimed,) = await store.claim(1, ["echo"], 30)
    await trio.sleep(0.6)
    assert await store.expire_due() == [], "running: not expired, and its entry is dropped"
    assert await expiring(store) == {}
    if back == "retry":
        await finish(store, Outcome(task.id, claimed.attempt, TaskStatus.RETRYING, error_json='{"type": "E"}'))
    elif back == "release":
        await store.release([(task.id, claimed.attempt)])
    else:
        await raw(store.url, "UPDATE taskd.tasks SET locked_until = now() - interval '1 second'")
        await store.rescue_expired()
    assert set(await expiring(store)) == {task.id}, "waiting again: listed again"
    assert await store.claim(1, ["echo"], 30) == [], "past its deadline: never claimed"
    assert await store.expire_due() == [task.id]
    got = await store.get(task.id)
    assert got is not None and got.status == TaskStatus.EXPIRED
