"""A small GPT-2 style decoder-only transformer written with einops.

Pre-LayerNorm blocks, causal self-attention through
:func:`torch.nn.functional.scaled_dot_product_attention` (``is_causal=True``, so no
mask buffer is kept), a 4x GELU MLP, learned position embeddings, a final LayerNorm
and a language-model head that shares its weight with the token embedding when
``tie_weights`` is set.

The module keeps no references to parameter tensors outside their ``nn.Parameter``
objects and holds no buffers, so a trainer may rebind every ``param.data`` (and
``param.grad``) to a view into a flat matrix without breaking the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diloco.models.batched import embedding, layer_norm, linear, token_losses

__all__ = ["GPT"]


def lm_loss(logits: Tensor, idx: Tensor, targets: Tensor | None) -> Tensor | None:
    """Mean next-token cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]``."""
    if targets is None:
        return None
    if targets.shape != idx.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must match idx shape {tuple(idx.shape)}"
        )
    return F.cross_entropy(
        rearrange(logits, "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)")
    )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over ``x`` of shape [B, T, C]; position t only sees positions <= t."""
        q, k, v = rearrange(
            self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head
        ).unbind(0)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = rearrange(y, "b h t d -> b t (h d)")
        return self.resid_drop(self.out_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear(C, 4C) -> GELU -> Linear(4C, C)."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.act = nn.GELU()
        self.down_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to every position of ``x``."""
        return self.drop(self.down_proj(self.act(self.up_proj(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        """Run one residual attention + MLP step."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 style language model.

    Args:
        vocab_size: Number of token ids; logits have this last dimension.
        block_size: Longest sequence the model accepts (size of the position table).
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide ``n_embd``.
        n_embd: Width of the residual stream.
        dropout: Dropout probability in [0, 1) for embeddings, attention and MLP.
        bias: Whether Linear and LayerNorm layers carry biases.
        tie_weights: Share one ``nn.Parameter`` between the token embedding and the
            language-model head (listed once by ``parameters()``).

    Raises:
        ValueError: If an argument is out of range; the message names the argument.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        *,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 256,
        dropout: float = 0.0,
        bias: bool = False,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
        ):
            _check_positive_int(name, value)
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ValueError(f"dropout must be a float, got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")

        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.tie_weights = tie_weights

        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self._init_weights()
        if tie_weights:
            # Share the Parameter object itself, not a tensor: parameters() lists it
            # once and rebinding its .data updates both uses.
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, scaled residual projections."""
        resid_std = 0.02 / math.sqrt(2 * self.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=resid_std)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Compute next-token logits and, if ``targets`` is given, the mean loss.

        Args:
            idx: Token ids, LongTensor of shape [B, T] with ``T <= block_size``.
            targets: Optional LongTensor [B, T] of next-token ids; entries equal to
                -100 are ignored by the loss.

        Returns:
            ``(logits, loss)``: logits of shape [B, T, vocab_size] and the mean
            cross-entropy (a scalar) or ``None`` when ``targets`` is ``None``.

        Raises:
            ValueError: If ``idx`` is not 2-D, ``T > block_size`` or ``targets`` has
                a different shape.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, T], got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length T={t} exceeds block_size={self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, lm_loss(logits, idx, targets)

    def batched_loss(self, w: dict[str, Tensor], idx: Tensor, targets: Tensor) -> Tensor:
        """Mean loss of K replicas at once: ``w[name]`` is ``[K, *shape]``, ``idx`` ``[K, B, T]``.

        The same computation as :meth:`forward` per replica (equal to fp32 rounding; dropout
        draws its own masks), with one ``bmm`` per layer over the replicas. Returns ``[K]``.
        """
        k, b, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"sequence length T={t} exceeds block_size={self.block_size}")
        c, h, p = self.n_embd, self.n_head, self.drop.p if self.training else 0.0
        x = embedding(w["tok_emb.weight"], idx) + w["pos_emb.weight"][:, None, :t]
        x = F.dropout(x.reshape(k, b * t, c), p, self.training)
        for i in range(self.n_layer):
            pre = f"blocks.{i}."

            def ln(name: str, x: Tensor, pre: str = pre) -> Tensor:
                return layer_norm(x, w[pre + name + ".weight"], w.get(pre + name + ".bias"))

            def fc(name: str, x: Tensor, pre: str = pre) -> Tensor:
                return linear(x, w[pre + name + ".weight"], w.get(pre + name + ".bias"))

            qkv = fc("attn.qkv", ln("ln_1", x))
            q, kk, v = rearrange(
                qkv, "k (b t) (three h d) -> three (k b) h t d", b=b, three=3, h=h
            ).unbind(0)
            y = F.scaled_dot_product_attention(q, kk, v, dropout_p=p, is_causal=True)
            y = rearrange(y, "(k b) h t d -> k (b t) (h d)", k=k)
            x = x + F.dropout(fc("attn.out_proj", y), p, self.training)
            up = F.gelu(fc("mlp.up_proj", ln("ln_2", x)))
            x = x + F.dropout(fc("mlp.down_proj", up), p, self.training)
        x = layer_norm(x, w["ln_f.weight"], w.get("ln_f.bias"))
        head = w["tok_emb.weight"] if self.tie_weights else w["lm_head.weight"]
        return token_losses(linear(x, head), targets.reshape(k, b * t))

    def num_params(self, non_embedding: bool = False) -> int:
        """Count parameters (each shared Parameter once).

        Args:
            non_embedding: Leave out the position embedding and, when weights are not
                tied, the token embedding. A tied token embedding doubles as the
                language-model head and is always counted.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel()
            if not self.tie_weights:
                n -= self.tok_emb.weight.numel()
        return n
