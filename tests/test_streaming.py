"""Streaming DiLoCo: fragments, schedule, delayed merge, bytes, resume and its DiLoCo limit."""

from __future__ import annotations

import pytest
import torch

from diloco import checkpoint
from diloco.algorithms.streaming import StreamingDiLoCo, fragment_indices
from diloco.config import ConfigError
from diloco.models import GPT, TinyMLP
from diloco.trainer import Trainer
from tests.helpers import TINY, count_rounds, make_config, synthetic_corpus

STREAMING = (*TINY, "algorithm=streaming_diloco")


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


def streaming(tmp_path, corpus, *overrides):
    return Trainer.from_config(make_config(*STREAMING, *overrides), tmp_path, corpus)


def test_p1_tau0_alpha0_equals_diloco(tmp_path, corpus):
    common = (*TINY, "workers.count=3", "algorithm.inner_steps=4", "train.steps=14")
    diloco = Trainer.from_config(make_config(*common), tmp_path / "a", corpus)
    stream = Trainer.from_config(
        make_config(
            *common,
            "algorithm=streaming_diloco",
            "algorithm.fragments=1",
            "algorithm.tau=0",
            "algorithm.alpha=0",
        ),
        tmp_path / "b",
        corpus,
    )
    a, b = diloco.fit(), stream.fit()
    assert isinstance(stream.algorithm, StreamingDiLoCo)
    assert torch.equal(diloco.group.global_param.data, stream.group.global_param.data)
    assert torch.equal(diloco.group.params, stream.group.params)
    assert a["final_eval_loss"] == b["final_eval_loss"]
    assert a["comm_bytes_per_worker"] == b["comm_bytes_per_worker"] > 0
    assert a["rounds"] == b["rounds"] == 4


def test_fragments_partition_positions_strided_by_block():
    torch.manual_seed(0)
    gpt = GPT(16, 8, n_layer=5, n_head=2, n_embd=8)  # tied head: listed once
    total = sum(p.numel() for p in gpt.parameters())
    for p in (1, 2, 3):
        idx = fragment_indices(gpt, p)
        assert torch.equal(torch.cat(idx).sort().values, torch.arange(total))
        owner = torch.full((total,), -1)
        for f, i in enumerate(idx):
            owner[i] = f
        offset, other = 0, 0
        for name, t in gpt.named_parameters():
            got = owner[offset : offset + t.numel()]
            if name.startswith("blocks."):
                want = int(name.split(".")[1]) % p
            else:  # tok_emb, pos_emb, ln_f: strided by index among non-block tensors
                want, other = other % p, other + 1
            assert (got == want).all(), name
            offset += t.numel()
    # a model without blocks: tensors strided by their index
    mlp = TinyMLP(16, 8)
    sizes = [t.numel() for t in mlp.parameters()]
    idx = fragment_indices(mlp, 2)
    assert [len(i) for i in idx] == [sum(sizes[0::2]), sum(sizes[1::2])]
    with pytest.raises(ConfigError, match=r"algorithm\.fragments=6"):
        fragment_indices(mlp, 6)  # 5 tensors: a fragment would be empty


def test_fragments_synced_in_alternation(tmp_path, corpus):
    t = streaming(tmp_path, corpus, "workers.count=2", "algorithm.inner_steps=4",
                  "algorithm.tau=0", "train.steps=16")  # fmt: skip
    alg = t.algorithm
    assert isinstance(alg, StreamingDiLoCo) and alg.inner_steps == 2
    for r in range(6):
        for _ in range(2):
            t._inner_step()
        before, rows = t.group.global_param.data.clone(), t.group.params.clone()
        f = r % 2
        assert alg.payload(t.group).key == f"fragment{f}"
        t._sync()
        changed = (t.group.global_param.data != before).nonzero().squeeze(1)
        mine, other = alg.indices[f], alg.indices[1 - f]
        assert len(changed) > 0.9 * len(mine)
        assert torch.isin(changed, mine).all()
        assert torch.equal(t.group.global_param.data[other], before[other])
        # tau=0: the synced fragment is merged at once (alpha=0.5), the other stays local
        new = t.group.global_param.data[mine][None]
        torch.testing.assert_close(t.group.params[:, mine], 0.5 * new + 0.5 * rows[:, mine])
        assert torch.equal(t.group.params[:, other], rows[:, other])


def test_tau_delays_merge_by_exactly_tau_steps(tmp_path, corpus):
    tau, alpha = 2, 0.5
    t = streaming(tmp_path, corpus, "workers.count=2", "algorithm.inner_steps=8",
                  f"algorithm.tau={tau}", f"algorithm.alpha={alpha}", "train.steps=16")  # fmt: skip
    alg = t.algorithm
    seen = []
    original = alg._merge

    def spy(group, f):
        before = group.params.clone()
        original(group, f)
        seen.append((alg.steps_done, before, group.params.clone()))

    alg._merge = spy  # type: ignore[method-assign]
    for _ in range(4):
        t._inner_step()
    rows_before = t.group.params.clone()
    t._sync()  # fragment 0 synced at t=4, merge due at 6
    assert torch.equal(t.group.params, rows_before)  # nothing merged at sync time
    assert alg.pending == [(4 + tau, 0)]
    glob = t.group.global_param.data.clone()
    for _ in range(4):
        t._inner_step()
    idx0, idx1 = alg.indices
    assert [step for step, _, _ in seen] == [4 + tau]  # merged once, exactly tau steps late
    for _, before, after in seen:
        want = (1 - alpha) * glob[idx0][None] + alpha * before[:, idx0]
        torch.testing.assert_close(after[:, idx0], want, rtol=0, atol=1e-7)
        assert torch.equal(after[:, idx1], before[:, idx1])
    assert alg.pending == []
    with pytest.raises(ConfigError, match=r"algorithm\.tau=8"):
        streaming(tmp_path / "bad", corpus, "algorithm.inner_steps=8", "algorithm.tau=8")


def test_tau_beyond_round_keeps_several_fragments_in_flight(tmp_path, corpus):
    t = streaming(tmp_path, corpus, "workers.count=2", "algorithm.inner_steps=8",
                  "algorithm.fragments=4", "algorithm.tau=5", "train.steps=20")  # fmt: skip
    alg = t.algorithm
    merges, original = [], alg._merge
    alg._merge = lambda group, f: (merges.append((alg.steps_done, f)), original(group, f))
    t.fit()
    # syncs at 2, 4, ..., 20 of fragments 0, 1, 2, 3, 0, ...; each merged 5 steps later
    assert merges == [(s + 5, (s // 2 - 1) % 4) for s in range(2, 16, 2)]
    assert alg.pending == [(21, 3), (23, 0), (25, 1)]  # never came due: not applied


def test_bytes_over_h_steps_equal_one_diloco_sync(tmp_path, corpus):
    common = (*TINY, "workers.count=4", "train.steps=20", "algorithm.inner_steps=10")
    dil = Trainer.from_config(make_config(*common), tmp_path / "a", corpus).fit()
    st = Trainer.from_config(
        make_config(*common, "algorithm=streaming_diloco", "algorithm.fragments=2"),
        tmp_path / "b",
        corpus,
    ).fit()
    assert st["rounds"] == 2 * dil["rounds"] == 4
    assert st["comm_bytes_per_worker"] == pytest.approx(dil["comm_bytes_per_worker"], rel=1e-9)


def test_resume_with_pending_merge_equals_uninterrupted(tmp_path, corpus):
    common = ("workers.count=2", "algorithm.inner_steps=8", "algorithm.tau=5",
              "train.lr_schedule=constant")  # fmt: skip
    straight = streaming(tmp_path / "a", corpus, *common, "train.steps=24")
    straight.fit()
    first = streaming(tmp_path / "b", corpus, *common, "train.steps=12")
    first.fit()
    path = tmp_path / "ckpt.pt"
    checkpoint.save(first.state_dict(), path)
    state = checkpoint.load(path)
    # syncs every 4 steps, tau=5: fragment 1 (synced at 8) and 0 (synced at 12) in flight
    assert state["algorithm"]["pending"] == [[13, 1], [17, 0]]
    resumed = streaming(tmp_path / "c", corpus, *common, "train.steps=24")
    resumed.load_state_dict(state)
    assert (resumed.step, resumed.round) == (12, first.round) and first.round > 0
    assert resumed.algorithm.state_dict()["pending"] == [[13, 1], [17, 0]]
    rounds_run = count_rounds(resumed)
    resumed.fit()
    assert rounds_run == list(range(first.round, straight.round))  # only the rounds left
    assert torch.equal(straight.group.global_param.data, resumed.group.global_param.data)
    assert torch.equal(straight.group.params, resumed.group.params)
    for a, b in zip(straight.algorithm.state_dict()["outers"],
                    resumed.algorithm.state_dict()["outers"], strict=True):  # fmt: skip
        for sa, sb in zip(a["state"].values(), b["state"].values(), strict=True):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_h_not_divisible_by_fragments_names_the_key(tmp_path, corpus):
    with pytest.raises(ConfigError) as err:
        streaming(tmp_path, corpus, "algorithm.inner_steps=10", "algorithm.fragments=3")
    assert err.value.key == "algorithm.fragments=3"
    assert "inner_steps=10" in str(err.value)


def test_int8_codec_trains(tmp_path, corpus):
    t = streaming(tmp_path, corpus, "codec=int8", "workers.count=2", "algorithm.inner_steps=10",
                  "algorithm.tau=1", "train.steps=60")  # fmt: skip
    before = t.evaluate()
    summary = t.fit()
    assert summary["final_eval_loss"] < before - 1.0
    assert set(t.exchange.streams) == {"fragment0", "fragment1"}
