"""A tiny per-position MLP language model for fast, deterministic tests.

Each position is predicted from its own token only (no mixing across time):
token embedding -> Linear -> GELU (tanh) -> Linear -> logits. It follows the same
contract as :class:`diloco.models.GPT` so every trainer path can be exercised in
milliseconds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diloco.models.batched import embedding, linear, token_losses
from diloco.models.gpt import _check_positive_int, lm_loss

__all__ = ["TinyMLP"]


class TinyMLP(nn.Module):
    """Token embedding followed by a per-position two-layer MLP.

    Args:
        vocab_size: Number of token ids; logits have this last dimension.
        block_size: Longest sequence accepted by ``forward`` (kept for API parity).
        hidden: Width of the hidden MLP layer.
        n_embd: Width of the token embedding.

    Raises:
        ValueError: If an argument is out of range; the message names the argument.
    """

    def __init__(
        self, vocab_size: int, block_size: int, *, hidden: int = 32, n_embd: int = 16
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("hidden", hidden),
            ("n_embd", n_embd),
        ):
            _check_positive_int(name, value)
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.fc_in = nn.Linear(n_embd, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(hidden, vocab_size)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """N(0, 0.02) weights and zero biases, so the initial loss is ~ln(vocab_size)."""
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)
        for lin in (self.fc_in, self.fc_out):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Return ``(logits [B, T, vocab_size], mean cross-entropy or None)``.

        Raises:
            ValueError: If ``idx`` is not 2-D, ``T > block_size`` or ``targets`` has
                a different shape.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, T], got {tuple(idx.shape)}")
        if idx.shape[1] > self.block_size:
            raise ValueError(
                f"sequence length T={idx.shape[1]} exceeds block_size={self.block_size}"
            )
        logits = self.fc_out(self.act(self.fc_in(self.tok_emb(idx))))
        return logits, lm_loss(logits, idx, targets)

    def batched_loss(self, w: dict[str, Tensor], idx: Tensor, targets: Tensor) -> Tensor:
        """Mean loss of K replicas at once (see :meth:`diloco.models.GPT.batched_loss`)."""
        k = idx.shape[0]
        x = embedding(w["tok_emb.weight"], idx).reshape(k, -1, self.tok_emb.embedding_dim)
        x = self.act(linear(x, w["fc_in.weight"], w["fc_in.bias"]))
        logits = linear(x, w["fc_out.weight"], w["fc_out.bias"])
        return token_losses(logits, targets.reshape(k, -1))

    def num_params(self, non_embedding: bool = False) -> int:
        """Count parameters; ``non_embedding`` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
        return n
