"""experiments/compare_optimizers.ipynb: committed executed, and it runs headless at debug size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "experiments" / "compare_optimizers.ipynb"
TINY_OVERRIDES = (
    "model=mlp train.steps=10 data.seq_len=32 logger.mode=disabled logger.progress=false"
)


@pytest.fixture
def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernel spec for this interpreter, first on JUPYTER_PATH.

    Works on a fresh machine with no kernel installed, and does not pick up a user-wide
    ``python3`` kernel that points at another Python.
    """
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter-prefix"
    install(kernel_name="python3", prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return "python3"


ALGORITHMS = ("ddp", "diloco", "fedavg", "streaming_diloco", "demo")


def _text(cells) -> str:
    return "".join(
        str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", ""))
        for c in cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_committed_notebook_is_executed_with_its_table_and_figures():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "not executed"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 2, "the curves and the Pareto plot"
    table = _text(code)
    assert all(a in table for a in ALGORITHMS) and "final_eval_loss" in table


def test_notebook_runs_sweep_and_saves_plot(python3_kernel, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    for key, value in {
        "DILOCO_SWEEP_DIR": str(sweep),
        "DILOCO_NOTEBOOK_OVERRIDES": TINY_OVERRIDES,
        "WANDB_MODE": "disabled",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }.items():
        monkeypatch.setenv(key, value)
    executed = tmp_path / "executed.ipynb"
    out = subprocess.run(  # what a user runs, as the README says
        [str(Path(sys.executable).parent / "jupyter"), "nbconvert", "--to", "notebook",
         "--execute", f"--ExecutePreprocessor.kernel_name={python3_kernel}",
         "--ExecutePreprocessor.timeout=300", "--output", str(executed), str(NOTEBOOK)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    nb = nbformat.read(executed, as_version=4)

    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == len(ALGORITHMS), [p.parent.name for p in summaries]
    assert (sweep / "compare.png").stat().st_size > 1000
    assert (sweep / "pareto.png").stat().st_size > 1000
    outputs = _text(nb.cells)
    assert all(a in outputs for a in ALGORITHMS), outputs
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "error"]  # fmt: skip
