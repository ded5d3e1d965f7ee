"""The Store against real PostgreSQL: every query prepares, the hot paths batch and fence."""

from __future__ import annotations

import asyncpg
import pytest
import trio
import trio_asyncio

from taskd import client, db, sql
from taskd.config import Settings
from taskd.errors import DatabaseUnavailable
from taskd.migrations import apply_migrations
from taskd.models import NewTask, Outcome, TaskStatus
from taskd.store import Store


async def finish(store: Store, outcome: Outcome) -> bool:
    """Write one outcome as the outcome batch does; False if the fence turned it away."""
    (written,) = await store._finish_batch([outcome])
    return written


async def submit_ids(store: Store, tasks: list[NewTask]) -> list[int]:
    return [submitted.id for submitted in await store.submit_many(tasks)]


def new(task_type: str = "echo", payload: str = "{}", max_retries: int = 3) -> NewTask:
    return NewTask(task_type, payload, max_retries, 30.0)


async def raw(url: str, *statements: str) -> list[list[asyncpg.Record]]:
    async def run() -> list[list[asyncpg.Record]]:
        conn = await asyncpg.connect(url)
        try:
            return [await conn.fetch(s) for s in statements]
        finally:
            await conn.close()

    return await trio_asyncio.aio_as_trio(run)()


async def test_every_named_query_prepares(aio_loop: object, database_url: str) -> None:
    async def prepare_all() -> list[str]:
        conn = await asyncpg.connect(database_url)
        try:
            failed = []
            for query in sql.queries().values():
                if query.name == "migration_prepare":
                    continue  # two statements: run at start-up, not preparable
                try:
                    await conn.prepare(query.text)
                except asyncpg.PostgresError as exc:
                    failed.append(f"{query.name}: {exc}")
            return failed
        finally:
            await conn.close()

    assert await trio_asyncio.aio_as_trio(prepare_all)() == []


async def test_migrations_apply_once_even_when_processes_race(aio_loop: object, empty_database_url: str) -> None:
    applied: list[list[int]] = []

    async def migrate() -> None:
        conn = await db.connect(empty_database_url)
        try:
            applied.append(await apply_migrations(conn))
        finally:
            await conn.close()

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(migrate)
    assert sorted(applied, key=len) == [[], [], [m.version for m in sql.migrations()]]
    (rows,) = await raw(empty_database_url, "SELECT count(*) AS n FROM taskd.migrations")
    assert rows[0]["n"] == len(sql.migrations())


async def test_ids_start_at_one_and_concurrent_submits_coalesce(store: Store) -> None:
    ids: dict[int, int] = {}

    async def submit(i: int) -> None:
        ids[i] = (await store.submit(new(payload=f'{{"i": {i}}}'))).id

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(submit, i)
    assert sorted(ids.values()) == list(range(1, 201))
    assert store.inserts.batches < 50, "200 concurrent submits should share statements"
    for i in (0, 57, 199):
        task = await store.get(ids[i])
        assert task is not None and task.payload == {"i": i}


async def test_a_bad_row_fails_only_its_own_request(store: Store) -> None:
    results: dict[str, object] = {}

    async def submit(name: str, task: NewTask) -> None:
        try:
            results[name] = (await store.submit(task)).id
        except Exception as exc:
            results[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, "good1", new())
        nursery.start_soon(submit, "bad", new(max_retries=-5))  # violates the CHECK constraint
        nursery.start_soon(submit, "good2", new())
    assert isinstance(results["good1"], int) and isinstance(results["good2"], int)
    assert isinstance(results["bad"], Exception) and "max_retries" in str(results["bad"])
    assert (await store.counts())["pending"] == 2


async def test_claim_finish_and_the_fence(store: Store) -> None:
    ids = await submit_ids(store, [new() for _ in range(5)])
    claimed = await store.claim(3, ["echo"], 30)
    assert [t.id for t in claimed] == ids[:3] and all(t.attempt == 1 for t in claimed)
    assert await store.claim(10, ["other"], 30) == []
    first, second, third = claimed
    assert await finish(store, Outcome(first.id, 1, TaskStatus.COMPLETED, result_json='{"r": 1}'))
    assert not await finish(store, Outcome(second.id, 2, TaskStatus.COMPLETED, result_json="1")), "wrong attempt"
    assert await finish(store, Outcome(second.id, 1, TaskStatus.RETRYING, error_json='{"type": "E"}', retry_delay=60))
    assert not await finish(store, Outcome(second.id, 1, TaskStatus.COMPLETED, result_json="1")), "not running"
    other = Store(store.url, store._pool, process_id="someone-else")
    try:
        written = await other._finish_batch([Outcome(third.id, 1, TaskStatus.COMPLETED, result_json="1")])
    finally:
        await other._finisher.close()
    assert written == [False], "another process's lease"
    done = await store.get(first.id)
    assert done and done.status == TaskStatus.COMPLETED and done.result == {"r": 1} and done.finished_at
    retrying = await store.get(second.id)
    assert retrying and retrying.status == TaskStatus.RETRYING and retrying.errors == [{"type": "E"}]
    assert retrying.finished_at is None
    remaining = await store.claim(10, ["echo"], 30)
    assert [t.id for t in remaining] == ids[3:], "the retry is not due for 60 s"


async def test_two_claimers_never_claim_the_same_task(store: Store, database_url: str) -> None:
    await submit_ids(store, [new() for _ in range(1000)])
    stores = [store] + [await Store.open(database_url, pool_size=2, process_id=f"test-{c}") for c in "bc"]
    seen: list[int] = []

    async def claim_all(s: Store) -> None:
        while batch := await s.claim(37, ["echo"], 30):
            seen.extend(t.id for t in batch)

    try:
        async with trio.open_nursery() as nursery:
            for s in stores:  # one claim loop per process, as in the server
                nursery.start_soon(claim_all, s)
    finally:
        for s in stores[1:]:
            await s.close()
    assert len(seen) == 1000 and len(set(seen)) == 1000


async def test_release_does_not_count_the_attempt(store: Store) -> None:
    (task_id,) = await submit_ids(store, [new()])
    (claimed,) = await store.claim(1, ["echo"], 30)
    await store.release([(claimed.id, claimed.attempt)])
    task = await store.get(task_id)
    assert task and task.status == TaskStatus.PENDING and task.attempts == 0 and task.started_at is None


async def test_expired_leases_are_rescued_as_crashes_that_spend_no_retry(store: Store) -> None:
    a, b = await submit_ids(store, [new(max_retries=1), new(max_retries=0)])
    for crash in (1, 2, 3, 4):
        claimed = await store.claim(2, ["echo"], 0.05)
        assert [(t.id, t.attempt, t.crashes, t.retries_used) for t in claimed] == [
            (a, crash, crash - 1, 0), (b, crash, crash - 1, 0)]
        await trio.sleep(0.1)
        rescued = dict(await store.rescue_expired())
        assert rescued == {a: TaskStatus.RETRYING, b: TaskStatus.RETRYING}, \
            "even with max_retries 0, and however often: a rescue alone never fails a task"
    task_b = await store.get(b)
    assert task_b and task_b.attempts == 4 and task_b.crashes == 4 and task_b.finished_at is None
    assert task_b.errors[0]["type"] == "LeaseExpired" and len(task_b.errors) == 4


async def test_a_process_does_not_rescue_what_it_is_handing_back_itself(store: Store, database_url: str) -> None:
    mine, other = await submit_ids(store, [new(), new()])
    await store.claim(2, ["echo"], 0.05)
    await trio.sleep(0.1)
    assert dict(await store.rescue_expired(keep=[mine])) == {other: TaskStatus.RETRYING}
    await store.release([(mine, 1)], from_heartbeat=True)
    task = await store.get(mine)
    assert task and task.status == TaskStatus.PENDING and task.attempts == 0 and task.crashes == 0
    elsewhere = await Store.open(database_url, pool_size=2, process_id="test-b")
    try:
        await store.claim(2, ["echo"], 0.05)
        await trio.sleep(0.1)
        assert dict(await elsewhere.rescue_expired(keep=[mine])) == {mine: TaskStatus.RETRYING,
                                                                     other: TaskStatus.RETRYING}, \
            "keep speaks only for the process's own leases"
    finally:
        await elsewhere.close()


async def test_claims_skip_what_this_process_still_runs(store: Store) -> None:
    a, b = await submit_ids(store, [new(), new()])
    assert [t.id for t in await store.claim(5, ["echo"], 30, skip=[a])] == [b]
    assert await store.seconds_until_due(["echo"], skip=[a]) is None
    assert (await store.seconds_until_due(["echo"])) is not None


async def test_heartbeat_renews_only_held_live_leases(store: Store) -> None:
    held, orphan, expired = await submit_ids(store, [new(), new(), new()])
    await store.claim(3, ["echo"], 0.3)
    await trio.sleep(0.4)  # all three leases ran out...
    renewed, _ = await store.heartbeat(0.3, [(held, 1), (expired, 1)], workers=1, busy=1)
    assert renewed == set(), "an expired lease is not revived: another process may hold the task now"
    await store.release([(held, 1), (orphan, 1), (expired, 1)])
    await store.claim(3, ["echo"], 0.3)
    for _ in range(3):
        await trio.sleep(0.15)
        renewed, _ = await store.heartbeat(0.3, [(held, 1)], workers=1, busy=1)
        assert renewed == {(held, 1)}
    # the orphan (claimed, but no longer tracked by its process) expires and is rescued
    rescued = dict(await store.rescue_expired())
    assert rescued == {orphan: TaskStatus.RETRYING, expired: TaskStatus.RETRYING}
    assert (await store.heartbeat(0.3, [(held, 2)], workers=1, busy=1))[0] == set(), "another attempt's lease"
    (process,) = await store.live_processes(60)
    assert process["id"] == "test-a" and process["busy"] == 1


async def test_one_outcome_batch_writes_what_is_current_and_fences_the_rest(store: Store) -> None:
    ids = await submit_ids(store, [new() for _ in range(4)])
    await store.claim(4, ["echo"], 30)
    outcomes = [Outcome(ids[0], 1, TaskStatus.COMPLETED, result_json="0"),
                Outcome(ids[1], 2, TaskStatus.COMPLETED, result_json="1"),  # stale attempt
                Outcome(ids[2], 1, TaskStatus.FAILED, error_json='{"type": "E"}'),
                Outcome(ids[3], 1, TaskStatus.COMPLETED, result_json="{")]  # the database refuses it
    written = await store._finish_batch(outcomes)
    assert written == [True, False, True, True]
    assert (await store.get(ids[1])).status == TaskStatus.RUNNING  # type: ignore[union-attr]
    refused = await store.get(ids[3])
    assert refused and refused.status == TaskStatus.FAILED and refused.errors[0]["type"] == "OutcomeNotStored"


async def test_a_refused_outcome_is_retried_when_retries_remain(store: Store) -> None:
    (task_id,) = await submit_ids(store, [new()])
    await store.claim(1, ["echo"], 30)
    await finish(store, Outcome(task_id, 1, TaskStatus.COMPLETED, result_json="{", retry_delay=0, may_retry=True))
    task = await store.get(task_id)
    assert task and task.status == TaskStatus.RETRYING and task.errors[0]["type"] == "OutcomeNotStored"
    (again,) = await store.claim(1, ["echo"], 30)
    assert again.id == task_id and again.attempt == 2


async def test_notify_wakes_a_waiting_claimer(store: Store) -> None:
    signal = store.work_signal()
    with trio.move_on_after(0.2):
        await signal.wait()
        raise AssertionError("woke with nothing inserted")
    sent = trio.current_time()
    await store.submit(new())
    with trio.fail_after(2):
        await signal.wait()
    assert trio.current_time() - sent < 0.5


async def test_deleting_a_running_task_notifies_its_process(store: Store) -> None:
    cancelled: list[tuple[int, int]] = []
    notified = trio.Event()
    store.on_cancel(lambda task_id, attempt: (cancelled.append((task_id, attempt)), notified.set()))
    a, b = await submit_ids(store, [new(), new()])
    await store.claim(1, ["echo"], 30)
    assert await store.delete(b) == TaskStatus.PENDING
    assert await store.delete(a) == TaskStatus.RUNNING
    assert await store.delete(a) is None
    with trio.fail_after(2):
        await notified.wait()
    await trio.sleep(0.1)  # room for a wrong second notification to arrive
    assert cancelled == [(a, 1)]


async def test_wait_finished_returns_when_the_outcome_is_written(store: Store) -> None:
    (task_id,) = await submit_ids(store, [new()])
    await store.claim(1, ["echo"], 30)
    finished_at: list[float] = []

    async def finish_soon() -> None:
        await trio.sleep(0.05)
        await store.record(Outcome(task_id, 1, TaskStatus.COMPLETED, result_json="7"))
        await store.flush_outcomes()
        finished_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_soon)
        task = await store.wait_finished(task_id, 5)
        returned_at = trio.current_time()
    assert task and task.result == 7
    # Woken by the write itself, well before the 0.25 s poll that covers other processes.
    assert returned_at - finished_at[0] < 0.1
    pending = (await submit_ids(store, [new()]))[0]
    start = trio.current_time()
    task = await store.wait_finished(pending, 0.3)
    assert task and task.status == TaskStatus.PENDING and 0.25 < trio.current_time() - start < 1


async def test_list_pages_newest_first(store: Store) -> None:
    ids = await submit_ids(store, [new("echo"), new("sleep"), new("echo")])
    page = await store.list_tasks(status=None, task_type="echo", before_id=None, limit=10)
    assert [t.id for t in page] == [ids[2], ids[0]]
    page = await store.list_tasks(status="pending", task_type=None, before_id=ids[2], limit=1)
    assert [t.id for t in page] == [ids[1]]


async def test_stats_queries(store: Store) -> None:
    ids = await submit_ids(store, [new() for _ in range(3)])
    claimed = await store.claim(3, ["echo"], 30)
    await finish(store, Outcome(claimed[0].id, 1, TaskStatus.COMPLETED, result_json="1"))
    await finish(store, Outcome(claimed[1].id, 1, TaskStatus.FAILED, error_json='{"type": "E"}'))
    assert (await store.counts())["running"] == 1
    assert await store.recent(60) == {"completed": 1, "failed": 1}
    (by_type,) = await store.by_type()
    assert (by_type["total"], by_type["completed"], by_type["failed"]) == (3, 1, 1)
    (timing,) = await store.timings_by_type()
    assert timing["n"] == 2 and len(timing["run_pct"]) == 3
    assert sum(r["completed"] + r["failed"] for r in await store.timeline()) == 2
    assert len(ids) == 3


async def test_enqueue_joins_the_callers_transaction(store: Store, database_url: str) -> None:
    async def in_asyncio() -> list[int]:
        conn = await asyncpg.connect(database_url)
        try:
            tr = conn.transaction()
            await tr.start()
            await client.enqueue(conn, "echo", {"rolled": "back"})
            await tr.rollback()
            async with conn.transaction():
                kept = await client.enqueue(conn, "echo", {"kept": True}, max_retries=1)
            return [kept]
        finally:
            await conn.close()

    (kept,) = await trio_asyncio.aio_as_trio(in_asyncio)()
    tasks = await store.list_tasks(status=None, task_type=None, before_id=None, limit=10)
    assert [(t.id, t.payload, t.max_retries) for t in tasks] == [(kept, {"kept": True}, 1)]


async def test_unreachable_database_is_a_clear_error(aio_loop: object) -> None:
    with pytest.raises(DatabaseUnavailable):
        await Store.open("postgresql://postgres@127.0.0.1:1/nowhere", pool_size=2)


async def test_listening_resumes_after_the_connection_is_lost(store: Store, database_url: str) -> None:
    """A database restart drops the LISTEN connection; new work must wake claimers again."""
    (killed,) = await raw(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                        "WHERE datname = current_database() AND query LIKE 'LISTEN%'")
    assert killed and killed[0][0] is True
    signal = store.work_signal()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.keep_listening, 0.05)
        with trio.fail_after(5):
            await signal.wait()  # woken once listening again, to look for missed work
        signal.clear()
        await store.submit(new())
        with trio.fail_after(5):
            await signal.wait()
        nursery.cancel_scope.cancel()


async def test_ready_means_the_database_takes_writes(store: Store, database_url: str) -> None:
    from taskd import db

    assert await store.ping()
    # What a standby, or a primary demoted in a failover, answers.
    conn = await db.connect(database_url, server_settings={"default_transaction_read_only": "on"})
    try:
        assert await conn.run(store._q["db_ping"]) is False
    finally:
        await conn.close()


async def test_higher_priorities_are_claimed_first_and_equal_ones_in_submission_order(store: Store) -> None:
    priorities = [0, 5, -100, 5, 100, 0, -1]
    ids = await submit_ids(store, [
        client.prepare("echo", {"i": i}, priority=p, settings=Settings()) for i, p in enumerate(priorities)])
    order = [t.id for t in await store.claim(3, ["echo"], 30)] + [t.id for t in await store.claim(10, ["echo"], 30)]
    by_priority = sorted(range(len(ids)), key=lambda i: (-priorities[i], i))
    assert order == [ids[i] for i in by_priority]
    task = await store.get(ids[4])
    assert task and task.priority == 100


async def test_a_scheduled_task_is_reported_scheduled_and_claimed_only_once_due(store: Store) -> None:
    import datetime as dt

    later, past = await submit_ids(store, [
        # Over a second ahead: the kept counts may call a task due within the next second pending.
        client.prepare("echo", {}, delay_seconds=1.6, settings=Settings()),
        client.prepare("echo", {}, run_at=dt.datetime(2001, 1, 1, tzinfo=dt.UTC), settings=Settings())])
    task = await store.get(later)
    assert task and task.status == TaskStatus.SCHEDULED and task.run_at is not None
    assert (await store.counts())["scheduled"] == 1 and (await store.counts())["pending"] == 1
    listed = await store.list_summaries(status="scheduled", task_type=None, before_id=None, limit=10)
    assert [t.id for t in listed] == [later] and listed[0].status == TaskStatus.SCHEDULED
    pending = await store.list_summaries(status="pending", task_type=None, before_id=None, limit=10)
    assert [t.id for t in pending] == [past], "a task not yet due is not listed as pending"
    assert [t.id for t in await store.claim(5, ["echo"], 30)] == [past], "never before its time"
    claimed = await store.get(past)
    assert claimed and claimed.run_at and claimed.run_at.year > 2001, "a past time counts as now: no queue-jumping"
    due_in = await store.seconds_until_due(["echo"])
    assert due_in is not None and 0 < due_in <= 1.6, "the claimer knows when to look again"
    await trio.sleep(due_in + 0.05)
    assert [t.id for t in await store.claim(5, ["echo"], 30)] == [later]
    task = await store.get(later)
    assert task and task.status == TaskStatus.RUNNING


async def test_a_snooze_is_counted_apart_and_spends_no_retry(store: Store) -> None:
    (task_id,) = await submit_ids(store, [new(max_retries=0)])
    (first,) = await store.claim(1, ["echo"], 30)
    written = await store._finish_batch([Outcome(task_id, 1, TaskStatus.RETRYING, retry_delay=0.0, snoozed=True)])
    assert written == [True]
    (again,) = await store.claim(1, ["echo"], 30)
    assert (again.attempt, again.snoozes, again.retries_used) == (2, 1, 0), "still its one attempt's worth"
    task = await store.get(task_id)
    assert task and task.errors == [], "a snooze is not an error"
