"""Table and plots for the ``comm_methods`` sweep: loss per byte and per modelled second.

    python -m diloco.train experiment=comm_methods
    python -m diloco.train experiment=comm_methods_codecs
    python experiments/comm_methods.py multirun/comm_methods --out experiments/results/comm_methods

Writes ``<out>.md`` (one row per method, DDP the reference) and ``<out>.png`` (eval loss
against bytes sent per worker, and against modelled time at 1 Gbit/s and 100 Mbit/s).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diloco.results import load_runs, plot_runs

XS = {
    "comm/bytes_sent": "bytes sent per worker",
    "time/sim_s": "modelled time at 1 Gbit/s (s)",
    "time/sim_s@100mbps": "modelled time at 100 Mbit/s (s)",
}


def method(run: str) -> str:
    """``0_algorithm=ddp`` or ``algorithm=ddp`` -> ``ddp``; ``codec=int4`` -> ``diloco_int4``."""
    head, _, rest = run.partition("_")
    body = rest if head.isdigit() else run  # with or without the sweep's job number
    overrides = dict(p.split("=", 1) for p in body.split(",") if "=" in p)
    if "codec" in overrides:
        return f"diloco_{overrides['codec']}"
    return overrides.get("algorithm", run)


def main() -> None:
    """Load the sweep, print and write the table, save the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--out", default="experiments/results/comm_methods")
    args = parser.parse_args()
    metrics, summaries = load_runs(args.sweep_dir)
    for frame in (summaries, metrics):  # label runs by their method alone
        frame["run"] = frame["run"].map(method)
    ref = summaries.set_index("run").loc["ddp"]
    lines = [
        "| method | final eval loss | vs DDP | bytes sent/worker | fewer bytes than DDP "
        "| modelled time 1 Gbit/s (s) | modelled time 100 Mbit/s (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, s in summaries.sort_values("final_eval_loss").iterrows():
        lines.append(
            f"| {s['run']} | {s['final_eval_loss']:.4f} "
            f"| {s['final_eval_loss'] / ref['final_eval_loss'] - 1:+.1%} "
            f"| {s['comm_bytes_per_worker']:,.0f} "
            f"| {ref['comm_bytes_per_worker'] / s['comm_bytes_per_worker']:,.0f}x "
            f"| {s['sim_time_s']:,.0f} | {s['sim_time_s@100mbps']:,.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.with_suffix(".md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), sharey=True)
    for ax, (x, label) in zip(axes, XS.items(), strict=True):
        plot_runs(metrics, x=x, ax=ax)
        ax.set_xlabel(label)
        ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    for ax in axes[1:]:
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
    fig.suptitle("4 workers, equal tokens, 0.44M-param GPT on Shakespeare")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
