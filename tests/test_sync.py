"""Sync policies: deadline rounds with heterogeneous workers."""

from __future__ import annotations

import pytest
import torch

from diloco.config import ConfigError
from diloco.profiles import Profiles
from diloco.sync import All, Deadline
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

FEDAVG = (*TINY, "algorithm=fedavg", "workers.count=4", "algorithm.inner_steps=8",
          "train.steps=16", "workers.step_time_s=0.1")  # fmt: skip


def test_steps_per_worker():
    def steps(policy, budget, speeds):
        cfg = policy.Config(budget) if policy is Deadline else policy.Config()
        return policy(cfg, inner_steps=8, profiles=Profiles((), ())).steps_for(8, speeds)

    assert steps(All, 1.0, [1.0, 0.25]) == [8, 8]
    assert steps(Deadline, 1.0, [1.0, 0.25, 2.0, 0.1]) == [8, 2, 8, 0]
    assert steps(Deadline, 0.5, [1.0, 0.25]) == [4, 1]


def test_deadline_with_equal_speeds_equals_all(tmp_path):
    corpus = synthetic_corpus()
    a = Trainer.from_config(make_config(*FEDAVG), tmp_path / "a", corpus)
    b = Trainer.from_config(make_config(*FEDAVG, "sync=deadline"), tmp_path / "b", corpus)
    sa, sb = a.fit(), b.fit()
    assert torch.equal(a.group.global_param.data, b.group.global_param.data)
    assert sa["final_eval_loss"] == sb["final_eval_loss"]
    assert sa["sim_time_s"] == sb["sim_time_s"]


def test_deadline_weights_payloads_by_steps_run(tmp_path):
    trainer = Trainer.from_config(
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

    def spy(steps=None, plan=None):
        seen.append((trainer.group.params.clone(), steps))
        overlap = sync(steps, plan)
        seen[-1] += (trainer.group.global_param.data.clone(),)
        return overlap

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
    summary = Trainer.from_config(cfg, tmp_path, synthetic_corpus()).fit()
    assert summary["sim_time_s"] - summary["comm_time_s"] == pytest.approx(16 * 0.1 * 4)


def test_deadline_needs_local_steps(tmp_path):
    with pytest.raises(ConfigError, match="sync=deadline"):
        Trainer.from_config(
            make_config(*TINY, "algorithm=ddp", "sync=deadline"), tmp_path, synthetic_corpus()
        )
