"""Tables for the ``robustness`` and ``stragglers`` sweeps.

    python -m diloco.train experiment=robustness
    python -m diloco.train experiment=robustness_gauntlet
    python -m diloco.train experiment=stragglers
    python -m diloco.train experiment=validator_detection
    python experiments/robustness.py multirun/robustness multirun/robustness_gauntlet \
        --stragglers multirun/stragglers --detection multirun/validator_detection

Writes ``experiments/results/robustness.md``: the final eval-loss gap of every attack x
defense (a robust aggregator, or the validator's weights on a mean) against the honest-only
run (no attack, mean), the validator's detection, and the modelled time to a target loss
for each sync policy and worker profile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diloco.results import load_metrics

DEFENSES = ["mean", "median", "trimmed_mean", "geomed", "multikrum", "cclip", "nnm",
            "gauntlet"]  # fmt: skip


def _overrides(run: Path) -> dict[str, str]:
    lines = (run / ".hydra" / "overrides.yaml").read_text().splitlines()
    pairs = (line.removeprefix("- ").lstrip("+").split("=", 1) for line in lines)
    return {k: v for k, v in pairs}


def _defense(run: Path) -> str:
    """The validator when the run had one, else its aggregator's conf/ option name."""
    import yaml

    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    if cfg.get("validator"):
        return "gauntlet"
    return _overrides(run).get("aggregator", "mean")


def robustness(sweeps: list[Path]) -> list[str]:
    """Markdown: gap vs honest-only per attack (rows) and defense (columns)."""
    runs = {}
    for summary in (s for sweep in sweeps for s in sweep.rglob("summary.json")):
        o = _overrides(summary.parent)
        runs[o["attack"], _defense(summary.parent)] = json.loads(summary.read_text())
    honest = runs["none", "mean"]["final_eval_loss"]
    attacks = sorted({a for a, _ in runs}, key=lambda a: (a != "none", a))
    lines = [f"Honest-only (no attack, mean): final eval loss {honest:.4f}.", "",
             "| attack | " + " | ".join(DEFENSES) + " |",
             "|---|" + "---|" * len(DEFENSES)]  # fmt: skip
    for a in attacks:
        cells = []
        for d in DEFENSES:
            s = runs.get((a, d))
            cells.append("" if s is None else f"{s['final_eval_loss'] / honest - 1:+.1%}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "Validator (gauntlet) detection, any detector, over every round:", "",
              "| attack | precision | recall |", "|---|---|---|"]  # fmt: skip
    for a in attacks:
        s = runs.get((a, "gauntlet"))
        if s and a == "none" and "detect_flagged_share" in s:
            lines.append(f"| none | honest flagged {s['detect_flagged_share']:.1%} | |")
        elif s and a != "none":
            lines.append(f"| {a} | {s['detect_precision']:.2f} | {s['detect_recall']:.2f} |")
    return lines


def stragglers(sweep: Path) -> list[str]:
    """Markdown: modelled time to the loss every run reaches, per profile and sync policy."""
    runs = {}
    for summary in sweep.rglob("summary.json"):
        o = _overrides(summary.parent)
        rows = load_metrics(summary.parent)
        runs[o["workers"], o["sync"]] = [r for r in rows if "eval/loss" in r]
    target = max(min(r["eval/loss"] for r in rows) for rows in runs.values())
    lines = [f"Target eval loss {target:.4f} (the best loss the slowest-learning run reached).",
             "", "| workers | sync | modelled time to target (s) | final eval loss |",
             "|---|---|---|---|"]  # fmt: skip
    for (workers, sync), rows in sorted(runs.items()):
        t = next(r["time/sim_s"] for r in rows if r["eval/loss"] <= target)
        lines.append(f"| {workers} | {sync} | {t:.1f} | {rows[-1]['eval/loss']:.4f} |")
    return lines


def detection(sweep: Path) -> list[str]:
    """Markdown: the validator's precision / recall per detector and attack, summed over rounds.

    "Excluded from round": the first round (counted from 1, as ``metrics.jsonl``) from which
    every Byzantine payload has weight 0 in every later round. Without an attack, the share
    of payloads flagged (all honest).
    """
    names = ("loss", "assignment", "copy", "")
    lines = ["| attack | loss score | assignment | copy | any | excluded from round "
             "| final eval loss |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for summary in sorted(sweep.rglob("summary.json")):
        attack = _overrides(summary.parent)["attack"]
        s = json.loads(summary.read_text())
        if attack == "none":
            share = f"flagged {s['detect_flagged_share']:.1%} of honest payloads"
            lines.append(f"| none | {share} | | | | | {s['final_eval_loss']:.4f} |")
            continue
        cells = []
        for d in names:
            p = f"detect_{d}_" if d else "detect_"
            cells.append(f"{s[p + 'precision']:.2f} / {s[p + 'recall']:.2f}")
        rows = [r for r in load_metrics(summary.parent) if "adversary/byzantine_weight" in r]
        weights = [r["adversary/byzantine_weight"] for r in rows]
        held = [i for i in range(len(weights)) if all(w == 0 for w in weights[i:])]
        cells.append(str(rows[held[0]]["round"]) if held else "never")  # rounds count from 1
        lines.append(f"| {attack} | " + " | ".join(cells) + f" | {s['final_eval_loss']:.4f} |")
    return lines


def main() -> None:
    """Print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", nargs="+", help="robustness and robustness_gauntlet")
    parser.add_argument("--stragglers", default=None)
    parser.add_argument("--detection", default=None, help="experiment=validator_detection's dir")
    parser.add_argument("--out", default="experiments/results/robustness.md")
    args = parser.parse_args()
    lines = robustness([Path(d) for d in args.sweep_dirs])
    if args.stragglers:
        lines += ["", *stragglers(Path(args.stragglers))]
    if args.detection:
        lines += ["", "Validator detection over 50 rounds (precision / recall):", "",
                  *detection(Path(args.detection))]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
