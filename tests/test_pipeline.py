"""The exchange pipeline inside the trainer: codecs, attacks, validation, robust aggregation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diloco.config import ConfigError
from diloco.trainer import Trainer
from tests.helpers import REPO, TINY, count_rounds, make_config, plugin, synthetic_corpus

DILOCO = (*TINY, "workers.count=4", "algorithm.inner_steps=5", "train.steps=40")


def run(tmp_path, *overrides):
    trainer = Trainer.from_config(make_config(*DILOCO, *overrides), tmp_path, synthetic_corpus())
    return trainer, trainer.fit()


def test_int8_codec_bytes_follow_the_encoding(tmp_path):
    trainer, summary = run(tmp_path, "codec=int8", "codec.block=64")
    p = trainer.group.num_params
    encoded = p + 4 * math.ceil(p / 64)  # int8 codes + one fp32 scale per block
    rounds = 40 // 5
    expected = rounds * 2 * 3 / 4 * encoded  # ring all-reduce of the encoded payload
    assert summary["comm_bytes_per_worker"] == pytest.approx(expected, rel=1e-12)
    assert summary["final_eval_loss"] < 4.0


def test_error_feedback_state_survives_a_checkpoint(tmp_path):
    overrides = ("codec=topk", "codec.fraction=0.05")
    a = Trainer.from_config(make_config(*DILOCO, *overrides), tmp_path / "a", synthetic_corpus())
    a.fit()
    b = Trainer.from_config(make_config(*DILOCO, *overrides), tmp_path / "b", synthetic_corpus())
    for _ in range(4):  # stop half way, as a killed run would
        for _ in range(5):
            b._inner_step()
        b._sync()
    state = b.state_dict()
    assert state["exchange"]["streams"][""]["codec"]["residual"].abs().sum() > 0
    c = Trainer.from_config(make_config(*DILOCO, *overrides), tmp_path / "c", synthetic_corpus())
    c.load_state_dict(state)
    assert (c.step, c.round) == (20, 4)
    assert torch.equal(
        c.exchange.stream("")["codec"].residual, b.exchange.stream("")["codec"].residual
    )
    rounds_run = count_rounds(c)
    c.fit()
    assert rounds_run == [4, 5, 6, 7]  # only the rounds left
    assert torch.equal(a.group.global_param.data, c.group.global_param.data)


def test_sign_flip_breaks_mean_but_not_trimmed_mean(tmp_path):
    honest = run(tmp_path / "h")[1]["final_eval_loss"]
    attack = ("attack=sign_flip", "attack.num_byzantine=1", "attack.scale=20.0")
    broken = run(tmp_path / "m", *attack)[1]["final_eval_loss"]
    robust = run(tmp_path / "t", *attack, "aggregator=trimmed_mean", "aggregator.f=1")[1]
    assert broken > honest + 0.5
    assert robust["final_eval_loss"] < honest + 0.1


@pytest.mark.parametrize("kind", ["nan", "inf", "huge", "wrong_shape", "wrong_dtype"])
def test_malformed_payloads_are_excluded_and_the_run_goes_on(tmp_path, kind, caplog):
    trainer, summary = run(tmp_path, "attack=malformed", f"attack.kind={kind}", "attack.ids=[2]")
    assert math.isfinite(summary["final_eval_loss"])
    assert torch.isfinite(trainer.group.global_param.data).all()
    assert trainer.exchange.stats.excluded_total == 40 // 5  # once per round
    assert "payload excluded: worker 2" in caplog.text


def test_excluded_payloads_are_logged_as_metrics(tmp_path):
    from diloco.metrics import JsonlLogger

    trainer = Trainer.from_config(
        make_config(*DILOCO, "attack=malformed", "attack.kind=nan"), tmp_path, synthetic_corpus()
    )
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    trainer.fit(logger)
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["adversary/excluded"] for r in rows if "round" in r] == [1] * 4  # steps 10..40


def test_bad_plugin_values_name_their_key(tmp_path):
    with pytest.raises(ConfigError, match="attack.num_byzantine=4"):
        run(tmp_path, "attack=sign_flip", "attack.num_byzantine=4")
    with pytest.raises(ConfigError, match="codec"):
        run(tmp_path, "codec=int8", "codec.block=0")


def test_sparse_payloads_are_all_gathered(tmp_path):
    trainer, summary = run(
        tmp_path, "codec=topk", "codec.fraction=0.1", "codec.error_feedback=false"
    )
    p = trainer.group.num_params
    k = math.ceil(0.1 * p)
    index_bytes = math.ceil(k * max(1, (p - 1).bit_length()) / 8)
    expected = (40 // 5) * 3 * (4 * k + index_bytes)  # all-gather: (n-1) payloads per round
    assert summary["comm_bytes_per_worker"] == pytest.approx(expected, rel=1e-12)


def test_sparseloco_config_runs(tmp_path):
    cfg = make_config(*DILOCO, "algorithm=sparseloco", "codec.chunk=64", "codec.k=16")
    assert cfg.codec["_target_"].endswith(".ChunkTopK") and cfg.algorithm["name"] == "sparseloco"
    assert cfg.codec["error_feedback"] and cfg.codec["ef_decay"] == 0.95
    assert cfg.algorithm["outer_optimizer"] == {
        "_target_": "torch.optim.SGD",
        "lr": 1.0,
        "momentum": 0.0,
    }
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    before = trainer.evaluate()
    summary = trainer.fit()
    assert summary["final_eval_loss"] < before - 0.2


@pytest.mark.parametrize("codec", sorted(p.stem for p in (REPO / "conf" / "codec").glob("*.yaml")))
def test_every_codec_config_trains(tmp_path, codec):
    cfg = make_config(*DILOCO, f"codec={codec}", "train.steps=10")
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    before = trainer.evaluate()
    summary = trainer.fit()
    assert summary["final_eval_loss"] < before
    assert summary["comm_bytes_per_worker"] > 0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("aggregator=trimmed_mean", "aggregator.f=2"), "aggregator: f=2"),
        (("aggregator=multikrum", "aggregator.m=9"), "aggregator"),
        (("attack=sign_flip", "attack.num_byzantine=abc"), "attack.num_byzantine"),
        (("attack=sign_flip", "attack.ids=[0,1,2,3]"), "attack.ids=[0, 1, 2, 3]"),
        (("attack=mimic", "attack.target=5"), "attack"),
        (("codec=topk", "codec.ef_decay=2.0"), "codec.ef_decay=2.0"),
        (("comm.what_if_mbps=[0]",), "comm.what_if_mbps=[0.0]: must be > 0.0"),
    ],
)
def test_bad_exchange_settings_fail_before_training(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        Trainer.from_config(make_config(*DILOCO, *overrides), tmp_path, synthetic_corpus())


def test_demo_rejects_exchange_plugins_it_bypasses(tmp_path):
    cfg = make_config(*TINY, "algorithm=demo", "attack=sign_flip")
    with pytest.raises(ConfigError, match="algorithm=demo"):
        Trainer.from_config(cfg, tmp_path, synthetic_corpus())


def test_streaming_keeps_aggregator_and_attack_state_per_fragment(tmp_path):
    common = ("algorithm=streaming_diloco", "algorithm.inner_steps=10", "algorithm.fragments=2",
              "algorithm.tau=0")  # fmt: skip
    for extra in (("aggregator=cclip",), ("attack=stale", "attack.num_byzantine=1")):
        trainer, summary = run(tmp_path / extra[0], *common, *extra)
        assert math.isfinite(summary["final_eval_loss"])
        assert set(trainer.exchange.streams) == {"fragment0", "fragment1"}


def test_sign_payloads_are_all_gathered(tmp_path):
    trainer, summary = run(tmp_path, "codec=sign", "codec.error_feedback=false")
    p = trainer.group.num_params
    expected = (40 // 5) * 3 * (math.ceil(p / 8) + 4)  # 1 bit per entry + one fp32 scale
    assert summary["comm_bytes_per_worker"] == pytest.approx(expected, rel=1e-12)


def _residual_spy(trainer):
    """Record (steps, residual before, residual after) around every sync of ``trainer``."""
    seen = []
    sync = trainer._sync

    def spy(steps=None, plan=None):
        codec = trainer.exchange.stream("")["codec"]
        before = None if codec.residual is None else codec.residual.clone()
        overlap = sync(steps, plan)
        seen.append((list(steps), before, codec.residual.clone()))
        return overlap

    trainer._sync = spy
    return seen


EF_DEADLINE = ("sync=deadline", "algorithm.inner_steps=3", "train.steps=12", "codec=topk",
               "codec.error_feedback=true", "codec.fraction=0.05")  # fmt: skip


def test_error_feedback_keeps_a_zero_step_worker_residual(tmp_path):
    # a worker delayed 4x for round 2 runs 0 of its 3 steps: it sends nothing that round
    events = "faults.events=[{worker:1,round:2,kind:delay}]"
    cfg = make_config(*DILOCO, *EF_DEADLINE, events)
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    seen = _residual_spy(trainer)
    trainer.fit()
    assert [s[1] for s, _, _ in seen] == [3, 3, 0, 3]
    steps, before, after = seen[2]
    assert before[1].abs().sum() > 0  # it had a residual from the rounds it sent
    assert torch.equal(after[1], before[1])  # kept exactly: not sent, not decayed
    assert not torch.equal(after[0], before[0])  # the senders' residuals moved on


def test_error_feedback_residual_of_a_straggler_that_never_sends_stays_zero(tmp_path):
    # at speed 1/4 the straggler runs floor(3 / 4) = 0 steps every round
    cfg = make_config(*DILOCO, *EF_DEADLINE, "workers=straggler", "codec.ef_decay=0.5")
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    seen = _residual_spy(trainer)
    trainer.fit()
    assert all(s == [3, 3, 3, 0] for s, _, _ in seen)
    residual = seen[-1][2]
    assert torch.equal(residual[3], torch.zeros_like(residual[3]))
    assert (residual[:3].abs().sum(1) > 0).all()


@pytest.mark.parametrize("attack", ["alie", "sign_flip"])
def test_forged_payloads_go_through_the_codec(tmp_path, attack):
    """Under top-k a forger sends k values and k indices, not a dense row for free."""
    k = 8
    cfg = make_config(
        *DILOCO, "codec=topk", f"codec.k={k}", "codec.error_feedback=false",
        f"attack={attack}", "attack.num_byzantine=1",
    )  # fmt: skip
    ex = Trainer.from_config(cfg, tmp_path, synthetic_corpus()).exchange
    seen = []
    ex.stream("")["aggregator"] = lambda rows, w: seen.append(rows) or rows.mean(0)
    rows = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    ex(rows)
    codec = plugin("codec", "topk", k=k, error_feedback=False)
    sent = codec.decode(codec.encode(rows))  # what every worker's honest encoding carries
    forged = plugin("attack", attack, num_byzantine=1)(sent, torch.tensor([0, 0, 0, 1]) > 0, 0)
    expected = codec.decode(codec.encode(forged[3:]))[0]
    got = seen[0][3]
    assert int((got != 0).sum()) == k
    assert torch.equal(got, expected)
    assert torch.equal(seen[0][:3], sent[:3])  # honest rows untouched
    assert ex.stats.forged_nbytes == codec.encode(rows).nbytes_per_worker()


def test_forged_payloads_without_a_codec_are_the_attack_rows(tmp_path):
    cfg = make_config(*DILOCO, "attack=alie", "attack.num_byzantine=2")
    ex = Trainer.from_config(cfg, tmp_path, synthetic_corpus()).exchange
    seen = []
    ex.stream("")["aggregator"] = lambda rows, w: seen.append(rows) or rows.mean(0)
    rows = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    ex(rows)
    byz = torch.tensor([0, 0, 1, 1]) > 0
    assert torch.equal(seen[0], plugin("attack", "alie", num_byzantine=2)(rows, byz, 0))
    assert ex.stats.forged_nbytes == 4 * 50


def test_a_forger_under_randk_picks_its_own_k_entries(tmp_path):
    """A random support is the sender's secret: the forger sends its largest k entries."""
    k = 10
    cfg = make_config(
        *DILOCO, "codec=randk", f"codec.k={k}", "codec.error_feedback=false",
        "attack=sign_flip", "attack.num_byzantine=1",
    )  # fmt: skip
    ex = Trainer.from_config(cfg, tmp_path, synthetic_corpus()).exchange
    seen = []
    ex.stream("")["aggregator"] = lambda rows, w: seen.append(rows) or rows.mean(0)
    ex(torch.randn(4, 1000, generator=torch.Generator().manual_seed(3)))
    assert int((seen[0][3] != 0).sum()) == k  # not a free rider on a fresh random support
