"""Worker profiles and the modelled time of heterogeneous workers."""

from __future__ import annotations

import pytest

from diloco.config import ConfigError, WorkersConfig
from diloco.profiles import worker_profiles
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus


def test_presets():
    assert worker_profiles(WorkersConfig(count=3), 0).speeds == (1.0, 1.0, 1.0)
    straggler = worker_profiles(WorkersConfig(count=4, profile="straggler"), 0)
    assert straggler.speeds == straggler.bandwidth_factors == (1.0, 1.0, 1.0, 0.25)


def test_longtail_is_seeded_per_worker_not_per_count():
    four = worker_profiles(WorkersConfig(count=4, profile="longtail"), seed=1)
    eight = worker_profiles(WorkersConfig(count=8, profile="longtail"), seed=1)
    other = worker_profiles(WorkersConfig(count=4, profile="longtail"), seed=2)
    assert four.speeds == eight.speeds[:4] and four.speeds != other.speeds
    assert len(set(eight.speeds)) == 8 and all(s > 0 for s in eight.speeds)


def test_overrides_and_their_errors():
    cfg = WorkersConfig(count=2, profile="straggler", speeds=[2.0, 0.5])
    assert worker_profiles(cfg, 0).speeds == (2.0, 0.5)
    with pytest.raises(ConfigError, match="workers.speeds: 3 values for workers.count=2"):
        worker_profiles(WorkersConfig(count=2, speeds=[1.0, 1.0, 1.0]), 0)


def test_straggler_sets_the_pace_of_compute_and_of_the_exchange(tmp_path):
    k, steps, h, bw = 4, 10, 5, 100.0
    cfg = make_config(*TINY, "workers=straggler", f"workers.count={k}", "workers.step_time_s=0.1",
                      f"train.steps={steps}", f"algorithm.inner_steps={h}",
                      f"comm.bandwidth_mbps={bw}")  # fmt: skip
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    summary = trainer.fit()
    d = 4 * trainer.group.num_params
    per_sync = 2 * (k - 1) / k * d / (0.25 * bw * 125_000)  # slowest link: a quarter of bw
    assert summary["comm_time_s"] == pytest.approx(steps // h * per_sync, rel=1e-9)
    assert summary["sim_time_s"] == pytest.approx(steps * 0.1 * 4 + steps // h * per_sync)
