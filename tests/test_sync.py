"""Sync policies: deadline rounds with heterogeneous workers."""

from __future__ import annotations

import pytest
import torch

from diloco.config import ConfigError
from diloco.sync import steps_per_worker
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

FEDAVG = (*TINY, "algorithm=fedavg", "workers.count=4", "algorithm.inner_steps=8",
          "train.steps=16", "workers.step_time_s=0.1")  # fmt: skip


def test_steps_per_worker():
    assert steps_per_worker("all", 8, [1.0, 0.25], 1.0) == [8, 8]
    assert steps_per_worker("deadline", 8, [1.0, 0.25, 2.0, 0.1], 1.0) == [8, 2, 8, 0]
    assert steps_per_worker("deadline", 8, [1.0, 0.25], 0.5) == [4, 1]


def test_deadline_with_equal_speeds_equals_all(tmp_path):
    corpus = synthetic_corpus()
    a = Trainer(make_config(*FEDAVG), tmp_path / "a", corpus)
    b = Trainer(make_config(*FEDAVG, "sync=deadline"), tmp_path / "b", corpus)
    sa, sb = a.fit(), b.fit()
    assert torch.equal(a.group.global_param.data, b.group.global_param.data)
    assert sa["final_eval_loss"] == sb["final_eval_loss"]
    assert sa["sim_time_s"] == sb["sim_time_s"]


def test_deadline_weights_payloads_by_steps_run(tmp_path):
    trainer = Trainer(
        make_config(
            *FEDAVG,
            "sync=deadline",
            "workers=straggler",
            "workers.count=4",
            "workers.step_time_s=0.1",
        ),  # fmt: skip
        tmp_path,
        synthetic_corpus(),
    )
    seen = []
    sync = trainer._sync

    def spy(steps=None):
        seen.append((trainer.group.params.clone(), steps))
        sync(steps)
        seen[-1] += (trainer.group.global_param.data.clone(),)

    trainer._sync = spy
    summary = trainer.fit()
    for params, steps, new_global in seen:
        assert steps == [8, 8, 8, 2]  # the straggler (speed 1/4) runs a quarter of H
        w = torch.tensor(steps, dtype=torch.float32)[:, None]
        # FedAvg: the new global model is the step-weighted mean of the workers' models
        torch.testing.assert_close(new_global, (w * params).sum(0) / w.sum(), atol=1e-6, rtol=0)
    assert trainer.worker_steps.tolist() == [16, 16, 16, 4]
    assert summary["tokens_per_worker"] == (16 * 3 + 4) / 4 * 4 * 16
    # a round lasts H reference steps: the straggler no longer sets the pace of compute
    assert summary["sim_time_s"] - summary["comm_time_s"] == pytest.approx(16 * 0.1)


def test_all_waits_for_the_straggler(tmp_path):
    cfg = make_config(*FEDAVG, "workers=straggler", "workers.count=4", "workers.step_time_s=0.1")
    summary = Trainer(cfg, tmp_path, synthetic_corpus()).fit()
    assert summary["sim_time_s"] - summary["comm_time_s"] == pytest.approx(16 * 0.1 * 4)


def test_deadline_needs_local_steps(tmp_path):
    with pytest.raises(ConfigError, match="sync=deadline"):
        Trainer(make_config(*TINY, "algorithm=ddp", "sync=deadline"), tmp_path, synthetic_corpus())
