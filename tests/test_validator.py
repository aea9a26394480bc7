"""The Gauntlet-style validator ranks and excludes bad contributions."""

from __future__ import annotations

import math

import pytest
import torch

from diloco.adversary.validator import Gauntlet, arrival_times
from diloco.config import ConfigError
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

COMMON = (*TINY, "workers.count=5", "algorithm.inner_steps=5", "train.steps=30",
          "validator=gauntlet", "attack.num_byzantine=1")  # fmt: skip


def run(tmp_path, *overrides):
    trainer = Trainer.from_config(make_config(*COMMON, *overrides), tmp_path, synthetic_corpus())
    weights = []
    weigh = trainer.exchange.validator.weigh

    def spy(*args):
        weights.append(weigh(*args))
        return weights[-1]

    trainer.exchange.validator.weigh = spy
    return trainer, trainer.fit(), torch.stack(weights)


def test_sign_flipper_is_ranked_last_and_excluded(tmp_path):
    trainer, summary, weights = run(tmp_path, "attack=sign_flip")
    scores = trainer.exchange.validator.scores
    assert int(scores.argmin()) == 4  # the Byzantine worker (the last one)
    assert summary["detect_recall"] == 1.0
    assert (weights[:, 4] == 0).all()
    assert (weights[:, :4] > 0).float().mean() >= 0.9  # honest workers keep their weight
    assert summary["detect_precision"] >= 0.9


@pytest.mark.parametrize("attack", ["free_rider", "poison"])
def test_free_rider_and_poison_are_detected(tmp_path, attack):
    extra = ("attack.mode=random",) if attack == "poison" else ()
    trainer, summary, weights = run(tmp_path, f"attack={attack}", *extra)
    assert summary["detect_recall"] >= 0.8
    assert (weights[-3:, 4] == 0).all()  # excluded once the scores have settled
    assert (weights[-3:, :4] > 0).all()


def test_low_index_copier_is_blamed_not_the_worker_it_copies(tmp_path):
    """Worker 0 copies worker 1: the copy arrives later, so worker 0 alone is excluded."""
    trainer, summary, weights = run(tmp_path, "attack=mimic", "attack.ids=[0]")
    assert (weights[:, 0] == 0).all()
    assert (weights[:, 1] > 0).float().mean() >= 0.8
    assert summary["detect_copy_precision"] == 1.0 and summary["detect_copy_recall"] == 1.0


def _gauntlet(arrival=None, **cfg):
    return Gauntlet(
        Gauntlet.Config(**cfg),
        lambda flat, batch: torch.zeros(len(batch[0]), dtype=torch.float64),
        lambda i: (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)),
        lambda: (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)),
        lambda: torch.zeros(4),
        torch.tensor([False, False, True]),
        arrival,
    )


def test_copies_blame_the_later_arrival_or_both_when_together():
    rows = torch.tensor([[1.0, 2, 3, 4], [4, -1, 0, 2], [1.0, 2, 3, 4]])
    together = _gauntlet()._copies(rows, [0, 1, 2])
    assert together.tolist() == [True, False, True]
    later = _gauntlet(lambda p: torch.tensor([1.0, 1.0, 2.0]))._copies(rows, [0, 1, 2])
    assert later.tolist() == [False, False, True]
    earlier = _gauntlet(lambda p: torch.tensor([3.0, 1.0, 2.0]))._copies(rows, [0, 1, 2])
    assert earlier.tolist() == [True, False, False]


def test_payloads_forged_from_others_arrive_after_them():
    readers = torch.tensor([False, False, True, False])
    t = arrival_times([4, 4, 4, 2], [1.0, 2.0, 1.0, 1.0], readers, step_s=0.5, upload_s=0.1)
    assert t.tolist() == pytest.approx([2.1, 1.1, 2.2, 1.1])


def test_outliers_use_a_robust_spread():
    g = _gauntlet(z=3.0, spread_floor=0.1)
    scores = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, -0.5], dtype=torch.float64)
    assert g._outliers(scores).tolist() == [False] * 5 + [True]
    same = torch.full((5,), 0.3, dtype=torch.float64)  # no spread: the floor keeps them in
    assert not g._outliers(same).any()


def test_fresh_batches_come_from_the_training_split_and_change(tmp_path):
    corpus = synthetic_corpus()
    trainer = Trainer.from_config(make_config(*COMMON), tmp_path, corpus)
    v = trainer.exchange.validator
    a, b = v.fresh_batch(), v.fresh_batch()
    train = {tuple(r.tolist()) for r in corpus.train[:, :-1]}
    evals = {tuple(r.tolist()) for r in corpus.eval[:, :-1]}
    rows = {tuple(r.tolist()) for r in torch.cat([a[0], b[0]])}
    assert rows <= train and not rows & (evals - train)
    assert not torch.equal(a[0], b[0])


def test_scores_are_computed_in_eval_mode(tmp_path):
    cfg = make_config(*COMMON, "model=gpt", "model.n_layer=1", "model.n_head=2",
                      "model.n_embd=16", "model.dropout=0.5")  # fmt: skip
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    v = trainer.exchange.validator
    batch = v.fresh_batch()
    theta = trainer.group.global_param.data.clone()
    assert torch.equal(v.loss_at(theta, batch), v.loss_at(theta, batch))
    assert trainer.group.global_model.training  # restored


def test_validator_needs_full_pseudo_gradients(tmp_path):
    with pytest.raises(ConfigError, match="validator=gauntlet"):
        Trainer.from_config(make_config(*TINY, "algorithm=ddp", "validator=gauntlet"), tmp_path,
                synthetic_corpus())  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        ("faults=churn", "faults.rate=0.3", "seed=1"),
        ("faults.events=[{worker:0,round:0,kind:crash},{worker:0,round:3,kind:rejoin}]",),
        ("sync=deadline", "workers=straggler", "workers.count=5", "workers.straggler_slowdown=8"),
    ],
)
def test_absent_and_idle_workers_are_neither_scored_nor_flagged(tmp_path, overrides):
    """A worker of weight 0 (absent, or no step under a deadline) sent nothing to judge."""
    cfg = make_config(*COMMON, "attack=sign_flip", *overrides)
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    v, calls = trainer.exchange.validator, []
    weigh = v.weigh

    def spy(rows, ids, present=None):
        calls.append(torch.ones(len(ids), dtype=torch.bool) if present is None else present)
        return weigh(rows, ids, present)

    v.weigh = spy
    trainer.fit()  # the first round's absent worker has drawn no batch: no crash
    present = torch.cat(calls)
    assert not present.all()  # the regime has weight-0 rows
    assert v.rows_seen == int(present.sum())
    byz_present = sum(int(p[-1]) for p in calls)  # the sign flipper is the last worker
    assert int(v.counts[-1, 2]) == byz_present


def test_validator_state_resumes_exactly(tmp_path):
    """Scores, detection counts, the fresh sampler and every worker's recent batches."""
    over = ("attack=sign_flip", "validator.own_batches=3")
    full, _, _ = run(tmp_path / "a", *over)
    cut = Trainer.from_config(make_config(*COMMON, *over), tmp_path / "b", synthetic_corpus())
    for _ in range(3):
        for _ in range(5):
            cut._inner_step()
        cut._sync()
    state = cut.state_dict()
    resumed = Trainer.from_config(make_config(*COMMON, *over), tmp_path / "c", synthetic_corpus())
    resumed.load_state_dict(state)
    resumed.fit()
    a, b = full.exchange.validator, resumed.exchange.validator
    assert torch.equal(a.scores, b.scores) and torch.equal(a.assign, b.assign)
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(full.group.global_param.data, resumed.group.global_param.data)


def test_a_payload_with_a_non_finite_loss_is_flagged_and_kept_out():
    rows = torch.zeros(4, 4)
    rows[3] = 1.0  # the payload that breaks the model

    def loss_at(flat, batch):
        bad = bool((flat < -0.5).any())
        return torch.full((len(batch[0]),), math.nan if bad else 1.0, dtype=torch.float64)

    batch = (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    g = Gauntlet(Gauntlet.Config(), loss_at, lambda i: batch, lambda: batch,
                 lambda: torch.zeros(4), torch.tensor([False, False, False, True]))  # fmt: skip
    w = g.weigh(rows, [0, 1, 2, 3])
    assert w.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert torch.isfinite(g.scores).all() and torch.isfinite(g.assign).all()
    assert not g.seen[3]
