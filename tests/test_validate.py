import pytest
import torch

from diloco.adversary import Malformed, validate_payloads

P = 6
BYZ = [False, True, False, True]


def good(n: int = 4) -> list[torch.Tensor]:
    return list(torch.randn(n, P, generator=torch.Generator().manual_seed(0)))


def test_good_rows_pass():
    ok, bad = validate_payloads(good(), shape=(P,), dtype=torch.float32, max_abs=1e12)
    assert ok == [0, 1, 2, 3] and bad == {}


@pytest.mark.parametrize("kind", ["nan", "inf", "huge", "wrong_shape", "wrong_dtype"])
def test_every_malformed_variant_is_rejected(kind):
    payloads = Malformed(kind=kind).corrupt_payloads(good(), BYZ)
    ok, bad = validate_payloads(payloads, shape=(P,), dtype=torch.float32, max_abs=1e12)
    assert ok == [0, 2] and set(bad) == {1, 3}
    expected = {
        "nan": "non-finite values",
        "inf": "non-finite values",
        "huge": "magnitude 1e+30 above 1e+12",
        "wrong_shape": "shape (7,) != (6,)",
        "wrong_dtype": "dtype float64 != float32",
    }[kind]
    assert bad[1] == f"worker 1: {expected}"
    assert "\n" not in bad[3]


def test_malformed_rows_via_call_are_rejected():
    rows = torch.stack(good())
    for kind in ("nan", "inf", "huge"):
        out = Malformed(kind=kind)(rows, torch.tensor(BYZ), 0)
        ok, _ = validate_payloads(list(out), shape=(P,), dtype=torch.float32, max_abs=1e12)
        assert ok == [0, 2]


def test_garbage_never_raises():
    payloads = [
        None,
        b"\x00\x01",
        "tensor",
        torch.empty(0),
        torch.zeros((), dtype=torch.float32),
        torch.zeros(P, dtype=torch.int64),
        torch.zeros(P, dtype=torch.complex64),
        torch.zeros(P).to_sparse(),
        torch.empty(P, device="meta"),
        torch.zeros(2, 3),
        [0.0] * P,
        torch.zeros(P, dtype=torch.bool),
    ]
    ok, bad = validate_payloads(payloads, shape=(P,), dtype=torch.float32, max_abs=1.0)
    assert ok == []
    assert set(bad) == set(range(len(payloads)))
    assert bad[0] == "worker 0: not a tensor (NoneType)"
    assert bad[1] == "worker 1: not a tensor (bytes)"
    assert bad[3] == "worker 3: shape (0,) != (6,)"
    assert bad[5] == "worker 5: dtype int64 != float32"


def test_empty_payload_of_expected_shape_passes():
    ok, bad = validate_payloads([torch.empty(0)], shape=(0,), dtype=torch.float32, max_abs=1.0)
    assert ok == [0] and bad == {}


def test_index_payloads():
    payloads = [
        torch.tensor([0, 5, 4095]),
        torch.tensor([0, 5, 4096]),
        torch.tensor([-1, 5, 7]),
        torch.tensor([1, 2, 3], dtype=torch.int32),
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([torch.iinfo(torch.int64).min, 0, 1]),
    ]
    ok, bad = validate_payloads(payloads, shape=(3,), dtype=torch.int64, index_bound=4096)
    assert ok == [0]
    assert bad[1].startswith("worker 1: index out of range [0, 4096)")
    assert bad[2].startswith("worker 2: index out of range [0, 4096)")
    assert bad[3] == "worker 3: dtype int32 != int64"
    assert bad[4] == "worker 4: dtype float32 != int64"
    assert 5 in bad


def test_max_abs():
    payloads = [torch.full((P,), 10.0), torch.full((P,), -1e30), torch.full((P,), 1e12)]
    ok, bad = validate_payloads(payloads, shape=(P,), dtype=torch.float32, max_abs=1e12)
    assert ok == [0, 2]
    assert bad[1] == "worker 1: magnitude 1e+30 above 1e+12"
