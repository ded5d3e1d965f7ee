"""The loop that keeps the counts: it folds every second, and checks against a full count
at once when it starts (the first process after the migration fills the totals) and then
once per check period; an outage is waited out, never fatal."""

from __future__ import annotations

from typing import Any

import trio

from taskd import maintenance
from taskd.errors import DatabaseUnavailable


class FakeStore:
    def __init__(self, fail_folds: int = 0) -> None:
        self.folds: list[float] = []
        self.checks: list[tuple[float, float]] = []
        self.fail_folds = fail_folds

    async def fold_counts(self) -> int:
        self.folds.append(trio.current_time())
        if self.fail_folds:
            self.fail_folds -= 1
            raise DatabaseUnavailable("away")
        return 0

    async def check_counts(self, every: float) -> int:
        self.checks.append((trio.current_time(), every))
        return 0


async def _run_for(store: Any, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await maintenance.counts_loop(store, every=1.0, check_every=10.0)


async def test_the_first_check_runs_at_once_then_once_a_period(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    start = trio.current_time()
    await _run_for(store, 25.5)
    assert [round(t - start) for t, _ in store.checks] == [0, 10, 20]
    assert {every for _, every in store.checks} == {10.0}
    assert len(store.folds) == 26, "a fold every second"


async def test_an_outage_is_waited_out(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore(fail_folds=3)
    await _run_for(store, 5.5)
    assert len(store.folds) == 6, "the loop went on after three failed folds"
    assert store.checks, "and checked once the database answered"
