"""Robust aggregators: reduce payload rows ``[n, P]`` (one per worker) to one fp32 update ``[P]``.

Every aggregator is called as ``agg(rows, weights=None)``. Weights scale a row's share in the
averaging steps only; the selection steps (trimming, Krum scores, nearest neighbours, buckets)
count rows, so a worker cannot buy its way past a filter with a large weight. Stateful rules
(:class:`CenteredClipping`, :class:`Bucketing`) carry their state in ``state_dict``.

Absent rows. A row of weight 0 (an absent worker under faults or a deadline sends an all-zero
row with weight 0; a validator may score a row 0) is dropped before any rule sees the rows:
it never enters a selection, a trimming, a neighbourhood or a bucket, so every rule returns
what it returns on the present rows alone.

``f`` is the number of Byzantine rows tolerated; rules with an ``f`` need ``n > 2f`` rows.
Called with ``n <= 2f`` rows in all, they raise ``ValueError`` naming ``f`` and ``n`` (the
pipeline probes every aggregator with ``workers.count`` rows at build time and reports this as
a config error). When the rows given satisfy ``n > 2f`` but too few are *present* (weight > 0),
``f`` is lowered for that call to ``(n_present - 1) // 2``, the most the present rows allow,
and a warning is logged: the run goes on and the result is never NaN, but it tolerates fewer
Byzantine rows in that round.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diloco.config import ConfigError, configure, import_target

log = logging.getLogger(__name__)


def _rule(name: str) -> dict[str, Any]:
    return {"_target_": f"{__name__}.{name}"}


def _wmean(rows: Tensor, w: Tensor | None) -> Tensor:
    return rows.mean(0) if w is None else (w @ rows) / w.sum()


def _coord_median(rows: Tensor, w: Tensor | None) -> Tensor:
    """Coordinate-wise (weighted) median; see :class:`CoordinateMedian`."""
    n = rows.shape[0]
    vals, idx = rows.sort(dim=0)
    if w is None:
        return (vals[(n - 1) // 2] + vals[n // 2]) / 2
    cum = w[idx].cumsum(0)
    half, tol = cum[-1] / 2, cum[-1] * 1e-6
    lo = (cum < half - tol).sum(0, keepdim=True).clamp_max(n - 1)
    hi = (cum <= half + tol).sum(0, keepdim=True).clamp_max(n - 1)
    return ((vals.gather(0, lo) + vals.gather(0, hi)) / 2)[0]


def _sq_dists(rows: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``[n, n]`` (direct differences, not the Gram trick)."""
    d = torch.cdist(rows[None], rows[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    return d.square()


class Aggregator:
    """Base class: checks inputs, casts to fp32, drops rows of weight 0, calls :meth:`_aggregate`.

    ``_aggregate(rows, w, n_all)`` gets the present rows only (``w`` is ``None`` or all > 0);
    ``n_all`` is how many rows the caller gave, present or not, for :meth:`_f`.
    """

    name = "aggregator"
    Config: Any = None

    def __init__(self, cfg: Any = None, **kwargs: Any) -> None:
        self.cfg = configure(self.Config, cfg, kwargs, "aggregator")

    def __call__(self, rows: Tensor, weights: Tensor | None = None) -> Tensor:
        """Aggregate ``rows [n, P]`` (optionally weighted by ``weights [n]``) into ``[P]``."""
        if rows.dim() != 2 or rows.shape[0] == 0:
            raise ValueError(f"{self.name}: rows must be [n, P], n >= 1; got {tuple(rows.shape)}")
        rows = rows.float()
        w = None
        if weights is not None:
            w = weights.to(device=rows.device, dtype=torch.float32)
            if w.shape != rows.shape[:1]:
                raise ValueError(f"{self.name}: weights {tuple(w.shape)} != ({rows.shape[0]},)")
            if not (torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
                raise ValueError(f"{self.name}: weights must be finite, >= 0, not all zero")
        n_all = rows.shape[0]
        if w is not None and bool((w == 0).any()):  # absent rows never enter a selection
            present = w > 0
            rows, w = rows[present], w[present]
        return self._run(rows, w, n_all)

    def _run(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        """Aggregate present rows (the entry point a composed rule uses for its inner rule)."""
        return self._aggregate(rows, w, n_all).float()

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        raise NotImplementedError

    def _f(self, n: int, n_all: int) -> int:
        """The ``f`` this call tolerates with ``n`` present rows out of ``n_all`` given.

        ``cfg.f`` when ``n > 2f``; ``ValueError`` when ``n_all <= 2f`` (misconfigured);
        otherwise (absent rows left too few) ``(n - 1) // 2``, with a warning.
        """
        f = int(self.cfg.f)
        if n > 2 * f:
            return f
        if n_all <= 2 * f:
            raise ValueError(f"f={f} needs n > 2f rows, got n={n_all}")
        lowered = (n - 1) // 2
        log.warning(
            "%s: %d of %d rows present (the rest weight 0); f=%d lowered to %d for this call",
            self.name, n, n_all, f, lowered,
        )  # fmt: skip
        return lowered

    def state_dict(self) -> dict[str, Any]:
        """State carried across calls (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class Mean(Aggregator):
    """Arithmetic (or weighted) mean: ``sum_i w_i x_i / sum_i w_i``. Not robust (breakdown 0)."""

    name = "mean"

    @dataclass
    class Config:
        """No parameters."""

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        return _wmean(rows, w)


class CoordinateMedian(Aggregator):
    """Coordinate-wise median (Yin et al., ICML 2018, arXiv 1803.01498).

    Each coordinate is the median of that coordinate over rows; for even ``n`` the two middle
    values are averaged. With weights it is the weighted median (the value where the cumulative
    weight crosses one half, averaging the two neighbours on an exact tie).
    """

    name = "median"

    @dataclass
    class Config:
        """No parameters."""

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        return _coord_median(rows, w)


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018, arXiv 1803.01498).

    Per coordinate, drop the ``f`` largest and ``f`` smallest values and average the other
    ``n - 2f`` (weighted by the kept rows' weights). Needs ``n > 2f``.
    """

    name = "trimmed_mean"

    @dataclass
    class Config:
        """``f``: values trimmed at each end of every coordinate."""

        f: int = field(default=1, metadata={"ge": 0})

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        n = rows.shape[0]
        f = self._f(n, n_all)
        vals, idx = rows.sort(dim=0)
        kept = vals[f : n - f]
        if w is None:
            return kept.mean(0)
        kw = w[idx[f : n - f]]
        return (kept * kw).sum(0) / kw.sum(0).clamp_min(torch.finfo(torch.float32).tiny)


class GeometricMedian(Aggregator):
    """Geometric median by smoothed Weiszfeld (Pillutla et al., RFA, arXiv 1912.13445).

    Minimises ``sum_i w_i g_nu(||z - x_i||)`` with ``g_nu(r) = r`` for ``r >= nu`` and
    ``r^2 / (2 nu) + nu / 2`` below (the ``nu``-smoothed geometric median; with every distance
    at least ``nu`` at the solution it is the geometric median). From the coordinate-wise
    (weighted) median ``z_0``, repeat ``beta_i = w_i / max(nu, ||z - x_i||)``,
    ``z <- sum_i beta_i x_i / sum_i beta_i`` (each step lowers the objective) until the
    relative change ``||z_new - z|| <= tol * max(||z_new||, nu)`` or ``max_iter`` steps
    (``nu`` floors the scale so a median near 0 does not need exact zeros to stop).
    :attr:`iterations` is how many steps the last call took.
    """

    name = "geomed"
    iterations: int = 0

    @dataclass
    class Config:
        """``nu`` smoothing; ``tol`` relative change that stops; ``max_iter`` cap on steps."""

        nu: float = field(default=0.1, metadata={"gt": 0.0})
        tol: float = field(default=1e-6, metadata={"ge": 0.0})
        max_iter: int = field(default=100, metadata={"ge": 1})

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        alpha = torch.ones(rows.shape[0], device=rows.device) if w is None else w
        z = _coord_median(rows, w)
        nu, tol = self.cfg.nu, self.cfg.tol
        self.iterations = 0
        for _ in range(self.cfg.max_iter):
            beta = alpha / (rows - z).norm(dim=1).clamp_min(nu)
            new = (beta @ rows) / beta.sum()
            step, scale = float((new - z).norm()), max(float(new.norm()), nu)
            z = new
            self.iterations += 1
            if step <= tol * scale:
                break
        return z


def _krum_scores(rows: Tensor, f: int) -> Tensor:
    """Sum of squared distances to the ``n - f - 1`` nearest other rows (needs ``n > 2f``)."""
    n = rows.shape[0]
    k = n - f - 1
    if k == 0:
        return torch.zeros(n, device=rows.device)
    return _sq_dists(rows).sort(dim=1).values[:, 1 : k + 1].sum(1)  # column 0: the row itself


class Krum(Aggregator):
    """Krum (Blanchard et al., NeurIPS 2017, arXiv 1703.02757): the row with the lowest score.

    ``score_i = sum of ||x_i - x_j||^2 over the n - f - 1 nearest j != i`` (the ``n - f``
    nearest rows counting ``x_i`` itself), ``i* = argmin_i score_i``, output ``x_{i*}``. Ties go
    to the lowest index. Needs ``n > 2f``.

    Convention: Blanchard et al. sum over ``n - f - 2`` neighbours and prove resilience for
    ``n > 2f + 2``; at ``n = 2f + 1`` that sum covers only ``f - 1`` rows, so ``f`` colluding
    rows placed together score 0 and win however far they are. Here the neighbourhood is the
    ``n - f`` nearest rows including the row itself, the convention of Allouah et al.
    (AISTATS 2023, arXiv 2302.01772, "Fixing by Mixing"), which needs only ``n > 2f``: the
    ``n - f - 1 >= f`` neighbours of a Byzantine row always include an honest one, while an
    honest row has ``n - f - 1`` honest neighbours to choose from.
    """

    name = "krum"

    @dataclass
    class Config:
        """``f``: tolerated Byzantine rows."""

        f: int = field(default=1, metadata={"ge": 0})

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        f = self._f(rows.shape[0], n_all)
        return rows[int(_krum_scores(rows, f).argmin())]


class MultiKrum(Aggregator):
    """Multi-Krum (Blanchard et al., NeurIPS 2017, arXiv 1703.02757): mean of the best ``m``.

    The ``m`` rows of lowest Krum score (scores as :class:`Krum`, over the ``n - f - 1``
    nearest other rows; ties to the lowest index) are averaged, weighted if weights are given.
    ``m=None`` means ``n - f``. Needs ``n > 2f`` and ``m <= n``.
    """

    name = "multikrum"

    @dataclass
    class Config:
        """``f``: tolerated Byzantine rows; ``m``: rows averaged (``None``: ``n - f``)."""

        f: int = field(default=1, metadata={"ge": 0})
        m: int | None = field(default=None, metadata={"ge": 1})

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        n = rows.shape[0]
        f = self._f(n, n_all)
        m = n - f if self.cfg.m is None else self.cfg.m
        if m > n_all:
            raise ValueError(f"m={m} needs m <= n rows, got n={n_all}")
        if m > n:  # absent rows left fewer than m: keep the n - f best
            log.warning("multikrum: %d of %d rows present; m=%d lowered to %d", n, n_all, m, n - f)
            m = n - f
        keep = _krum_scores(rows, f).sort(stable=True).indices[:m]
        return _wmean(rows[keep], None if w is None else w[keep])


class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy et al., ICML 2021, arXiv 2012.10333).

    ``L`` times: ``v <- v + sum_i w_i clip_tau(x_i - v) / sum_i w_i`` with
    ``clip_tau(y) = y * min(1, tau / ||y||)``. The center ``v`` starts at 0 and is kept across
    calls (the paper centres on the previous round's aggregate); it is the rule's state.
    """

    name = "cclip"

    @dataclass
    class Config:
        """``tau``: clipping radius; ``L``: clipping iterations per call."""

        tau: float = field(default=1.0, metadata={"gt": 0.0})
        L: int = field(default=1, metadata={"ge": 1})

    def __init__(self, cfg: Any = None, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.center: Tensor | None = None

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        v = self.center
        if v is None:
            v = torch.zeros(rows.shape[1], device=rows.device)
        elif v.shape != rows.shape[1:]:
            raise ValueError(f"cclip: center has {v.shape[0]} coords, rows have {rows.shape[1]}")
        v = v.to(rows.device)
        for _ in range(self.cfg.L):
            diff = rows - v
            scale = (self.cfg.tau / diff.norm(dim=1).clamp_min(1e-30)).clamp_max(1.0)
            v = v + _wmean(diff * scale[:, None], w)
        self.center = v.detach().clone()
        return v

    def state_dict(self) -> dict[str, Any]:
        """The persistent center (``None`` before the first call)."""
        return {"center": None if self.center is None else self.center.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the center."""
        self.center = state["center"]


def _inner(node: dict[str, Any], f: int | None) -> Aggregator:
    """Build an inner rule from its ``_target_`` node; pass ``f`` down unless the node sets it."""
    cls = import_target(node, "aggregator.inner")
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise ConfigError("aggregator.inner._target_", f"{node['_target_']} is not an aggregator")
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    if f is not None and any(fl.name == "f" for fl in dataclasses.fields(cls.Config)):
        kwargs.setdefault("f", f)
    return cls(**kwargs)


class _PreAggregation(Aggregator):
    """A mixing step, then ``inner`` (a ``_target_`` node or an Aggregator)."""

    def __init__(self, cfg: Any = None, **kwargs: Any) -> None:
        given = kwargs.pop("inner") if isinstance(kwargs.get("inner"), Aggregator) else None
        super().__init__(cfg, **kwargs)
        f = getattr(self.cfg, "f", None)
        self.inner = given if given is not None else _inner(self.cfg.inner, f)

    def _mix(self, rows: Tensor, w: Tensor | None, n_all: int) -> tuple[Tensor, Tensor | None, int]:
        """Mixed rows, their weights, and how many the mix of all ``n_all`` rows would give."""
        raise NotImplementedError

    def _aggregate(self, rows: Tensor, w: Tensor | None, n_all: int) -> Tensor:
        return self.inner._run(*self._mix(rows, w, n_all))

    def state_dict(self) -> dict[str, Any]:
        """The inner rule's state."""
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the inner rule's state."""
        self.inner.load_state_dict(state["inner"])


class NNM(_PreAggregation):
    """Nearest neighbour mixing (Allouah et al., AISTATS 2023, arXiv 2302.01772).

    Each row is replaced by the (weighted) mean of its ``n - f`` nearest rows, itself included;
    the mixed rows then go to ``inner`` with the original weights. ``inner`` inherits ``f``
    unless its node sets one. Needs ``n > 2f``.
    """

    name = "nnm"

    @dataclass
    class Config:
        """``f``: tolerated Byzantine rows; ``inner``: the rule applied after mixing."""

        f: int = field(default=1, metadata={"ge": 0})
        inner: dict[str, Any] = field(default_factory=lambda: _rule("TrimmedMean"))

    def _mix(self, rows: Tensor, w: Tensor | None, n_all: int) -> tuple[Tensor, Tensor | None, int]:
        n = rows.shape[0]
        f = self._f(n, n_all)
        near = _sq_dists(rows).sort(dim=1, stable=True).indices[:, : n - f]
        mix = torch.zeros(n, n, device=rows.device)
        mix.scatter_(1, near, 1.0 if w is None else w[near])
        mix = mix / mix.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return mix @ rows, w, n_all


class Bucketing(_PreAggregation):
    """Bucketing (Karimireddy et al., ICLR 2022, arXiv 2006.09365).

    Shuffle the rows with a seeded permutation, average consecutive buckets of ``s`` rows
    (the last may be smaller; with weights, weighted means and bucket weight = sum of its
    weights), then apply ``inner`` to the ``ceil(n / s)`` bucket means.
    """

    name = "bucketing"

    @dataclass
    class Config:
        """``s``: bucket size; ``inner``: rule on the bucket means; ``seed``: shuffle seed."""

        s: int = field(default=2, metadata={"ge": 1})
        inner: dict[str, Any] = field(default_factory=lambda: _rule("CoordinateMedian"))
        seed: int = field(default=0, metadata={"ge": 0})

    def __init__(self, cfg: Any = None, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def _mix(self, rows: Tensor, w: Tensor | None, n_all: int) -> tuple[Tensor, Tensor | None, int]:
        n, dev = rows.shape[0], rows.device
        perm = torch.randperm(n, generator=self.generator).to(dev)
        bucket = torch.empty(n, dtype=torch.long, device=dev)
        bucket[perm] = torch.arange(n, device=dev) // self.cfg.s
        mix = torch.zeros(-(-n // self.cfg.s), n, device=dev)
        mix[bucket, torch.arange(n, device=dev)] = 1.0 if w is None else w
        bw = mix.sum(1)
        means = (mix / bw.clamp_min(torch.finfo(torch.float32).tiny)[:, None]) @ rows
        return means, None if w is None else bw, -(-n_all // self.cfg.s)

    def state_dict(self) -> dict[str, Any]:
        """The shuffle generator's state and the inner rule's state."""
        return {"generator": self.generator.get_state(), **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator and the inner rule."""
        self.generator.set_state(state["generator"])
        super().load_state_dict(state)
