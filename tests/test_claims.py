"""The claims suite end to end at the debug size: configs compose, every arm trains, the
report renders with a verdict per claim, the README table is replaced, and a rerun resumes
(trains nothing). No verdict is asserted: the debug runs are 8 steps long."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diloco.compose import check_overrides
from diloco.config import ConfigError

CLAIMS_DIR = Path(__file__).resolve().parent.parent / "experiments" / "claims"
sys.path.insert(0, str(CLAIMS_DIR))

import claims as C  # noqa: E402
import run as R  # noqa: E402


def test_debug_suite_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- claims:begin -->\nold\n<!-- claims:end -->\nrest\n")
    args = ["--scale", "debug", "--results", str(tmp_path / "res"), "--runs",
            str(tmp_path / "runs"), "--readme", str(readme), "--jobs", "1"]  # fmt: skip
    R.main(args)
    report = (tmp_path / "res" / "claims.md").read_text()
    for claim in C.CLAIMS:
        section = report.split(f"## {claim.name}\n", 1)[1].split("\n## ", 1)[0]
        assert "**Verdict: " in section and "pending" not in section, claim.name
        assert (tmp_path / "res" / "claims" / f"{claim.name}.png").stat().st_size > 0
    assert "## internet" in report and "INTELLECT-1" in report
    text = readme.read_text()
    assert "old" not in text and "| robustness" in text.replace("[", "| ").replace("]", "")
    assert text.startswith("intro\n") and text.endswith("rest\n")
    records = (tmp_path / "res" / "claims_runs.jsonl").read_text().splitlines()
    keys = [json.loads(r)["key"] for r in records]
    assert len(keys) == len(set(keys))  # a run shared by claims trained once
    capsys.readouterr()
    R.main(args)  # resumes: every run has a record
    assert (tmp_path / "res" / "claims_runs.jsonl").read_text().splitlines() == records
    assert "[1/" not in capsys.readouterr().out

    import evidence as E

    E.main(args[:6] + ["--jobs", "1"])  # the probes train on top of the suite's records
    table = (tmp_path / "res" / "claims_evidence.md").read_text()
    assert "pending" not in table
    assert table.count("(the suite's point)") == len(E.PROBES)
    assert table.count(": best ") == len(E.PROBES)


def test_unknown_claim_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        R.main(["--claims", "ddp_gap,nope", "--report-only"])
    assert exit_info.value.code == 2
    assert "--claims: unknown nope; allowed: ddp_gap" in capsys.readouterr().err


def test_nested_experiment_names_are_checked() -> None:
    check_overrides(["experiment=claims/ddp_gap"])
    with pytest.raises(ConfigError, match="experiment=claims/nope: unknown; allowed: claims/"):
        check_overrides(["experiment=claims/nope"])


def test_verdict_rules() -> None:
    low, high = C.Stats([1.0, 1.1, 1.2]), C.Stats([1.5, 1.58, 1.71])
    assert C.beats(low, high) == "yes" and C.beats(high, low) == "no"
    noisy = C.Stats([1.0, 1.6, 1.1])
    assert C.beats(low, noisy) == "tie"
    assert C.paired(low, high)[0] == pytest.approx(-0.4966, abs=1e-4)
    decide = C.BY_NAME["outer_optimizer"].decide
    verdict, _ = decide({"diloco": low, "fedavg": high, "outer adam": noisy})
    assert verdict == "partly"
    verdict, _ = decide({"diloco": high, "fedavg": low, "outer adam": low})
    assert verdict == "reversed"
    arms = C.BY_NAME["ddp_gap"].decide(
        {
            "ddp_S": C.Stats([2.0]),
            "diloco_S": C.Stats([2.2]),
            "ddp_M": C.Stats([1.8]),
            "diloco_M": C.Stats([1.85]),
        }  # fmt: skip
    )
    assert arms[0] == "reproduced" and "+10.0% at S" in arms[1]
