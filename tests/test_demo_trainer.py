"""DeMo inside the trainer: K workers stay identical; bytes are what the payload holds."""

from __future__ import annotations

import pytest
import torch

from demo_optim import DeMo
from diloco.config import ConfigError
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

DEMO = (*TINY, "algorithm=demo", "optimizer.compression_topk=4", "optimizer.compression_chunk=8")


def test_demo_workers_stay_bitwise_identical_and_bytes_match_payload(tmp_path):
    k, steps = 3, 6
    trainer = Trainer.from_config(
        make_config(*DEMO, f"workers.count={k}", f"train.steps={steps}"),
        tmp_path,
        synthetic_corpus(),
    )
    assert all(isinstance(o, DeMo) for o in trainer.group.optimizers)
    before = trainer.evaluate()
    summary = trainer.fit()
    for row in trainer.group.params[1:]:
        assert torch.equal(row, trainer.group.params[0])
    assert torch.equal(trainer.group.global_param.data, trainer.group.params[0])
    # each worker's payload per step: chunks x k x (index bytes + value bytes)
    payload = trainer.group.optimizers[0].encode()
    chunks_k = sum(t.numel() for t in payload[0::2])
    assert DeMo.payload_nbytes(payload) == chunks_k * (8 + 4)
    # all-gather: each worker forwards (k-1) payloads per step
    assert summary["comm_bytes_per_worker"] == steps * (k - 1) * DeMo.payload_nbytes(payload)
    assert summary["final_eval_loss"] < before


def test_demo_with_full_k_is_sign_sgd_on_the_mean_gradient(tmp_path):
    """k = chunk elements: the first DeMo step is p - lr * sign(mean_i grad_i) (signSGD)."""
    overrides = (
        *TINY,
        "algorithm=demo",
        "workers.count=3",
        "optimizer.compression_topk=64",
        "optimizer.compression_chunk=8",
        "train.steps=1",
        "train.grad_clip=0",
        "train.warmup_steps=0",
        "train.lr_schedule=constant",
    )
    cfg = make_config(*overrides)
    corpus = synthetic_corpus()
    probe = Trainer.from_config(cfg, tmp_path / "probe", corpus)
    probe.group.forward_backward([s.next_batch() for s in probe.samplers])
    mean_grad = probe.group.grads.mean(0)
    expected = probe.group.params[0] - cfg.optimizer["lr"] * mean_grad.sign()
    trainer = Trainer.from_config(cfg, tmp_path / "run", corpus)
    trainer.fit()
    got = trainer.group.params[0]
    differ = ~torch.isclose(got, expected, rtol=0, atol=1e-7)
    # only coordinates whose mean gradient is ~0 (e.g. embeddings of unseen tokens) may
    # differ: the DCT round trip turns an exact 0 into +-1e-10, whose sign moves by lr
    assert (~differ).float().mean() > 0.9
    assert mean_grad[differ].abs().max() < 1e-6 * mean_grad.abs().max()


def test_demo_needs_demo_optimizer(tmp_path):
    cfg = make_config(*TINY, "algorithm=demo", "optimizer=adamw")
    with pytest.raises(ConfigError, match="optimizer=demo"):
        Trainer.from_config(cfg, tmp_path, synthetic_corpus())


def test_compact_indices_halve_the_bytes_without_changing_the_model(tmp_path):
    corpus = synthetic_corpus()
    common = (*DEMO, "workers.count=2", "train.steps=4")
    wide = Trainer.from_config(make_config(*common), tmp_path / "a", corpus)
    narrow = Trainer.from_config(
        make_config(*common, "optimizer.index_dtype=auto"), tmp_path / "b", corpus
    )
    wide_bytes = wide.fit()["comm_bytes_per_worker"]
    narrow_bytes = narrow.fit()["comm_bytes_per_worker"]
    assert torch.equal(wide.group.params, narrow.group.params)
    # chunk 8 -> at most 64 coefficients per chunk: uint8 indices (1 byte) instead of int64
    assert narrow_bytes / wide_bytes == pytest.approx((1 + 4) / (8 + 4))


def test_bf16_values_from_config(tmp_path):
    overrides = (*DEMO, "workers.count=2", "train.steps=2", "optimizer.value_dtype=bfloat16")
    trainer = Trainer.from_config(make_config(*overrides), tmp_path, synthetic_corpus())
    payload_bytes = trainer.fit()["comm_bytes_per_worker"] / 2  # 2 steps, 1 peer
    chunks_k = sum(t.numel() for t in trainer.group.optimizers[0].encode()[0::2])
    assert payload_bytes == chunks_k * (8 + 2)


@pytest.mark.parametrize("corrupt", ["index_out_of_range", "nan_values"])
def test_bad_peer_payloads_are_excluded_without_a_crash(tmp_path, corrupt, caplog):
    trainer = Trainer.from_config(
        make_config(*DEMO, "workers.count=3", "train.steps=3"), tmp_path, synthetic_corpus()
    )
    gather = trainer.comm.all_gather_parts

    def hostile_gather(parts, nbytes=None):
        out = [rows.clone() for rows in gather(parts, nbytes)]
        for rows in out:
            if rows.dtype == torch.int64 and corrupt == "index_out_of_range":
                rows[1] = 10**6
            elif rows.is_floating_point() and corrupt == "nan_values":
                rows[1] = float("nan")
        return out

    trainer.comm.all_gather_parts = hostile_gather
    trainer.fit()
    params = trainer.group.params
    assert torch.isfinite(params).all()
    assert all(torch.equal(row, params[0]) for row in params)
    assert trainer.algorithm.excluded_total >= 3 and "excluded" in caplog.text
