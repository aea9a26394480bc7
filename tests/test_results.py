"""Reading runs back for notebooks: summaries, curves, plots."""

from __future__ import annotations

import json

from diloco.metrics import JsonlLogger
from diloco.results import eval_curve, load_summaries, plot_eval
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus


def test_curves_summaries_and_plot(tmp_path):
    cfg = make_config(*TINY, "workers.count=2", "algorithm.inner_steps=5", "train.steps=20",
                      "train.eval_every=10")  # fmt: skip
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg, run_dir, synthetic_corpus())
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    summary = trainer.fit(logger)
    logger.close()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    tokens, losses = eval_curve(run_dir)
    assert tokens == [10 * 4 * 16, 20 * 4 * 16] and losses[-1] == summary["final_eval_loss"]
    assert load_summaries(tmp_path) == [summary]
    plot_eval({"diloco": run_dir}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
