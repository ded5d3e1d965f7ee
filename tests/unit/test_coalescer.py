from collections.abc import Sequence

import pytest
import trio

from taskd.coalescer import Coalescer, CoalescerClosed


async def test_concurrent_submits_share_a_batch_and_get_their_own_results() -> None:
    batches: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        batches.append(list(items))
        return [ValueError(f"bad {i}") if i % 10 == 3 else i * 2 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush, max_items=100, window=0.01, name="t")
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        try:
            results[i] = await coalescer.submit(i)
        except ValueError as exc:
            results[i] = str(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.run)
        async with trio.open_nursery() as clients:
            for i in range(50):
                clients.start_soon(one, i)
        coalescer.close()

    assert len(batches) < 5, "50 concurrent submits should need only a few statements"
    for i in range(50):
        assert results[i] == (f"bad {i}" if i % 10 == 3 else i * 2)


async def test_a_full_batch_is_flushed_without_waiting_for_the_window(autojump_clock: trio.abc.Clock) -> None:
    sizes: list[int] = []

    async def flush(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush, max_items=10, window=1000.0, name="t")
    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.run)
        start = trio.current_time()
        async with trio.open_nursery() as clients:
            for i in range(10):
                clients.start_soon(coalescer.submit, i)
        assert trio.current_time() - start < 1
        coalescer.close()
    assert sizes == [10]


async def test_a_failing_flush_fails_every_item_of_that_batch_only() -> None:
    calls = 0

    async def flush(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database hiccup")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush, max_items=10, window=0, name="t")
    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.run)
        with pytest.raises(RuntimeError, match="hiccup"):
            await coalescer.submit(1)
        assert await coalescer.submit(2) == 2
        coalescer.close()


async def test_submit_after_close_is_refused() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush, max_items=10, window=0, name="t")
    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.run)
        coalescer.close()
    with pytest.raises(CoalescerClosed):
        await coalescer.submit(1)


async def test_items_queued_when_the_loop_is_cancelled_fail_instead_of_hanging() -> None:
    started = trio.Event()

    async def flush(items: Sequence[int]) -> list[int]:
        started.set()
        await trio.sleep_forever()
        return []

    coalescer: Coalescer[int, int] = Coalescer(flush, max_items=1, window=0, name="t", flush_timeout=0.2)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            await coalescer.submit(i)
        except (CoalescerClosed, trio.TooSlowError) as exc:
            outcomes.append(type(exc).__name__)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        async with trio.open_nursery() as clients:
            clients.start_soon(one, 1)
            await started.wait()
            clients.start_soon(one, 2)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert sorted(outcomes) == ["CoalescerClosed", "TooSlowError"]


async def test_a_lone_item_at_a_quiet_time_does_not_wait_for_the_window(autojump_clock: trio.abc.Clock) -> None:
    sizes: list[int] = []

    async def flush(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush, max_items=100, window=10.0, name="t")
    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.run)
        start = trio.current_time()
        await coalescer.submit(1)
        assert trio.current_time() - start < 1, "quiet: flushed at once"
        async with trio.open_nursery() as clients:  # a burst: shared batches, so the window applies
            for i in range(3):
                clients.start_soon(coalescer.submit, i)
        start = trio.current_time()
        await coalescer.submit(9)
        assert trio.current_time() - start >= 10, "busy: waited for company"
        coalescer.close()
    assert sizes[0] == 1 and sizes[1] == 3
