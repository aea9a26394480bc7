"""Published internet-scale runs against the planner: one row per reported number.

    python experiments/claims/internet.py

Reads ``published_runs.yaml`` beside this file (set-ups, reported numbers, citations and the
place in each paper), plans every run with :func:`diloco.plan.check_published` and prints a
table: reported, predicted, the criterion (utilization within 10 points, times within 20 %)
and whether it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diloco.plan import check_published

RUNS = Path(__file__).resolve().parent / "published_runs.yaml"


def rows(path: Path = RUNS) -> list[dict[str, Any]]:
    """``check_published`` of the runs file: name, source, metric, reported, predicted, ..."""
    return check_published(path)


def _value(metric: str, v: float) -> str:
    return f"{v:.1%}" if metric == "utilization" else f"{v:.0f} s"


def table(found: list[dict[str, Any]] | None = None) -> str:
    """The rows as a markdown table."""
    lines = ["| run | metric | reported | predicted | criterion | holds |", "|" + "---|" * 6]
    for r in rows() if found is None else found:
        m = r["metric"]
        lines.append(
            f"| {r['name']} | {m} | {_value(m, r['reported'])} | {_value(m, r['predicted'])} "
            f"| {r['criterion']} | {'yes' if r['holds'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Print the rows as a markdown table."""
    print(table())


if __name__ == "__main__":
    main()
