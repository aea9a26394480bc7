"""Test-wide settings: never reach W&B or the HF hub, keep torch single-threaded and fast."""

import os
from pathlib import Path

import pytest

from tests.seaweed import ACCESS_KEY, SECRET_KEY, run_weed

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A two-node Slurm cluster on this machine (tests/slurm_cluster.py), for the session.

    Installs slurm-wlm and munge with apt-get when missing (as root); skips where it cannot.
    """
    from tests.slurm_cluster import ClusterUnavailable, SlurmCluster

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start(timeout=90)
    except ClusterUnavailable as err:
        pytest.skip(str(err))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A `weed mini` on 127.0.0.1 for the test session (see run_weed)."""
    with run_weed(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture
def creds(monkeypatch):
    """The S3 server's credentials in this test's environment (no other AWS_* settings)."""
    for k in list(os.environ):
        if k.startswith("AWS_") and k != "AWS_CA_BUNDLE":
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    return monkeypatch


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A small text corpus: enough for a few hundred steps of a tiny GPT."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        lines = [f"line {j} of document {i}: the quick brown fox jumps." for j in range(400)]
        (folder / f"doc{i}.txt").write_text("\n".join(lines))
    return folder
