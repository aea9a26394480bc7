import math

import pytest
import torch

from diloco.models import GPT, LanguageModel, TinyMLP
from diloco.models.gpt import Block

VOCAB = 64
BLOCK = 16


def small_gpt(**kwargs: object) -> GPT:
    cfg: dict[str, object] = {"n_layer": 2, "n_head": 2, "n_embd": 32}
    cfg.update(kwargs)
    return GPT(VOCAB, BLOCK, **cfg)  # type: ignore[arg-type]


def batch(b: int = 4, t: int = BLOCK, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (b, t), generator=g)
    targets = torch.randint(0, VOCAB, (b, t), generator=g)
    return idx, targets


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("factory", [small_gpt, lambda: TinyMLP(VOCAB, BLOCK)])
def test_shapes_and_loss(factory) -> None:
    model = factory()
    assert isinstance(model, LanguageModel)
    idx, targets = batch(3, 10)
    logits, loss = model(idx)
    assert logits.shape == (3, 10, VOCAB)
    assert loss is None
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, VOCAB)
    assert loss is not None and loss.dim() == 0
    assert abs(loss.item() - math.log(VOCAB)) < 0.15


@pytest.mark.parametrize("factory", [small_gpt, lambda: TinyMLP(VOCAB, BLOCK)])
def test_fp32_params_no_buffers(factory) -> None:
    model = factory()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert list(model.buffers()) == []
    assert model.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("factory", [small_gpt, lambda: TinyMLP(VOCAB, BLOCK)])
def test_sequence_too_long_raises(factory) -> None:
    model = factory()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_weight_tying_shares_one_parameter() -> None:
    model = small_gpt()
    assert model.lm_head.weight is model.tok_emb.weight
    params = list(model.parameters())
    assert sum(p is model.tok_emb.weight for p in params) == 1
    untied = small_gpt(tie_weights=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() == model.num_params() + VOCAB * 32
    # non_embedding excludes the position table (and the untied token table).
    assert model.num_params(non_embedding=True) == model.num_params() - BLOCK * 32
    assert untied.num_params(non_embedding=True) == model.num_params(non_embedding=True)


def test_rebinding_param_data_to_flat_views() -> None:
    """The trainer rebinds .data/.grad to views of one flat buffer; the model must follow."""
    model = small_gpt()
    idx, targets = batch()
    ref_logits, _ = model(idx)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    logits, loss = model(idx, targets)
    torch.testing.assert_close(logits, ref_logits)
    flat.zero_()
    logits, _ = model(idx)
    assert torch.all(logits == 0)  # lm_head (tied) reads the rebound data
    assert loss is not None


def test_causality() -> None:
    model = small_gpt().eval()
    idx, _ = batch(2, BLOCK)
    logits, _ = model(idx)
    t = 9
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % VOCAB
    logits2, _ = model(idx2)
    torch.testing.assert_close(logits2[:, :t], logits[:, :t])
    assert not torch.allclose(logits2[:, t], logits[:, t])


def test_init_std() -> None:
    n_layer = 6
    model = GPT(VOCAB, BLOCK, n_layer=n_layer, n_head=4, n_embd=128)
    expected = 0.02 / math.sqrt(2 * n_layer)
    for block in model.blocks:
        assert isinstance(block, Block)
        for w in (block.attn.out_proj.weight, block.mlp.down_proj.weight):
            assert w.std().item() == pytest.approx(expected, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_biases_zero_when_enabled() -> None:
    model = small_gpt(bias=True)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and "ln" not in n]
    assert biases and all(torch.all(b == 0) for b in biases)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"block_size": -1}, "block_size"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": 0}, "n_head"),
        ({"n_embd": 0}, "n_embd"),
        ({"n_embd": 100, "n_head": 3}, "n_embd=100 must be divisible by n_head=3"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"n_layer": 2.5}, "n_layer"),
    ],
)
def test_gpt_invalid_args(kwargs: dict[str, object], name: str) -> None:
    cfg: dict[str, object] = {"vocab_size": VOCAB, "block_size": BLOCK, "n_head": 2, "n_embd": 32}
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=name) as info:
        GPT(**cfg)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"vocab_size": 0}, "vocab_size"), ({"hidden": 0}, "hidden"), ({"n_embd": -2}, "n_embd")],
)
def test_mlp_invalid_args(kwargs: dict[str, object], name: str) -> None:
    cfg: dict[str, object] = {"vocab_size": VOCAB, "block_size": BLOCK}
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=name):
        TinyMLP(**cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", [small_gpt, lambda: TinyMLP(VOCAB, BLOCK)])
def test_adamw_reduces_loss(factory) -> None:
    model = factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, targets = batch()
    losses = []
    for _ in range(20):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_tiny_mlp_deterministic() -> None:
    idx, _ = batch()
    torch.manual_seed(1)
    a = TinyMLP(VOCAB, BLOCK)(idx)[0]
    torch.manual_seed(1)
    b = TinyMLP(VOCAB, BLOCK)(idx)[0]
    assert torch.equal(a, b)


def test_dropout_gpt_trains_and_evals() -> None:
    model = small_gpt(dropout=0.1, bias=True)
    idx, targets = batch()
    model.train()
    _, loss = model(idx, targets)
    assert loss is not None
    loss.backward()
    model.eval()
    a, _ = model(idx)
    b, _ = model(idx)
    assert torch.equal(a, b)
