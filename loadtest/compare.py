"""An interleaved A/B comparison of the drain and batch figures between two revisions of taskd.

    python -m loadtest.compare HEAD~3                      # A = HEAD~3, B = the working tree, 5 rounds
    python -m loadtest.compare v0.1 HEAD --rounds 7 -n 10000
    python -m loadtest.compare HEAD~1 --rounds 1 -n 500    # a smoke run

A revision is exported with `git archive` into a temporary directory, so the repository is
never touched (no worktree, no checkout); "the working tree" is this checkout as it is,
uncommitted and untracked files included. Then `python -m loadtest.bench drain batch --json`
runs A, B, A, B, ...: one fresh process per run, fresh databases for every scenario, and
--taskd-source pointing its servers at that side's tree. Interleaving spreads this machine's
drift (other load, thermal, caches) over both sides instead of onto whichever ran second.
The measuring code (this loadtest/) is the same for both sides; only the server differs.
Both sides share this venv, so a revision with other dependencies needs them installed first.

Prints one JSON object on stdout: each run's figures, the median per side, and per metric
B vs A as (B - A) / A, and whether that is within --tolerance (default 10 %). A summary and
the bench's progress go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
from typing import Any

from loadtest.report import REPO, machine, progress, versions

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1/taskd_compare"
# name -> (scenario, path to the figure in its JSON, higher is better)
METRICS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "drain_tasks_per_s": ("drain", ("tasks_per_s",), True),
    "batch_submitted_per_s": ("batch", ("submitted_per_s",), True),
    "batch_completed_per_s": ("batch", ("completed_per_s",), True),
    "batch_submit_p99_ms": ("batch", ("latency_ms", "p99"), False),
}


@dataclasses.dataclass(frozen=True)
class Side:
    name: str  # "A" or "B"
    revision: str  # as given, or "working tree"
    commit: str | None  # None: the working tree
    tree: pathlib.Path


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def export(name: str, revision: str | None, into: pathlib.Path) -> Side:
    """The side for `revision` exported under `into`, or for the working tree (None)."""
    if revision is None:
        return Side(name, "working tree", None, REPO)
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"compare: {revision!r} is not a revision of {REPO}")
    tree = into / name
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return Side(name, revision, commit, tree)


def imported_from(side: Side) -> str:
    """Where `import taskd` resolves the way the bench starts that side's server (cwd first on sys.path)."""
    env = {**os.environ, "PYTHONPATH": str(side.tree)}
    out = subprocess.run([sys.executable, "-c", "import taskd; print(taskd.__file__)"], cwd=side.tree, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not pathlib.Path(out).resolve().is_relative_to(side.tree.resolve()):
        sys.exit(f"compare: side {side.name} would run taskd from {out}, not from {side.tree}")
    return out


def bench_once(side: Side, args: argparse.Namespace) -> dict[str, Any]:
    """One `loadtest.bench drain batch` run against side's code: its figures and any scenario errors."""
    argv = [sys.executable, "-m", "loadtest.bench", "drain", "batch", "-n", str(args.n), "--json",
            "--taskd-source", str(side.tree), "--database-url", args.database_url]
    done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)  # progress passes through stderr
    if done.returncode != 0:
        return {"figures": {}, "errors": {"bench": f"exited with {done.returncode}"}}
    scenarios = json.loads(done.stdout)["scenarios"]
    figures: dict[str, float | None] = {}
    for metric, (scenario, path, _) in METRICS.items():
        value: Any = scenarios.get(scenario, {})
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        figures[metric] = value
    errors = {name: fig.get("error") or fig.get("skipped") for name, fig in scenarios.items()
              if "error" in fig or "skipped" in fig}
    return {"figures": figures, "errors": errors}


def summarise(runs: list[dict[str, Any]], tolerance: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median per side, and B vs A per metric."""
    medians: dict[str, dict[str, float | None]] = {}
    for side in ("A", "B"):
        medians[side] = {}
        for metric in METRICS:
            values = [r["figures"].get(metric) for r in runs if r["side"] == side]
            present = [v for v in values if v is not None]
            medians[side][metric] = round(statistics.median(present), 2) if present else None
    comparison: dict[str, Any] = {}
    for metric, (_, _, higher_is_better) in METRICS.items():
        a, b = medians["A"][metric], medians["B"][metric]
        if not a or b is None:
            comparison[metric] = None
            continue
        relative = (b - a) / a
        within = abs(relative) <= tolerance
        better = relative > 0 if higher_is_better else relative < 0
        comparison[metric] = {"relative": round(relative, 4), "within_tolerance": within,
                              "verdict": "same" if within else ("B better" if better else "B worse")}
    return medians, comparison


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.compare", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("a", metavar="A", help="the baseline revision, e.g. HEAD~3")
    add("b", metavar="B", nargs="?", help="the revision to compare (default: the working tree)")
    add("--rounds", type=int, default=5, help="A, B pairs to run (default 5)")
    add("-n", type=int, default=20_000, help="tasks per scenario (default 20,000, as loadtest.bench)")
    add("--tolerance", type=float, default=0.10, help="|B - A| / A still called the same (default 0.10)")
    add("--database-url", default=DEFAULT_DATABASE_URL,
        help=f"created and dropped by every run (default {DEFAULT_DATABASE_URL})")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or not 0 <= args.tolerance < 1:
        parser.error("--rounds and -n must be at least 1, --tolerance from 0 to 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="taskd-compare-") as tmp:
        sides = [export("A", args.a, pathlib.Path(tmp)), export("B", args.b, pathlib.Path(tmp))]
        origins = {side.name: imported_from(side) for side in sides}
        runs: list[dict[str, Any]] = []
        for round_no in range(1, args.rounds + 1):
            for side in sides:
                progress(f"[round {round_no}/{args.rounds}, side {side.name}: {side.revision}]")
                runs.append({"round": round_no, "side": side.name, **bench_once(side, args)})
    medians, comparison = summarise(runs, args.tolerance)
    for metric, verdict in comparison.items():
        progress(f"{metric}: A {medians['A'][metric]}, B {medians['B'][metric]}, "
                 + (f"{verdict['relative']:+.1%} ({verdict['verdict']})" if verdict else "no figure"))
    dirty = bool(git("status", "--porcelain"))
    report = {
        "sides": {side.name: {"revision": side.revision, "commit": side.commit or git("rev-parse", "HEAD"),
                              "uncommitted_changes": dirty if side.commit is None else False,
                              "taskd_imported_from": origins[side.name]} for side in sides},
        "params": {"rounds": args.rounds, "n": args.n, "tolerance": args.tolerance, "order": "A, B per round"},
        "runs": runs,
        "median": medians,
        "b_vs_a": comparison,
        "machine": machine(),
        "versions": versions(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
