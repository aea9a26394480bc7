"""Every aggregator in a short DiLoCo run with absent workers (all-zero rows of weight 0).

Under churn a departed worker sends nothing (its row is zero, its weight 0); under a deadline
a worker too slow to run one step in the round is left out the same way. The run must end with
a finite loss and finite parameters whatever rule reduces the rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

RULES = {
    "mean": ("aggregator=mean",),
    "median": ("aggregator=median",),
    "trimmed_mean": ("aggregator=trimmed_mean", "aggregator.f=1"),
    "geomed": ("aggregator=geomed",),
    "krum": ("aggregator=krum", "aggregator.f=1"),
    "multikrum": ("aggregator=multikrum", "aggregator.f=1", "aggregator.m=2"),
    "cclip": ("aggregator=cclip",),
    "nnm": ("aggregator=nnm", "aggregator.f=1"),
    "bucketing": ("aggregator=bucketing", "aggregator.s=2"),
}

SCENARIOS = {
    # each worker leaves a round with probability 0.4 and comes back 1 round later
    "churn": (
        "faults=churn",
        "faults.rate=0.4",
        "faults.rejoin_after=1",
        "algorithm.inner_steps=4",
    ),
    # the straggler (speed 1/4) runs floor(3 / 4) = 0 steps a round: weight 0 every round
    "deadline": ("sync=deadline", "workers=straggler", "algorithm.inner_steps=3"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("rule", list(RULES))
def test_rule_trains_with_absent_workers(tmp_path, rule, scenario):
    overrides = (*TINY, "workers.count=4", "train.steps=24", *SCENARIOS[scenario], *RULES[rule])
    trainer = Trainer.from_config(make_config(*overrides), tmp_path, synthetic_corpus())
    summary = trainer.fit()
    assert math.isfinite(summary["final_eval_loss"])
    assert torch.isfinite(trainer.group.global_param.data).all()
    steps = trainer.worker_steps
    if scenario == "deadline":
        assert steps[-1] == 0 and (steps[:-1] == 24).all()  # the straggler was always absent
    else:
        assert steps.min() < steps.max()  # somebody missed a round
