"""SparseLoCo's codec (arXiv 2508.15706): quantizer, chunk-wise top-k, bytes, error feedback."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from diloco.config import ConfigError
from diloco.exchange.codecs import ErrorFeedback, index_bits, make_codec, unpack_bits
from diloco.exchange.sparseloco import ChunkTopK, dequantize_groups, quantize_groups
from diloco.trainer import Trainer
from tests.helpers import CONF_DIR, TINY, make_config, plugin, synthetic_corpus


def codec(**kw):
    return plugin("codec", "sparseloco", **kw)


def rows(n, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g) * torch.logspace(-2, 1, p)


def test_quantizer_known_vector():
    # shift 0, std sqrt(20/3), scale = 6 std / 4 = 3.873: c / scale + 2 = [1.23, 1.74, 2.26, 2.77]
    q, stats = quantize_groups(torch.tensor([[-3.0, -1.0, 1.0, 3.0]]), bits=2, range_sigmas=6.0)
    assert q.tolist() == [[1, 2, 2, 3]]
    torch.testing.assert_close(stats, torch.tensor([[0.0, 0.0, -3.0, 0.0, 3.0]]))  # shift, 4 bins
    out = dequantize_groups(q, stats, bits=2)
    torch.testing.assert_close(out, torch.tensor([[-3.0, 0.0, 0.0, 3.0]]))  # each bin's mean
    q2, stats2 = quantize_groups(torch.tensor([[7.0, 9.0, 11.0, 13.0]]), bits=2, range_sigmas=6.0)
    assert torch.equal(q2, q) and stats2[0, 0] == 10.0  # shift is the group mean
    uniform = quantize_groups(torch.tensor([[-3.0, -1.0, 1.0, 3.0]]), 2, 6.0, lookup=False)[1]
    torch.testing.assert_close(uniform, torch.tensor([[0.0, 6 * math.sqrt(20 / 3) / 4]]))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("lookup", [True, False])
def test_quantizer_error_bound_and_sum(bits, lookup):
    v = torch.randn(50, 64, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    q, stats = quantize_groups(v, bits, 6.0, lookup)
    out = dequantize_groups(q, stats, bits, lookup)
    levels = 2**bits
    c = v - v.mean(-1, keepdim=True)
    scale = 6.0 * (c.square().sum(-1, keepdim=True) / 63).sqrt() / levels
    inner = (q > 0) & (q < levels - 1)  # unclipped bins have width `scale`
    err = (out - v).abs()
    bound = scale if lookup else scale / 2  # bin mean vs bin centre
    assert inner.float().mean() > 0.5
    assert (err <= bound * (1 + 1e-5) + 1e-6)[inner].all()
    if lookup:  # a bin decodes to its mean, so every group's sum is kept
        torch.testing.assert_close(out.sum(-1), v.sum(-1), atol=1e-4, rtol=1e-5)


def test_two_bit_packing_layout():
    enc = codec(chunk=4, k=4).encode(torch.tensor([[-3.0, -1.0, 1.0, 3.0]]))
    assert enc.values.dtype == torch.uint8
    assert enc.values.tolist() == [[1 | 2 << 2 | 2 << 4 | 3 << 6]]  # codes [1, 2, 2, 3], LSB first
    assert enc.indices is not None and enc.indices.tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6]]
    assert enc.scales is not None and enc.scales.shape == (1, 5)


def test_topk_is_per_chunk_not_global():
    x = rows(2, 40, seed=1)
    x[:, :10] *= 1000.0  # a global top-k would take everything from chunk 0
    c = codec(chunk=10, k=3, bits=8)
    enc = c.encode(x)
    assert enc.indices is not None
    idx = unpack_bits(enc.indices, index_bits(10), 4 * 3).view(2, 4, 3)
    for i in range(2):
        for j in range(4):
            expect = x[i, 10 * j : 10 * (j + 1)].abs().topk(3).indices.sort().values
            assert idx[i, j].tolist() == expect.tolist()
    out = c.decode(enc)
    assert ((out != 0).view(2, 4, 10).sum(-1) <= 3).all()
    kept = out != 0
    assert (kept.view(2, 4, 10).sum(-1) >= 1).all()  # every chunk sends something


def test_scales_are_per_chunk():
    x = rows(1, 24, seed=2)
    c = codec(chunk=8, k=4)
    base = c.encode(x).scales
    y = x.clone()
    y[:, 8:16] *= 100.0
    scaled = c.encode(y).scales
    assert base is not None and scaled is not None
    base, scaled = base.view(3, 5), scaled.view(3, 5)
    torch.testing.assert_close(scaled[1], base[1] * 100.0)  # only chunk 1's stats move
    assert torch.equal(scaled[[0, 2]], base[[0, 2]])
    kept = x.view(3, 8).abs().topk(4).indices
    torch.testing.assert_close(base[:, 0], x.view(3, 8).gather(1, kept).mean(1))  # shift


@pytest.mark.parametrize(
    "n,p,kw",
    [
        (1, 1, {}),
        (2, 100, {"chunk": 16, "k": 3}),
        (3, 1000, {"chunk": 64, "k": 5, "bits": 4}),
        (2, 4097, {}),
        (2, 5000, {"bits": 8, "lookup": False}),
        (1, 300, {"chunk": 32, "k": 40}),  # k capped at chunk
    ],
)
def test_bytes_match_formula(n, p, kw):
    c = codec(**kw)
    enc = c.encode(rows(n, p))
    chunk, bits = kw.get("chunk", 4096), kw.get("bits", 2)
    k = min(kw.get("k", 64), chunk)
    chunks = -(-p // chunk)
    stats = 2**bits + 1 if kw.get("lookup", True) else 2
    expected = (
        math.ceil(chunks * k * bits / 8)
        + math.ceil(chunks * k * index_bits(chunk) / 8)
        + 4 * stats * chunks
    )
    assert enc.nbytes_per_worker() == c.nbytes(p) == expected
    assert c.decode(enc).shape == (n, p)


def test_default_gpt_bytes():
    p = 1_844_928  # the default GPT
    # 451 chunks x 64 values: 2-bit codes 7,216 B, 12-bit indices 43,296 B, stats 451 x 20 B
    assert codec().nbytes(p) == 7_216 + 43_296 + 9_020 == 59_532


def test_error_feedback_conserves_mass():
    ef = ErrorFeedback(codec(chunk=16, k=2), decay=1.0)
    inputs = [rows(3, 50, seed) for seed in range(6)]
    sent = sum(ef.decode(ef.encode(x)) for x in inputs)
    assert ef.residual is not None
    torch.testing.assert_close(sent + ef.residual, sum(inputs), atol=1e-4, rtol=1e-5)


def test_config_is_the_published_method():
    node = yaml.safe_load((CONF_DIR / "codec" / "sparseloco.yaml").read_text())
    ef = make_codec(node)
    assert isinstance(ef, ErrorFeedback) and ef.decay == 0.95
    inner = ef.codec
    assert isinstance(inner, ChunkTopK)
    assert (inner.chunk, inner.k, inner.bits) == (4096, 64, 2)
    x, r = rows(2, 9000), rows(2, 9000, 1)
    ef.encode(r)
    first = ef.residual
    assert first is not None
    e = 0.95 * first + x  # the accumulator's rule: e = beta e + Delta; e -= Q(TopK(e))
    out = ef.decode(ef.encode(x))
    torch.testing.assert_close(ef.residual, e - out)
    with pytest.raises(ConfigError, match="codec.bits"):
        codec(bits=3)


def test_sparseloco_trains_with_published_settings(tmp_path):
    overrides = (*TINY, "workers.count=4", "algorithm.inner_steps=5", "train.steps=40")
    cfg = make_config(*overrides, "algorithm=sparseloco")
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    before = trainer.evaluate()
    summary = trainer.fit()
    assert math.isfinite(summary["final_eval_loss"]) and summary["final_eval_loss"] < before
