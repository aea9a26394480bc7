"""A validator after Templar's Gauntlet: score each contribution by the loss it removes.

Templar (tplr-ai/templar; the incentive design of SparseLoCo's network, arXiv 2508.15706)
evaluates a miner's pseudo-gradient on the data that miner was assigned and on data it was
not, and rewards the gap. Here, for every payload row ``delta_i`` of worker ``i``, applied
alone to the global model in eval mode (``theta_i' = theta - delta_i``: for DiLoCo, worker
i's model)::

    own_ij  = L(theta; A_i) - L(theta_j'; A_i)      A_i: the last ``own_batches`` batches
                                                  worker i was assigned (a poisoner's clean
                                                  ones), scored for every payload j
    fresh_i = L(theta; F)   - L(theta_i'; F)        F: ``fresh_batches`` batches drawn fresh
                                                  each round from the training split (never
                                                  the eval split)

and per worker two exponential moving averages (``s <- beta s + (1 - beta) raw``, the first
round taken as is):

- **loss score** ``s_i = EMA(fresh_i)``: does the update help on data nobody was assigned?
  (a sign flipper, a random-token poisoner; a free rider early in training).
- **assignment score** ``a_i = EMA(own_ii - mean_{j != i} own_ij)``: does it lower the loss
  on the batches its worker was assigned more than the other payloads do? (an update
  trained on other data, a free rider, a copy of someone else's). Templar compares against
  the miner's gain on random batches; comparing with the other payloads on the same batches
  removes the batch-to-batch variance, which was ten times the signal on the robustness
  setting.
- Either score below ``median - z * max(1.4826 MAD, spread_floor * |median|)`` over the
  round's payloads flags the worker (a robust outlier rule); a payload whose loss is not
  finite is flagged by the loss score and left out of both.
- **copy check**: a row whose cosine similarity to another row exceeds ``copy_threshold`` is
  a copy; the later one by modelled arrival time is blamed (both when they arrive together).
  Arrival: a worker's compute time for the round (its steps at its speed) plus its upload
  (fp32 payload at ``comm.bandwidth_mbps``); a forged payload built from others' payloads
  cannot leave before those arrive, so it arrives after the latest of them plus its own
  upload (see :func:`arrival_times`).

A flagged worker gets weight 0 and the others weight 1 (the aggregate is the mean of the
accepted payloads; late in training an honest worker's loss score is small and noisy, often
below 0, so it makes a poor weight). Detection is
counted against the true Byzantine ids, per detector and for the union, as true and false
positives summed over rounds: precision = caught / flagged, recall = caught / Byzantine
rows seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diloco.config import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
LossAt = Callable[[torch.Tensor, Batch], torch.Tensor]
"""``loss_at(flat_params, batch)``: per-sequence losses ``[B]`` (eval mode) at those params."""

DETECTORS = ("loss", "assignment", "copy")


def arrival_times(
    steps: Sequence[int],
    speeds: Sequence[float],
    readers: torch.Tensor,
    step_s: float,
    upload_s: float,
) -> torch.Tensor:
    """Modelled arrival ``[K]`` of each worker's payload at the validator, in seconds.

    ``steps_i / speed_i * step_s + upload_s``; a worker in ``readers`` (it forges from the
    others' payloads) arrives at the latest other arrival plus ``upload_s``.
    """
    t = torch.tensor(steps, dtype=torch.float64) / torch.tensor(speeds, dtype=torch.float64)
    t = t * step_s + upload_s
    if bool(readers.any()) and not bool(readers.all()):
        t[readers] = t[~readers].max() + upload_s
    return t


class Gauntlet:
    """Scores contributions and turns scores into aggregation weights.

    Args:
        cfg: settings (``conf/validator/gauntlet.yaml``).
        loss_at: evaluates the model at given flat parameters on a batch.
        own_batch: ``own_batch(i)``: the last batches worker i was assigned, concatenated.
        fresh_batch: draws a new batch from the training split (``fresh_batches`` per round).
        theta: returns the current global parameters ``[P]``.
        byzantine: the true ``[K]`` Byzantine mask, for detection metrics only.
        arrival: ``arrival(P)`` gives every worker's modelled arrival ``[K]`` this round for
            payloads of ``P`` fp32 entries (None: all arrive together).
        sampler: the fresh batches' sampler, checkpointed with the scores.
    """

    @dataclass
    class Config:
        """EMA ``beta``; outliers below the median by ``z`` robust spreads; copies; batches."""

        beta: float = field(default=0.75, metadata={"ge": 0.0, "lt": 1.0})
        z: float = field(default=5.0, metadata={"gt": 0.0})
        spread_floor: float = field(default=0.1, metadata={"ge": 0.0})
        copy_threshold: float = field(default=0.999, metadata={"gt": 0.0, "le": 1.0})
        fresh_batches: int = field(default=8, metadata={"ge": 1})
        own_batches: int = field(default=5, metadata={"ge": 1})

    def __init__(
        self,
        cfg: Config,
        loss_at: LossAt,
        own_batch: Callable[[int], Batch],
        fresh_batch: Callable[[], Batch],
        theta: Callable[[], torch.Tensor],
        byzantine: torch.Tensor,
        arrival: Callable[[int], torch.Tensor] | None = None,
        sampler: Any = None,
    ) -> None:
        self.cfg, self.loss_at, self.theta = cfg, loss_at, theta
        self.own_batch, self.fresh_batch, self.arrival = own_batch, fresh_batch, arrival
        self.sampler = sampler  # the fresh batches' sampler, checkpointed with the scores
        self.byzantine = byzantine
        k = len(byzantine)
        self.scores = torch.zeros(k, dtype=torch.float64)
        self.assign = torch.zeros(k, dtype=torch.float64)
        self.seen = torch.zeros(k, dtype=torch.bool)
        self.last: dict[str, float] = {}
        # per detector (+ the union): [caught, flagged, byzantine rows seen]
        self.counts = torch.zeros(len(DETECTORS) + 1, 3, dtype=torch.float64)
        self.rows_seen = 0

    @staticmethod
    def check(parts: Any) -> None:
        """Each payload is applied alone to the model: it needs whole pseudo-gradients."""
        if getattr(parts.algorithm, "payload_kind", None) != "pseudo_gradient":
            raise ConfigError("validator=gauntlet", "scores full pseudo-gradients: use DiLoCo")

    @torch.no_grad()
    def weigh(
        self, rows: torch.Tensor, ids: Sequence[int], present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Aggregation weights ``[n]`` for payload rows ``[n, P]`` sent by workers ``ids``.

        ``present`` ``[n]`` (None: all): the rows that count this round; the others (an
        absent worker's or one that ran no step, weight 0 in the aggregate) are neither
        scored, flagged nor counted, and keep weight 1 here.
        """
        ids = list(ids)
        keep = [j for j in range(len(ids)) if present is None or bool(present[j])]
        weights = torch.ones(len(ids), dtype=torch.float64)
        if keep:
            weights[keep] = self._weigh(rows[keep], [ids[j] for j in keep])
        return weights.float()

    def _weigh(self, rows: torch.Tensor, ids: list[int]) -> torch.Tensor:
        n = len(ids)
        theta = self.theta().clone()
        fresh = [self.fresh_batch() for _ in range(self.cfg.fresh_batches)]
        own = [self.own_batch(i) for i in ids]
        batches = fresh + own  # one evaluation of every batch per model: [sequences]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        sizes = [len(b[0]) for b in batches]
        base = self.loss_at(theta, (x, y))
        nf = sum(sizes[: len(fresh)])
        owner = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes[len(fresh) :]))
        per_owner = torch.bincount(owner, minlength=n).to(torch.float64)
        fresh_gain = torch.zeros(n, dtype=torch.float64)
        gain = torch.zeros(n, n, dtype=torch.float64)  # [m, j]: payload j on ids[m]'s batch
        for j in range(n):  # one forward of every batch per payload
            gains = base - self.loss_at(theta - rows[j], (x, y))
            fresh_gain[j] = gains[:nf].mean()
            gain[:, j] = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, gains[nf:])
        gain /= per_owner[:, None]
        # a payload whose loss is not finite is flagged and kept out of every statistic
        finite = torch.isfinite(fresh_gain) & torch.isfinite(gain).all(0)
        g = torch.where(finite[None, :], gain, 0.0)
        count = (int(finite.sum()) - finite.long()).clamp_min(1)
        assign_raw = g.diagonal() - (g.sum(1) - g.diagonal()) / count
        for j, i in enumerate(ids):
            if not finite[j]:
                continue
            b = self.cfg.beta if self.seen[i] else 0.0
            self.scores[i] = b * self.scores[i] + (1 - b) * fresh_gain[j]
            self.assign[i] = b * self.assign[i] + (1 - b) * assign_raw[j]
            self.seen[i] = True
        loss = ~finite
        assign = torch.zeros(n, dtype=torch.bool)
        ok = [i for i, f in zip(ids, finite.tolist(), strict=True) if f]
        if ok:
            loss[finite] = self._outliers(self.scores[ok])
            assign[finite] = self._outliers(self.assign[ok])
        flags = {"loss": loss, "assignment": assign, "copy": self._copies(rows, ids)}
        flagged = flags["loss"] | flags["assignment"] | flags["copy"]
        weights = (~flagged).to(torch.float64)
        self._detect(flags, flagged, weights, ids)
        return weights

    def _outliers(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores below ``median - z * max(1.4826 MAD, spread_floor * |median|)``.

        ``median`` is the lower median of an even count (``torch.median``); with one or two
        scores nothing can be an outlier.
        """
        med = scores.median()
        mad = 1.4826 * (scores - med).abs().median()
        return scores < med - self.cfg.z * torch.maximum(mad, self.cfg.spread_floor * med.abs())

    def _copies(self, rows: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Rows nearly parallel to another row that arrived no later than they did."""
        unit = torch.nn.functional.normalize(rows.double(), dim=1)
        similar = ((unit @ unit.T) > self.cfg.copy_threshold).cpu()
        similar.fill_diagonal_(False)
        if self.arrival is None:
            t = torch.zeros(len(ids), dtype=torch.float64)
        else:
            t = self.arrival(rows.shape[1])[ids].to(torch.float64).cpu()
        not_earlier = t[:, None] >= t[None, :]  # [j, m]: j arrived no earlier than m
        return (similar & not_earlier).any(dim=1)

    def _detect(
        self,
        flags: dict[str, torch.Tensor],
        flagged: torch.Tensor,
        weights: torch.Tensor,
        ids: list[int],
    ) -> None:
        byz = self.byzantine[ids]
        n_byz = float(byz.sum())
        self.rows_seen += len(ids)
        self.last = {}
        for d, (name, mask) in enumerate([*flags.items(), ("", flagged)]):
            caught, n_flag = float((mask & byz).sum()), float(mask.sum())
            self.counts[d] += torch.tensor([caught, n_flag, n_byz], dtype=torch.float64)
            prefix = f"{name}_" if name else ""
            self.last[f"{prefix}precision"] = caught / n_flag if n_flag else 1.0
            self.last[f"{prefix}recall"] = caught / n_byz if n_byz else 1.0
        total = float(weights.sum())
        self.last_share = float(weights[byz].sum()) / total if total > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Per-worker scores and the last round's detection (per detector and overall)."""
        out = {f"worker/{i}/score": float(v) for i, v in enumerate(self.scores)}
        out.update({f"worker/{i}/assignment": float(v) for i, v in enumerate(self.assign)})
        out.update({f"adversary/detect_{k}": v for k, v in self.last.items()})
        if self.last:
            out["adversary/byzantine_weight"] = self.last_share
        return out

    def summary(self) -> dict[str, float]:
        """Detection precision and recall over every round validated (counts summed)."""
        out = {}
        for d, name in enumerate([*DETECTORS, ""]):
            caught, n_flag, n_byz = self.counts[d].tolist()
            prefix = f"{name}_" if name else ""
            out[f"detect_{prefix}precision"] = caught / n_flag if n_flag else 1.0
            out[f"detect_{prefix}recall"] = caught / n_byz if n_byz else 1.0
        out["detect_flagged_share"] = float(self.counts[-1, 1]) / max(self.rows_seen, 1)
        return out

    def state_dict(self) -> dict[str, Any]:
        """EMA scores, detection counts and the fresh sampler's position."""
        state: dict[str, Any] = {
            "scores": self.scores.clone(),
            "assign": self.assign.clone(),
            "seen": self.seen.clone(),
            "counts": self.counts.clone(),
            "rows_seen": self.rows_seen,
        }
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.scores.copy_(state["scores"])
        self.seen.copy_(state["seen"])
        if "assign" in state:  # checkpoints of the one-score validator have neither
            self.assign.copy_(state["assign"])
            self.counts = state["counts"].clone()
            self.rows_seen = int(state["rows_seen"])
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
