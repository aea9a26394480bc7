"""sync=async: workers push when they finish; stale pseudo-gradients weigh less."""

from __future__ import annotations

import pytest
import torch

from diloco import checkpoint
from diloco.asynchronous import AsyncSchedule
from diloco.config import ConfigError
from diloco.trainer import Trainer
from tests.helpers import TINY, count_rounds, make_config, synthetic_corpus

FEDAVG = (*TINY, "algorithm=fedavg", "workers.count=4", "algorithm.inner_steps=8",
          "workers.step_time_s=0.1", "train.lr_schedule=constant")  # fmt: skip


def test_schedule_order_staleness_and_weights():
    sched = AsyncSchedule(h=4, step_s=0.5, speeds=[1.0, 1.0, 0.25], exponent=1.0)
    served = []
    for _ in range(8):
        i = sched.next_worker()
        served.append((i, *sched.weight(i), sched.served(i, comm_s=0.0)))
    # workers 0 and 1 finish every 2 s, the straggler every 8 s (after them on the tie)
    assert [s[0] for s in served] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [s[3] for s in served] == [2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 8.0, 8.0]
    assert served[1][1:3] == (1, pytest.approx(1 / 3))  # s <= K-1: 1/K
    i = sched.next_worker()
    assert i == 2 and sched.weight(2) == (8, pytest.approx(3 / 9 / 3))  # (K/(1+s))^a / K
    sched.served(2, comm_s=1.0)
    assert sched.finish[2] == 8.0 + 1.0 + 8.0  # push and pull delay the next cycle


def test_one_cycle_of_equal_workers_equals_a_synchronous_fedavg_round(tmp_path):
    corpus = synthetic_corpus()
    sync = Trainer.from_config(make_config(*FEDAVG, "train.steps=8"), tmp_path / "a", corpus)
    asy = Trainer.from_config(
        make_config(*FEDAVG, "train.steps=8", "sync=async"), tmp_path / "b", corpus
    )
    sync.fit(), asy.fit()
    torch.testing.assert_close(asy.group.global_param.data, sync.group.global_param.data)
    assert asy.round == 4 and sync.round == 1
    # each worker pulled the model as it was after its own push
    torch.testing.assert_close(asy.group.params[3], sync.group.params[3])


def test_straggler_is_stale_and_weighs_less_while_fast_workers_run_more_steps(tmp_path):
    no_network_time = "comm.bandwidth_mbps=1e12"
    cfg = make_config(*FEDAVG, "sync=async", "workers=straggler", "train.steps=64", no_network_time)
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    weights = []
    trainer.algorithm.outer.step = _spy(trainer, weights)
    summary = trainer.fit()
    steps = trainer.worker_steps.tolist()
    assert steps == [64, 64, 64, 16]  # 4x slower: a quarter of the steps in the same time
    assert summary["sim_time_s"] == pytest.approx(6.4, rel=0.01)
    straggler = [w for i, w in weights if i == 3]
    others = [w for i, w in weights if i != 3]
    assert len(straggler) == 2 and max(straggler) < min(others) == pytest.approx(1 / 4)


def _spy(trainer: Trainer, seen: list) -> object:
    step = trainer.algorithm.outer.step
    sched = trainer.policy.schedule

    def spied(*args, **kwargs):
        i = sched.next_worker()
        seen.append((i, sched.weight(i)[1]))
        return step(*args, **kwargs)

    return spied


def test_a_run_shorter_than_one_cycle_serves_nobody_and_runs_no_round(tmp_path):
    trainer = Trainer.from_config(
        make_config(*FEDAVG, "sync=async", "train.steps=6"), tmp_path, synthetic_corpus()
    )
    summary = trainer.fit()
    assert trainer.round == 0 and trainer.policy.schedule.version == 0
    assert trainer.worker_steps.tolist() == [0, 0, 0, 0]
    assert summary["final_eval_loss"] == summary["final_eval_loss"]  # evaluated, not NaN


def test_resume_equals_uninterrupted(tmp_path):
    corpus = synthetic_corpus()
    common = (*FEDAVG, "sync=async", "workers=straggler")
    straight = Trainer.from_config(make_config(*common, "train.steps=48"), tmp_path / "a", corpus)
    straight.fit()
    first = Trainer.from_config(make_config(*common, "train.steps=24"), tmp_path / "b", corpus)
    first.fit()
    path = tmp_path / "ckpt.pt"
    checkpoint.save(first.state_dict(), path)
    resumed = Trainer.from_config(make_config(*common, "train.steps=48"), tmp_path / "c", corpus)
    resumed.load_state_dict(checkpoint.load(path))
    # it continues where the first run stopped, and runs only the rounds left
    assert (resumed.step, resumed.round) == (first.step, first.round)
    assert 0 < first.round < straight.round
    assert torch.equal(resumed.worker_steps, first.worker_steps)
    rounds_run = count_rounds(resumed)
    resumed.fit()
    assert torch.equal(straight.group.global_param.data, resumed.group.global_param.data)
    assert torch.equal(straight.group.params, resumed.group.params)
    assert straight.round == resumed.round
    assert rounds_run == list(range(first.round, straight.round))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algorithm=streaming_diloco", "algorithm"),
        ("aggregator=median", "aggregator"),
        ("attack=sign_flip", "attack"),
        ("workers.step_time_s=null", "workers.step_time_s"),
    ],
)
def test_what_async_cannot_run_names_the_key(override, key, tmp_path):
    extra = ("attack.num_byzantine=1",) if override.startswith("attack") else ()
    with pytest.raises(ConfigError) as err:
        Trainer.from_config(
            make_config(*FEDAVG, "sync=async", override, *extra), tmp_path, synthetic_corpus()
        )
    assert err.value.key.startswith(key)
