import math

import pytest
import torch

from diloco.adversary import (
    ALIE,
    IPM,
    Gaussian,
    Malformed,
    Mimic,
    MinMax,
    SignFlip,
    Stale,
)
from diloco.compose import check_overrides
from diloco.config import ConfigError
from tests.helpers import CONF_DIR, plugin

X = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
BYZ = torch.tensor([False, True, False, False, True])

KWARGS = {
    "none": {},
    "sign_flip": {"scale": 2.0},
    "gaussian": {"std": 1.0, "seed": 1},
    "alie": {},
    "ipm": {"eps": 0.5},
    "mimic": {"target": 1},
    "minmax": {},
    "stale": {"k": 1},
    "free_rider": {},
    "malformed": {"kind": "nan"},
}


def rows5(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))


def with_byzantine(honest: torch.Tensor, n_byz: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.cat([honest, torch.zeros(n_byz, honest.shape[1])])
    return rows, torch.arange(rows.shape[0]) >= honest.shape[0]


def test_registry_covers_all():
    files = {p.stem for p in (CONF_DIR / "attack").glob("*.yaml")}
    assert files - {"poison", "poison_random"} == set(KWARGS)  # poison: data (test_poison.py)


@pytest.mark.parametrize("name", list(KWARGS))
def test_only_byzantine_rows_change(name):
    attack = plugin("attack", name, **KWARGS[name])
    if name == "stale":  # needs one round of history
        attack(rows5(1), BYZ, 0)
    rows = rows5()
    before = rows.clone()
    out = attack(rows, BYZ, 1)
    assert out is not rows and out.shape == rows.shape
    assert torch.equal(out[~BYZ], rows[~BYZ])
    assert torch.equal(rows, before)  # input untouched
    changed = ~torch.isclose(out[BYZ], rows[BYZ]).all(1)
    assert bool(changed.all()) == (name != "none")


@pytest.mark.parametrize("name", list(KWARGS))
def test_start_round(name):
    attack = plugin("attack", name, start_round=3, **KWARGS[name])
    rows = rows5()
    for r in range(3):
        assert torch.equal(attack(rows, BYZ, r), rows)
    if name not in ("none", "stale"):
        assert not torch.equal(attack(rows, BYZ, 3), rows)


def test_no_byzantine_is_identity():
    rows = rows5()
    assert torch.equal(plugin("attack", "alie")(rows, torch.zeros(5, dtype=torch.bool), 0), rows)


def test_alie_known_vector_and_z_max():
    rows, byz = with_byzantine(X)
    out = ALIE(z=1.5)(rows, byz, 0)
    torch.testing.assert_close(out[3], torch.tensor([8.5, 9.5, 10.5]))
    # n=4, f=1: s = floor(3) - 1 = 2, z = Phi^-1(2/4) = 0 -> the honest mean
    torch.testing.assert_close(ALIE()(rows, byz, 0)[3], torch.tensor([4.0, 5, 6]))
    assert ALIE.z_max(50, 12) == pytest.approx(0.5828, abs=1e-4)  # Phi^-1(36/50)
    assert math.isfinite(ALIE.z_max(5, 4))


def test_ipm_known_vector():
    rows, byz = with_byzantine(X)
    torch.testing.assert_close(IPM(eps=2.0)(rows, byz, 0)[3], torch.tensor([-8.0, -10, -12]))


def test_sign_flip_and_free_rider():
    rows = rows5()
    torch.testing.assert_close(SignFlip(scale=3.0)(rows, BYZ, 0)[BYZ], -3 * rows[BYZ])
    assert torch.equal(plugin("attack", "free_rider")(rows, BYZ, 0)[BYZ], torch.zeros(2, 6))


def test_gaussian_scale_and_seed():
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(4, 4000, generator=g)
    byz = torch.tensor([False, False, False, True])
    out = Gaussian(std=2.0, seed=5)(rows, byz, 0)[3]
    expected = 2.0 * rows[:3].norm(dim=1).mean() / math.sqrt(4000)
    assert abs(out.std().item() / expected.item() - 1) < 0.1
    assert torch.equal(Gaussian(std=2.0, seed=5)(rows, byz, 0)[3], out)
    a = Gaussian(seed=5)
    a(rows, byz, 0)
    saved = a.state_dict()
    nxt = a(rows, byz, 1)
    b = Gaussian(seed=0)
    b.load_state_dict(saved)
    assert torch.equal(b(rows, byz, 1), nxt)


def test_mimic_target():
    rows = rows5()
    out = Mimic(target=2)(rows, BYZ, 0)
    assert torch.equal(out[1], rows[3]) and torch.equal(out[4], rows[3])
    with pytest.raises(ValueError, match="target=3"):
        Mimic(target=3)(rows, BYZ, 0)


def test_minmax_known_vector():
    # mu = (4,5,6), p = -std = -(3,3,3); the farthest row (7,8,9) hits the diameter at gamma=1
    rows, byz = with_byzantine(X)
    torch.testing.assert_close(MinMax()(rows, byz, 0)[3], torch.tensor([1.0, 2, 3]))


@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_minmax_gamma_is_the_largest_feasible(perturbation):
    honest = torch.randn(6, 10, generator=torch.Generator().manual_seed(8)).double()
    rows, byz = with_byzantine(honest.float(), 2)
    out = MinMax(perturbation=perturbation)(rows, byz, 0)
    assert torch.equal(out[6], out[7])
    diam = torch.cdist(honest, honest).max()
    mu = honest.mean(0)
    p = (out[6].double() - mu).clone()
    assert torch.cdist(out[6:7].double(), honest).max() <= diam * (1 + 1e-5)
    assert torch.cdist((mu + 1.01 * p)[None], honest).max() > diam
    assert p.norm() > 0


def test_stale_replays_k_rounds_back():
    attack = Stale(k=2)
    byz = torch.tensor([False, True, True])
    seq = [torch.full((3, 2), float(r)) + torch.arange(3.0)[:, None] for r in range(4)]
    outs = [attack(seq[r], byz, r) for r in range(2)]
    assert torch.equal(outs[0], seq[0]) and torch.equal(outs[1], seq[1])  # no history yet
    saved = attack.state_dict()
    out2 = attack(seq[2], byz, 2)
    assert torch.equal(out2[0], seq[2][0]) and torch.equal(out2[1:], seq[0][1:])
    fresh = Stale(k=2)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh(seq[2], byz, 2), out2)
    # a worker that was honest k rounds ago has no stale row of its own: it sends its current one
    out3 = attack(seq[3], torch.tensor([True, False, True]), 3)
    assert torch.equal(out3[0], seq[3][0]) and torch.equal(out3[2], seq[1][2])


@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
def test_malformed_call(kind):
    out = Malformed(kind=kind)(rows5(), BYZ, 0)
    bad = out[BYZ]
    assert {"nan": bad.isnan(), "inf": bad.isinf(), "huge": bad == 1e30}[kind].all()
    assert torch.isfinite(out[~BYZ]).all()


@pytest.mark.parametrize("kind", ["nan", "inf", "huge", "wrong_shape", "wrong_dtype"])
def test_malformed_corrupt_payloads(kind):
    payloads = list(rows5())
    out = Malformed(kind=kind).corrupt_payloads(payloads, BYZ.tolist())
    for i, (a, b) in enumerate(zip(payloads, out, strict=True)):
        if not BYZ[i]:
            assert b is a
        else:
            same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            assert not same
    assert Malformed(kind=kind, start_round=2).corrupt_payloads(payloads, BYZ, round=1) == payloads
    if kind.startswith("wrong"):
        with pytest.raises(ValueError, match="corrupt_payloads"):
            Malformed(kind=kind)(rows5(), BYZ, 0)


def test_registry_errors():
    with pytest.raises(ConfigError, match="attack=flip: unknown; allowed: alie"):
        check_overrides(["attack=flip"])
    with pytest.raises(ConfigError, match="k=0"):
        plugin("attack", "stale", k=0)
    with pytest.raises(ConfigError, match="allowed"):
        plugin("attack", "malformed", kind="garbage")
    with pytest.raises(ConfigError, match="start_round"):
        plugin("attack", "ipm", start_round=-1)
    with pytest.raises(ConfigError, match="unknown key"):
        plugin("attack", "none", eps=1.0)


def test_bad_mask_shape():
    with pytest.raises(ValueError):
        IPM()(rows5(), torch.tensor([True, False]), 0)
