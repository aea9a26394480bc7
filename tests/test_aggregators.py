import numpy as np
import pytest
import torch

from diloco.adversary import (
    NNM,
    Bucketing,
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    Mean,
    MultiKrum,
    TrimmedMean,
)
from diloco.compose import check_overrides
from diloco.config import ConfigError
from tests.helpers import CONF_DIR, node, plugin

X = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])


def honest_and_outlier(n: int = 7, p: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    honest = 1.0 + 0.1 * torch.randn(n - 1, p, generator=g)
    return honest, torch.cat([honest, torch.full((1, p), 1e6)])


# --- known vectors ------------------------------------------------------------------------


def test_median_known_vector():
    assert torch.equal(CoordinateMedian()(X), torch.tensor([4.0, 5, 6]))


def test_trimmed_mean_known_vector():
    rows = torch.cat([X, torch.tensor([[-4.0, -5, -6]])])
    torch.testing.assert_close(TrimmedMean(f=1)(rows), torch.tensor([2.5, 3.5, 4.5]))


def test_geomed_known_vector():
    # equilateral triangle: the median is the centroid; convex quadrilateral: the crossing of
    # its diagonals (y = x and y = 1 - x / 3). Every vertex is > nu away, so no smoothing.
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3**0.5]])
    quad = torch.tensor([[0.0, 0.0], [3.0, 0.0], [2.0, 2.0], [0.0, 1.0]])
    for rows, median in ((tri, [1.0, 3**-0.5]), (quad, [0.75, 0.75])):
        out = GeometricMedian(nu=0.1)(rows)
        torch.testing.assert_close(out, torch.tensor(median), atol=1e-5, rtol=0)


def test_krum_known_vector():
    # f=1, n=4: each score sums the squared distances to the n - f - 1 = 2 nearest other rows:
    # [0]: 1 + 9 = 10, [1]: 1 + 4 = 5, [3]: 4 + 9 = 13, [10]: 49 + 81 = 130
    rows = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    assert torch.equal(Krum(f=1)(rows), torch.tensor([1.0]))
    torch.testing.assert_close(MultiKrum(f=1, m=2)(rows), torch.tensor([0.5]))  # [1] and [0]
    torch.testing.assert_close(MultiKrum(f=1)(rows), torch.tensor([4.0 / 3]))  # m = n - f = 3


@pytest.mark.parametrize("f", [1, 2, 3])
@pytest.mark.parametrize("extra", [0, 1], ids=["n=2f+1", "n=2f+2"])
def test_krum_boundary_colluders_never_selected(f, extra):
    n = 2 * f + 1 + extra
    g = torch.Generator().manual_seed(10 * f + extra)
    for _ in range(50):
        honest = torch.randn(n - f, 4, generator=g)
        colluders = 1e6 + 1e-3 * torch.randn(f, 4, generator=g)  # together, far away
        rows = torch.cat([colluders, honest])[torch.randperm(n, generator=g)]
        out = Krum(f=f)(rows)
        assert any(torch.equal(out, h) for h in honest), out
        kept = MultiKrum(f=f)(rows)  # m = n - f: exactly the honest rows
        torch.testing.assert_close(kept, honest.mean(0))


# --- rule details -------------------------------------------------------------------------


def test_mean_weighted_and_fp32():
    assert torch.equal(Mean()(X, torch.tensor([1.0, 0, 0])), X[0])
    torch.testing.assert_close(Mean()(X, torch.tensor([1.0, 1, 2])), (X[0] + X[1] + 2 * X[2]) / 4)
    assert Mean()(X.double()).dtype == torch.float32


def test_median_even_and_weighted():
    rows = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    med = CoordinateMedian()
    torch.testing.assert_close(med(rows), torch.quantile(rows, 0.5, dim=0))
    torch.testing.assert_close(med(rows, torch.full((6,), 3.0)), med(rows))
    heavy = torch.tensor([10.0, 1, 1, 1, 1, 1])
    assert torch.equal(med(rows, heavy), rows[0])


def test_trimmed_mean_weights_uniform_matches_unweighted():
    rows = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    tm = TrimmedMean(f=2)
    torch.testing.assert_close(tm(rows, torch.ones(7)), tm(rows))
    torch.testing.assert_close(TrimmedMean(f=0)(rows), rows.mean(0))


def smoothed_geomed_float64(rows: torch.Tensor, w: torch.Tensor, nu: float) -> torch.Tensor:
    """argmin_z sum_i w_i g_nu(||z - x_i||) by BFGS in float64 (independent of Weiszfeld)."""
    optimize = pytest.importorskip("scipy.optimize")
    x, a = rows.double().numpy(), w.double().numpy()

    def objective(z):
        diff = z - x
        d = (diff**2).sum(1) ** 0.5
        far = d >= nu
        value = a @ np.where(far, d, d**2 / (2 * nu) + nu / 2)
        return value, (a * np.where(far, 1 / np.maximum(d, 1e-300), 1 / nu)) @ diff

    z0 = np.median(x, axis=0)
    res = optimize.minimize(objective, z0, jac=True, method="BFGS", options={"gtol": 1e-12})
    return torch.from_numpy(res.x)


@pytest.mark.parametrize("seed", range(6))
def test_geomed_matches_a_high_precision_solution(seed):
    g = torch.Generator().manual_seed(seed)
    n, p = [(5, 3), (7, 5), (9, 50), (8, 1000), (16, 200), (6, 10)][seed]
    rows = 1.0 + torch.randn(n, p, generator=g) * (0.1 + seed / 2)
    bad = max(1, n // 4)
    rows[:bad] = 20.0 + 50.0 * torch.randn(bad, p, generator=g)  # outliers
    for w in (torch.ones(n), 0.5 + torch.rand(n, generator=g)):
        agg = GeometricMedian()
        out = agg(rows, w).double()
        ref = smoothed_geomed_float64(rows, w, nu=0.1)
        assert agg.iterations < agg.cfg.max_iter  # stopped on tol, not on the cap
        assert (out - ref).norm() <= 1e-5 * ref.norm(), float((out - ref).norm() / ref.norm())


def test_geomed_stopping_and_weights():
    rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    one = GeometricMedian(max_iter=1)
    z0 = CoordinateMedian()(rows)
    beta = 1 / (rows - z0).norm(dim=1).clamp_min(0.1)
    torch.testing.assert_close(one(rows), (beta @ rows) / beta.sum())  # one step from z_0
    quad = torch.tensor([[0.0, 0.0], [3.0, 0.0], [2.0, 2.0], [0.0, 1.0]])
    capped, free = GeometricMedian(max_iter=4), GeometricMedian()
    assert not torch.allclose(capped(quad), free(quad), atol=1e-4)
    assert capped.iterations == 4 < free.iterations
    torch.testing.assert_close(GeometricMedian()(rows, torch.ones(5) * 2), GeometricMedian()(rows))


def test_multikrum():
    rows = torch.randn(7, 4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(MultiKrum(f=2, m=1)(rows), Krum(f=2)(rows))
    torch.testing.assert_close(MultiKrum(f=0, m=7)(rows), rows.mean(0))
    with pytest.raises(ValueError, match="m=8"):
        MultiKrum(f=1, m=8)(rows)


def test_cclip_rule_and_state():
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    cc = CenteredClipping(tau=1.0, L=1)
    torch.testing.assert_close(cc(rows), torch.tensor([0.3, 0.4]))  # (unit(3,4) + 0) / 2
    saved = cc.state_dict()
    second = cc(rows)
    fresh = CenteredClipping(tau=1.0, L=1)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh(rows), second)
    assert not torch.allclose(second, torch.tensor([0.3, 0.4]))  # the center persisted


class Recorder(Mean):
    """A mean that keeps the rows (and weights) it was given."""

    def _aggregate(self, rows, w, n_all):
        self.seen = (rows.clone(), None if w is None else w.clone())
        return super()._aggregate(rows, w, n_all)


def test_nnm_known_mixed_rows():
    # f=1: each row becomes the mean of its n - f = 2 nearest rows, itself included
    rows = torch.tensor([[0.0], [1.0], [10.0]])
    inner = Recorder()
    out = NNM(f=1, inner=inner)(rows)
    torch.testing.assert_close(inner.seen[0], torch.tensor([[0.5], [0.5], [5.5]]))
    torch.testing.assert_close(out, torch.tensor([6.5 / 3]))
    w = torch.tensor([1.0, 3.0, 1.0])  # weighted means of the same neighbourhoods: (10 + 3) / 4
    NNM(f=1, inner=inner)(rows, w)
    torch.testing.assert_close(inner.seen[0], torch.tensor([[0.75], [0.75], [3.25]]))
    assert torch.equal(inner.seen[1], w)


def test_nnm_mixing():
    rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(NNM(f=0, inner=node("aggregator", "mean"))(rows), rows.mean(0))
    composed = plugin("aggregator", "nnm", f=1, inner=node("aggregator", "trimmed_mean"))
    assert isinstance(composed.inner, TrimmedMean) and composed.inner.cfg.f == 1
    explicit = NNM(f=1, inner=TrimmedMean(f=1))
    torch.testing.assert_close(composed(rows), explicit(rows))


def test_bucketing_seeded_state_roundtrip():
    rows = torch.randn(8, 3, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(Bucketing(s=1, inner=node("aggregator", "mean"))(rows), rows.mean(0))
    torch.testing.assert_close(
        Bucketing(s=8, inner=node("aggregator", "median"))(rows), rows.mean(0)
    )
    b = Bucketing(s=2, inner=node("aggregator", "median"), seed=3)
    b(rows)
    saved = b.state_dict()
    ahead = [b(rows) for _ in range(2)]
    c = Bucketing(s=2, inner=node("aggregator", "median"), seed=99)
    c.load_state_dict(saved)
    assert all(torch.equal(c(rows), a) for a in ahead)
    assert torch.equal(
        Bucketing(s=2, inner=node("aggregator", "median"), seed=3)(rows),
        Bucketing(s=2, seed=3)(rows),
    )


@pytest.mark.parametrize(
    "agg", [TrimmedMean(f=2), Krum(f=2), MultiKrum(f=2), NNM(f=2)], ids=lambda a: a.name
)
def test_n_le_2f_raises(agg):
    with pytest.raises(ValueError, match=r"f=2.*n=4"):
        agg(torch.randn(4, 3))


def test_bad_inputs():
    with pytest.raises(ValueError):
        Mean()(torch.randn(3))
    with pytest.raises(ValueError):
        Mean()(X, torch.ones(2))
    with pytest.raises(ValueError):
        Mean()(X, torch.tensor([1.0, -1.0, 1.0]))


# --- breakdown ----------------------------------------------------------------------------

ROBUST = [
    ("median", {}),
    ("trimmed_mean", {"f": 1}),
    ("geomed", {}),
    ("krum", {"f": 1}),
    ("multikrum", {"f": 1}),
    ("cclip", {"tau": 1.0, "L": 10}),
    ("nnm", {"f": 1, "inner": node("aggregator", "trimmed_mean")}),
    ("bucketing", {"s": 2, "inner": node("aggregator", "median")}),
]


def test_mean_breaks_down():
    honest, rows = honest_and_outlier()
    assert (Mean()(rows) - honest.mean(0)).norm() > 1e4


@pytest.mark.parametrize(("name", "kwargs"), ROBUST, ids=[r[0] for r in ROBUST])
def test_robust_rules_resist_one_huge_row(name, kwargs):
    honest, rows = honest_and_outlier()
    out = plugin("aggregator", name, **kwargs)(rows)
    assert torch.isfinite(out).all()
    assert (out - honest.mean(0)).norm() < 1.0, out


# --- absent rows (weight 0) --------------------------------------------------------------

EVERY = [
    ("mean", {}),
    ("median", {}),
    ("trimmed_mean", {"f": 1}),
    ("geomed", {}),
    ("krum", {"f": 1}),
    ("multikrum", {"f": 1, "m": 2}),
    ("multikrum", {"f": 1}),
    ("cclip", {"tau": 1.0, "L": 3}),
    ("nnm", {"f": 2, "inner": node("aggregator", "trimmed_mean")}),
    ("bucketing", {"s": 2, "inner": node("aggregator", "median")}),
]


def with_absent_rows(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """5 spread-out present rows and 4 absent (all-zero, weight 0) ones that cluster at 0.

    Returns (all rows, all weights, present mask). The zero rows are each other's nearest
    neighbours, so a rule that let them into its selection would pick them.
    """
    g = torch.Generator().manual_seed(seed)
    present = 2.0 + 3.0 * torch.randn(5, 6, generator=g)
    rows = torch.cat([present[:2], torch.zeros(2, 6), present[2:], torch.zeros(2, 6)])
    mask = torch.tensor([True, True, False, False, True, True, True, False, False])
    weights = torch.where(mask, 1.0 + torch.rand(9, generator=g), torch.zeros(9))
    return rows, weights, mask


@pytest.mark.parametrize(("name", "kwargs"), EVERY, ids=[f"{n}{kw}" for n, kw in EVERY])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
def test_absent_rows_are_dropped_before_the_rule(name, kwargs, uniform):
    rows, weights, mask = with_absent_rows()
    if uniform:
        weights = mask.float()
    out = plugin("aggregator", name, **kwargs)(rows, weights)
    assert torch.isfinite(out).all()
    # a fresh instance (same seed, no center yet) on the present rows alone
    torch.testing.assert_close(out, plugin("aggregator", name, **kwargs)(rows[mask], weights[mask]))


def test_krum_never_selects_an_absent_row():
    rows, weights, mask = with_absent_rows()
    out = Krum(f=1)(rows, weights)
    assert any(torch.equal(out, r) for r in rows[mask]) and out.abs().sum() > 0
    assert torch.isfinite(MultiKrum(f=1, m=1)(rows, weights)).all()


def test_too_few_present_rows_lower_f(caplog):
    rows = torch.tensor([[0.0], [1.0], [5.0], [0.0], [0.0]])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])  # 3 present, f=2 needs 5
    for agg in (
        TrimmedMean(f=2),
        Krum(f=2),
        MultiKrum(f=2),
        NNM(f=2, inner=node("aggregator", "mean")),
    ):
        out = agg(rows, weights)
        ref = type(agg)(**{**vars(agg.cfg), "f": 1})(rows[:3])  # f lowered to (3 - 1) // 2
        torch.testing.assert_close(out, ref)
        assert "f=2 lowered to 1" in caplog.text
    with pytest.raises(ValueError, match=r"f=3.*n=5"):  # misconfigured: all rows too few
        TrimmedMean(f=3)(rows, weights)


def test_multikrum_m_above_present_rows():
    rows = torch.tensor([[0.0], [1.0], [2.0], [0.0], [0.0]])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(MultiKrum(f=1, m=4)(rows, weights), MultiKrum(f=1, m=2)(rows[:3]))
    with pytest.raises(ValueError, match="m=6"):
        MultiKrum(f=1, m=6)(rows, weights)


# --- registry -----------------------------------------------------------------------------


def test_registry_names():
    assert {p.stem for p in (CONF_DIR / "aggregator").glob("*.yaml")} == {
        "mean", "median", "trimmed_mean", "geomed", "krum", "multikrum", "cclip", "nnm",
        "bucketing",
    }  # fmt: skip


def test_registry_errors():
    with pytest.raises(ConfigError, match="aggregator=average: unknown; allowed: bucketing"):
        check_overrides(["aggregator=average"])
    with pytest.raises(ConfigError, match=r"f=-1.*>= 0"):
        plugin("aggregator", "krum", f=-1)
    with pytest.raises(ConfigError, match="unknown key"):
        plugin("aggregator", "median", f=1)
    with pytest.raises(ConfigError, match="aggregator.inner._target_"):
        plugin("aggregator", "nnm", inner={"_target_": "nope"})
    with pytest.raises(ConfigError):
        plugin("aggregator", "geomed", nu=0.0)
    with pytest.raises(ConfigError):
        TrimmedMean(TrimmedMean.Config(f=-1))
    assert TrimmedMean(TrimmedMean.Config(f=2)).cfg.f == 2
