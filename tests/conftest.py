"""Test-wide settings: never reach W&B or the HF hub, keep torch single-threaded and fast."""

import os

import pytest

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
