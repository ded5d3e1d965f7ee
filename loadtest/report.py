"""What every load-test report shares: percentiles, package versions, machine and git revision."""

from __future__ import annotations

import importlib.metadata
import math
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("trio", "trio-asyncio", "asyncpg", "quart", "quart-trio", "hypercorn", "httpx", "pgqueuer",
            "locust")


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of unsorted values (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p99 first (we care about the tail more than the middle), then p50 and the mean, in ms."""
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "p99": ms(percentile(seconds, 99)),
        "p50": ms(percentile(seconds, 50)),
        "avg": ms(sum(seconds) / len(seconds)) if seconds else None,
        "n": len(seconds),
    }


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]}


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def progress(message: str) -> None:
    """Progress goes to stderr so stdout stays a clean report."""
    print(message, file=sys.stderr, flush=True)
