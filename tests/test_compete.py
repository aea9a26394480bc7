"""Model competitions: the win-rate rule, reward rules, copy detection, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from diloco import compete, miners
from diloco.competition import (
    DetectConfig,
    RewardConfig,
    Submission,
    copy_flags,
    rewards,
    win_rates,
)
from diloco.compose import compose
from diloco.config import ConfigError
from diloco.trainer import Trainer
from tests.helpers import REPO, make_config, synthetic_corpus

MINERS = [
    {"name": "a"},
    {"name": "hi_lr", "overrides": ["optimizer.lr=1e-2"]},
    {"name": "wide", "overrides": ["model.hidden=64"]},
]


def node(*overrides: str, miners=MINERS, copiers=(), corpus=None) -> dict:
    """A small competition of TinyMLP miners (conf/compete.yaml with ``overrides``)."""
    cfg = OmegaConf.to_container(compose(list(overrides), "compete"), resolve=True)
    base = ["algorithm=ddp", "workers.count=1", "experiment=debug", "train.batch_size=8"]
    if corpus is not None:
        base.append(f"data.path={corpus}")
    cfg.update(base=base, miners=list(miners), copiers=list(copiers))
    cfg.update(epochs=3, steps_per_epoch=10, eval_batches=4, eval_batch_size=8)
    cfg["logger"]["progress"] = False
    return cfg


# -- the rules on known numbers ---------------------------------------------------------------


def test_win_rates_on_hand_computed_losses():
    losses = torch.tensor([[1.0, 2.0, 3.0], [1.5, 1.5, 1.5], [2.0, 1.0, 4.0]])
    times = torch.tensor([0.0, 1.0, 2.0])
    # no margin: batch 0: 0 beats 1, 2; 1 beats 2.  batch 1: 2 beats 0, 1; 1 beats 0.
    # batch 2: 1 beats 0, 2; 0 beats 2.  wins: 0 -> 3, 1 -> 4, 2 -> 2, of 3 * 2 = 6
    assert win_rates(losses, times, 0.0).tolist() == pytest.approx([3 / 6, 4 / 6, 2 / 6])
    # margin 0.4: an earlier loss counts 0.6 of itself against a later one.
    # batch 0: 0 (0.6) beats 1, 2; 1 (0.9) beats 2.  batch 1: 0 (1.2) beats 1 (1.5), loses to
    # 2 (1.0); 1 (0.9) beats 2.  batch 2: 0 (1.8) loses to 1 (1.5), beats 2; 1 beats 2.
    # wins: 0 -> 4, 1 -> 4, 2 -> 1
    m = 0.4
    by_hand = torch.zeros(3)
    for b in range(3):
        for i in range(3):
            for j in range(3):
                li = losses[i, b] * (1 - m if times[i] < times[j] else 1)
                lj = losses[j, b] * (1 - m if times[j] < times[i] else 1)
                by_hand[i] += float(i != j and li < lj)
    rates = win_rates(losses, times, m)
    assert rates.tolist() == pytest.approx((by_hand / 6).tolist())
    assert rates.tolist() == pytest.approx([4 / 6, 4 / 6, 1 / 6])  # the earliest gains most


def test_the_margin_protects_an_earlier_submission():
    early = torch.tensor([[1.0] * 4])
    for better, wins in ((0.998, False), (0.99, True)):  # 0.2% and 1% better; margin 0.5%
        losses = torch.cat([early, early * better])
        rates = win_rates(losses, torch.tensor([0.0, 1.0]), 0.005)
        assert rates.tolist() == ([0.0, 1.0] if wins else [1.0, 0.0])
    # an exact copy submitted later never wins; with equal times neither does
    same = torch.cat([early, early])
    assert win_rates(same, torch.tensor([0.0, 1.0]), 0.005).tolist() == [1.0, 0.0]
    assert win_rates(same, torch.tensor([1.0, 1.0]), 0.005).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("rule", ["winner_take_all", "softmax", "proportional"])
def test_every_reward_rule_sums_to_one(rule):
    g = torch.Generator().manual_seed(0)
    cfg = RewardConfig(rule=rule, temperature=0.05)
    for _ in range(20):
        rates = torch.rand(6, generator=g).double()
        eligible = torch.rand(6, generator=g) < 0.7
        eligible[0] = True
        out = rewards(rates, eligible, cfg)
        assert out.sum().item() == pytest.approx(1.0)
        assert (out[~eligible] == 0).all() and (out >= 0).all()
        best = rates.masked_fill(~eligible, -1).argmax()
        assert out.argmax() == best  # every rule pays the best win rate most
    zeros = rewards(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.bool), cfg)
    assert zeros.tolist() == pytest.approx([1 / 3] * 3)  # nobody won: shared evenly
    tie = rewards(torch.tensor([0.5, 0.5, 0.0]).double(), torch.ones(3, dtype=torch.bool), cfg)
    assert tie[0] == tie[1] and tie.sum().item() == pytest.approx(1.0)


def test_sn9_softmax_is_winner_take_most():
    # SN9's temperature 0.01: a 10-point lead in win rate takes all but e^-10 of the reward
    out = rewards(torch.tensor([0.6, 0.5, 0.4]).double(), torch.ones(3, dtype=torch.bool),
                  RewardConfig(rule="softmax", temperature=0.01))  # fmt: skip
    assert out[0] > 0.9999


def test_exact_and_noised_copies_are_flagged():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, generator=g)
    orig = Submission("leader", 0, 1.0, w, "gpt")
    exact = Submission("copier", 0, 2.0, w.clone(), "gpt")
    noised = Submission("copier", 0, 2.0, w + 1e-3 * torch.randn(1000, generator=g), "gpt")
    other = Submission("honest", 0, 2.0, torch.randn(1000, generator=g), "gpt")
    cfg = DetectConfig()
    assert copy_flags(exact, [orig], cfg) == ["copy:hash", "copy:distance"]
    assert copy_flags(noised, [orig], cfg) == ["copy:distance"]
    assert copy_flags(other, [orig], cfg) == []
    assert copy_flags(orig, [exact], cfg) == []  # the original came first
    assert copy_flags(exact, [orig], DetectConfig(hash=False, distance=0.0)) == []


def test_a_copier_cannot_get_the_leader_it_copied_flagged():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(1000, generator=g)
    w1 = w0 + 1e-3 * torch.randn(1000, generator=g)  # the leader's next model moved little
    first = Submission("leader", 0, 1.0, w0, "gpt")
    copy0 = Submission("copier", 0, 2.0, w0.clone(), "gpt")
    second = Submission("leader", 1, 3.0, w1, "gpt")
    copy1 = Submission("copier", 1, 4.0, w1.clone(), "gpt")
    cfg = DetectConfig()
    assert copy_flags(second, [first, copy0], cfg) == []  # credited to its first version
    assert copy_flags(copy0, [first], cfg) == ["copy:hash", "copy:distance"]
    assert copy_flags(copy1, [first, copy0, second], cfg) == ["copy:hash", "copy:distance"]
    assert copy_flags(copy1, [second], cfg) == ["copy:hash", "copy:distance"]


# -- whole competitions -----------------------------------------------------------------------


def test_a_competition_rewards_sum_to_one_and_catches_copiers(tmp_path, corpus_dir):
    copiers = [{"name": "exact", "mode": "exact"}, {"name": "noised", "mode": "noise"},
               {"name": "tuned", "mode": "finetune", "steps": 3}]  # fmt: skip
    summary = compete.run(node(copiers=copiers, corpus=corpus_dir), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert sum(v for k, v in r.items() if k.startswith("reward/")) == pytest.approx(1.0)
    m = summary["miners"]
    assert m["exact"]["flags"] == ["copy:distance", "copy:hash"]
    assert m["noised"]["flags"] == ["copy:distance"]
    assert "copy:distance" in m["tuned"]["flags"]
    for name in ("exact", "noised", "tuned"):
        assert m[name]["mean_reward"] == 0.0
    for name in ("a", "hi_lr", "wide"):
        assert m[name]["flags"] == [] and 0 < m[name]["eval_loss"] < 6  # diloco.train's eval
    assert m["exact"]["eval_loss"] is None
    assert sum(v["reward"] for v in m.values()) == pytest.approx(1.0)
    assert summary["best_loss"] == min(m[n]["final_loss"] for n in ("a", "hi_lr", "wide"))
    size = {n: v["params"] for n, v in m.items() if not v["copier"]}
    total, expected = 0, []  # a submission: uploaded, downloaded by the validator (+1: copy)
    for r in torch.load(tmp_path / "competition.pt", weights_only=False)["rows"]:
        for name, got in r["miners"].items():
            total += 3 * 4 * size[got["source"]] if got["source"] else 2 * 4 * size[name]
        expected.append(total)
    assert [r["comm/bytes_total"] for r in rows] == expected
    assert (tmp_path / "competition.png").stat().st_size > 0
    assert (tmp_path / "a" / "metrics.jsonl").exists()  # each miner's own training log


def test_without_detection_the_margin_still_denies_an_exact_copy(tmp_path, corpus_dir):
    cfg = node("detect.hash=false", "detect.distance=0", copiers=[{"name": "cp"}],
               corpus=corpus_dir)  # fmt: skip
    compete.run(cfg, tmp_path)
    rows = torch.load(tmp_path / "competition.pt", weights_only=False)["rows"]
    assert "cp" not in rows[0]["miners"]  # nothing to copy before the first evaluation
    for r in rows[1:]:
        cp = r["miners"]["cp"]
        source = r["miners"][cp["source"]]
        assert cp["loss"] == source["loss"]  # the same weights, the same loss
        assert cp["flags"] == []  # detection is off
        assert source["win_rate"] >= cp["win_rate"] + 1 / 3  # it beats its copy on every batch


def test_resume_mid_competition_equals_uninterrupted(tmp_path, corpus_dir):
    copiers = [{"name": "tuned", "mode": "finetune", "steps": 2}]
    cfg = node(copiers=copiers, corpus=corpus_dir)
    whole = compete.run(cfg, tmp_path / "whole")

    def stop(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compete.run(cfg, tmp_path / "cut", on_epoch=stop)
    resumed = compete.run({**cfg, "resume": True}, tmp_path / "cut")
    assert resumed == whole
    lines = lambda d: (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert lines(tmp_path / "cut") == lines(tmp_path / "whole")
    for change, key in (({"steps_per_epoch": 5}, "steps_per_epoch"), ({"epochs": 4}, "epochs")):
        with pytest.raises(ConfigError, match=rf"^resume: {key}: differs"):
            compete.run({**cfg, "resume": True, **change}, tmp_path / "cut")
    other = [dict(m) for m in cfg["miners"]]
    other[1]["overrides"] = ["optimizer.lr=2e-3"]
    with pytest.raises(ConfigError, match=r"^resume: miners\[1\].overrides\[0\]: differs"):
        compete.run({**cfg, "resume": True, "miners": other}, tmp_path / "cut")
    a = torch.load(tmp_path / "whole" / "competition.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "competition.pt", weights_only=False)
    for x, y in zip(a["miners"], b["miners"], strict=True):
        assert torch.equal(x["group"]["global"], y["group"]["global"])


def test_sampled_miners_are_seeded_and_validated():
    space = [
        miners.Dimension("optimizer.lr", low=1e-4, high=1e-2, log=True),
        miners.Dimension("model.hidden", choices=[32, 64]),
    ]
    a = miners.sampled(miners.SampleConfig(count=8, space=space), seed=0)
    assert a == miners.sampled(miners.SampleConfig(count=8, space=space), seed=0)
    assert a != miners.sampled(miners.SampleConfig(count=8, space=space), seed=1)
    for spec in a:
        lr = float(spec.overrides[0].split("=")[1])
        assert 1e-4 <= lr <= 1e-2 and spec.overrides[1] in ("model.hidden=32", "model.hidden=64")
    assert len({s.overrides[1] for s in a}) == 2  # both choices drawn in 8 miners
    bad = [miners.Dimension("model.hidden"), miners.Dimension("x", low=2.0, high=1.0)]
    for d in bad:
        with pytest.raises(ConfigError, match=r"^sample.space\[0\]: "):
            miners.sampled(miners.SampleConfig(count=1, space=[d]), 0)


def test_bad_miner_overrides_are_one_line_errors(tmp_path):
    cfg = node()
    cfg["miners"] = [{"name": "a"}, {"name": "b", "overrides": ["optimizer.lrr=1"]}]
    with pytest.raises(ConfigError, match=r"^miners\[1\].overrides: optimizer.lrr=1: unknown"):
        compete.run(cfg, tmp_path)
    cfg["miners"] = [{"name": "a"}, {"name": "a"}]
    with pytest.raises(ConfigError, match="names must differ"):
        compete.run(cfg, tmp_path)
    cfg["miners"] = [{"name": "a"}, {"name": "b", "overrides": ["data.seq_len=16"]}]
    with pytest.raises(ConfigError, match="data.* must be the same"):
        compete.run(cfg, tmp_path)
    cfg["miners"] = [{"name": "a"}, {"name": "b", "overrides": ["sync=deadline"]}]
    with pytest.raises(ConfigError, match=r"^miners\[1\].overrides: .*sync=all"):
        compete.run(cfg, tmp_path)
    cfg["miners"] = [{"name": "a"}, {"name": "b", "data_fraction": 1e-6}]
    with pytest.raises(ConfigError, match=r"^miners\[1\].data_fraction=1e-06: 1 of \d+ train"):
        compete.run(cfg, tmp_path)


def test_the_cli_reports_a_bad_value_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "diloco.compete", "reward.rule=best", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: reward.rule: got 'best'; allowed: winner_take_all, softmax, proportional"
    ]


@pytest.mark.parametrize("model", ["mlp", "gpt"])  # the debug model and the default GPT
def test_fit_until_then_on_equals_one_fit(tmp_path, model):
    cfg = make_config(
        "experiment=debug", f"model={model}", "algorithm=diloco", "algorithm.inner_steps=5",
        "workers.count=2",
    )  # fmt: skip
    assert cfg.model["_target_"].endswith("GPT" if model == "gpt" else "TinyMLP")
    corpus = synthetic_corpus(seq_len=32)
    whole = Trainer.from_config(cfg, tmp_path / "whole", corpus)
    whole.fit()
    parts = Trainer.from_config(cfg, tmp_path / "parts", corpus)
    parts.fit(until=10)
    assert parts.step == 10 and parts.round == 2
    parts.fit()
    assert parts.step == whole.step == cfg.train.steps
    assert torch.equal(parts.group.global_param, whole.group.global_param)
    assert parts.last_eval == whole.last_eval


def test_a_competition_logs_to_an_offline_wandb_run(tmp_path, corpus_dir):
    cfg = node(corpus=corpus_dir)
    cfg.update(epochs=1)
    cfg["logger"]["mode"] = "offline"
    compete.run(cfg, tmp_path)
    assert any((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run written"


def test_the_equal_compute_comparison_runs_and_reports(tmp_path):
    out = tmp_path / "report" / "nk"
    cmd = [sys.executable, "experiments/network_kinds.py", "--seeds", "0", "--steps", "60",
           "--epochs", "2", "--runs", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 5  # the header, DDP, DiLoCo, DiLoCo with a copier, the competition
    runs = [json.loads(line) for line in out.with_name("nk_runs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in runs} == {"ddp", "diloco", "diloco+copier", "competition"}
    by = {r["method"]: r for r in runs}
    assert by["competition"]["copier_flagged"] and by["competition"]["copier_reward"] < 0.01
    assert by["ddp"]["bytes"] > by["diloco"]["bytes"]
    assert out.with_suffix(".png").stat().st_size > 0
