"""A model competition's validator: win rates with time priority, reward rules, copy detection.

Model competitions (Bittensor SN9 "pre-training", SN29 "Coldint") pay miners who train models
independently. Every evaluation, the validator scores each current submission on the same
fresh batches and compares submissions pairwise, batch by batch (SN9's ``iswin``): submission
``i`` beats ``j`` on batch ``b`` when

    l_ib * (1 - eps * [t_i < t_j])  <  l_jb * (1 - eps * [t_j < t_i])

where ``l`` is the batch loss, ``t`` the submission time and ``eps`` the time-priority margin:
a later submission must be better by a factor ``1 - eps`` to win, so re-submitting the
leader's weights never pays. Submission ``i``'s win rate is its wins over the
``B * (S - 1)`` comparisons; the reward rule maps win rates to shares summing to 1:

- ``winner_take_all``: the highest win rate takes everything (ties share);
- ``softmax``: ``exp(w_i / T) / sum_j exp(w_j / T)`` (SN9: ``T = 0.01``: a lead of a few
  points of win rate takes nearly everything);
- ``proportional``: ``w_i / sum_j w_j``.

Copies are flagged by content hash (an exact copy) and by relative weight distance
``|w - w'| / |w'|`` to an earlier submission of another miner with the same architecture.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Rule = Literal["winner_take_all", "softmax", "proportional"]


@dataclass
class RewardConfig:
    """How win rates become rewards (``conf/reward/``: sn9, sn29 and the plain rules)."""

    rule: Rule = "softmax"
    temperature: float = field(default=0.01, metadata={"gt": 0.0})
    margin: float = field(default=0.005, metadata={"ge": 0.0, "lt": 1.0})  # time priority eps


@dataclass
class DetectConfig:
    """Copy detection: by hash, by relative weight distance (0 turns it off)."""

    hash: bool = True
    distance: float = field(default=0.01, metadata={"ge": 0.0})
    exclude: bool = True  # flagged submissions take no part in the comparisons, get nothing
    history: int = field(default=3, metadata={"ge": 1})  # epochs of submissions kept to compare


@dataclass
class Submission:
    """One miner's checkpoint as the validator sees it.

    ``source``: the miner a copier copied; never used by the validator's scoring (copiers
    use it to find the model behind a copier that led).
    """

    miner: str
    epoch: int
    time_s: float  # modelled submission time since the competition started
    params: torch.Tensor  # flat fp32 weights (CPU)
    arch: str  # architecture key: only the same architecture is compared by distance
    digest: str = ""
    source: str | None = None

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = content_hash(self.params, self.arch)

    def state_dict(self) -> dict[str, Any]:
        """A plain dict (checkpoints)."""
        return dict(self.__dict__)


def content_hash(params: torch.Tensor, arch: str) -> str:
    """SHA-256 of the architecture key and the fp32 weights' bytes."""
    h = hashlib.sha256(arch.encode())
    h.update(params.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def win_rates(losses: torch.Tensor, times: torch.Tensor, margin: float) -> torch.Tensor:
    """Each submission's share of pairwise, per-batch wins (module docstring).

    Args:
        losses: ``[S, B]`` loss of submission ``s`` on batch ``b``.
        times: ``[S]`` submission times; earlier is protected by ``margin``.
        margin: the time-priority ``eps`` in ``[0, 1)``.

    Returns:
        ``[S]`` win rates in ``[0, 1]`` (a lone submission wins 1.0).
    """
    s = losses.shape[0]
    if s == 0:
        return torch.zeros(0, dtype=torch.float64)
    if s == 1:
        return torch.ones(1, dtype=torch.float64)
    lo = losses.double()
    earlier = (times[:, None] < times[None, :]).double()  # [i, j]: i submitted before j
    mine = lo[:, None, :] * (1 - margin * earlier)[:, :, None]  # i's adjusted loss against j
    theirs = lo[None, :, :] * (1 - margin * earlier.T)[:, :, None]  # j's against i
    wins = (mine < theirs).double().sum((1, 2))
    return wins / (losses.shape[1] * (s - 1))


def rewards(rates: torch.Tensor, eligible: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Shares summing to 1 over the ``eligible`` submissions (all zero if none is eligible)."""
    out = torch.zeros_like(rates, dtype=torch.float64)
    if not bool(eligible.any()):
        return out
    w = rates.double()[eligible]
    if cfg.rule == "winner_take_all":
        share = (w == w.max()).double()
    elif cfg.rule == "softmax":
        share = torch.softmax(w / cfg.temperature, 0)
    elif w.sum() > 0:
        share = w
    else:
        share = torch.ones_like(w)
    out[eligible] = share / share.sum()
    return out


def copy_flags(sub: Submission, earlier: list[Submission], cfg: DetectConfig) -> list[str]:
    """Why ``sub`` looks like a copy of an earlier submission by another miner (or ``[]``).

    The weights are credited to whoever had them first: ``sub`` is flagged when the earliest
    submission it matches (by hash, or by distance) is another miner's. A miner whose next
    model moves little from its own earlier one is not flagged by a copier that re-submitted
    that earlier one in between.
    """
    flags: list[str] = []
    for how in ("copy:hash", "copy:distance"):
        matches = [e for e in earlier if e.time_s < sub.time_s and _same(sub, e, how, cfg)]
        if matches and min(matches, key=lambda e: e.time_s).miner != sub.miner:
            flags.append(how)
    return flags


def _same(a: Submission, b: Submission, how: str, cfg: DetectConfig) -> bool:
    """Whether ``a`` and ``b`` match by hash, or by relative weight distance to ``b``."""
    if how == "copy:hash":
        return cfg.hash and a.digest == b.digest
    if cfg.distance <= 0 or a.arch != b.arch or a.params.shape != b.params.shape:
        return False
    gap = (a.params - b.params).norm() / b.params.norm().clamp_min(1e-12)
    return gap.item() < cfg.distance
