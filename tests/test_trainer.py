"""Equivalences of the core trainer: special cases of DiLoCo and DDP equal plain training."""

from __future__ import annotations

import math

import pytest
import torch

from diloco.data import ShardSampler, shard_indices
from diloco.models import TinyMLP
from diloco.trainer import Trainer
from diloco.workers import lr_multiplier
from tests.helpers import TINY, make_config, synthetic_corpus


def reference_lr(step, tc):
    """The schedule written out: linear warmup to the base lr, then cosine to min_lr_ratio."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return 1.0
    t = min(1.0, (step - tc.warmup_steps) / (tc.steps - tc.warmup_steps))
    return tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * (1.0 + math.cos(math.pi * t)) / 2


def plain_training(cfg, corpus, batches_per_step):
    """Reference: one model, one AdamW, a standard torch loop over the given batches.

    Written without the trainer's helpers: its own decay (the weight matrices) and no-decay
    (the biases) groups, named by hand, and its own schedule (:func:`reference_lr`).
    """
    torch.manual_seed(cfg.seed)
    model = TinyMLP(corpus.vocab_size, cfg.data.seq_len, hidden=32, n_embd=16)
    opt_cfg = {k: v for k, v in cfg.optimizer.items() if not k.startswith("_")}
    decay = [model.tok_emb.weight, model.fc_in.weight, model.fc_out.weight]
    no_decay = [model.fc_in.bias, model.fc_out.bias]
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, **opt_cfg)
    tc = cfg.train
    for step, (x, y) in enumerate(batches_per_step):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        for g in opt.param_groups:
            g["lr"] = opt_cfg["lr"] * reference_lr(step, tc)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_lr_multiplier_by_hand():
    # 100 steps, 10 of warmup, cosine to 0.1
    assert lr_multiplier(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(4, 100, 10, "cosine", 0.1) == pytest.approx(0.5)
    assert lr_multiplier(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)  # cosine starts
    # a quarter of the way through 110 steps: 0.1 + 0.9 (1 + cos(pi / 4)) / 2
    assert lr_multiplier(35, 110, 10, "cosine", 0.1) == pytest.approx(0.868198, abs=1e-6)
    assert lr_multiplier(55, 100, 10, "cosine", 0.1) == pytest.approx(0.55)  # half way
    assert lr_multiplier(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)  # the end
    assert lr_multiplier(130, 100, 10, "cosine", 0.1) == pytest.approx(0.1)  # held after
    assert lr_multiplier(0, 100, 0, "cosine", 0.0) == pytest.approx(1.0)  # no warmup
    assert lr_multiplier(50, 100, 0, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(3, 100, 10, "constant", 0.1) == pytest.approx(0.4)
    assert lr_multiplier(60, 100, 10, "constant", 0.1) == 1.0


def worker_batches(cfg, corpus, k, steps):
    """The batches worker ``k`` of ``cfg`` sees, step by step."""
    shards = shard_indices(corpus, cfg.workers.count, cfg.data.shard, cfg.seed)
    sampler = ShardSampler(corpus.train, shards[k], cfg.train.batch_size, cfg.seed, k)
    return [sampler.next_batch() for _ in range(steps)]


def test_diloco_k1_h1_outer_sgd1_equals_plain_training(tmp_path):
    cfg = make_config(
        *TINY,
        "workers.count=1",
        "algorithm.inner_steps=1",
        "algorithm.outer_optimizer.lr=1.0",
        "algorithm.outer_optimizer.momentum=0.0",
        "algorithm.outer_optimizer.nesterov=false",
        "train.steps=12",
    )
    corpus = synthetic_corpus()
    trainer = Trainer.from_config(cfg, tmp_path, corpus)
    trainer.fit()
    expected = plain_training(cfg, corpus, worker_batches(cfg, corpus, 0, 12))
    torch.testing.assert_close(trainer.group.global_param.data, expected, rtol=0, atol=1e-6)
    assert trainer.comm.sent.sum() == 0  # one worker sends nothing


def test_ddp_k_workers_equals_one_worker_with_k_times_batch(tmp_path):
    k, steps = 3, 10
    cfg = make_config(*TINY, "algorithm=ddp", f"workers.count={k}", f"train.steps={steps}")
    corpus = synthetic_corpus()
    trainer = Trainer.from_config(cfg, tmp_path, corpus)
    trainer.fit()
    per_worker = [worker_batches(cfg, corpus, i, steps) for i in range(k)]
    big = [
        (
            torch.cat([per_worker[i][s][0] for i in range(k)]),
            torch.cat([per_worker[i][s][1] for i in range(k)]),
        )
        for s in range(steps)
    ]
    expected = plain_training(cfg, corpus, big)
    torch.testing.assert_close(trainer.group.global_param.data, expected, rtol=0, atol=1e-6)
    # every replica stays identical to the global model
    for row in trainer.group.params:
        assert torch.equal(row, trainer.group.global_param.data)
    # ring all-reduce of fp32 gradients every step: 2 (k-1)/k * 4P bytes per worker per step
    expected_bytes = steps * 2 * (k - 1) / k * 4 * trainer.group.num_params
    assert trainer.summary()["comm_bytes_per_worker"] == pytest.approx(expected_bytes, rel=1e-12)


def test_fedavg_equals_diloco_with_outer_sgd_lr1_and_averages_workers(tmp_path):
    common = (*TINY, "workers.count=3", "algorithm.inner_steps=4", "train.steps=8")
    corpus = synthetic_corpus()
    fedavg = Trainer.from_config(make_config(*common, "algorithm=fedavg"), tmp_path / "a", corpus)
    diloco = Trainer.from_config(
        make_config(
            *common,
            "algorithm.outer_optimizer.lr=1.0",
            "algorithm.outer_optimizer.momentum=0.0",
            "algorithm.outer_optimizer.nesterov=false",
        ),
        tmp_path / "b",
        corpus,
    )
    # FedAvg's global model after a round is the mean of the workers' models
    for _ in range(4):
        fedavg._inner_step()
    mean_of_workers = fedavg.group.params.mean(0)
    fedavg._sync()
    torch.testing.assert_close(fedavg.group.global_param.data, mean_of_workers, atol=1e-6, rtol=0)
    fedavg.fit()
    diloco.fit()
    assert torch.equal(fedavg.group.global_param.data, diloco.group.global_param.data)
    assert fedavg.summary()["algorithm"] == "fedavg"


def test_diloco_bytes_are_h_times_fewer_than_ddp(tmp_path):
    h, steps = 5, 20
    corpus = synthetic_corpus()
    common = (*TINY, "workers.count=4", f"train.steps={steps}")
    ddp = Trainer.from_config(make_config(*common, "algorithm=ddp"), tmp_path / "a", corpus)
    dil = Trainer.from_config(
        make_config(*common, f"algorithm.inner_steps={h}"), tmp_path / "b", corpus
    )
    ddp_bytes = ddp.fit()["comm_bytes_per_worker"]
    dil_bytes = dil.fit()["comm_bytes_per_worker"]
    assert ddp_bytes == h * dil_bytes > 0


def test_diloco_workers_resync_and_keep_inner_state(tmp_path):
    cfg = make_config(*TINY, "workers.count=2", "algorithm.inner_steps=3", "train.steps=6")
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    for _ in range(3):
        trainer._inner_step()
    assert not torch.equal(trainer.group.params[0], trainer.group.params[1])
    trainer._sync()
    for row in trainer.group.params:
        assert torch.equal(row, trainer.group.global_param.data)
    assert trainer.group.inner.steps == [3, 3]
    assert trainer.group.inner.exp_avg.abs().sum() > 0
    # Nesterov momentum is kept between rounds
    assert trainer.algorithm.state_dict()["outer"]["state"]


def test_training_reduces_eval_loss(tmp_path):
    cfg = make_config(*TINY, "workers.count=2", "algorithm.inner_steps=5", "train.steps=60")
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    before = trainer.evaluate()
    after = trainer.fit()["final_eval_loss"]
    assert after < before - 1.0


def test_modelled_time_is_compute_plus_ring_allreduce_time(tmp_path):
    k, steps, h = 4, 10, 5
    common = (*TINY, f"workers.count={k}", f"train.steps={steps}", "workers.step_time_s=0.5",
              "comm.bandwidth_mbps=100", "comm.latency_ms=20")  # fmt: skip
    corpus = synthetic_corpus()
    runs = {"ddp": ("algorithm=ddp",), "diloco": (f"algorithm.inner_steps={h}",)}
    for algo, syncs in (("ddp", steps), ("diloco", steps // h)):
        cfg = make_config(*common, *runs[algo])
        trainer = Trainer.from_config(cfg, tmp_path / algo, corpus)
        summary = trainer.fit()
        d = 4 * trainer.group.num_params  # fp32 payload
        per_sync = 2 * (k - 1) / k * d / (100 * 125_000) + 2 * (k - 1) * 0.020
        assert summary["comm_time_s"] == pytest.approx(syncs * per_sync, rel=1e-9)
        assert summary["sim_time_s"] == pytest.approx(steps * 0.5 + syncs * per_sync, rel=1e-9)


@pytest.mark.parametrize(
    ("topology", "sent", "recv"),
    [
        ("ring", lambda n, d: 2 * (n - 1) / n * d, lambda n, d: 2 * (n - 1) / n * d),
        ("butterfly", lambda n, d: 2 * (n - 1) / n * d, lambda n, d: 2 * (n - 1) / n * d),
        ("parameter_server", lambda n, d: d, lambda n, d: d),
        ("object_store", lambda n, d: d, lambda n, d: (n - 1) * d),
    ],
)
def test_topology_sets_bytes_per_worker(tmp_path, topology, sent, recv):
    k, rounds = 4, 2
    cfg = make_config(*TINY, f"workers.count={k}", "algorithm.inner_steps=5", "train.steps=10",
                      f"comm.topology={topology}")  # fmt: skip
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    trainer.fit()
    d = 4 * trainer.group.num_params
    assert trainer.comm.sent[0].item() == pytest.approx(rounds * sent(k, d), rel=1e-12)
    assert trainer.comm.recv[0].item() == pytest.approx(rounds * recv(k, d), rel=1e-12)


def test_streaming_overlap_hides_tau_steps_of_communication(tmp_path):
    k, steps = 4, 20
    common = (*TINY, f"workers.count={k}", f"train.steps={steps}", "workers.step_time_s=0.5",
              "comm.bandwidth_mbps=0.01", "algorithm=streaming_diloco",
              "algorithm.inner_steps=10", "algorithm.fragments=2")  # fmt: skip
    corpus = synthetic_corpus()
    times = {}
    for tau in (0, 2):
        trainer = Trainer.from_config(
            make_config(*common, f"algorithm.tau={tau}"), tmp_path / f"{tau}", corpus
        )
        summary = trainer.fit()
        times[tau] = (summary["sim_time_s"], summary["comm_time_s"])
    syncs = steps // 5
    assert times[0][1] == times[2][1] > syncs * 2 * 0.5  # each exchange longer than 2 steps
    assert times[0][0] == pytest.approx(steps * 0.5 + times[0][1])
    assert times[2][0] == pytest.approx(times[0][0] - syncs * 2 * 0.5)  # tau=2 steps hidden
    assert summary["inner_steps"] == 10  # H, not the round length H/P


def test_what_if_bandwidths_model_the_same_run_at_other_speeds(tmp_path):
    cfg = make_config(*TINY, "workers.count=4", "algorithm=ddp", "train.steps=6",
                      "workers.step_time_s=0.1", "comm.bandwidth_mbps=1000",
                      "comm.what_if_mbps=[100,10]")  # fmt: skip
    summary = Trainer.from_config(cfg, tmp_path, synthetic_corpus()).fit()
    comm = summary["comm_time_s"]
    assert summary["comm_time_s@100mbps"] == pytest.approx(10 * comm)
    assert summary["comm_time_s@10mbps"] == pytest.approx(100 * comm)
    assert summary["sim_time_s@10mbps"] == pytest.approx(6 * 0.1 + 100 * comm)
