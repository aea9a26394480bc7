"""The builder and the one plug-in mechanism: every part from a ``_target_`` node.

A new rule or sync policy is a class with a ``Config`` dataclass, named from the command
line or a conf/ file; nothing in the trainer or the builder names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from diloco.adversary.aggregators import Aggregator
from diloco.config import ConfigError
from diloco.sync import All
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

DILOCO = (*TINY, "workers.count=4", "algorithm.inner_steps=4", "train.steps=8")


class ScaledMean(Aggregator):
    """A user's rule: the mean times ``scale`` (records every call)."""

    calls: list[int] = []

    @dataclass
    class Config:
        """``scale``: factor on the mean."""

        scale: float = field(default=1.0, metadata={"gt": 0.0})

    def _aggregate(self, rows, w, n_all):
        ScaledMean.calls.append(rows.shape[0])
        return rows.mean(0) * self.cfg.scale


class EveryOtherWorker(All):
    """A user's sync policy: in round r only workers with id parity r % 2 run and send."""

    def plan(self, progress, faults):
        plan = super().plan(progress, faults)
        if plan is not None:
            plan.steps = [s if i % 2 == progress.round % 2 else 0 for i, s in enumerate(plan.steps)]
            plan.weights = torch.tensor(plan.steps, dtype=torch.float32)
        return plan


def test_a_new_aggregator_is_a_class_and_a_target(tmp_path):
    target = "aggregator._target_=tests.test_build.ScaledMean"
    cfg = make_config(*DILOCO, "algorithm=fedavg", target, "+aggregator.scale=0.5")
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    assert ScaledMean.calls[-1:] == [4]  # probed with workers.count rows when built
    ScaledMean.calls.clear()
    before = trainer.group.global_param.data.clone()
    rows = []
    sync = trainer._sync

    def spy(steps=None, plan=None):
        rows.append(trainer.algorithm.payload(trainer.group).rows.clone())
        return sync(steps, plan)

    trainer._sync = spy
    trainer.fit()
    assert ScaledMean.calls == [4, 4]  # one call per round, every worker's row gathered
    # FedAvg (outer SGD lr 1): each round moves the model by -0.5 * mean pseudo-gradient
    moved = before - sum(0.5 * r.mean(0) for r in rows)
    torch.testing.assert_close(trainer.group.global_param.data, moved, atol=1e-6, rtol=0)


def test_a_new_sync_policy_is_a_class_and_a_target(tmp_path):
    cfg = make_config(*DILOCO, "sync._target_=tests.test_build.EveryOtherWorker")
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    assert isinstance(trainer.policy, EveryOtherWorker)
    trainer.fit()
    assert trainer.worker_steps.tolist() == [4, 4, 4, 4]  # each ran one of the two rounds


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("codec=topk", "+codec.bogus=1"), "codec.bogus: unknown key"),
        (("+aggregator.f=1",), "aggregator.f: unknown key"),
        (("sync=deadline", "sync.budget=0"), "sync.budget=0.0: must be > 0.0"),
        (("comm.timeout_s=-1",), "comm.timeout_s=-1.0: must be > 0.0"),
        (("validator=gauntlet", "validator.beta=2"), "validator.beta=2.0: must be < 1.0"),
        (("attack=poison", "attack.mode=flip"), "attack.mode: got 'flip'"),
        (("aggregator._target_=nowhere.Rule",), "aggregator._target_: cannot import"),
        (("~sync._target_",), "sync: missing; pick one from conf/sync"),
    ],
)
def test_plugin_values_are_checked_when_the_config_is_parsed(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        make_config(*TINY, *overrides)


def test_demo_bypasses_the_exchange_and_says_which_groups_to_reset(tmp_path):
    cfg = make_config(*TINY, "algorithm=demo", "codec=int8", "aggregator=median")
    with pytest.raises(ConfigError, match="algorithm=demo: .*codec, aggregator must stay"):
        Trainer.from_config(cfg, tmp_path, synthetic_corpus())


def test_a_run_bigger_than_free_memory_is_refused_before_training(tmp_path, monkeypatch):
    import diloco.build
    from diloco.config import build

    cfg = make_config(*DILOCO)
    corpus = synthetic_corpus()
    model = build(cfg.model, "model", vocab_size=256, block_size=cfg.data.seq_len)
    p = sum(t.numel() for t in model.parameters())
    need = diloco.build.memory_estimate(cfg, model, vocab_size=256, local=4)
    # 4 workers x (parameters, gradients) + the global model, fp32; logits and their
    # gradient for the 4 workers of the batched path, fp32
    b, t = cfg.train.batch_size, cfg.data.seq_len
    assert need == 4 * p * 9 + 4 * 2 * b * t * 256 * 4
    loop = make_config(*DILOCO, "workers.execution=loop")
    assert diloco.build.memory_estimate(loop, model, 256, 4) == 4 * p * 9 + 4 * 2 * b * t * 256
    monkeypatch.setattr(diloco.build, "available_memory", lambda device: need - 1)
    with pytest.raises(ConfigError, match=r"4 workers of this model and batch need at least"):
        Trainer.from_config(cfg, tmp_path, corpus)
    monkeypatch.setattr(diloco.build, "available_memory", lambda device: need)
    Trainer.from_config(cfg, tmp_path, corpus)


def test_a_corpus_too_small_for_one_batch_per_worker_is_refused(tmp_path):
    cfg = make_config(*DILOCO, "train.batch_size=100")  # 4 x 100 > 256 train sequences
    with pytest.raises(ConfigError, match="packs into 256 train / 16 eval .* need 400"):
        Trainer.from_config(cfg, tmp_path, synthetic_corpus())
