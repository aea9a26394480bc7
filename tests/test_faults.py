"""Faults: crash, leave, rejoin, delay, random churn."""

from __future__ import annotations

import pytest
import torch

from diloco.config import ConfigError, FaultEvent, FaultsConfig
from diloco.faults import Faults
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

FEDAVG = (*TINY, "algorithm=fedavg", "workers.count=4", "algorithm.inner_steps=4",
          "train.steps=24")  # fmt: skip


def test_schedule():
    cfg = FaultsConfig(events=[FaultEvent(1, 2, "crash"), FaultEvent(1, 4, "rejoin"),
                               FaultEvent(0, 3, "delay")])  # fmt: skip
    faults = Faults(cfg, 3, seed=0)
    assert [faults.at(r).present[1] for r in range(6)] == [True, True, False, False, True, True]
    assert faults.at(2).crashed == [1] and faults.at(3).crashed == []
    assert faults.at(3).slowdown == [4.0, 1.0, 1.0] and faults.at(4).slowdown == [1.0] * 3
    with pytest.raises(ConfigError, match="faults.events"):
        Faults(FaultsConfig(events=[FaultEvent(5, 0, "crash")]), 3, seed=0)


def test_random_churn_is_seeded_and_rejoins():
    cfg = FaultsConfig(rate=0.3, rejoin_after=2)
    a = [Faults(cfg, 4, seed=7).at(r).present for r in range(30)]
    assert a == [Faults(cfg, 4, seed=7).at(r).present for r in range(30)]
    away = [not p for row in a for p in row]
    assert 0 < sum(away) < len(away)


def test_crashed_worker_is_left_out_then_rejoins_from_the_global_model(tmp_path):
    trainer = Trainer.from_config(
        make_config(*FEDAVG, "faults=crash_rejoin"), tmp_path, synthetic_corpus()
    )
    seen = []
    sync = trainer._sync

    def spy(steps=None, plan=None):
        before = trainer.group.params.clone()
        overlap = sync(steps, plan)
        seen.append((steps, before, trainer.group.global_param.data.clone()))
        # after every sync every row, the absent worker's included, holds the global model
        assert all(
            torch.equal(row, trainer.group.global_param.data) for row in trainer.group.params
        )
        return overlap

    trainer._sync = spy
    trainer.fit()
    assert [s[1] for s, _, _ in seen] == [4, 4, 0, 0, 4, 4]
    for steps, before, new_global in seen[2:4]:
        present = torch.tensor([s > 0 for s in steps])
        # the average is over the 3 workers present, not over K=4
        torch.testing.assert_close(new_global, before[present].mean(0), atol=1e-6, rtol=0)
    # the crash lost worker 1's AdamW state: it restarted at the rejoin
    steps_of = trainer.group.inner.steps
    assert steps_of == [24, 8, 24, 24]


def test_faults_need_local_rounds(tmp_path):
    with pytest.raises(ConfigError, match="faults"):
        Trainer.from_config(
            make_config(*TINY, "algorithm=ddp", "faults=churn"), tmp_path, synthetic_corpus()
        )


def test_churn_worker_preset_selects_the_churn_faults(tmp_path):
    cfg = make_config(*TINY, "workers=churn", "workers.count=4", "algorithm.inner_steps=2",
                      "train.steps=40")  # fmt: skip
    assert cfg.faults.rate == 0.1 and cfg.workers.profile == "homogeneous"
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    trainer.fit()
    assert trainer.worker_steps.min() < 40  # someone left for a while


def test_error_feedback_keeps_an_absent_worker_residual(tmp_path):
    cfg = make_config(*FEDAVG, "faults=crash_rejoin", "codec=topk", "codec.fraction=0.05",
                      "codec.error_feedback=true")  # fmt: skip
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    residuals = []
    sync = trainer._sync

    def spy(steps=None, plan=None):
        overlap = sync(steps, plan)
        residuals.append(trainer.exchange.stream("")["codec"].residual.clone())
        return overlap

    trainer._sync = spy
    trainer.fit()
    assert len(residuals) == 6 and residuals[1][1].abs().sum() > 0
    # worker 1 is absent in rounds 2 and 3: its residual stays as it left it after round 1
    assert torch.equal(residuals[2][1], residuals[1][1])
    assert torch.equal(residuals[3][1], residuals[1][1])
    assert not torch.equal(residuals[4][1], residuals[1][1])  # it sends again at the rejoin
    assert not torch.equal(residuals[2][0], residuals[1][0])
