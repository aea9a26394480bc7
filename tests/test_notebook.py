"""experiments/compare_optimizers.ipynb runs headless: a tiny sweep, the table and the plot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
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


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


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
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name=python3_kernel,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 3, [p.parent.name for p in summaries]
    assert (sweep / "compare.png").stat().st_size > 1000
    outputs = "".join(
        str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert all(f"algorithm={a}" in outputs for a in ("ddp", "diloco", "fedavg")), outputs
