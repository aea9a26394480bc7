"""Which kind of network trains the better model at equal total compute (the survey's question).

    python experiments/network_kinds.py --seeds 0 1 2 --out experiments/results/network_kinds

The regime is the claims suite's (``conf/experiment/claims/base.yaml``: a 119K-parameter GPT,
64-token sequences, K = 4 of batch 8, 3000 steps each), and every network spends the same
tokens, K x 3000 x 8 x 64:

- DDP with K workers and DiLoCo with K workers (H = 30, 100 rounds), at the learning rates the
  claims suite tuned for this regime (``ddp_gap``, size M, seed 100: DDP lr 0.012; DiLoCo
  inner lr 0.003, outer Nesterov lr 0.8), and DiLoCo again with one copier
  (``attack=mimic``: it re-sends worker 0's pseudo-gradient) under the Gauntlet validator,
  which drops payloads it finds copied;
- a competition (SN9 rules, ``conf/compete.yaml``): K miners train one model each, on their
  own, at four learning rates (their own search: the DDP grid of the claims suite), and
  submit every 600 steps. The network's model is the winner's (highest reward at the last
  evaluation); best-of-K is the lowest eval loss among the miners. Two copiers (an exact and a
  noised copy of the last leader) take part with detection reporting but not excluding, so
  the time-priority margin alone decides what they earn.

The final eval loss is every model's loss on the fixed eval set of ``diloco.train``. Writes
``<out>.md`` (mean and std over seeds), ``<out>.png`` and ``<out>_runs.jsonl`` (every run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diloco import api, compete
from diloco.compose import compose
from diloco.config import ConfigError

REGIME = ["experiment=claims/base", "logger.mode=disabled", "logger.progress=false"]
NO_H = "~algorithm.inner_steps"  # DDP syncs every step: the regime's H does not apply
DDP_LR, DILOCO_LR, DILOCO_OUTER_LR = 0.012, 0.003, 0.8  # claims ddp_gap, size M, tuned
LRS = [3e-3, 6e-3, 1.2e-2, 2.4e-2]  # the competition's miners (the claims DDP grid)


def common(seed: int, steps: int | None) -> list[str]:
    """The overrides every run shares."""
    return [*REGIME, f"seed={seed}", *([f"train.steps={steps}"] if steps else [])]


def competition(out: Path, seed: int, steps: int, epochs: int) -> dict[str, Any]:
    """K = len(LRS) miners and two copiers; the winner's and the best miner's eval loss."""
    node: dict[str, Any] = OmegaConf.to_container(compose([], "compete"), resolve=True)  # type: ignore[assignment]
    base = [*common(seed, steps), "algorithm=ddp", NO_H, "workers.count=1"]
    node.update(
        seed=seed,
        epochs=epochs,
        steps_per_epoch=steps // epochs,
        base=base,
        miners=[{"name": f"lr{lr:g}", "overrides": [f"optimizer.lr={lr}"]} for lr in LRS],
        copiers=[
            {"name": "copier_exact", "mode": "exact"},
            {"name": "copier_noise", "mode": "noise", "noise": 1e-3},
        ],
    )
    node["detect"]["exclude"] = False
    node["logger"].update(mode="disabled", progress=False)
    s = compete.run(node, out)
    honest = {n: m for n, m in s["miners"].items() if not m["copier"]}
    winner = max(honest, key=lambda n: honest[n]["reward"])
    copiers = [m for m in s["miners"].values() if m["copier"]]
    return {
        "method": "competition",
        "seed": seed,
        "eval_loss": honest[winner]["eval_loss"],
        "winner": winner,
        "best_of_k": min(m["eval_loss"] for m in honest.values()),
        "bytes": s["bytes_total"],
        "copier_reward": sum(m["mean_reward"] for m in copiers) / len(copiers),
        "copier_flagged": all(m["flags"] for m in copiers),
    }


def trained(out: Path, method: str, args: list[str], seed: int) -> dict[str, Any]:
    """One diloco.train run in this process."""
    run = api.train(args, dir=out, progress=False)
    s = run.summary
    row = {
        "method": method,
        "seed": seed,
        "eval_loss": s["final_eval_loss"],
        "bytes": s["comm_bytes_total"],
    }
    if "detect_recall" in s:
        row["copier_flagged_share"] = s["detect_recall"]
    return row


def runs(root: Path, seed: int, steps: int | None, epochs: int) -> list[dict[str, Any]]:
    """Every method for one seed (each cached in its own folder)."""
    k = len(LRS)
    diloco = ["algorithm=diloco", f"optimizer.lr={DILOCO_LR}",
              f"algorithm.outer_optimizer.lr={DILOCO_OUTER_LR}"]  # fmt: skip
    plan = {
        "ddp": ["algorithm=ddp", NO_H, f"optimizer.lr={DDP_LR}"],
        "diloco": diloco,
        "diloco+copier": [*diloco, "attack=mimic", "validator=gauntlet"],
    }
    rows = []
    for method, extra in plan.items():
        out = root / f"{method}_seed{seed}"
        cached = out / "row.json"
        if not cached.exists():
            row = trained(out, method, [*common(seed, steps), f"workers.count={k}", *extra], seed)
            cached.write_text(json.dumps(row))
        rows.append(json.loads(cached.read_text()))
    out = root / f"competition_seed{seed}"
    cached = out / "row.json"
    if not cached.exists():
        out.mkdir(parents=True, exist_ok=True)
        total = steps or int(OmegaConf.select(compose(REGIME), "train.steps"))
        cached.write_text(json.dumps(competition(out, seed, total, epochs)))
    rows.append(json.loads(cached.read_text()))
    return rows


def stat(values: list[float], fmt: str = ".4f") -> str:
    """``mean ± std`` (std over seeds; 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def report(rows: list[dict[str, Any]], out: Path, cmd: str, note: str) -> str:
    """The markdown table (and the plot next to it)."""
    by = {
        m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)
    }
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"# Which network trains the better model at equal compute\n\n`{cmd}`\n",
        f"Seeds {seeds}; mean ± std over seeds. {note}\n",
        "| network | final eval loss | bytes moved (all participants) | what a copier gets |",
        "|---|---|---|---|",
    ]
    for method, rs in by.items():
        loss = stat([r["eval_loss"] for r in rs])
        nbytes = statistics.mean(r["bytes"] for r in rs)
        if method == "competition":
            best = stat([r["best_of_k"] for r in rs])
            gets = (
                f"mean reward share {stat([r['copier_reward'] for r in rs], '.1e')}; flagged "
                f"as a copy in {sum(r['copier_flagged'] for r in rs)}/{len(rs)} seeds"
            )
            lines.append(
                f"| competition: winner's model (best of K: {best}) | {loss} | "
                f"{nbytes:.3g} | {gets} |"
            )
        elif method == "diloco+copier":
            share = stat([r["copier_flagged_share"] for r in rs])
            lines.append(
                f"| DiLoCo, one copier, Gauntlet | {loss} | {nbytes:.3g} | "
                f"dropped as a copy in a share {share} of rounds |"
            )
        else:
            gets = (
                "the same model; its gradient is averaged in unscored (no validator)"
                if method == "ddp"
                else "see the next row"
            )
            lines.append(
                f"| {method.upper() if method == 'ddp' else 'DiLoCo'} | {loss} | "
                f"{nbytes:.3g} | {gets} |"
            )
    text = "\n".join(lines) + "\n"
    plot(by, out.with_suffix(".png"))
    return text


def plot(by: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Final eval loss of each network (one point per seed), against bytes moved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, rs in by.items():
        ax.scatter([r["bytes"] for r in rs], [r["eval_loss"] for r in rs], label=method)
    ax.set_xscale("log")
    ax.set_xlabel("bytes moved, all participants")
    ax.set_ylabel("final eval loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ddp_validator_note(root: Path) -> str:
    """What this framework says when DDP is given the Gauntlet validator (refused at build)."""
    try:
        api.train("algorithm=ddp", "validator=gauntlet", "experiment=debug", dir=root / "ddp+v")
    except ConfigError as err:
        return f"DDP with a validator: `{err}`."
    return "DDP runs with the Gauntlet validator."


def main() -> None:
    """Run (or reuse) every method for every seed, then write the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="per worker (default: the regime's)")
    p.add_argument("--epochs", type=int, default=5, help="competition evaluations")
    p.add_argument("--runs", default="outputs/network_kinds", help="run folders (cached)")
    p.add_argument("--out", default="experiments/results/network_kinds")
    a = p.parse_args()
    root, out = Path(a.runs), Path(a.out)
    rows = [r for seed in a.seeds for r in runs(root, seed, a.steps, a.epochs)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + "_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = f"python experiments/network_kinds.py --seeds {' '.join(map(str, a.seeds))}"
    cmd += (f" --steps {a.steps}" if a.steps else "") + f" --epochs {a.epochs}"
    note = (
        f"K = {len(LRS)}; the claims regime (conf/experiment/claims/base.yaml), every network "
        "the same tokens. DDP lr 0.012, DiLoCo lr 0.003 / outer lr 0.8 (H = 30), as tuned by "
        f"the claims suite; the competition's miners at lrs {LRS}, one model each. Its "
        "copiers are flagged but not excluded (detect.exclude=false): their reward is what "
        "the time-priority margin alone leaves them. " + ddp_validator_note(root)
    )
    text = report(rows, out, cmd, note)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
