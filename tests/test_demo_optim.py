"""Tests for the standalone DeMo optimizer (demo_optim)."""

from __future__ import annotations

import io
import math
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from demo_optim import (
    DeMo,
    aggregate_sparse,
    chunk_shape,
    chunk_size,
    compact_index_dtype,
    dct_basis,
    dct_decode,
    dct_encode,
    dct_nd,
    decode_aggregate,
    idct_nd,
    pack_signs,
    payload_nbytes,
    sparse_idct,
    to_chunks,
    unpack_signs,
)


def scipy_fft():
    """``scipy.fft``, or skip the calling test (only the scipy comparisons need it)."""
    return pytest.importorskip("scipy.fft")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny matmuls with several OpenMP threads on a busy 2-core box can take tens of ms.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SHAPES = [(100, 96), (96,), (4, 8, 12), (131,), (), (7, 64), (16, 16)]


def make_params(shapes=SHAPES, dtype=torch.float64, seed=0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def clone_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def rand_grads(params, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


def stack_payloads(payloads: list[list[Tensor]]) -> list[Tensor]:
    return [torch.stack([pl[j] for pl in payloads]) for j in range(len(payloads[0]))]


def simulated_step(opts: list[DeMo]) -> list[list[Tensor]]:
    payloads = [opt.encode() for opt in opts]
    gathered = stack_payloads(payloads)
    for opt in opts:
        opt.apply(gathered)
    return payloads


class ThreadGather:
    """A gather_fn per worker thread: every worker's step() sees all payloads."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n)
        self.slots: list[list[Tensor] | None] = [None] * n

    def fn(self, rank: int):
        def gather(payload: list[Tensor]) -> list[Tensor]:
            self.slots[rank] = payload
            self.barrier.wait()
            out = stack_payloads(self.slots)  # type: ignore[arg-type]
            self.barrier.wait()
            return out

        return gather


def run_threads(fns) -> None:
    errors: list[BaseException] = []

    def wrap(f):
        try:
            f()
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(f,)) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- DCT


@pytest.mark.parametrize("n", [1, 2, 7, 29, 60, 64])
def test_dct_basis_orthonormal_and_equal_to_scipy(n):
    fft = scipy_fft()
    d = dct_basis(n, dtype=torch.float64)
    np.testing.assert_allclose(d @ d.T, np.eye(n), atol=1e-12)
    ref = fft.dct(np.eye(n), type=2, norm="ortho", axis=0)
    np.testing.assert_allclose(d.numpy(), ref, atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    np.testing.assert_allclose(dct_nd(x).numpy(), fft.dct(x.numpy(), norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(idct_nd(x).numpy(), fft.idct(x.numpy(), norm="ortho"), atol=1e-12)


def test_dct_basis_is_cached_per_device_and_dtype():
    assert dct_basis(8) is dct_basis(8)
    assert dct_basis(8, dtype=torch.float64) is not dct_basis(8)
    assert dct_basis(8, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(100, 96), (131,), (96,), (3, 96, 100), (2, 3, 8, 10), ()])
def test_dct_roundtrip(shape):
    x = torch.randn(shape, dtype=torch.float64)
    coeffs = dct_encode(x, 64)
    assert coeffs.shape[1:] == chunk_shape(x.shape, 64)
    torch.testing.assert_close(dct_decode(coeffs, x.shape), x, atol=1e-12, rtol=0)


def test_chunked_dct_matches_scipy_2d():
    fft = scipy_fft()
    x = torch.randn(2, 96, 100, dtype=torch.float64)
    chunks = to_chunks(x, (48, 50))
    assert chunks.shape == (2 * 2 * 2, 48, 50)
    # Chunk-major order: (leading, chunk row, chunk column).
    torch.testing.assert_close(chunks[3], x[0, 48:, 50:])
    ref = fft.dctn(chunks.numpy(), type=2, norm="ortho", axes=(1, 2))
    np.testing.assert_allclose(dct_encode(x, 64).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(96, 48), (100, 50), (131, 1), (50257, 29), (50304, 64), (64, 64), (1, 1), (768, 64)],
)
def test_chunk_size_rule(size, expected):
    assert chunk_size(size, 64) == expected


def test_chunk_shape_rule():
    assert chunk_shape((96,), 64) == (48,)
    assert chunk_shape((), 64) == (1,)
    assert chunk_shape((100, 96), 64) == (50, 48)
    assert chunk_shape((5, 3, 100, 96), 64) == (50, 48)
    assert chunk_shape((50257, 768), 64) == (29, 64)


# ------------------------------------------------------------------- optimizer


def naive_step(params, deltas, grads, *, lr, decay, topk, chunk, wd):
    """Straightforward per-parameter, per-worker DeMo step (the reference semantics)."""
    for i, p in enumerate(params):
        if wd:
            p.data.mul_(1 - lr * wd)
        sent = []
        for w in range(len(deltas)):
            d = deltas[w][i]
            d.mul_(decay).add_(grads[w][i], alpha=lr)
            coeffs = dct_encode(d, chunk)
            flat = coeffs.reshape(coeffs.shape[0], -1)
            k = max(1, min(topk, flat.shape[1]))
            idx = flat.abs().topk(k, dim=1).indices
            val = flat.gather(1, idx)
            own = torch.zeros_like(flat).scatter(1, idx, val)
            d.sub_(dct_decode(own.view(coeffs.shape), d.shape))
            sent.append((idx, val))
        total = torch.zeros_like(flat)
        count = torch.zeros_like(flat)
        for idx, val in sent:
            total += torch.zeros_like(flat).scatter(1, idx, val)
            count += torch.zeros_like(flat).scatter(1, idx, torch.ones_like(val))
        mean = torch.where(count > 0, total / count.clamp(min=1), 0.0)
        p.data.sub_(lr * dct_decode(mean.view(coeffs.shape), p.shape).sign())


def test_matches_naive_per_parameter_reference():
    n_workers, lr, decay, topk, chunk, wd = 3, 0.01, 0.9, 8, 16, 0.1
    base = make_params()
    ref_params = clone_params(base)
    ref_deltas = [[torch.zeros_like(p) for p in base] for _ in range(n_workers)]
    worker_params = [clone_params(base) for _ in range(n_workers)]
    opts = [
        DeMo(
            ps,
            lr,
            compression_decay=decay,
            compression_topk=topk,
            compression_chunk=chunk,
            weight_decay=wd,
        )  # fmt: skip
        for ps in worker_params
    ]
    for step in range(3):
        grads = [rand_grads(base, seed=100 * step + w) for w in range(n_workers)]
        naive_step(ref_params, ref_deltas, grads, lr=lr, decay=decay, topk=topk, chunk=chunk, wd=wd)
        for ps, g in zip(worker_params, grads, strict=True):
            set_grads(ps, g)
        simulated_step(opts)
        for w in range(n_workers):
            for p, r in zip(worker_params[w], ref_params, strict=True):
                torch.testing.assert_close(p.detach(), r.detach(), atol=1e-12, rtol=0)
            for p, d in zip(worker_params[w], ref_deltas[w], strict=True):
                torch.testing.assert_close(opts[w].state[p]["delta"], d, atol=1e-12, rtol=0)


def test_error_feedback_conservation():
    params = make_params()
    lr = 0.05
    opt = DeMo(params, lr, compression_topk=4, compression_chunk=16)
    grads = rand_grads(params, seed=1)
    set_grads(params, grads)
    payload = opt.encode()
    # First step: momentum before the feedback is lr * grad. Rebuild each parameter's
    # own transmission from the payload and check delta_before == delta_after + sent.
    layout = opt._get_layout()
    for gi, geo in enumerate(layout.geometries):
        idx, val = payload[2 * gi], payload[2 * gi + 1]
        dense = torch.zeros(geo.n_chunks, geo.n_coeffs, dtype=val.dtype).scatter(1, idx, val)
        start = 0
        for m in geo.members:
            rows = dense[start : start + m.n_chunks].view(m.n_chunks, *geo.chunk)
            start += m.n_chunks
            sent = dct_decode(rows, m.param.shape)
            g = grads[next(i for i, p in enumerate(params) if p is m.param)]
            after = opt.state[m.param]["delta"]
            torch.testing.assert_close(after + sent, lr * g, atol=1e-12, rtol=0)
            assert after.norm() < (lr * g).norm()  # something was sent


def test_alpha_scales_error_feedback():
    params = make_params([(32, 32)])
    opt_full = DeMo(clone_params(params), 0.1, compression_topk=3, compression_chunk=8)
    opt_half = DeMo(clone_params(params), 0.1, compression_topk=3, compression_chunk=8, alpha=0.5)
    g = rand_grads(params, seed=3)
    for opt in (opt_full, opt_half):
        set_grads(opt.param_groups[0]["params"], g)
        opt.step()
    d_full = opt_full.state[opt_full.param_groups[0]["params"][0]]["delta"]
    d_half = opt_half.state[opt_half.param_groups[0]["params"][0]]["delta"]
    sent = 0.1 * g[0] - d_full
    torch.testing.assert_close(d_half, 0.1 * g[0] - 0.5 * sent, atol=1e-12, rtol=0)


def test_full_k_is_signsgd_on_mean_gradient_via_gather_fn():
    n_workers, lr = 3, 0.01
    base = make_params()
    gather = ThreadGather(n_workers)
    worker_params = [clone_params(base) for _ in range(n_workers)]
    # compression_topk above every chunk's element count: everything is sent.
    opts = [
        DeMo(ps, lr, compression_topk=10_000, compression_chunk=16, gather_fn=gather.fn(r))
        for r, ps in enumerate(worker_params)
    ]
    grads = [rand_grads(base, seed=7 + w) for w in range(n_workers)]
    for ps, g in zip(worker_params, grads, strict=True):
        set_grads(ps, g)
    run_threads([opt.step for opt in opts])
    for i, p0 in enumerate(base):
        mean_g = torch.stack([g[i] for g in grads]).mean(0)
        expected = p0.detach() - lr * mean_g.sign()
        for ps in worker_params:
            torch.testing.assert_close(ps[i].detach(), expected, atol=1e-12, rtol=0)
        # Everything was sent: no momentum left.
        assert opts[0].state[worker_params[0][i]]["delta"].abs().max() < 1e-12


def test_aggregate_averages_over_senders_only():
    # Worker 0 sends coefficients {0, 1}, worker 1 sends {0, 3}.
    indices = torch.tensor([[[0, 1]], [[0, 3]]])
    values = torch.tensor([[[2.0, 5.0]], [[4.0, -7.0]]])
    agg = aggregate_sparse(indices, values, 4)
    torch.testing.assert_close(agg, torch.tensor([[3.0, 5.0, 0.0, -7.0]]))


@pytest.mark.parametrize("chunk", [(16,), (16, 16), (8, 12)])
def test_sparse_idct_equals_dense(chunk):
    n, e, k = 5, math.prod(chunk), 4
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    val = torch.randn(n, k, dtype=torch.float64)
    dense = torch.zeros(n, e, dtype=torch.float64).scatter(1, idx, val).view(n, *chunk)
    torch.testing.assert_close(sparse_idct(idx, val, chunk), idct_nd(dense, len(chunk)))


@pytest.mark.parametrize(("n_workers", "k"), [(1, 3), (2, 3), (3, 2), (4, 40)])
def test_decode_aggregate_sparse_and_dense_paths_agree(n_workers, k):
    chunk, n = (16, 16), 6
    # Overlapping choices: every worker picks from the first 2k coefficients.
    idx = torch.stack(
        [torch.stack([torch.randperm(2 * k)[:k] for _ in range(n)]) for _ in range(n_workers)]
    )
    val = torch.randn(n_workers, n, k, dtype=torch.float64)
    agg = aggregate_sparse(idx, val, 256)
    expected = idct_nd(agg.view(n, *chunk), 2)
    torch.testing.assert_close(decode_aggregate(idx, val, chunk), expected)


def test_disjoint_coefficients_survive_unhalved_end_to_end():
    # Worker A's momentum has DCT coefficients c0=-1, c1=0.5; worker B's c0=-1, c3=0.5.
    # With k=2 both send c0, and one of c1 / c3 each. Averaging over senders keeps c1 and
    # c3 at 0.5, which makes element 0 of the update positive; dividing by the number of
    # workers would halve them and flip that sign.
    lr, n = 0.5, 8
    basis = dct_basis(n, dtype=torch.float64)
    coeff_a = torch.zeros(n, dtype=torch.float64)
    coeff_a[0], coeff_a[1] = -1.0, 0.5
    coeff_b = torch.zeros(n, dtype=torch.float64)
    coeff_b[0], coeff_b[3] = -1.0, 0.5
    grads = [basis.T @ coeff_a / lr, basis.T @ coeff_b / lr]
    base = [nn.Parameter(torch.zeros(n, dtype=torch.float64))]
    worker_params = [clone_params(base) for _ in range(2)]
    opts = [DeMo(ps, lr, compression_topk=2, compression_chunk=n) for ps in worker_params]
    for ps, g in zip(worker_params, grads, strict=True):
        set_grads(ps, [g])
    simulated_step(opts)
    right = basis.T @ torch.tensor([-1.0, 0.5, 0, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    halved = basis.T @ torch.tensor([-1.0, 0.25, 0, 0.25, 0, 0, 0, 0], dtype=torch.float64)
    assert right[0] > 0 > halved[0]
    torch.testing.assert_close(worker_params[0][0].detach(), -lr * right.sign())
    torch.testing.assert_close(worker_params[1][0].detach(), -lr * right.sign())


def test_every_change_is_zero_or_lr_without_weight_decay():
    lr = 0.0078125  # 2**-7
    params = make_params(dtype=torch.float32)
    opt = DeMo(params, lr, compression_topk=4, compression_chunk=16)
    for step in range(4):
        before = [p.detach().clone() for p in params]
        set_grads(params, rand_grads(params, seed=step))
        opt.step()
        for p, b in zip(params, before, strict=True):
            change = (p.detach() - b).abs()
            ok = (change == 0) | torch.isclose(change, torch.tensor(lr), rtol=1e-3, atol=0)
            assert bool(ok.all())
            assert bool((change > 0).any())


def test_param_group_learning_rates():
    a, b = make_params([(32, 32)]), make_params([(32, 32)], seed=1)
    opt = DeMo([{"params": a, "lr": 0.5}, {"params": b}], 0.25, compression_chunk=8)
    before = [a[0].detach().clone(), b[0].detach().clone()]
    set_grads(a + b, rand_grads(a + b, seed=0))
    opt.step()
    for p, b0, lr in ((a[0], before[0], 0.5), (b[0], before[1], 0.25)):
        steps = ((p.detach() - b0).abs() / lr).round(decimals=9).unique().tolist()
        assert 1.0 in steps and set(steps) <= {0.0, 1.0}  # moved, by exactly its lr
    assert len(opt.encode()) == 2  # same geometry: one (indices, values) pair


def test_state_dict_roundtrip_is_bitwise():
    kwargs = {"compression_topk": 4, "compression_chunk": 16, "weight_decay": 0.1}
    base = make_params(dtype=torch.float32)
    grads = [rand_grads(base, seed=s) for s in range(6)]

    straight = clone_params(base)
    opt = DeMo(straight, 0.01, **kwargs)
    for g in grads:
        set_grads(straight, g)
        opt.step()

    first = clone_params(base)
    opt1 = DeMo(first, 0.01, **kwargs)
    for g in grads[:3]:
        set_grads(first, g)
        opt1.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = [nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = DeMo(resumed, 0.01, **kwargs)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[resumed[0]]["step"] == 3
    for g in grads[3:]:
        set_grads(resumed, g)
        opt2.step()
    for p, q in zip(straight, resumed, strict=True):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["delta"], opt2.state[q]["delta"])


@pytest.mark.parametrize(
    "options",
    [{}, {"index_dtype": "auto", "value_dtype": torch.bfloat16}, {"sign_values": True}],
    ids=["reference", "compact", "sign"],
)
def test_simulated_workers_stay_bitwise_identical(options):
    n_workers = 4
    base = make_params(dtype=torch.float32)
    worker_params = [clone_params(base) for _ in range(n_workers)]
    opts = [
        DeMo(ps, 0.01, compression_topk=6, compression_chunk=16, weight_decay=0.1, **options)
        for ps in worker_params
    ]
    for step in range(5):
        for w, ps in enumerate(worker_params):
            set_grads(ps, rand_grads(base, seed=10 * step + w))
        simulated_step(opts)
    for ps in worker_params[1:]:
        for p, q in zip(worker_params[0], ps, strict=True):
            assert torch.equal(p.detach(), q.detach())
    # Different gradients, different momenta.
    p0, p1 = worker_params[0][0], worker_params[1][0]
    assert not torch.equal(opts[0].state[p0]["delta"], opts[1].state[p1]["delta"])


def test_params_rebound_to_views_of_a_flat_matrix():
    # The trainer rebinds every param.data / param.grad to views into a [K, P] matrix.
    n_workers, shapes = 3, [(32, 48), (48,), (2, 16, 16)]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.randn(1, sum(sizes)).repeat(n_workers, 1)
    flat_grad = torch.zeros_like(flat)
    models, opts = [], []
    for w in range(n_workers):
        params = [nn.Parameter(torch.empty(s)) for s in shapes]
        start = 0
        for p, s, n in zip(params, shapes, sizes, strict=True):
            p.data = flat[w, start : start + n].view(s)
            p.grad = flat_grad[w, start : start + n].view(s)
            start += n
        models.append(params)
        opts.append(DeMo(params, 0.01, compression_chunk=16, compression_topk=8))
    before = flat.clone()
    for step in range(3):
        flat_grad.copy_(torch.randn(flat_grad.shape, generator=torch.Generator().manual_seed(step)))
        simulated_step(opts)
    assert not torch.equal(flat, before)
    for w in range(1, n_workers):
        assert torch.equal(flat[0], flat[w])


@pytest.mark.parametrize(
    ("options", "index_bytes", "value_bytes"),
    [
        ({}, 8, 4),
        ({"index_dtype": "auto", "value_dtype": torch.bfloat16}, None, 2),
        ({"index_dtype": torch.int32, "value_dtype": torch.float16}, 4, 2),
        ({"index_dtype": "auto", "sign_values": True}, None, None),
    ],
)
def test_payload_bytes_match_formula(options, index_bytes, value_bytes):
    shapes = [(64, 128), (128,), (4, 32, 64), (50, 30), (131,), (256, 8)]
    params = make_params(shapes, dtype=torch.float32)
    topk, chunk = 20, 32
    opt = DeMo(params, 0.01, compression_topk=topk, compression_chunk=chunk, **options)
    set_grads(params, rand_grads(params, seed=0))
    payload = opt.encode()
    expected = 0
    for shape in shapes:
        cshape = chunk_shape(shape, chunk)
        elems = math.prod(cshape)
        n_chunks = math.prod(shape) // elems
        k = min(topk, elems)
        ib = index_bytes or torch.empty(0, dtype=compact_index_dtype(elems)).element_size()
        if options.get("sign_values"):
            expected += n_chunks * (k * ib + math.ceil(k / 8))
        else:
            expected += n_chunks * k * (ib + value_bytes)
    assert payload_nbytes(payload) == expected == DeMo.payload_nbytes(payload)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1.0},
        {"lr": float("nan")},
        {"compression_decay": 1.0},
        {"compression_decay": -0.1},
        {"compression_topk": 0},
        {"compression_topk": 2.5},
        {"compression_chunk": 0},
        {"weight_decay": -0.01},
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"index_dtype": torch.float32},
        {"index_dtype": "small"},
        {"value_dtype": torch.int32},
        {"sign_values": True, "value_dtype": torch.bfloat16},
        {"gather_fn": 3},
    ],
)
def test_invalid_hyperparameters_raise(kwargs):
    kwargs = {"lr": 0.01, **kwargs}
    lr = kwargs.pop("lr")
    with pytest.raises(ValueError):
        DeMo(make_params([(4,)]), lr, **kwargs)


def test_index_dtype_too_small_raises():
    # caught at construction: a 32x32 chunk has indices up to 1023
    with pytest.raises(ValueError, match="index_dtype.*indices reach 1023"):
        DeMo(make_params([(32, 32)]), 0.1, index_dtype=torch.uint8, compression_chunk=32)
    # a dtype that holds chunk**2 - 1 is accepted
    DeMo(make_params([(32, 32)]), 0.1, index_dtype=torch.int16, compression_chunk=32).encode()


def test_compact_indices_and_bf16_values():
    shapes = [(16, 16), (16, 32), (64,), (300,)]
    base = make_params(shapes, dtype=torch.float32)
    full = clone_params(base)
    compact = clone_params(base)
    opt_full = DeMo(full, 0.01, compression_topk=8, compression_chunk=64)
    opt_compact = DeMo(
        compact, 0.01, compression_topk=8, compression_chunk=64,
        index_dtype="auto", value_dtype=torch.bfloat16,
    )  # fmt: skip
    g = rand_grads(base, seed=0)
    set_grads(full, g)
    set_grads(compact, g)
    pf, pc = opt_full.encode(), opt_compact.encode()
    # Geometries: 16x16 (256 elems), 16x32 (512), 64, 300 -> 1 x 60 chunks... in order.
    assert [t.dtype for t in pc[0::2]] == [torch.uint8, torch.int16, torch.uint8, torch.uint8]
    assert all(t.dtype == torch.bfloat16 for t in pc[1::2])
    for a, b in zip(pf[0::2], pc[0::2], strict=True):
        assert torch.equal(a, b.long())  # same coefficients selected
    for a, b in zip(pf[1::2], pc[1::2], strict=True):
        torch.testing.assert_close(a.to(torch.bfloat16), b)
    # The feedback removes the rounded values: the rounding error stays in the momentum.
    d_full = opt_full.state[full[0]]["delta"]
    d_compact = opt_compact.state[compact[0]]["delta"]
    assert not torch.equal(d_full, d_compact)
    torch.testing.assert_close(d_full, d_compact, atol=1e-4, rtol=0)
    opt_full.apply([t.unsqueeze(0) for t in pf])
    opt_compact.apply([t.unsqueeze(0) for t in pc])
    for a, b in zip(full, compact, strict=True):
        agree = (a.detach() == b.detach()).float().mean()
        assert agree > 0.95


def test_bfloat16_parameters():
    params = make_params([(32, 64), (64,)], dtype=torch.bfloat16)
    opt = DeMo(params, 2**-6, compression_chunk=16, compression_topk=4, index_dtype="auto")
    for step in range(2):
        before = [p.detach().clone() for p in params]
        set_grads(params, rand_grads(params, seed=step))
        opt.step()
        for p, b in zip(params, before, strict=True):
            assert p.dtype == opt.state[p]["delta"].dtype == torch.bfloat16
            assert bool((p.detach() != b).any())


def test_sign_packing_roundtrip():
    vals = torch.randn(3, 5, 13)
    packed = pack_signs(vals)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 2)
    unpacked = unpack_signs(packed, 13)
    expected = torch.where(vals < 0, -1.0, 1.0)
    assert torch.equal(unpacked, expected)


def test_sign_values_single_worker_decodes_plus_minus_one():
    params = make_params([(8,)])
    opt = DeMo(params, 0.1, compression_topk=3, compression_chunk=8, sign_values=True)
    before = params[0].detach().clone()
    set_grads(params, rand_grads(params, seed=0))
    delta = 0.1 * params[0].grad
    payload = opt.encode()
    assert payload[1].dtype == torch.uint8 and payload[1].shape == (1, 1)
    coeffs = dct_encode(delta, 8)[0]
    top = coeffs.abs().topk(3).indices
    signs = torch.zeros(8, dtype=torch.float64)
    signs[top] = coeffs[top].sign()
    opt.apply([t.unsqueeze(0) for t in payload])
    expected = before - 0.1 * dct_decode(signs.view(1, 8), (8,)).sign()
    torch.testing.assert_close(params[0].detach(), expected)


def test_grad_none_counts_as_zero_and_frozen_params_are_skipped():
    params = make_params([(16, 16), (16,), (8,)])
    params[2].requires_grad_(False)
    frozen_before = params[2].detach().clone()
    opt = DeMo(params, 0.1, compression_chunk=16, compression_topk=4)
    params[0].grad = torch.randn(16, 16, dtype=torch.float64)
    n_tensors = len(opt.encode())
    opt.step()
    assert torch.equal(params[2].detach(), frozen_before)
    assert params[2] not in opt.state
    params[0].grad = None
    assert len(opt.encode()) == n_tensors  # layout does not depend on .grad


def test_apply_rejects_mismatched_payload():
    params = make_params([(16, 16)])
    opt = DeMo(params, 0.1, compression_chunk=16)
    set_grads(params, rand_grads(params, seed=0))
    payload = opt.encode()
    with pytest.raises(ValueError):
        opt.apply([t.unsqueeze(0) for t in payload][:1])
    with pytest.raises(ValueError):
        opt.apply([payload[0].unsqueeze(0), payload[1].unsqueeze(0)[:, :, :3]])


def test_single_process_torch_distributed_exchange(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized")
    base = make_params(dtype=torch.float32)
    alone, with_dist = clone_params(base), clone_params(base)
    options = {"index_dtype": "auto", "value_dtype": torch.bfloat16, "compression_topk": 4}
    opt_alone = DeMo(alone, 0.01, **options)
    opt_dist = DeMo(with_dist, 0.01, **options)
    g = rand_grads(base, seed=0)
    set_grads(alone, g)
    set_grads(with_dist, g)
    opt_alone.step()
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        opt_dist.step()  # all_gather of int16 / uint8 / bf16 as raw bytes
    finally:
        dist.destroy_process_group()
    for p, q in zip(alone, with_dist, strict=True):
        assert torch.equal(p.detach(), q.detach())


def test_closure_loss_is_returned():
    model = nn.Linear(8, 4)
    opt = DeMo(model.parameters(), 0.01)
    x = torch.randn(5, 8)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and torch.isfinite(loss)


# Two gloo ranks: opt.step() with DeMo's default all-gather (no gather_fn) must give both
# ranks the parameters of one process that stacks the same two payloads and applies them.
RANK_OPTIONS = [
    {},
    {"index_dtype": "auto", "value_dtype": torch.bfloat16, "compression_topk": 4},
    {"sign_values": True, "weight_decay": 0.1},
]
RANK_STEPS = 3


def _rank_grads(params, rank: int, step: int) -> list[Tensor]:
    return rand_grads(params, seed=1000 * step + rank)


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a DeMo per option set, stepped with the default torch.distributed gather."""
    from datetime import timedelta

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result = []
        for options in RANK_OPTIONS:
            params = make_params(dtype=torch.float32)
            opt = DeMo(params, 0.01, **options)
            for step in range(RANK_STEPS):
                set_grads(params, _rank_grads(params, rank, step))
                opt.step()
            result.append(([p.detach() for p in params], [opt.state[p]["delta"] for p in params]))
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_default_all_gather_equals_single_process_reference(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    world = 2
    ctx = mp.start_processes(
        _rank_main,
        args=(world, free_port(), str(tmp_path)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "ranks timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for i, options in enumerate(RANK_OPTIONS):
        base = make_params(dtype=torch.float32)
        workers = [clone_params(base) for _ in range(world)]
        opts = [DeMo(ps, 0.01, **options) for ps in workers]
        for step in range(RANK_STEPS):
            for r, ps in enumerate(workers):
                set_grads(ps, _rank_grads(ps, r, step))
            simulated_step(opts)  # encode both, stack in rank order, apply on both
        for r in range(world):
            params, deltas = ranks[r][i]
            for got, want in zip(params, workers[r], strict=True):
                assert torch.equal(got, want.detach()), (options, r)
            for got, p in zip(deltas, workers[r], strict=True):
                assert torch.equal(got, opts[r].state[p]["delta"]), (options, r)
        for a, b in zip(ranks[0][i][0], ranks[1][i][0], strict=True):
            assert torch.equal(a, b)
        assert not torch.equal(ranks[0][i][1][0], ranks[1][i][1][0])  # the ranks did differ


@pytest.mark.parametrize(
    "options",
    [{}, {"sign_values": True}, {"value_dtype": torch.bfloat16, "alpha": 0.5},
     {"index_dtype": "auto", "weight_decay": 0.1, "compression_topk": 300}],
    ids=["reference", "signs", "bf16_alpha", "auto_index_dense"],
)  # fmt: skip
def test_encode_many_equals_separate_encodes(options):
    """Three workers' encodes as one batched DCT / top-k / decode: the same payloads and
    momenta as three ``encode()`` calls (one thread: bitwise), over several steps."""
    base = make_params(dtype=torch.float32)
    workers = [clone_params(base) for _ in range(3)]
    separate = [DeMo(p, lr=0.01, compression_chunk=16, **options) for p in workers]
    copies = [clone_params(base) for _ in range(3)]
    together = [DeMo(p, lr=0.01, compression_chunk=16, **options) for p in copies]
    for step in range(3):
        for j in range(3):
            grads = rand_grads(base, seed=10 * step + j)
            set_grads(workers[j], grads)
            set_grads(copies[j], grads)
        one_by_one = [opt.encode() for opt in separate]
        at_once = DeMo.encode_many(together)
        for a, b in zip(one_by_one, at_once, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        for a, b in zip(separate, together, strict=True):
            pairs = zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True)
            for pa, pb in pairs:
                assert torch.equal(a.state[pa]["delta"], b.state[pb]["delta"])
                assert torch.equal(pa, pb)
    other = DeMo(make_params(dtype=torch.float32), lr=0.01, compression_chunk=8)
    with pytest.raises(ValueError, match="one layout"):
        DeMo.encode_many([together[0], other])
