"""Byzantine attacks on payload rows ``[n, P]``, one row per worker.

An attack is called as ``attack(rows, byzantine, round)`` with ``byzantine`` a bool mask
``[n]`` and returns a new tensor in which only the Byzantine rows differ. Attackers are
omniscient: they see the honest rows ``rows[~byzantine]`` of the same round. Every attack
has ``start_round`` and passes rows through unchanged before it. All Byzantine workers send
the same forged row unless the rule is per-worker (sign flip, noise, stale, malformed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import torch
from torch import Tensor

from diloco.config import ConfigError, configure


@dataclass
class AttackConfig:
    """Shared by every attack: who is Byzantine and from which round the attack is active.

    ``ids`` names the Byzantine workers; when null, the last ``num_byzantine`` are.
    """

    num_byzantine: int = field(default=0, metadata={"ge": 0})
    ids: list[int] | None = None
    start_round: int = field(default=0, metadata={"ge": 0})


def _honest(rows: Tensor, byz: Tensor) -> Tensor:
    honest = rows[~byz].double()
    if honest.shape[0] == 0:
        raise ValueError("this attack needs at least one honest row to look at")
    return honest


def _std(honest: Tensor) -> Tensor:
    """Per-coordinate sample (unbiased) std; zero with a single honest row."""
    return honest.std(0) if honest.shape[0] > 1 else torch.zeros_like(honest[0])


class Attack:
    """Base class: checks inputs, honours ``start_round`` and calls :meth:`_forge`.

    An attack acts on payloads (:meth:`forge`, when ``forges_payloads``), on the data its
    workers train on (:meth:`corrupt_sampler`), or both; the builder and the exchange call
    both hooks for every attack, so neither names one.
    """

    name = "attack"
    Config: Any = AttackConfig
    forges_payloads = True
    through_codec = True  # forged rows are encoded with the wire's codec (not: malformed)
    reads_others = False  # forged from other workers' payloads (so sent after they arrive)

    def __init__(self, cfg: Any = None, **kwargs: Any) -> None:
        self.cfg = configure(self.Config, cfg, kwargs, "attack")

    def byzantine_mask(self, num_workers: int) -> Tensor:
        """The ``[K]`` mask of the workers this attack controls (``ids``, else the last ones)."""
        k, ids = num_workers, self.cfg.ids
        if ids is None:
            if self.cfg.num_byzantine >= k:
                raise ConfigError(
                    f"attack.num_byzantine={self.cfg.num_byzantine}", f"must be < {k}"
                )
            ids = list(range(k - self.cfg.num_byzantine, k))
        if any(not 0 <= i < k for i in ids):
            raise ConfigError(f"attack.ids={ids}", f"every id must be in [0, {k - 1}]")
        mask = torch.zeros(k, dtype=torch.bool)
        mask[ids] = True
        if mask.all():
            raise ConfigError(f"attack.ids={ids}", "at least one worker must be honest")
        return mask

    def corrupt_sampler(self, sampler: Any, worker: int, vocab_size: int, seed: int) -> Any:
        """The data sampler of Byzantine ``worker`` (unchanged unless the attack poisons data)."""
        return sampler

    def forge(self, rows: Tensor, byzantine: Tensor, round: int) -> list[Tensor]:
        """The per-worker payloads after the attack (what the exchange validates)."""
        return list(self(rows, byzantine, round))

    def __call__(self, rows: Tensor, byzantine: Tensor, round: int) -> Tensor:
        """Rows with the Byzantine ones replaced (from ``start_round`` on)."""
        byz = self._mask(rows, byzantine)
        out = rows.clone()
        if round >= self.cfg.start_round and bool(byz.any()):
            out[byz] = self._forge(rows, byz, round).to(rows.dtype)
        return out

    def _mask(self, rows: Tensor, byzantine: Tensor) -> Tensor:
        if rows.dim() != 2:
            raise ValueError(f"{self.name}: rows must be [n, P], got {tuple(rows.shape)}")
        if byzantine.shape != rows.shape[:1]:
            raise ValueError(f"{self.name}: mask {tuple(byzantine.shape)} != ({rows.shape[0]},)")
        return byzantine.to(device=rows.device, dtype=torch.bool)

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        """The forged rows ``[n_byz, P]`` (or one row ``[P]`` broadcast to all of them)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State carried across rounds (empty for stateless attacks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class NoAttack(Attack):
    """Every row passes through unchanged."""

    name = "none"
    forges_payloads = False

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        return rows[byz]


class SignFlip(Attack):
    """Sign flipping (Allen-Zhu et al., ICLR 2021): send ``-scale * x_i`` for one's own row."""

    name = "sign_flip"

    @dataclass
    class Config(AttackConfig):
        """``scale``: multiplier of the flipped row."""

        scale: float = field(default=1.0, metadata={"ge": 0.0})

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        return -self.cfg.scale * rows[byz]


class Gaussian(Attack):
    """Gaussian noise: each coordinate ``~ N(0, sigma^2)``, ``sigma = std * r / sqrt(P)``.

    ``r`` is the mean norm of the honest rows, so ``std=1`` gives noise rows of about the
    honest norm. Drawn from a seeded generator whose state is checkpointed.
    """

    name = "gaussian"
    reads_others = True

    @dataclass
    class Config(AttackConfig):
        """``std``: noise scale relative to the honest norm; ``seed``: generator seed."""

        std: float = field(default=1.0, metadata={"ge": 0.0})
        seed: int = field(default=0, metadata={"ge": 0})

    def __init__(self, cfg: Any = None, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        honest = _honest(rows, byz)
        sigma = self.cfg.std * float(honest.norm(dim=1).mean()) / math.sqrt(max(rows.shape[1], 1))
        noise = torch.randn(int(byz.sum()), rows.shape[1], generator=self.generator)
        return (sigma * noise).to(rows.device)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator."""
        self.generator.set_state(state["generator"])


class ALIE(Attack):
    """A Little Is Enough (Baruch et al., NeurIPS 2019, arXiv 1902.06156).

    Send ``mu + z * sigma`` per coordinate, with ``mu`` and ``sigma`` the honest mean and sample
    (unbiased) std. ``z=None`` takes the paper's ``z_max``: with ``n`` workers and ``f``
    Byzantine ones, ``s = floor(n / 2 + 1) - f`` and ``z = Phi^{-1}((n - s) / n)``; ``s`` is
    clamped to ``[1, n - 1]`` so a Byzantine majority gets a finite ``z``.
    """

    name = "alie"
    reads_others = True

    @dataclass
    class Config(AttackConfig):
        """``z``: std multiplier (``None``: the paper's ``z_max``)."""

        z: float | None = None

    @staticmethod
    def z_max(n: int, f: int) -> float:
        """The paper's ``z`` for ``n`` workers of which ``f`` are Byzantine."""
        if n < 2:
            return 0.0
        s = min(max(math.floor(n / 2 + 1) - f, 1), n - 1)
        return NormalDist().inv_cdf((n - s) / n)

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        honest = _honest(rows, byz)
        z = self.cfg.z if self.cfg.z is not None else self.z_max(rows.shape[0], int(byz.sum()))
        return honest.mean(0) + z * _std(honest)


class IPM(Attack):
    """Inner product manipulation (Xie et al., UAI 2020, arXiv 1903.03936): ``-eps * mu``.

    ``mu`` is the honest mean; small ``eps`` (0.1) slips past distance-based rules, large
    ``eps`` reverses the update.
    """

    name = "ipm"
    reads_others = True

    @dataclass
    class Config(AttackConfig):
        """``eps``: scale of the reversed honest mean."""

        eps: float = field(default=0.1, metadata={"ge": 0.0})

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        return -self.cfg.eps * _honest(rows, byz).mean(0)


class Mimic(Attack):
    """Mimic (Karimireddy et al., ICLR 2022): copy the ``target``-th honest row.

    Over-represents one honest worker, which hurts under heterogeneous data.
    """

    name = "mimic"
    reads_others = True

    @dataclass
    class Config(AttackConfig):
        """``target``: index among the honest rows (in worker order)."""

        target: int = field(default=0, metadata={"ge": 0})

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        honest = rows[~byz]
        if self.cfg.target >= honest.shape[0]:
            raise ValueError(f"mimic: target={self.cfg.target} but {honest.shape[0]} honest rows")
        return honest[self.cfg.target]


class MinMax(Attack):
    """Min-Max, AGR-agnostic (Shejwalkar & Houmansadr, NDSS 2021).

    Send ``mu + gamma * p`` with ``mu`` the honest mean and ``p`` the perturbation
    (``"std"``: ``-sigma``, the inverse std, default; ``"unit"``: ``-mu / ||mu||``;
    ``"sign"``: ``-sign(mu)``), where ``gamma`` is the largest value with
    ``max_i ||mu + gamma p - x_i|| <= max_{i,j} ||x_i - x_j||`` over honest ``x``. The paper
    finds ``gamma`` by bisection; each constraint is a quadratic in ``gamma`` with a root
    ``>= 0`` (``mu`` lies in the honest hull), so the largest feasible ``gamma`` is the
    smallest of those roots, computed exactly here.
    """

    name = "minmax"
    reads_others = True

    @dataclass
    class Config(AttackConfig):
        """``perturbation``: direction ``p`` (``std``, ``unit`` or ``sign``)."""

        perturbation: Literal["std", "unit", "sign"] = "std"

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        honest = _honest(rows, byz)
        mu = honest.mean(0)
        if self.cfg.perturbation == "std":
            p = -_std(honest)
        elif self.cfg.perturbation == "unit":
            p = -mu / mu.norm().clamp_min(1e-300)
        else:
            p = -mu.sign()
        return mu + self.gamma(honest, mu, p) * p

    @staticmethod
    def gamma(honest: Tensor, mu: Tensor, p: Tensor) -> float:
        """Largest ``gamma >= 0`` with every ``||mu + gamma p - x_i|| <= max_ij ||x_i - x_j||``."""
        a = float(p @ p)
        if a == 0.0:
            return 0.0
        dist = torch.cdist(honest[None], honest[None], compute_mode="donot_use_mm_for_euclid_dist")
        diam2 = float(dist.max()) ** 2
        d = mu - honest
        b = d @ p
        c = ((d * d).sum(1) - diam2).clamp_max(0.0)
        return float(((-b + (b * b - a * c).sqrt()) / a).min().clamp_min(0.0))


class Stale(Attack):
    """Stale payloads: replay one's own row from ``k`` rounds earlier.

    Own rows are recorded every round (also before ``start_round``); a worker without a row
    from round ``round - k`` sends its current row.
    """

    name = "stale"

    @dataclass
    class Config(AttackConfig):
        """``k``: how many rounds old the replayed row is."""

        k: int = field(default=1, metadata={"ge": 1})

    def __init__(self, cfg: Any = None, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.history: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, rows: Tensor, byzantine: Tensor, round: int) -> Tensor:
        """Forge from the history, then record this round's Byzantine rows."""
        out = super().__call__(rows, byzantine, round)
        byz = self._mask(rows, byzantine)
        self.history[round] = (byz.cpu(), rows[byz].detach().cpu().clone())
        self.history = {r: v for r, v in self.history.items() if round - r < self.cfg.k}
        return out

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        out = rows[byz].clone()
        old = self.history.get(round - self.cfg.k)
        if old is not None:
            old_mask, old_rows = old
            pos = torch.full((rows.shape[0],), -1, dtype=torch.long)
            pos[old_mask] = torch.arange(old_rows.shape[0])
            have = pos[byz.cpu()]
            sel = (have >= 0).to(rows.device)
            out[sel] = old_rows[have[have >= 0]].to(device=rows.device, dtype=rows.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The recorded rows, by round."""
        return {"history": dict(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recorded rows."""
        self.history = dict(state["history"])


class FreeRider(Attack):
    """Free riding: send zeros (contribute nothing, still count in the aggregate)."""

    name = "free_rider"

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        return torch.zeros_like(rows[byz])


class Malformed(Attack):
    """Malformed payloads that a validator must reject without crashing.

    ``nan``/``inf`` fill the row with NaN/+inf and ``huge`` with ``1e30``; these also work on
    a ``[n, P]`` tensor via ``__call__``. ``wrong_shape`` (flattened, one element longer) and
    ``wrong_dtype`` (float64; float32 if already float64) only exist per worker: use
    :meth:`corrupt_payloads`. In the exchange it acts on the decoded payloads (a message
    broken in transit or by a faulty peer), not through the codec as the other attacks do.
    """

    name = "malformed"
    through_codec = False  # a corrupt message, as the receiver decodes it

    @dataclass
    class Config(AttackConfig):
        """``kind``: how the payload is broken."""

        kind: Literal["nan", "inf", "wrong_shape", "wrong_dtype", "huge"] = "nan"

    _FILL = {"nan": math.nan, "inf": math.inf, "huge": 1e30}

    def _forge(self, rows: Tensor, byz: Tensor, round: int) -> Tensor:
        if self.cfg.kind not in self._FILL:
            raise ValueError(f"malformed kind={self.cfg.kind!r} needs corrupt_payloads()")
        return torch.full_like(rows[byz], self._FILL[self.cfg.kind])

    def forge(self, rows: Tensor, byzantine: Tensor, round: int) -> list[Tensor]:
        """Per-worker payloads, so that wrong shapes and dtypes can be sent too."""
        return self.corrupt_payloads(list(rows), byzantine, round)

    def corrupt_payloads(
        self, payloads: Sequence[Tensor], byzantine: Sequence[bool] | Tensor, round: int = 0
    ) -> list[Tensor]:
        """Per-worker payloads with the Byzantine ones broken (from ``start_round`` on)."""
        out = list(payloads)
        if round < self.cfg.start_round:
            return out
        for i, bad in enumerate(byzantine):
            if not bool(bad):
                continue
            t = out[i]
            if self.cfg.kind == "wrong_shape":
                out[i] = torch.cat([t.reshape(-1), t.new_zeros(1)])
            elif self.cfg.kind == "wrong_dtype":
                out[i] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
            else:
                out[i] = torch.full_like(t, self._FILL[self.cfg.kind])
        return out
