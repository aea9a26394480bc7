"""Turn finished runs into a markdown table and a loss-vs-tokens/bytes plot.

    python experiments/report.py --out experiments/diloco_vs_ddp \
        ddp=multirun/.../0_algorithm=ddp diloco=multirun/.../1_algorithm=diloco

Prints the table; writes ``<out>.md`` and ``<out>.png``. The first run is the reference
for the loss gap and the byte ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diloco.results import plot_eval


def main() -> None:
    """Parse runs, print and write the table, save the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="label=run_dir, reference first")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    summaries = {k: json.loads((Path(v) / "summary.json").read_text()) for k, v in runs.items()}
    ref = next(iter(summaries.values()))
    lines = [
        "| run | workers | H | tokens/worker | final eval loss | gap vs first | "
        "bytes sent/worker | bytes ratio (first / run) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, s in summaries.items():
        gap = s["final_eval_loss"] / ref["final_eval_loss"] - 1
        sent = s["comm_bytes_per_worker"]
        ratio = ref["comm_bytes_per_worker"] / sent if sent else float("inf")
        lines.append(
            f"| {label} | {s['workers']} | {s['inner_steps']} | {s['tokens_per_worker']:,} "
            f"| {s['final_eval_loss']:.4f} | {gap:+.1%} | {sent:,.0f} | {ratio:.1f}x |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.with_suffix(".md").write_text(table + "\n")
    plot_eval(runs, out.with_suffix(".png"), args.title)


if __name__ == "__main__":
    main()
