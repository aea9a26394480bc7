"""Data poisoning: Byzantine workers train on corrupted batches and send honest-looking payloads.

``shuffle`` permutes the tokens of each sequence (the model learns unigram statistics only);
``random`` replaces them by uniform random tokens. The corruption of a batch is seeded by
``(seed, worker_id, draw)`` so a resumed run corrupts exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

from diloco.adversary.attacks import Attack, AttackConfig


class Poison(Attack):
    """Data poisoning: Byzantine workers train on corrupted data, then send honestly.

    Their payloads are not forged; each one's sampler is wrapped in a :class:`PoisonedSampler`.
    """

    name = "poison"
    forges_payloads = False

    @dataclass
    class Config(AttackConfig):
        """``mode``: ``shuffle`` the tokens of each sequence or draw ``random`` ones."""

        mode: Literal["shuffle", "random"] = "shuffle"

    def corrupt_sampler(self, sampler: Any, worker: int, vocab_size: int, seed: int) -> Any:
        """Wrap the worker's sampler: every batch it draws is corrupted."""
        return PoisonedSampler(sampler, self.cfg.mode, vocab_size, seed, worker)


class PoisonedSampler:
    """Wraps a worker's sampler; every batch it draws is corrupted."""

    def __init__(
        self,
        sampler: Any,
        mode: Literal["shuffle", "random"],
        vocab_size: int,
        seed: int,
        worker: int,
    ) -> None:
        if mode not in ("shuffle", "random"):
            raise ValueError(f"poison mode {mode!r}: allowed shuffle, random")
        self.sampler, self.mode, self.vocab = sampler, mode, vocab_size
        self.seed, self.worker, self.draws = seed, worker, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapped sampler's next batch, corrupted; ``y`` stays ``x`` shifted by one."""
        x, y = self.sampler.next_batch()
        seqs = torch.cat([x, y[:, -1:]], dim=1)
        digest = hashlib.sha256(f"{self.seed}/{self.worker}/{self.draws}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        self.draws += 1
        if self.mode == "random":
            seqs = torch.randint(0, self.vocab, seqs.shape, generator=gen)
        else:
            order = torch.rand(seqs.shape, generator=gen).argsort(dim=1)
            seqs = seqs.gather(1, order)
        return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()

    @property
    def last_assigned(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last clean batch the worker was assigned (it trains on a corrupted copy)."""
        return self.sampler.last_assigned

    @property
    def recent(self) -> Any:
        """The last batches the worker was assigned (clean, before the corruption)."""
        return self.sampler.recent

    def remember(self, n: int) -> None:
        """Keep the last ``n`` assigned batches (see the wrapped sampler)."""
        self.sampler.remember(n)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped sampler's position and the number of corrupted draws."""
        return {**self.sampler.state_dict(), "poison_draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        state = dict(state)
        self.draws = int(state.pop("poison_draws"))
        self.sampler.load_state_dict(state)
