"""A Gauntlet-style validator: score each contribution by the loss it removes.

After Templar's Gauntlet: for every payload row ``delta_i`` (a pseudo-gradient), apply it
alone to the global model, ``theta_i' = theta - delta_i`` (for DiLoCo this is worker i's
model), and measure

    own_i    = L(theta; own batch_i)    - L(theta_i'; own batch_i)   the batch assigned to
                                                                   worker i this round
    random_i = L(theta; random batch)   - L(theta_i'; random batch)  held-out data

The raw score is ``own_i + random_i``, smoothed per worker by an EMA (``score <- beta *
score + (1 - beta) * raw``). A worker that trained on its assigned data removes much more
loss there than one that did not (free rider), trained on other data (poison) or sent a
harmful update (sign flip). Workers whose EMA score is at most ``min_score`` or below
``relative_min`` times the median score get weight 0 (excluded); the others are weighted
by their score. A row whose cosine similarity to an
earlier row is above ``copy_threshold`` is flagged as a copy and excluded. Detection is
reported against the true Byzantine ids as precision and recall of the excluded set, and as
the share of aggregation weight that Byzantine workers received.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diloco.config import ConfigError

LossAt = Callable[[torch.Tensor, tuple[torch.Tensor, torch.Tensor]], float]
"""``loss_at(flat_params, batch)``: the model's loss with those parameters on that batch."""


class Gauntlet:
    """Scores contributions and turns scores into aggregation weights.

    Args:
        cfg: settings (``conf/validator/gauntlet.yaml``).
        loss_at: evaluates the model at given flat parameters on a batch.
        own_batch: ``own_batch(i)`` is a batch of worker i's assigned data.
        random_batch: a held-out batch.
        theta: returns the current global parameters ``[P]``.
        byzantine: the true ``[K]`` Byzantine mask, for detection metrics only.
    """

    @dataclass
    class Config:
        """EMA ``beta``; exclusion below ``min_score`` or ``relative_min`` x median; copies."""

        beta: float = field(default=0.5, metadata={"ge": 0.0, "lt": 1.0})
        min_score: float = 0.0
        relative_min: float = field(default=0.5, metadata={"ge": 0.0, "lt": 1.0})
        copy_threshold: float = field(default=0.999, metadata={"gt": 0.0, "le": 1.0})

    def __init__(
        self,
        cfg: Config,
        loss_at: LossAt,
        own_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        random_batch: tuple[torch.Tensor, torch.Tensor],
        theta: Callable[[], torch.Tensor],
        byzantine: torch.Tensor,
    ) -> None:
        self.cfg, self.loss_at, self.theta = cfg, loss_at, theta
        self.own_batch, self.random_batch = own_batch, random_batch
        self.byzantine = byzantine
        self.scores = torch.zeros(len(byzantine), dtype=torch.float64)
        self.seen = torch.zeros(len(byzantine), dtype=torch.bool)
        self.last: dict[str, float] = {}
        self.totals = torch.zeros(3, dtype=torch.float64)  # flagged byzantine, flagged, rounds

    @staticmethod
    def check(parts: Any) -> None:
        """Each payload is applied alone to the model: it needs whole pseudo-gradients."""
        if getattr(parts.algorithm, "payload_kind", None) != "pseudo_gradient":
            raise ConfigError("validator=gauntlet", "scores full pseudo-gradients: use DiLoCo")

    @torch.no_grad()
    def weigh(self, rows: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        """Aggregation weights ``[n]`` for payload rows ``[n, P]`` sent by workers ``ids``."""
        theta = self.theta().clone()
        base_random = self.loss_at(theta, self.random_batch)
        weights = torch.zeros(len(ids), dtype=torch.float64)
        unit = torch.nn.functional.normalize(rows.double(), dim=1)
        copies = []
        for j, i in enumerate(ids):
            own = self.own_batch(i)
            moved = theta - rows[j]
            raw = self.loss_at(theta, own) - self.loss_at(moved, own)
            raw += base_random - self.loss_at(moved, self.random_batch)
            b = self.cfg.beta if self.seen[i] else 0.0
            self.scores[i] = b * self.scores[i] + (1 - b) * raw
            self.seen[i] = True
            copies.append(j > 0 and bool((unit[:j] @ unit[j] > self.cfg.copy_threshold).any()))
        scores = self.scores[list(ids)]
        floor = max(self.cfg.min_score, self.cfg.relative_min * float(scores.median()))
        for j in range(len(ids)):
            if scores[j] > floor and not copies[j]:
                weights[j] = scores[j]
        self._detect(weights, ids)
        return weights.float()

    def _detect(self, weights: torch.Tensor, ids: Sequence[int]) -> None:
        byz = self.byzantine[list(ids)]
        flagged = weights == 0
        hit = int((flagged & byz).sum())
        precision = hit / int(flagged.sum()) if flagged.any() else 1.0
        recall = hit / int(byz.sum()) if byz.any() else 1.0
        total = float(weights.sum())
        share = float(weights[byz].sum()) / total if total > 0 else 0.0
        self.last = {"precision": precision, "recall": recall, "byzantine_weight": share}
        self.totals += torch.tensor([precision, recall, 1.0], dtype=torch.float64)

    def metrics(self) -> dict[str, float]:
        """Per-worker scores and the last round's detection."""
        out = {f"worker/{i}/score": float(v) for i, v in enumerate(self.scores)}
        out.update(
            {f"adversary/detect_{k}": v for k, v in self.last.items() if k != "byzantine_weight"}
        )
        if self.last:
            out["adversary/byzantine_weight"] = self.last["byzantine_weight"]
        return out

    def summary(self) -> dict[str, float]:
        """Detection precision and recall averaged over the rounds validated."""
        rounds = max(1.0, float(self.totals[2]))
        return {
            "detect_precision": float(self.totals[0]) / rounds,
            "detect_recall": float(self.totals[1]) / rounds,
        }

    def state_dict(self) -> dict[str, Any]:
        """EMA scores and detection totals."""
        return {"scores": self.scores.clone(), "seen": self.seen.clone(), "totals": self.totals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.scores.copy_(state["scores"])
        self.seen.copy_(state["seen"])
        self.totals = state["totals"].clone()
