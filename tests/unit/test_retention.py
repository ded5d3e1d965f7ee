"""Retention without a database: the duration settings, which statuses are pruned and how
often, and the prune loop's batches, turns, budget and lock against a scripted store."""

from __future__ import annotations

import datetime as dt
import logging
import pathlib
from typing import Any

import pytest
import trio

from taskd import cli, retention
from taskd.config import parse_settings
from taskd.errors import ConfigError, DatabaseUnavailable
from taskd.store import PruneBatch

DAY = 86_400.0


def test_retention_defaults() -> None:
    s = parse_settings({})
    assert (s.retention_completed, s.retention_failed, s.retention_cancelled) == (7 * DAY, 30 * DAY, 7 * DAY)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("12h", 43_200), ("7d", 7 * DAY), ("45s", 45), ("90", 90), ("0", 0), ("0d", 0),
     (" 2D ", 2 * DAY), ("1.5h", 5400), ("10 m", 600), ("2.5", 2.5), ("36500d", 36_500 * DAY)],
)
def test_retention_durations(text: str, seconds: float) -> None:
    for name, field in (("RETENTION_COMPLETED", "retention_completed"), ("RETENTION_FAILED", "retention_failed"),
                        ("RETENTION_CANCELLED", "retention_cancelled")):
        assert getattr(parse_settings({name: text}), field) == seconds


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "duration like 30m"), ("abc", "duration like 30m"), ("-1", "duration like 30m"),
     ("7w", "duration like 30m"), ("1e3", "duration like 30m"), ("d", "duration like 30m"),
     ("7 days", "duration like 30m"), ("7d12h", "duration like 30m"), ("nan", "duration like 30m"),
     ("36501d", "at most 36500d"), ("99999999999999999999", "at most 36500d")],
)
def test_bad_retention_is_one_line_naming_the_setting(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"RETENTION_FAILED": text})
    assert info.value.setting == "RETENTION_FAILED"
    assert problem in info.value.problem and "\n" not in str(info.value)


def test_retention_flags(tmp_path: pathlib.Path) -> None:
    s = cli.gather_settings(["--retention-completed", "2h", "--retention-cancelled", "0"],
                            {"RETENTION_COMPLETED": "1d", "RETENTION_FAILED": "3d"}, tmp_path)
    assert (s.retention_completed, s.retention_failed, s.retention_cancelled) == (7200, 3 * DAY, 0)


def test_rules_cover_expired_with_cancelled_and_skip_zero() -> None:
    assert retention.retention_rules(parse_settings({})) == (
        ("completed", 7 * DAY), ("failed", 30 * DAY), ("cancelled", 7 * DAY), ("expired", 7 * DAY))
    assert retention.retention_rules(parse_settings({"RETENTION_CANCELLED": "0", "RETENTION_FAILED": "1h"})) == (
        ("completed", 7 * DAY), ("failed", 3600))
    assert retention.retention_rules(parse_settings(
        {"RETENTION_COMPLETED": "0", "RETENTION_FAILED": "0", "RETENTION_CANCELLED": "0"})) == ()


@pytest.mark.parametrize(("shortest", "every"), [(7 * DAY, 60.0), (120, 60.0), (60, 30.0), (2, 1.0), (0.5, 1.0)])
def test_interval_follows_the_shortest_retention(shortest: float, every: float) -> None:
    assert retention.prune_interval((("completed", 30 * DAY), ("failed", shortest))) == every


class ScriptedStore:
    """Answers prune_finished from `due` (rows per status), each statement taking `took` seconds."""

    def __init__(self, due: dict[str, int], took: float | list[float] = 0.01, locked: bool = True) -> None:
        self.due = dict(due)
        self.took = took  # seconds per statement, or a list of them, one per statement (the last repeats)
        self.locked = locked
        self.calls: list[tuple[str, float, int, Any]] = []
        self.failures: list[BaseException] = []

    async def prune_finished(self, status: str, older_than: float, limit: int,
                             after: dt.datetime | None = None) -> PruneBatch:
        self.calls.append((status, older_than, limit, after))
        if self.failures:
            raise self.failures.pop(0)
        if isinstance(self.took, list):
            await trio.sleep(self.took.pop(0) if len(self.took) > 1 else self.took[0])
        else:
            await trio.sleep(self.took)
        if not self.locked:
            return PruneBatch(False, 0, None)
        n = min(limit, self.due.get(status, 0))
        self.due[status] = self.due.get(status, 0) - n
        reached = dt.datetime(2020, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=len(self.calls)) if n else None
        return PruneBatch(True, n, reached)


RULES = (("completed", 7 * DAY), ("failed", 30 * DAY), ("cancelled", 7 * DAY), ("expired", 7 * DAY))


async def test_a_run_takes_turns_between_statuses_until_nothing_is_due(autojump_clock: trio.abc.Clock) -> None:
    store = ScriptedStore({"completed": 2500, "failed": 1000, "expired": 10})
    run = await retention.prune_once(store, RULES, budget=100, batch=1000)  # type: ignore[arg-type]
    assert run.deleted == {"completed": 2500, "failed": 1000, "cancelled": 0, "expired": 10}
    assert not run.backlog and not run.lost_lock
    # One batch each in turn; a status leaves the turns once a batch comes back short.
    assert [c[0] for c in store.calls] == ["completed", "failed", "cancelled", "expired", "completed", "failed",
                                           "completed"]
    assert run.batches == [1000, 1000, 0, 10, 1000, 0, 500]
    assert all(limit == 1000 for _, _, limit, _ in store.calls)
    # Each status's next batch starts where its previous one stopped.
    assert store.calls[0][3] is None and store.calls[4][3] == dt.datetime(2020, 1, 1, 0, 0, 1, tzinfo=dt.UTC)
    assert [c[1] for c in store.calls[:4]] == [7 * DAY, 30 * DAY, 7 * DAY, 7 * DAY]


async def test_a_run_stops_when_its_budget_is_spent(autojump_clock: trio.abc.Clock) -> None:
    store = ScriptedStore({"completed": 1_000_000}, took=0.0625)
    start = trio.current_time()
    run = await retention.prune_once(store, RULES[:1], budget=1.0, batch=1000)  # type: ignore[arg-type]
    assert run.backlog and run.total == 16_000 and run.batches == [1000] * 16
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_another_pruner_ends_the_run_at_once(autojump_clock: trio.abc.Clock) -> None:
    store = ScriptedStore({"completed": 5000}, locked=False)
    run = await retention.prune_once(store, RULES, budget=100, batch=1000)  # type: ignore[arg-type]
    assert run.lost_lock and run.total == 0 and len(store.calls) == 1


async def test_slow_batches_get_smaller_and_quick_ones_grow_back(autojump_clock: trio.abc.Clock) -> None:
    store = ScriptedStore({"completed": 1_000_000}, took=[0.5, 0.5, 0.001])
    run = await retention.prune_once(store, RULES[:1], budget=1.2, batch=1000)  # type: ignore[arg-type]
    assert [c[2] for c in store.calls[:6]] == [1000, 500, 250, 500, 1000, 1000]
    assert run.backlog and max(run.batches) == 1000
    store.took = [0.5, 0.01]
    calls = len(store.calls)
    await retention.prune_once(store, RULES[:1], budget=0.1, batch=1000)  # type: ignore[arg-type]
    assert store.calls[calls][2] == 1000  # each run starts at full size


async def test_the_loop_survives_outages_and_logs_what_it_pruned(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="taskd.retention")
    store = ScriptedStore({"completed": 1500, "expired": 3})
    store.failures = [DatabaseUnavailable("server closed the connection")]
    settings = parse_settings({"RETENTION_FAILED": "0"})
    with trio.move_on_after(200):
        await retention.prune_loop(store, settings)  # type: ignore[arg-type]
    assert store.due == {"completed": 0, "cancelled": 0, "expired": 0}
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.DEBUG, "pruning finished tasks failed: server closed the connection") in messages
    pruned = [m for level, m in messages if level == logging.INFO]
    assert len(pruned) == 1 and pruned[0].startswith("pruned 1,503 finished tasks in ")
    assert pruned[0].endswith("(completed 1,500, expired 3)")
    # A run every minute: at 0 (the outage), 60 (pruned, in four batches), 120 and 180 (nothing due).
    assert len(store.calls) == 1 + 4 + 3 + 3 and all(c[0] != "failed" for c in store.calls)


async def test_a_backlog_brings_the_next_run_sooner(autojump_clock: trio.abc.Clock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="taskd.retention")
    store = ScriptedStore({"completed": 10_000}, took=0.5)
    with trio.move_on_after(30):
        await retention.prune_loop(store, parse_settings({}), budget=1.0)  # type: ignore[arg-type]
    assert store.due["completed"] == 0  # at a minute between runs, it would still be at the first run's
    assert "more are due, continuing in 1s" in caplog.text


async def test_nothing_to_prune_when_every_retention_is_zero(autojump_clock: trio.abc.Clock) -> None:
    store = ScriptedStore({"completed": 10})
    settings = parse_settings({"RETENTION_COMPLETED": "0", "RETENTION_FAILED": "0", "RETENTION_CANCELLED": "0"})
    with trio.fail_after(1):
        await retention.prune_loop(store, settings)  # type: ignore[arg-type]
    assert store.calls == []
