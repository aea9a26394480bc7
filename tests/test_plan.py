"""The planner equals the simulator: a tiny real run and its plan report the same modelled time.

Each case trains a small MLP in process with ``workers.step_time_s`` set, then plans the same
config (the same overrides, ``model.params`` the run's parameter count) and compares the
run's ``summary.json`` numbers with the plan's totals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from diloco.exchange.codec_base import nbytes_per_worker, wire_nbytes
from diloco.exchange.codecs import make_codec
from diloco.plan import check_published, main, plan
from diloco.trainer import Trainer
from tests.helpers import REPO, TINY, make_config, synthetic_corpus

CASES = {
    # DiLoCo fp32 over a ring, a last round of 2 steps, latency, a what-if bandwidth
    "diloco_fp32": ("workers.count=4", "algorithm.inner_steps=5", "train.steps=12",
                    "comm.bandwidth_mbps=10", "comm.latency_ms=20", "comm.what_if_mbps=[10]"),
    # DiLoCo int8 (ring all-reduce at 8 bits), a straggler: slow compute and a slow link
    "diloco_int8": ("workers.count=3", "algorithm.inner_steps=4", "train.steps=8", "codec=int8",
                    "workers=straggler", "comm.bandwidth_mbps=1"),
    # sparse: top-k with error feedback is all-gathered, here through an object store
    "topk": ("workers.count=4", "algorithm.inner_steps=3", "train.steps=9", "codec=topk",
             "comm.topology=object_store", "comm.bandwidth_mbps=0.1"),
    "sparseloco": ("workers.count=3", "algorithm=sparseloco", "algorithm.inner_steps=4",
                   "train.steps=8", "comm.bandwidth_mbps=0.05"),
    # Streaming DiLoCo, tau steps hidden; whole cycles, every exchange longer than its overlap
    "streaming": ("workers.count=4", "algorithm=streaming_diloco", "algorithm.inner_steps=6",
                  "algorithm.fragments=2", "algorithm.tau=2", "train.steps=12",
                  "comm.bandwidth_mbps=0.01", "comm.latency_ms=5"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_plan_equals_the_simulated_runs_modelled_time(tmp_path, case):
    shared = (*CASES[case], "workers.step_time_s=0.25")
    trainer = Trainer.from_config(make_config(*TINY, *shared), tmp_path, synthetic_corpus())
    summary = trainer.fit()
    p = plan([*shared, f"model.params={trainer.group.num_params}"])
    total = p.totals()
    assert total["rounds"] == summary["rounds"]
    assert total["comm_s"] == pytest.approx(summary["comm_time_s"], rel=1e-9)
    assert total["sim_s"] == pytest.approx(summary["sim_time_s"], rel=1e-9)
    assert total["bytes_per_worker"] == pytest.approx(summary["comm_bytes_per_worker"], rel=1e-12)
    assert summary["comm_time_s"] > 0.01 * summary["sim_time_s"]  # the network matters here
    for key in p.bandwidths_mbps:
        if key:
            assert p.totals(key)["sim_s"] == pytest.approx(summary[f"sim_time_s{key}"], rel=1e-9)
    if case == "streaming":  # overlap hid tau steps of every exchange
        assert total["sim_s"] == pytest.approx(total["compute_s"] + total["comm_s"] - 4 * 2 * 0.25)


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "codec").glob("*.yaml")), ids=str)
def test_wire_size_at_any_length_is_the_real_encodings(path):
    codec = make_codec(yaml.safe_load(path.read_text()), feedback=False)
    for p in (1, 37, 4096 + 5):
        real = codec.encode(torch.randn(3, p, generator=torch.Generator().manual_seed(p)))
        assert wire_nbytes(codec, p) == nbytes_per_worker(real)


def test_ten_billion_parameters_plan_in_seconds_without_memory():
    p = plan(["model.params=10e9", "workers.count=14", "algorithm.inner_steps=100",
              "codec=int8", "comm.bandwidth_mbps=500", "workers.step_time_s=22.8",
              "train.steps=1000"])  # fmt: skip
    r = p.rounds[0]
    assert (r.count, r.nbytes) == (10, 10_000_000_000 + 4 * 10_000_000_000 // 128)
    assert r.sent == pytest.approx(2 * 13 / 14 * r.nbytes)
    assert r.comm_s[""] == pytest.approx(r.sent / (500 * 125_000))
    assert p.per_round()["utilization"] == pytest.approx(2280 / (2280 + r.comm_s[""]))


def test_flop_model_step_time():
    p = plan(["model.params=1e9", "train.batch_size=16", "data.seq_len=1024",
              "plan.gpus_per_worker=8", "plan.accelerator_tflops=1000",
              "plan.mfu=0.5"])  # fmt: skip
    assert p.step_time_s == pytest.approx(6 * 1e9 * 16 * 1024 / (8 * 1000e12 * 0.5))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("workers.count=0", "workers.count"),
        ("plan.mfu=1.5", "plan.mfu"),
        ("codec=int9", "codec=int9"),
        ("algorithm=streaming_diloco algorithm.fragments=7", "algorithm.fragments"),
        ("plan.nope=1", "plan.nope"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_and_exit_2(capsys, override, key):
    with pytest.raises(SystemExit) as exit_:
        main(override.split())
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and key in err


def test_cli_prints_rounds_and_totals(capsys):
    main(["model.params=1e6", "workers.step_time_s=0.1", "comm.what_if_mbps=[10]"])
    out = capsys.readouterr().out
    assert "round" in out and "total at 1000 Mbps" in out and "total at 10 Mbps" in out


def test_published_runs_are_checked_into_well_formed_rows():
    path = Path(REPO / "experiments" / "claims" / "published_runs.yaml")
    rows = check_published(path)
    runs = yaml.safe_load(path.read_text())["runs"]
    assert len(rows) == sum(len(r["reported"]) for r in runs)
    names = {r["name"] for r in rows}
    assert any(n.startswith("INTELLECT-1") for n in names)
    assert any(n.startswith("Covenant-72B") for n in names)
    for row in rows:
        assert set(row) == {"name", "source", "metric", "reported", "predicted", "criterion",
                            "holds"}  # fmt: skip
        assert "arXiv" in row["source"]
        assert row["metric"] in ("utilization", "comm_s", "round_s")
        assert row["predicted"] > 0 and row["reported"] > 0
        assert isinstance(row["holds"], bool)
