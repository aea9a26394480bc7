"""Data poisoning by Byzantine workers."""

from __future__ import annotations

import pytest
import torch

from diloco.adversary.poison import PoisonedSampler
from diloco.config import ConfigError
from diloco.data import ShardSampler
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus


def sampler():
    corpus = synthetic_corpus()
    return ShardSampler(corpus.train, torch.arange(64), 4, seed=0, worker_id=0)


def test_shuffle_keeps_tokens_and_random_changes_them():
    clean_x, clean_y = sampler().next_batch()
    x, y = PoisonedSampler(sampler(), "shuffle", 256, seed=0, worker=0).next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])  # still next-token pairs
    full = torch.cat([x, y[:, -1:]], 1).sort(1).values
    assert torch.equal(full, torch.cat([clean_x, clean_y[:, -1:]], 1).sort(1).values)
    assert not torch.equal(x, clean_x)
    rx, _ = PoisonedSampler(sampler(), "random", 256, seed=0, worker=0).next_batch()
    assert (rx != clean_x).float().mean() > 0.9


def test_poisoned_sampler_resumes_exactly():
    a = PoisonedSampler(sampler(), "random", 256, seed=0, worker=1)
    a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()
    b = PoisonedSampler(sampler(), "random", 256, seed=0, worker=1)
    b.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(b.next_batch(), expected, strict=True))


def test_poisoned_worker_hurts_the_mean_in_training(tmp_path):
    common = (*TINY, "workers.count=3", "algorithm.inner_steps=5", "train.steps=40")
    corpus = synthetic_corpus()
    honest = Trainer.from_config(make_config(*common), tmp_path / "h", corpus).fit()[
        "final_eval_loss"
    ]
    trainer = Trainer.from_config(
        make_config(*common, "attack=poison", "attack.mode=random", "attack.num_byzantine=1"),
        tmp_path / "p",
        corpus,
    )
    assert isinstance(trainer.samplers[2], PoisonedSampler)
    assert not isinstance(trainer.samplers[0], PoisonedSampler)
    assert trainer.fit()["final_eval_loss"] > honest + 0.05
    with pytest.raises(ConfigError, match="attack.mode"):
        Trainer.from_config(
            make_config(*common, "attack=poison", "attack.mode=flip"), tmp_path, corpus
        )


def test_poison_random_option_is_random_token_poison():
    from diloco.config import build
    from tests.helpers import make_config

    attack = build(make_config("attack=poison_random").attack, "attack")
    assert attack.cfg.mode == "random" and not attack.forges_payloads
