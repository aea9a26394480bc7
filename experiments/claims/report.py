"""Render the claims report from the suite's records: ``claims.md``, plots, README table.

Called by ``run.py`` after every invocation (``run.py --report-only`` renders alone). For
each claim: the source, what it states, the criterion, the arms' chosen learning rates and
final eval loss (mean +- std over the seeds), bytes per worker, the verdict with its
evidence, a plot of eval loss against tokens (mean over seeds, band = min..max), and the
tuning grid with every point's loss. The README's results section (between the
``<!-- claims:begin -->`` and ``<!-- claims:end -->`` markers) gets the one-line-per-claim
table, so no number there is copied by hand.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from claims import TUNE_SEED, Claim, Stats

if TYPE_CHECKING:
    from run import Suite

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def _point(point: dict[str, Any] | None, grid: dict[str, list[Any]] | None = None) -> str:
    """``lr=0.01, outer_optimizer=0.8``; a value at the end of its grid axis is marked."""
    if not point:
        return "-"
    parts = []
    for k, v in point.items():
        name = "outer lr" if "outer_optimizer" in k else k.split(".")[-1]
        axis = (grid or {}).get(k, [])
        edge = " (grid edge)" if len(axis) > 1 and v in (min(axis), max(axis)) else ""
        parts.append(f"{name}={v:g}{edge}")
    return ", ".join(parts)


def arm_stats(suite: Suite, claim: Claim) -> tuple[dict[str, Stats], dict[str, Any]]:
    """Stats of every arm whose seeds all finished, and each arm's chosen point."""
    stats, points = {}, {}
    for arm in claim.arms:
        points[arm.label] = suite.chosen(claim, arm)
        recs = [suite.records.get(j.key) for j in suite.seed_jobs(claim, arm)]
        if len(recs) == len(suite.seeds) and all(recs):
            done = [r for r in recs if r]
            bytes_ = sum(r["comm_bytes_per_worker"] for r in done) / len(done)
            stats[arm.label] = Stats(
                [float(r["final_eval_loss"]) for r in done],
                bytes_,
                bytes_ / max(1, done[0]["rounds"]),
                done,
            )
    return stats, points


def plot(path: Path, claim: Claim, stats: dict[str, Stats]) -> None:
    """Eval loss against tokens per worker, mean over seeds with a min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, s in stats.items():
        curves = [r["curve"] for r in s.summaries]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        x = [c[0] for c in curves[0][:n]]
        ys = [[c[i][1] for c in curves] for i in range(n)]
        ax.plot(x, [sum(y) / len(y) for y in ys], label=f"{label} ({s.mean:.3f})")
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
    ax.set_xlabel("tokens per worker")
    ax.set_ylabel("eval loss (nats/byte)")
    ax.set_title(claim.name)
    lows = [s.mean for s in stats.values()]
    if lows:
        ax.set_ylim(min(lows) * 0.97, max(lows) * 1.25)
    if ax.get_lines():  # a claim whose runs log no eval curve has nothing to name
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def claim_section(suite: Suite, claim: Claim, results: Path) -> tuple[str, str]:
    """The claim's markdown section, and its verdict ("pending" until every arm finished)."""
    stats, points = arm_stats(suite, claim)
    lines = [
        f"## {claim.name}",
        "",
        f"- **Source:** {claim.source}",
        f"- **States:** {claim.statement}",
        f"- **Criterion:** {claim.criterion}",
        f"- **Regime:** `conf/experiment/claims/{claim.regime}.yaml`",
        "",
        "| arm | size | chosen lr | final eval loss (mean +- std, "
        f"{len(suite.seeds)} seeds) | vs first | bytes sent/worker |",
        "|---|---|---|---|---|---|",
    ]
    first = next(iter(stats.values()), None)
    for arm in claim.arms:
        s = stats.get(arm.label)
        head = (
            f"| {arm.label} | {arm.size} | {_point(points[arm.label], claim.tuned_by(arm).grid)} |"
        )
        if s is None:
            lines.append(f"{head} pending | | |")
            continue
        vs = f"{s.mean / first.mean - 1:+.2%}" if first else ""
        lines.append(f"{head} {s} | {vs} | {s.bytes_per_worker:,.0f} |")
    if len(stats) == len(claim.arms):
        verdict, evidence = claim.decide(stats)
        png = results / "claims" / f"{claim.name}.png"
        plot(png, claim, stats)
        lines += ["", f"**Verdict: {verdict}.** {evidence}", "",
                  f"![{claim.name}](claims/{claim.name}.png)"]  # fmt: skip
    else:
        verdict = "pending"
        lines += ["", "**Verdict: pending** (not every arm has finished its seeds)."]
    lines += ["", tuning_table(suite, claim), ""]
    return "\n".join(lines), verdict


def tuning_table(suite: Suite, claim: Claim) -> str:
    """Every grid point of the claim's tuned arms with its loss (seed TUNE_SEED)."""
    rows = []
    for arm in claim.arms:
        for point, job in suite.tuning_jobs(claim, arm):
            loss = suite.loss(job)
            chosen = " (chosen)" if point == suite.chosen(claim, arm) else ""
            value = f"{loss:.4f}" if math.isfinite(loss) else "pending"
            rows.append(f"| {arm.label} | {_point(point)} | {value}{chosen} |")
    if not rows:
        return ""
    head = [
        f"<details><summary>Tuning grid (seed {TUNE_SEED}, the claim's full run)</summary>",
        "",
        "| arm | point | final eval loss |",
        "|---|---|---|",
    ]
    return "\n".join([*head, *rows, "", "</details>"])


def internet_section() -> str:
    """Claim 13: the planner against published internet-scale runs (no training)."""
    from internet import table

    return "\n".join(
        [
            "## internet",
            "",
            "- **Source:** INTELLECT-1 (arXiv 2412.01152), Table 2; Covenant-72B (arXiv "
            "2603.08163), Sec. 4 (citations and places: `experiments/claims/published_runs.yaml`)",
            "- **States:** from the published set-ups, our clock and network model "
            "(`python -m diloco.plan`) predict the reported compute utilization within 10 points "
            "and the reported times within 20%.",
            "- **Criterion:** per row, as in the table; the planner equals a simulated run's "
            "modelled time on this machine (tests/test_plan.py).",
            "",
            table(),
            "",
        ]
    )


def _short(source: str) -> str:
    """``First work (arXiv ids)``: the source without its tables and figures."""
    ids = re.findall(r"arXiv \d{4}\.\d{4,5}", source)
    return f"{source.split('(')[0].strip()} ({', '.join(ids)})"


def render(suite: Suite, claims: list[Claim], results: Path, readme: Path | None) -> str:
    """Write ``claims.md`` (and the README table); return the summary table."""
    sections, summary = [], ["| claim | source | verdict |", "|---|---|---|"]
    for claim in claims:
        text, verdict = claim_section(suite, claim, results)
        sections.append(text)
        summary.append(f"| [{claim.name}](experiments/results/claims.md#{claim.name}) "
                       f"| {_short(claim.source)} | {verdict} |")  # fmt: skip
    table = "\n".join(summary)
    header = [
        "# Claims of the literature, checked",
        "",
        "Generated by `python experiments/claims/run.py` (scale "
        f"`{suite.scale}`) from `claims_runs.jsonl`; see `experiments/claims/README.md` for "
        "the regime, the tuning protocol and the cost. Do not edit by hand.",
        "",
        table.replace("experiments/results/claims.md", ""),
        "",
    ]
    sections.append(internet_section())
    summary.append(
        "| [internet](experiments/results/claims.md#internet) | INTELLECT-1 "
        "(arXiv 2412.01152), Covenant-72B (arXiv 2603.08163) | see table |"
    )
    (results / "claims.md").write_text("\n".join(header + sections))
    if readme is not None and readme.exists():
        text = readme.read_text()
        if BEGIN in text and END in text:
            before, rest = text.split(BEGIN, 1)
            after = rest.split(END, 1)[1]
            readme.write_text(f"{before}{BEGIN}\n{table}\n{END}{after}")
    print(table)
    return table
