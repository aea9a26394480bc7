"""Codecs: round-trip error bounds, exact byte counts, error-feedback conservation."""

from __future__ import annotations

import math

import pytest
import torch

from diloco.compose import check_overrides
from diloco.config import ConfigError
from diloco.exchange.codecs import (
    Compose,
    Encoded,
    ErrorFeedback,
    Int4,
    Int8,
    TopK,
    index_bits,
    nbytes_per_worker,
    pack_bits,
    unpack_bits,
)
from tests.helpers import node, plugin

SHAPES = [(1, 1), (2, 7), (3, 100), (2, 257), (4, 1000)]


def compose(**kwargs):
    """A sparsifier composed with a value codec (conf/codec/topk_int4.yaml is one)."""
    from diloco.config import from_dict

    return Compose(from_dict(Compose.Config, kwargs, "codec"))


def rows(n, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g) * torch.logspace(-2, 1, p)


def cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 11, 17])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 13))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, cdiv(13 * bits, 8))
    assert torch.equal(unpack_bits(packed, bits, 13), codes)


def test_pack_bits_layout_is_lsb_first():
    packed = pack_bits(torch.tensor([[1, 0, 0, 1, 1, 0, 0, 0, 1]]), 1)
    assert packed.tolist() == [[0b00011001, 0b1]]
    assert pack_bits(torch.tensor([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]
    assert pack_bits(torch.tensor([[5, 1, 7]]), 3).tolist() == [[0b11001101, 0b1]]


def test_index_bits():
    assert [index_bits(p) for p in (1, 2, 3, 256, 257, 65536)] == [1, 1, 2, 8, 9, 16]


@pytest.mark.parametrize(
    "name,dtype,eps", [("fp16", torch.float16, 2**-11), ("bf16", torch.bfloat16, 2**-8)]
)
def test_half_precisions_relative_error(name, dtype, eps):
    x = rows(3, 100)
    x = x.sign() * x.abs().clamp(min=1e-3)  # normal range of fp16
    enc = plugin("codec", name).encode(x)
    assert enc.values.dtype == dtype
    out = plugin("codec", name).decode(enc)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert ((out - x).abs() <= eps * x.abs()).all()


def test_none_is_identity():
    x = rows(2, 9)
    codec = plugin("codec", "none")
    assert torch.equal(codec.decode(codec.encode(x)), x)


def block_scales(x, block, qmax):
    n, p = x.shape
    pad = torch.nn.functional.pad(x, (0, cdiv(p, block) * block - p)).view(n, -1, block)
    return pad.abs().amax(-1) / qmax


@pytest.mark.parametrize("name,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("n,p", [(2, 7), (3, 100), (2, 257)])
def test_int_quant_error_within_half_scale(name, qmax, scale_dtype, n, p):
    block = 32
    x = rows(n, p)
    x[0, :block] = 0.0  # an all-zero block (scale 0) must not divide by zero
    codec = plugin("codec", name, block=block, scale_dtype=scale_dtype)
    enc = codec.encode(x)
    out = codec.decode(enc)
    assert enc.scales is not None
    stored = enc.scales.float()
    if scale_dtype == "fp32":
        torch.testing.assert_close(stored, block_scales(x, block, qmax))
    else:
        assert enc.scales.dtype == torch.float16
        assert (stored >= block_scales(x, block, qmax)).all()  # rounded up
    bound = stored.repeat_interleave(block, dim=1)[:, :p] / 2
    assert ((out - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(name):
    x = torch.linspace(-1, 1, 64).repeat(2, 1)
    codec = plugin("codec", name, block=16, stochastic=True, seed=3)
    runs = torch.stack([codec.decode(codec.encode(x)) for _ in range(400)])
    scale = block_scales(x, 16, codec.qmax).repeat_interleave(16, dim=1)
    assert ((runs - x).abs() <= scale + 1e-6).all()
    # std of one draw <= scale/2, so the mean of 400 has std <= scale/40: allow 5 sigma
    assert ((runs.mean(0) - x).abs() <= scale / 8).all()
    # and the rounding is actually random: deterministic rounding would be biased here
    det = plugin("codec", name, block=16).decode(plugin("codec", name, block=16).encode(x))
    assert (runs.mean(0) - x).abs().mean() < (det - x).abs().mean() / 3


def test_stochastic_state_dict_replays():
    codec = plugin("codec", "int4", stochastic=True, seed=1)
    x = rows(2, 50)
    state = codec.state_dict()
    first = codec.encode(x).values
    codec.load_state_dict(state)
    assert torch.equal(codec.encode(x).values, first)


def test_sign_is_scaled_sign():
    x = rows(3, 21) + 0.01 * torch.sign(rows(3, 21, 1))
    x[x == 0] = 1.0
    codec = plugin("codec", "sign")
    enc = codec.encode(x)
    scale = x.abs().mean(1, keepdim=True)
    torch.testing.assert_close(codec.decode(enc), scale * torch.sign(x))


@pytest.mark.parametrize("name", ["topk", "randk"])
@pytest.mark.parametrize("n,p", [(1, 1), (2, 7), (3, 300)])
def test_sparsifiers_exact_on_kept_zero_elsewhere(name, n, p):
    x = rows(n, p) + 1e-3
    codec = plugin("codec", name, k=min(5, p))
    out = codec.decode(codec.encode(x))
    kept = out != 0
    assert (kept.sum(1) == min(5, p)).all()
    assert torch.equal(out[kept], x[kept])
    if name == "topk":
        thresh = x.abs().topk(min(5, p), dim=1).values[:, -1:]
        assert torch.equal(kept, x.abs() >= thresh)


def test_topk_fraction_and_k_precedence():
    assert plugin("codec", "topk", fraction=0.1).num_values(95) == 10
    assert plugin("codec", "topk", fraction=1e-6).num_values(95) == 1
    assert plugin("codec", "topk", k=7, fraction=0.5).num_values(95) == 7
    assert plugin("codec", "topk", k=700).num_values(95) == 95


def test_dct_topk_full_is_exact_and_sparse_is_close():
    x = rows(2, 100)
    full = plugin("codec", "dct_topk", chunk=16, k=16)
    torch.testing.assert_close(full.decode(full.encode(x)), x, atol=1e-5, rtol=1e-5)
    smooth = torch.linspace(0, 1, 96).repeat(2, 1)
    sparse = plugin("codec", "dct_topk", chunk=32, k=4)
    assert (sparse.decode(sparse.encode(smooth)) - smooth).abs().max() < 0.02


def test_compose_topk_int4():
    x = rows(3, 200)
    codec = compose(sparsifier=node("codec", "topk", k=12), values=node("codec", "int4"))
    assert isinstance(codec, Compose) and codec.name == "topk+int4"
    top, q = TopK(TopK.Config(k=12)), Int4(Int4.Config(block=128))
    sparse = top.encode(x)
    quantized = q.decode(q.encode(sparse.values))  # kept values through int4
    ref = top.decode(Encoded(sparse.shape, quantized, indices=sparse.indices))
    torch.testing.assert_close(codec.decode(codec.encode(x)), ref)
    assert ((ref - top.decode(sparse)).abs() <= q.encode(sparse.values).scales / 2 + 1e-7).all()


def expected_nbytes(name, p, kw):
    s = 2 if kw.get("scale_dtype") == "fp16" else 4
    b = cdiv(p, kw.get("block", 128))
    k = min(p, kw.get("k", 5))
    return {
        "none": 4 * p,
        "fp16": 2 * p,
        "bf16": 2 * p,
        "int8": p + s * b,
        "int4": cdiv(p, 2) + s * b,
        "sign": cdiv(p, 8) + 4,
        "topk": 4 * k + cdiv(k * index_bits(p), 8),
        "randk": 4 * k + cdiv(k * index_bits(p), 8),
        "dct_topk": 4 * cdiv(p, 16) * 3 + cdiv(cdiv(p, 16) * 3 * 4, 8),
        "topk+int4": cdiv(k, 2) + 4 * cdiv(k, 128) + cdiv(k * index_bits(p), 8),
        "topk+sign": cdiv(k, 8) + 4 + cdiv(k * index_bits(p), 8),
    }[name]


CASES = [
    ("none", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {"block": 32}),
    ("int8", {"block": 32, "scale_dtype": "fp16"}),
    ("int4", {"block": 24}),
    ("int4", {"block": 64, "scale_dtype": "fp16"}),
    ("sign", {}),
    ("topk", {"k": 5}),
    ("randk", {"k": 5}),
    ("dct_topk", {"chunk": 16, "k": 3}),
]


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("n,p", SHAPES)
def test_bytes_match_formula(name, kw, n, p):
    enc = plugin("codec", name, **kw).encode(rows(n, p))
    for t in (enc.values, enc.indices, enc.scales):
        assert t is None or t.shape[0] == n
    assert nbytes_per_worker(enc) == enc.nbytes_per_worker() == expected_nbytes(name, p, kw)


@pytest.mark.parametrize("values", ["int4", "sign"])
@pytest.mark.parametrize("n,p", SHAPES)
def test_compose_bytes_match_formula(values, n, p):
    codec = compose(sparsifier=node("codec", "topk", k=5), values=node("codec", values))
    assert nbytes_per_worker(codec.encode(rows(n, p))) == expected_nbytes(f"topk+{values}", p, {})


def test_int4_packs_two_per_byte_and_int8_is_int8():
    assert plugin("codec", "int4").encode(rows(2, 9)).values.shape == (2, 5)
    assert plugin("codec", "int8").encode(rows(2, 9)).values.dtype == torch.int8


SPECS = [
    ("topk", {"k": 3}),
    ("randk", {"fraction": 0.1}),
    ("sign", {}),
    ("int4", {"block": 8, "stochastic": True}),
    ("dct_topk", {"chunk": 8, "k": 2}),
]


SPARSE_INT8 = {"sparsifier": node("codec", "topk", k=4), "values": node("codec", "int8")}


@pytest.mark.parametrize("name,kw", [*SPECS, ("compose", SPARSE_INT8)])
def test_error_feedback_conserves_mass(name, kw):
    ef = ErrorFeedback(compose(**kw) if name == "compose" else plugin("codec", name, **kw))
    inputs = [rows(3, 37, seed) for seed in range(6)]
    sent = sum(ef.decode(ef.encode(x)) for x in inputs)
    assert ef.residual is not None
    torch.testing.assert_close(sent + ef.residual, sum(inputs), atol=1e-4, rtol=1e-5)


def test_error_feedback_rule_and_state_dict():
    ef = ErrorFeedback(plugin("codec", "topk", k=1), decay=0.5)
    x = torch.tensor([[1.0, 2.0, -4.0], [4.0, 0.5, 0.1]])
    ef.encode(x)
    torch.testing.assert_close(ef.residual, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.5, 0.1]]))
    state = ef.state_dict()
    out = ef.decode(ef.encode(x))  # e = 0.5 * r + x
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, -4.0], [4.0, 0.0, 0.0]]))
    torch.testing.assert_close(ef.residual, torch.tensor([[1.5, 3.0, 0.0], [0.0, 0.75, 0.15]]))
    fresh = ErrorFeedback(plugin("codec", "topk", k=1), decay=0.5)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.decode(fresh.encode(x)), out)


def test_error_feedback_rows_that_do_not_send_keep_their_residual():
    ef = ErrorFeedback(plugin("codec", "topk", k=1), decay=0.5)
    x = torch.tensor([[1.0, 2.0, -4.0], [4.0, 0.5, 0.1]])
    ef.encode(x, torch.tensor([True, False]))  # row 1 never sent: its residual stays zero
    torch.testing.assert_close(ef.residual, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
    ef.encode(x)
    kept = ef.residual.clone()
    ef.encode(torch.zeros(2, 3), torch.tensor([False, True]))  # row 0 sits out: not decayed
    assert torch.equal(ef.residual[0], kept[0])
    torch.testing.assert_close(ef.residual[1], torch.tensor([0.0, 0.0, 0.05]))  # sent 0.25


def test_registry_errors():
    with pytest.raises(ConfigError, match="codec=zip: unknown; allowed: bf16"):
        check_overrides(["codec=zip"])
    with pytest.raises(ConfigError, match=r"codec.block=0: must be >= 1"):
        plugin("codec", "int8", block=0)
    with pytest.raises(ConfigError, match="codec.bogus"):
        plugin("codec", "topk", bogus=1)
    with pytest.raises(ConfigError, match="not a sparsifier"):
        compose(sparsifier=node("codec", "int8"))
    with pytest.raises(ConfigError):
        ErrorFeedback(Int8(), decay=1.5)
    assert math.isclose(ErrorFeedback(Int8(), decay=0.9).decay, 0.9)
