"""optimizer=muon (diloco/muon.py): Muon on the hidden matrices, AdamW on the rest (MuLoCo).

One step equals torch's Muon and AdamW run by hand on the same split (bitwise); the schedule
reaches both parts; a DiLoCo run trains, resumes bitwise, and batches its forward and backward
under workers.execution=auto; bad values fail in one line before any data loads.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diloco.compose import compose
from diloco.config import ConfigError
from diloco.inner import LoopOptimizers, param_groups
from diloco.models import GPT, TinyMLP
from diloco.muon import MuonAdamW
from diloco.train import run
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

GPT_TINY = (*TINY, "model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32")
LR, ADAMW_LR, WD = 0.02, 0.003, 0.1


def gpt(tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(256, 16, n_layer=2, n_head=2, n_embd=32, tie_weights=tie)


def backward(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (3, 16), generator=g)
    model.zero_grad()
    model(idx, idx.roll(-1, 1))[1].backward()


@pytest.mark.parametrize("tie", [True, False])
def test_steps_are_torch_muon_on_hidden_matrices_and_adamw_on_the_rest(tie):
    model = gpt(tie)
    ref = copy.deepcopy(model)
    opt = MuonAdamW(param_groups(model), lr=LR, weight_decay=WD, adamw_lr=ADAMW_LR)
    names = {id(p): n for n, p in model.named_parameters()}
    assert opt.muon is not None
    to_muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    # the blocks' matrices; never the embeddings or the head (tied: the token table)
    assert to_muon == [n for n, p in model.named_parameters() if "blocks" in n and p.dim() == 2]
    by_name = dict(ref.named_parameters())
    ends = [p for n, p in by_name.items() if p.dim() == 2 and n not in to_muon]
    assert len(ends) == (2 if tie else 3)  # tok_emb, pos_emb (and an untied lm_head)
    muon = torch.optim.Muon([by_name[n] for n in to_muon], lr=LR, weight_decay=WD, momentum=0.95,
                            nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")  # fmt: skip
    vectors = [p for p in by_name.values() if p.dim() < 2]
    groups = [{"params": ends}, {"params": vectors, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=ADAMW_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    for step in range(3):  # the momentum and moments carry over
        backward(model, step)
        backward(ref, step)
        opt.step()
        muon.step()
        adamw.step()
    start = dict(gpt(tie).named_parameters())
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert not torch.equal(p, start[n]), n
        assert torch.equal(p, q), n


def test_tiny_mlp_gives_its_hidden_layer_alone_to_muon():
    model = TinyMLP(256, 16)
    opt = MuonAdamW(param_groups(model))
    assert opt.muon is not None and opt.muon.param_groups[0]["params"] == [model.fc_in.weight]
    # a dummy vector (build_optimizer's probe): AdamW only
    probe = MuonAdamW([{"params": [torch.zeros(1, requires_grad=True)]}])
    assert probe.muon is None and probe.adamw is not None


def test_the_schedule_reaches_both_parts():
    model, halved = gpt(), gpt()
    loop = LoopOptimizers([MuonAdamW(param_groups(model), lr=LR, adamw_lr=ADAMW_LR)])
    loop.set_lr(0.5)  # as the trainer: each group's lr = its initial_lr * multiplier
    opt = loop.optimizers[0]
    assert isinstance(opt, MuonAdamW) and opt.muon is not None and opt.adamw is not None
    assert [g["lr"] for g in opt.muon.param_groups] == [LR / 2]
    assert [g["lr"] for g in opt.adamw.param_groups] == [ADAMW_LR / 2] * 2
    other = MuonAdamW(param_groups(halved), lr=LR / 2, adamw_lr=ADAMW_LR / 2)
    for step in range(2):
        backward(model, step)
        backward(halved, step)
        loop.step([True])
        other.step()
    for p, q in zip(model.parameters(), halved.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trips_and_a_reset_clears_both_parts():
    model, twin = gpt(), gpt()
    opt = MuonAdamW(param_groups(model))
    backward(model, 0)
    opt.step()
    copied = MuonAdamW(param_groups(twin))
    twin.load_state_dict(model.state_dict())
    copied.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in (1, 2):
        backward(model, step)
        backward(twin, step)
        opt.step()
        copied.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    opt.state.clear()  # what a crash does (LoopOptimizers.reset)
    assert opt.muon is not None and opt.adamw is not None
    assert not opt.muon.state and not opt.adamw.state


def muon_run(tmp_path, name: str, *overrides: str) -> Trainer:
    common = (*GPT_TINY, "optimizer=muon", "workers.count=2", "algorithm.inner_steps=3")
    cfg = make_config(*common, "train.steps=18", "checkpoint.every=2", "train.lr_schedule=constant",
                      *overrides)  # fmt: skip
    return Trainer.from_config(cfg, tmp_path / name, synthetic_corpus())


def test_a_diloco_run_with_muon_trains_batches_and_resumes_bitwise(tmp_path):
    whole = muon_run(tmp_path, "whole")
    # auto: the batched forward and backward, one torch optimizer per worker
    assert whole.group.batched and isinstance(whole.group.inner, LoopOptimizers)
    before = whole.evaluate()
    after = whole.fit()["final_eval_loss"]
    assert after < before - 0.5, (before, after)
    muon_run(tmp_path, "r", "train.steps=9").fit()
    resumed = muon_run(tmp_path, "r")
    assert resumed.maybe_resume()
    resumed.fit()
    assert torch.equal(resumed.group.params, whole.group.params)
    assert torch.equal(resumed.group.global_param.data, whole.group.global_param.data)
    loop = muon_run(tmp_path, "loop", "workers.execution=loop", "train.steps=9")
    assert not loop.group.batched
    assert loop.fit()["final_eval_loss"] < before - 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.momentum=-1", "optimizer.momentum=-1: momentum=-1: must be in [0, 1)"),
        ("optimizer.ns_steps=0", "optimizer.ns_steps=0: ns_steps=0: must be in [1, 99]"),
        ("optimizer.adjust_lr_fn=none", "optimizer.adjust_lr_fn=none: adjust_lr_fn='none': must"),
    ],
)
def test_a_bad_value_is_one_line_naming_optimizer_before_data_loads(tmp_path, override, message):
    node = compose(["optimizer=muon", override, "data.path=/no/such"])
    with pytest.raises(ConfigError) as err:  # the missing corpus would be a DataError
        run(node, tmp_path)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
