"""Reading EXPLAIN (FORMAT JSON) plans in the plan tests."""

from __future__ import annotations

from typing import Any


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a plan, the top one first."""
    return [plan, *(n for child in plan.get("Plans", []) for n in nodes(child))]
