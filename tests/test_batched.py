"""The batched execution path (``workers.execution``): all workers of a process in one pass.

Tolerances (fp32): a batched forward and backward sums in another order than K separate ones
(``bmm`` against ``mm``), so losses agree to 1e-5 and gradients to 1e-6 of their scale; the
matrix inner optimizers are bitwise equal to K torch optimizers; whole runs agree to 1e-4 on
the final global parameters (DeMo, whose sign step turns rounding into whole steps: to 0.05 in
eval loss). With one intra-op thread a worker's numbers do not depend on how many workers
share its process (bitwise).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from diloco.build import torch_threads
from diloco.config import ConfigError
from diloco.inner import LoopOptimizers, MatrixAdamW, MatrixSGD
from diloco.models import GPT, TinyMLP
from diloco.trainer import Trainer
from diloco.workers import WorkerGroup
from tests.helpers import TINY, make_config, synthetic_corpus


class LoopOnlyMLP(TinyMLP):
    """A model without a batched forward (only the loop can run it)."""

    batched_loss = None  # type: ignore[assignment]


def default_gpt() -> GPT:
    """conf/model/gpt.yaml on the byte corpus (1.84M parameters)."""
    return GPT(256, 128, n_layer=4, n_head=6, n_embd=192)


@pytest.mark.parametrize(
    "make",
    [default_gpt, lambda: GPT(300, 16, n_layer=2, n_head=2, n_embd=32, bias=True,
                              tie_weights=False), lambda: TinyMLP(300, 16)],
    ids=["default_gpt", "gpt_bias_untied", "mlp"],
)  # fmt: skip
def test_batched_forward_backward_equals_the_loop(make):
    torch.manual_seed(0)
    model = make()
    opt = partial(torch.optim.AdamW, lr=1e-3)
    loop = WorkerGroup(copy.deepcopy(model), range(3), opt, "loop")
    batched = WorkerGroup(copy.deepcopy(model), range(3), opt, "batched")
    assert batched.batched and not loop.batched and len(batched.replicas) == 1
    noise = 0.02 * torch.randn_like(loop.params)  # workers apart, as after inner steps
    loop.params.add_(noise)
    batched.params.add_(noise)
    t = model.block_size
    x = torch.randint(0, model.vocab_size, (3, 2, t))
    y = torch.randint(0, model.vocab_size, (3, 2, t))
    y[1, 0, :5] = -100  # ignored targets
    batches = [(x[i], y[i]) for i in range(3)]
    torch.testing.assert_close(
        batched.forward_backward(batches), loop.forward_backward(batches), atol=1e-5, rtol=0
    )
    scale = loop.grads.abs().max().item()
    torch.testing.assert_close(batched.grads, loop.grads, atol=1e-6 * scale, rtol=0)
    # an idle worker: zero gradient, the others unchanged
    batches[1] = None
    batched.forward_backward(batches)
    loop.forward_backward(batches)
    assert batched.active == [True, False, True]
    assert not batched.grads[1].any()
    torch.testing.assert_close(batched.grads, loop.grads, atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize(
    "opt",
    [
        partial(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8),
        partial(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True),
        partial(torch.optim.SGD, lr=0.1),
        partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        partial(torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.1),
    ],
    ids=["adamw", "adamw_fused", "sgd", "sgd_nesterov_wd", "sgd_dampening"],
)
def test_matrix_optimizers_are_bitwise_k_torch_optimizers(opt):
    """Same gradients in, bitwise the same rows out, with idle workers (their own step
    counts), a crash (state forgotten) and the schedule's rate."""
    torch.manual_seed(0)
    model = GPT(64, 8, n_layer=1, n_head=2, n_embd=16, bias=True)
    loop = WorkerGroup(copy.deepcopy(model), range(4), opt, "loop")
    matrix = WorkerGroup(copy.deepcopy(model), range(4), opt, "batched")
    assert isinstance(loop.inner, LoopOptimizers)
    assert isinstance(matrix.inner, (MatrixAdamW, MatrixSGD))
    for step in range(8):
        active = [True, step % 3 != 0, True, step % 2 == 0] if step != 5 else [False] * 4
        grads = torch.randn_like(loop.grads) * torch.tensor(active)[:, None]
        for g in (loop, matrix):
            g.grads.copy_(grads)
            g.active = list(active)
            g.clip_grads(1.0)
            g.optimizer_step(0.5 + step / 16)
        if step == 4:
            loop.inner.reset(2)
            matrix.inner.reset(2)
        assert torch.equal(loop.params, matrix.params), step
        assert loop.inner.steps == matrix.inner.steps
    assert matrix.inner.lr == loop.inner.lr


def test_other_optimizers_and_options_run_as_a_loop():
    model = TinyMLP(64, 8)
    for opt in (
        partial(torch.optim.AdamW, lr=1e-3, amsgrad=True),
        partial(torch.optim.Adam, lr=1e-3),
        partial(torch.optim.SGD, lr=0.1, maximize=True),
    ):
        group = WorkerGroup(copy.deepcopy(model), range(2), opt, "batched")
        assert group.batched and isinstance(group.inner, LoopOptimizers)
        assert len(group.replicas) == 2  # each torch optimizer has its replica's views
        group.forward_backward([(torch.zeros(1, 8).long(), torch.ones(1, 8).long())] * 2)
        group.optimizer_step(1.0)
        assert not torch.equal(group.params[0], group.global_param.data)


def test_a_worker_does_not_depend_on_how_many_share_its_process():
    """One thread: worker i's loss and gradient are bitwise the same alone or among four
    (simulated == torch.distributed with one worker per rank)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = default_gpt()
        opt = partial(torch.optim.AdamW, lr=1e-3)
        four = WorkerGroup(copy.deepcopy(model), range(4), opt, "auto")
        four.params.add_(0.01 * torch.randn_like(four.params))
        batches = [(torch.randint(0, 256, (2, 128)), torch.randint(0, 256, (2, 128)))] * 4
        losses = four.forward_backward(batches)
        for i in (0, 3):
            alone = WorkerGroup(copy.deepcopy(model), [i], opt, "auto")
            assert alone.batched  # auto batches one worker too
            alone.params.copy_(four.params[i])
            assert torch.equal(alone.forward_backward([batches[i]])[0], losses[i])
            assert torch.equal(alone.grads[0], four.grads[i])
    finally:
        torch.set_num_threads(previous)


GPT_TINY = (*TINY, "model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32")
CASES = {
    "ddp": ("algorithm=ddp", "train.steps=12"),
    "diloco": ("algorithm.inner_steps=4", "train.steps=16"),
    "streaming": ("algorithm=streaming_diloco", "algorithm.inner_steps=8", "train.steps=24"),
    "deadline": ("algorithm=fedavg", "algorithm.inner_steps=4", "train.steps=16",
                 "sync=deadline", "workers=straggler", "workers.step_time_s=0.1"),
    "faults": ("algorithm.inner_steps=2", "train.steps=12", "faults=crash_rejoin"),
    "poison": ("algorithm.inner_steps=4", "train.steps=16", "attack=poison",
               "aggregator=trimmed_mean"),
}  # fmt: skip


def fit(tmp_path, name: str, *overrides: str) -> tuple[Trainer, dict]:
    cfg = make_config(*GPT_TINY, "workers.count=4", *overrides)
    trainer = Trainer.from_config(cfg, tmp_path / name, synthetic_corpus())
    return trainer, trainer.fit()


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_run_equals_the_loop(tmp_path, case):
    loop, sl = fit(tmp_path, "loop", *CASES[case], "workers.execution=loop")
    batched, sb = fit(tmp_path, "batched", *CASES[case], "workers.execution=batched")
    assert (sl["execution"], sb["execution"]) == ("loop", "batched")
    assert sl["steps"] == sb["steps"] and sl["rounds"] == sb["rounds"]
    assert loop.worker_steps.tolist() == batched.worker_steps.tolist()
    torch.testing.assert_close(
        batched.group.global_param.data, loop.group.global_param.data, atol=1e-4, rtol=0
    )
    assert abs(sb["final_eval_loss"] - sl["final_eval_loss"]) < 1e-4


def test_batched_demo_run_agrees_with_the_loop(tmp_path):
    """DeMo keeps one torch optimizer per worker (its own batched encode); the forward and
    backward are batched. Its sign step makes rounding differences whole steps, so the runs
    agree in loss, not in bits."""
    common = ("algorithm=demo", "train.steps=30", "train.warmup_steps=2")
    loop, sl = fit(tmp_path, "loop", *common, "workers.execution=loop")
    batched, sb = fit(tmp_path, "batched", *common, "workers.execution=batched")
    assert batched.group.batched and isinstance(batched.group.inner, LoopOptimizers)
    assert abs(sb["final_eval_loss"] - sl["final_eval_loss"]) < 0.05
    assert sb["comm_bytes_total"] == sl["comm_bytes_total"]


def test_batched_resume_equals_uninterrupted(tmp_path):
    common = (*GPT_TINY, "workers.count=3", "algorithm.inner_steps=3", "train.steps=18",
              "checkpoint.every=2", "train.lr_schedule=constant",
              "workers.execution=batched")  # fmt: skip
    corpus = synthetic_corpus()
    whole = Trainer.from_config(make_config(*common), tmp_path / "whole", corpus)
    whole.fit()
    first = Trainer.from_config(make_config(*common, "train.steps=9"), tmp_path / "r", corpus)
    first.fit()
    second = Trainer.from_config(make_config(*common), tmp_path / "r", corpus)
    assert second.maybe_resume()
    second.fit()
    assert torch.equal(second.group.global_param.data, whole.group.global_param.data)
    assert torch.equal(second.group.inner.exp_avg_sq, whole.group.inner.exp_avg_sq)
    # the loop form cannot take the matrix's state: a one-line error naming the key to change
    other = Trainer.from_config(
        make_config(*common, "workers.execution=loop"), tmp_path / "r", corpus
    )
    with pytest.raises(ConfigError, match="workers.execution=batched"):
        other.maybe_resume()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_loop_checkpoint_resumes_batched(tmp_path, optimizer):
    """A checkpoint of K torch optimizers (the loop form, and every checkpoint written before
    the batched form) loads into the matrix form: the same moments and step counts."""
    common = (
        *GPT_TINY,
        "workers.count=3",
        "algorithm.inner_steps=3",
        "train.steps=9",
        f"optimizer={optimizer}",
        "faults.events=[{worker: 1, round: 1, kind: crash}, {worker: 1, round: 2, kind: rejoin}]",
    )
    if optimizer == "sgd":
        common += ("optimizer.momentum=0.9",)  # fmt: skip
    corpus = synthetic_corpus()
    loop = Trainer.from_config(make_config(*common, "workers.execution=loop"), tmp_path, corpus)
    loop.fit()
    batched = Trainer.from_config(make_config(*common), tmp_path / "b", corpus)
    batched.load_state_dict(loop.state_dict())
    assert batched.group.inner.steps == loop.group.inner.steps
    assert 0 < loop.group.inner.steps[1] < 9  # the crashed worker restarted its count
    for name, matrix in batched.group.inner._state().items():
        for row, opt in enumerate(loop.group.optimizers):
            flat = torch.cat([opt.state[p][name].reshape(-1) for g in opt.param_groups
                              for p in g["params"]])  # fmt: skip
            spans = batched.group.inner.param_spans
            got = torch.cat([matrix[row, a:b] for a, b in spans])
            assert torch.equal(got, flat), (name, row)


def test_batched_needs_a_model_with_a_batched_forward(tmp_path):
    cfg = make_config(*TINY, "model._target_=tests.test_batched.LoopOnlyMLP",
                      "workers.execution=batched")  # fmt: skip
    with pytest.raises(ConfigError, match=r"workers.execution=batched: LoopOnlyMLP has no"):
        Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    cfg = make_config(*TINY, "model._target_=tests.test_batched.LoopOnlyMLP")
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())  # auto: the loop
    assert not trainer.group.batched


def test_torch_threads_share_the_cores(monkeypatch):
    for var in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))  # 16 of the node
    assert torch_threads(None) == 16
    assert torch_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert torch_threads(None) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a count: ignored
    assert torch_threads(None) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert torch_threads(None) == 2
    assert torch_threads(5) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more processes than cores: one each
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert torch_threads(None) == 1


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    """``workers.precision=bf16``: the forward and backward under bf16 autocast (CPU here, as
    on CUDA), the matrix, gradients and optimizer state fp32; losses near fp32's, batched
    near loop, and training still lowers the loss."""
    torch.manual_seed(0)
    model = GPT(300, 16, n_layer=2, n_head=2, n_embd=32)
    opt = partial(torch.optim.AdamW, lr=1e-3)
    batches = [(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16)))] * 3
    ref = WorkerGroup(copy.deepcopy(model), range(3), opt, "batched")
    exact = ref.forward_backward(batches)
    for execution in ("batched", "loop"):
        low = WorkerGroup(copy.deepcopy(model), range(3), opt, execution, "bf16")
        losses = low.forward_backward(batches)
        assert losses.dtype == torch.float32 and low.grads.dtype == torch.float32
        torch.testing.assert_close(losses, exact, atol=2e-2, rtol=0)
        cos = torch.nn.functional.cosine_similarity(low.grads, ref.grads, dim=1)
        assert (cos > 0.99).all(), cos
    cfg = make_config(*GPT_TINY, "workers.count=2", "algorithm.inner_steps=5",
                      "train.steps=60", "workers.precision=bf16")  # fmt: skip
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    start = trainer.evaluate()
    assert trainer.fit()["final_eval_loss"] < start - 1.0


def test_compiled_batched_step_equals_the_eager_one(tmp_path):
    """``workers.compile=true``: torch.compile of the batched forward and backward (inductor
    on the CPU here); a short run ends where the eager one does (fp32 rounding), and the
    loop path refuses it in one line."""
    common = (*GPT_TINY, "workers.count=2", "algorithm.inner_steps=3", "train.steps=6")
    eager, se = fit(tmp_path, "eager", *common)
    compiled, sc = fit(tmp_path, "compiled", *common, "workers.compile=true")
    torch.testing.assert_close(
        compiled.group.global_param.data, eager.group.global_param.data, atol=1e-5, rtol=0
    )
    assert abs(sc["final_eval_loss"] - se["final_eval_loss"]) < 1e-5
    cfg = make_config(*common, "workers.compile=true", "workers.execution=loop")
    with pytest.raises(ConfigError, match="workers.compile=true compiles the batched step"):
        Trainer.from_config(cfg, tmp_path / "loop", synthetic_corpus())


def test_evaluation_builds_no_autograd_graph():
    """The eval forward runs under no_grad (a graph per eval batch costs memory and time)."""
    model = TinyMLP(vocab_size=16, block_size=8)
    group = WorkerGroup(model, range(2), partial(torch.optim.AdamW, lr=1e-3), "loop")
    seen: list[bool] = []
    group.global_model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    x = torch.randint(0, 16, (4, 8))
    loss = group.evaluate([(x, x)], is_main=True)
    assert loss == loss and seen == [False]
    assert group.evaluate([(x, x)], is_main=False) != group.evaluate([(x, x)], is_main=False)
