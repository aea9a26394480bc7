"""What README.md promises that the other test files do not check.

- the ``diloco-train`` console script runs a training run; what it writes: every
  ``metrics.jsonl`` field (and which rows carry which), ``git_sha`` in ``summary.json``,
  the offline W&B run's config (read from the ``.wandb`` file it wrote);
- ``algorithm.outer_optimizer._target_``: another ``torch.optim`` class is the outer step;
- ``optimizer=sgd``: every worker steps with plain SGD, and it trains;
- ``validator=gauntlet`` logs ``worker/<i>/score``;
- faults ``leave`` (absent, state kept) and ``delay`` (slower in the modelled clock);
- ``attack=poison attack.mode=shuffle``: the Byzantine worker trains on permuted tokens;
- ``comm=torchdist``: a stalled peer ends the run with one line after ``comm.timeout_s``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from diloco import metrics as M
from diloco.adversary.poison import PoisonedSampler
from diloco.data import ShardSampler, shard_indices
from diloco.trainer import Trainer
from tests.helpers import OFFLINE, REPO, TINY, free_port, make_config, synthetic_corpus, text_run

ENV = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}


def write_corpus(folder: Path) -> Path:
    """A small text corpus (a few hundred sequences of a tiny GPT)."""
    folder.mkdir(parents=True)
    for i in range(3):
        lines = [f"line {j} of note {i}: a stitch in time saves nine." for j in range(300)]
        (folder / f"note{i}.txt").write_text("\n".join(lines))
    return folder


# -- the console script and what a run writes -----------------------------------------------

STEPS, H, LOG_EVERY, EVAL_EVERY, BATCH, SEQ = 12, 4, 2, 6, 2, 16
# README.md, "Each run writes": the fields of metrics.jsonl
README_FIELDS = {
    "step", "round", "tokens", "train/loss", "train/lr", "train/grad_norm", "eval/loss",
    "comm/bytes_sent", "comm/bytes_recv", "time/wall_s",
}  # fmt: skip
TRAIN_FIELDS = {"step", "train/loss", "train/lr", "train/grad_norm"}


@dataclass
class CliRun:
    out: subprocess.CompletedProcess[str]
    run_dir: Path
    args: list[str]


def console_script() -> list[str]:
    """The installed ``diloco-train`` of this interpreter, else its entry point, loaded.

    The script is what pip generated from ``[project.scripts]``; without one (no install),
    the declared entry point is looked up and called as the script would call it.
    """
    script = Path(sysconfig.get_path("scripts")) / "diloco-train"
    if script.exists():
        return [str(script)]
    found = shutil.which("diloco-train")
    if found:
        return [found]
    load = (
        "import sys; from importlib.metadata import entry_points; "
        "(ep,) = entry_points(group='console_scripts', name='diloco-train'); "
        "sys.argv[0] = 'diloco-train'; sys.exit(ep.load()())"
    )
    return [sys.executable, "-c", load]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """One ``diloco-train`` run, W&B offline: 2 workers, H=4, 12 steps, eval every 6."""
    root = tmp_path_factory.mktemp("cli")
    corpus, run_dir = write_corpus(root / "corpus"), root / "run"
    sizes = (f"data.seq_len={SEQ}", "model.n_embd=16", f"train.batch_size={BATCH}",
             f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}",
             f"train.eval_every={EVAL_EVERY}", "train.warmup_steps=2", "workers.count=2",
             f"algorithm.inner_steps={H}")  # fmt: skip
    args = [a for a in text_run(corpus, run_dir, *sizes) if not a.startswith("logger.mode=")]
    args.append("logger.mode=offline")
    env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    out = subprocess.run(
        [*console_script(), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    return CliRun(out, run_dir, args)


def test_diloco_train_console_script_is_declared_and_resolves_to_main():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"diloco-train": "diloco.train:main"}
    import diloco.train

    installed = metadata.entry_points(group="console_scripts", name="diloco-train")
    if not installed:
        pytest.skip("the package is not installed: no console_scripts metadata")
    (ep,) = installed
    assert ep.value == "diloco.train:main"
    assert ep.load() is diloco.train.main


def test_diloco_train_console_script_trains_end_to_end(cli_run):
    """Broken by: ``main()`` returning before it runs ``_hydra_main()``."""
    out = cli_run.out
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((cli_run.run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["workers"] == 2
    assert math.isfinite(summary["final_eval_loss"])
    assert "final_eval_loss" in out.stdout  # the console summary table


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_every_field_the_readme_lists(cli_run):
    """Rows between a round's inner steps hold ``step`` and ``train/*``; a round's last row
    holds every field, ``eval/loss`` in the rows of the rounds that reach a multiple of
    ``train.eval_every`` and in the last (README.md, "Each run writes")."""
    assert cli_run.out.returncode == 0, cli_run.out.stderr[-3000:]
    rows = _rows(cli_run.run_dir)
    assert [r["step"] for r in rows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    evaluated = {8, 12}  # rounds end at 4, 8, 12; 8 passes step 6, 12 is the last
    seen: set[str] = set()
    for row in rows:
        seen |= row.keys()
        if row["step"] % H:  # inside a round
            assert row.keys() == TRAIN_FIELDS, row
            continue
        assert row.keys() >= README_FIELDS - {"eval/loss"}, row
        assert ("eval/loss" in row) == (row["step"] in evaluated), row
        assert row["round"] == row["step"] // H
        assert row["tokens"] == row["step"] * BATCH * SEQ
        assert all(math.isfinite(row[k]) for k in README_FIELDS & row.keys())
    assert seen >= README_FIELDS
    ends = [r for r in rows if r["step"] % H == 0]
    sent = [r["comm/bytes_sent"] for r in ends]
    assert sent == sorted(sent) and sent[0] > 0 and sent[-1] == pytest.approx(3 * sent[0])
    summary = json.loads((cli_run.run_dir / "summary.json").read_text())
    assert rows[-1]["eval/loss"] == summary["final_eval_loss"]
    assert rows[-1]["comm/bytes_sent"] == summary["comm_bytes_per_worker"]


def head_sha() -> str:
    """The checkout's commit, or "unknown" when the repo is not a git checkout."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def test_summary_has_the_git_sha_of_the_checkout(cli_run):
    assert cli_run.out.returncode == 0, cli_run.out.stderr[-3000:]
    summary = json.loads((cli_run.run_dir / "summary.json").read_text())
    sha = head_sha()
    assert summary["git_sha"] == sha
    if sha != "unknown":
        assert re.fullmatch(r"[0-9a-f]{40}", sha)


def test_git_sha_outside_a_git_checkout_is_unknown(tmp_path, monkeypatch):
    import diloco.train

    monkeypatch.setattr(diloco.train, "CONF_DIR", tmp_path / "conf")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert diloco.train.git_sha() == "unknown"


def wandb_records(path: Path):
    """The records of a ``.wandb`` transaction log, as ``wandb_internal_pb2.Record``.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
    then 32 KiB blocks of chunks (crc32, length, type: full, first, middle, last); a
    block's tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end of the file
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def test_offline_wandb_run_has_the_resolved_config_git_sha_and_overrides(cli_run):
    """The config that W&B wrote offline: the run's resolved config (what Hydra saved in
    ``.hydra/config.yaml``), ``git_sha`` and the overrides. Broken by: logging the config
    without the overrides."""
    from omegaconf import OmegaConf

    assert cli_run.out.returncode == 0, cli_run.out.stderr[-3000:]
    (log,) = cli_run.run_dir.glob("wandb/offline-run-*/run-*.wandb")
    runs = [r.run for r in wandb_records(log) if r.WhichOneof("record_type") == "run"]
    assert runs, "no run record"
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    config.pop("_wandb", None)
    hydra_dir = cli_run.run_dir / ".hydra"
    resolved = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=True)
    overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text())
    assert overrides == [a for a in cli_run.args if not a.startswith("hydra.")]
    assert config == {**resolved, "git_sha": head_sha(), "overrides": overrides}
    assert config["train"]["steps"] == STEPS and config["logger"]["mode"] == "offline"


# -- optimizers ---------------------------------------------------------------------------


def _sync_spy(trainer: Trainer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Record (global before, mean pseudo-gradient, global after) around every sync."""
    seen = []
    sync = trainer._sync

    def spy(steps=None, plan=None):
        before = trainer.group.global_param.data.clone()
        mean_delta = (before - trainer.group.params).mean(0)
        overlap = sync(steps, plan)
        seen.append((before, mean_delta, trainer.group.global_param.data.clone()))
        return overlap

    trainer._sync = spy
    return seen


def test_outer_optimizer_from_target_is_used(tmp_path):
    """``torch.optim.Adam`` as DiLoCo's outer optimizer: its first step moves every
    coordinate by about ``lr`` against the sign of the mean pseudo-gradient (SGD moves it
    by ``lr`` times the pseudo-gradient), and every round equals a reference Adam fed the
    same pseudo-gradients. Broken by: DiLoCo building its default Nesterov SGD."""
    lr = 0.01
    adam = f"+algorithm.outer_optimizer={{_target_:torch.optim.Adam,lr:{lr}}}"
    cfg = make_config(*TINY, "workers.count=2", "algorithm.inner_steps=3", "train.steps=9",
                      "~algorithm.outer_optimizer", adam)  # fmt: skip
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    assert type(trainer.algorithm.outer) is torch.optim.Adam
    seen = _sync_spy(trainer)
    trainer.fit()
    assert len(seen) == 3
    before, g, after = seen[0]
    moved = g.abs() > 1e-5  # Adam's eps (1e-8) is negligible there
    assert moved.float().mean() > 0.5
    step = after - before
    torch.testing.assert_close(step[moved], -lr * g[moved].sign(), rtol=1e-3, atol=0)
    assert not torch.allclose(step, -lr * g, atol=lr / 10)  # not what SGD would do
    ref = torch.nn.Parameter(before.clone())
    ref_opt = torch.optim.Adam([ref], lr=lr)
    for before, g, after in seen:
        torch.testing.assert_close(before, ref.data, rtol=0, atol=1e-7)
        ref.grad = g.clone()
        ref_opt.step()
        torch.testing.assert_close(after, ref.data, rtol=0, atol=1e-7)
    state = trainer.algorithm.outer.state[trainer.group.global_param]
    assert int(state["step"]) == 3 and "exp_avg_sq" in state


def test_inner_sgd_steps_every_worker_and_trains(tmp_path):
    """``optimizer=sgd``: each worker's step is ``-lr * mult * clipped grad``, and the eval
    loss falls. Broken by: building the workers' optimizers as AdamW whatever the config."""
    common = (*TINY, "optimizer=sgd", "optimizer.lr=0.5", "workers.count=2",
              "algorithm.inner_steps=5", "train.steps=60")  # fmt: skip
    cfg = make_config(*common)
    assert cfg.optimizer["_target_"] == "torch.optim.SGD"
    corpus = synthetic_corpus()
    trainer = Trainer.from_config(cfg, tmp_path / "a", corpus)
    inner = trainer.group.inner  # the matrix form of SGD (batched) with SGD's settings
    assert type(inner).__name__ == "MatrixSGD" and inner.groups[0]["momentum"] == 0.0
    before = trainer.group.params.clone()
    trainer._inner_step()  # step 0: warmup multiplier 1/2
    grads = trainer.group.grads  # clipped to norm <= 1 in place
    assert (grads.norm(dim=1) <= 1.0 + 1e-5).all() and grads.abs().sum() > 0
    expected = before - 0.5 * 0.5 * grads
    torch.testing.assert_close(trainer.group.params, expected, rtol=0, atol=1e-7)

    trainer = Trainer.from_config(make_config(*common), tmp_path / "b", corpus)
    start = trainer.evaluate()
    assert trainer.fit()["final_eval_loss"] < start - 1.0


# -- validator, faults, poisoning ------------------------------------------------------------


def test_gauntlet_logs_every_worker_score(tmp_path):
    """``validator=gauntlet``: every round's row has ``worker/<i>/score`` and
    ``worker/<i>/assignment`` for each worker, the validator's EMA scores; the sign flipper
    (worker 3) scores lowest."""
    k = 4
    cfg = make_config(*TINY, f"workers.count={k}", "algorithm.inner_steps=5", "train.steps=20",
                      "train.log_every=5", "validator=gauntlet", "attack=sign_flip",
                      "attack.num_byzantine=1")  # fmt: skip
    trainer = Trainer.from_config(cfg, tmp_path, synthetic_corpus())
    logger = M.JsonlLogger(tmp_path / "metrics.jsonl")
    trainer.fit(logger)
    logger.close()
    rounds = [r for r in _rows(tmp_path) if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    names = [f"worker/{i}/score" for i in range(k)]
    assigned = [f"worker/{i}/assignment" for i in range(k)]
    for row in rounds:
        assert sorted(k_ for k_ in row if k_.startswith("worker/")) == sorted(names + assigned)
        assert all(math.isfinite(row[n]) for n in names)
    assert len({tuple(r[n] for n in names) for r in rounds}) == len(rounds)  # updated each round
    last = [rounds[-1][n] for n in names]
    assert last == pytest.approx(trainer.exchange.validator.scores.tolist())
    assert min(range(k), key=last.__getitem__) == k - 1


FEDAVG = (*TINY, "algorithm=fedavg", "workers.count=4", "algorithm.inner_steps=4",
          "train.steps=24")  # fmt: skip


def test_leaving_worker_stops_contributing_and_keeps_its_state(tmp_path):
    """``leave`` at round 2, ``rejoin`` at round 4: absent in rounds 2 and 3 (the average is
    over the 3 present), its optimizer state kept (a crash would clear it)."""
    events = "faults.events=[{worker:1,round:2,kind:leave},{worker:1,round:4,kind:rejoin}]"
    trainer = Trainer.from_config(make_config(*FEDAVG, events), tmp_path, synthetic_corpus())
    seen = []
    sync = trainer._sync

    def spy(steps=None, plan=None):
        before = trainer.group.params.clone()
        overlap = sync(steps, plan)
        seen.append((list(steps), before, trainer.group.global_param.data.clone()))
        return overlap

    trainer._sync = spy
    trainer.fit()
    assert [s[1] for s, _, _ in seen] == [4, 4, 0, 0, 4, 4]
    for _, before, new_global in seen[2:4]:
        present = torch.tensor([True, False, True, True])
        torch.testing.assert_close(new_global, before[present].mean(0), atol=1e-6, rtol=0)
        assert not torch.allclose(new_global, before.mean(0), atol=1e-4)
    assert trainer.worker_steps.tolist() == [24, 16, 24, 24]
    steps_of = trainer.group.inner.steps
    assert steps_of == [24, 16, 24, 24]  # AdamW kept counting across the leave


def test_delayed_worker_is_slower_in_the_modelled_clock_only(tmp_path):
    """``delay`` of worker 2 in round 2 (``delay_factor`` 4): that round's modelled compute
    is 4x (everyone waits for it under sync=all); the model equals the undelayed run's.
    Broken by: ignoring the slowdown in ``Faults.at``."""
    common = (*TINY, "workers.count=3", "algorithm.inner_steps=4", "train.steps=24",
              "workers.step_time_s=0.5", "train.log_every=4")  # fmt: skip
    corpus = synthetic_corpus()
    runs = {}
    delay = "faults.events=[{worker:2,round:2,kind:delay}]"
    for name, extra in (("plain", ()), ("delayed", (delay,))):
        cfg = make_config(*common, *extra)
        trainer = Trainer.from_config(cfg, tmp_path / name, corpus)
        logger = M.JsonlLogger(tmp_path / name / "metrics.jsonl")
        summary = trainer.fit(logger)
        logger.close()
        rows = [r for r in _rows(tmp_path / name) if "round" in r]
        compute = [r["time/sim_s"] - r["time/comm_s"] for r in rows]
        per_round = [b - a for a, b in zip([0.0, *compute], compute, strict=False)]
        runs[name] = (trainer.group.global_param.data.clone(), per_round, summary)
    assert runs["plain"][1] == pytest.approx([2.0] * 6)  # 4 steps of 0.5 s
    assert runs["delayed"][1] == pytest.approx([2.0, 2.0, 8.0, 2.0, 2.0, 2.0])
    plain, delayed = runs["plain"][2], runs["delayed"][2]
    assert delayed["sim_time_s"] - plain["sim_time_s"] == pytest.approx(6.0)
    assert delayed["comm_time_s"] == plain["comm_time_s"]
    assert torch.equal(runs["plain"][0], runs["delayed"][0])


def test_poison_shuffle_trains_the_byzantine_worker_on_permuted_tokens(tmp_path):
    """``attack=poison`` (mode ``shuffle``): the last worker's every batch is a per-sequence
    permutation of the batch it was assigned, the honest workers' batches are clean, and
    the run completes. Broken by: a shuffle that returns the sequences unchanged."""
    k, steps = 3, 20
    common = (*TINY, f"workers.count={k}", "algorithm.inner_steps=5", f"train.steps={steps}")
    cfg = make_config(*common, "attack=poison", "attack.num_byzantine=1")
    assert cfg.attack["mode"] == "shuffle"
    corpus = synthetic_corpus()
    trainer = Trainer.from_config(cfg, tmp_path / "p", corpus)
    poisoned = trainer.samplers[k - 1]
    assert isinstance(poisoned, PoisonedSampler) and poisoned.mode == "shuffle"
    assert not any(isinstance(s, PoisonedSampler) for s in trainer.samplers[: k - 1])
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(k)]
    clean: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward_backward = trainer.group.forward_backward

    def spy(batches):
        for i, b in enumerate(batches):
            seen[i].append(b)
        assert poisoned.last_assigned is not None
        clean.append(poisoned.last_assigned)
        return forward_backward(batches)

    trainer.group.forward_backward = spy
    summary = trainer.fit()
    assert summary["steps"] == steps and math.isfinite(summary["final_eval_loss"])
    assert all(len(s) == steps for s in seen)
    for (x, y), (cx, cy) in zip(seen[k - 1], clean, strict=True):
        assert torch.equal(x[:, 1:], y[:, :-1])  # still next-token pairs
        seq, clean_seq = torch.cat([x, y[:, -1:]], 1), torch.cat([cx, cy[:, -1:]], 1)
        assert torch.equal(seq.sort(1).values, clean_seq.sort(1).values)  # a permutation
        assert (seq != clean_seq).any(1).all()  # of every sequence
    shards = shard_indices(corpus, k, cfg.data.shard, cfg.seed)
    for i in range(k - 1):  # the honest workers draw their clean batches
        sampler = ShardSampler(corpus.train, shards[i], cfg.train.batch_size, cfg.seed, i)
        for x, y in seen[i]:
            cx, cy = sampler.next_batch()
            assert torch.equal(x, cx) and torch.equal(y, cy)
    honest = Trainer.from_config(make_config(*common), tmp_path / "h", corpus)
    honest.fit()
    assert not torch.equal(honest.group.global_param.data, trainer.group.global_param.data)


# -- torch.distributed: a stalled peer -----------------------------------------------------


@pytest.mark.dist
def test_stalled_rank_ends_the_run_with_one_line_after_the_timeout(tmp_path):
    """README, "Run for real": with gloo a stalled peer ends the run after
    ``comm.timeout_s`` with one line ``error: comm: <collective> (collective #n) failed on
    rank 0 of 2: a peer died, stalled past comm.timeout_s=..., or the network failed
    (...)``, not a hang. Two ranks of ``python -m diloco.train comm=torchdist``; rank 1 is
    stopped (SIGSTOP) once rank 0 logs its first row. Broken by: ``diloco.train`` not
    catching ``CommError`` (a traceback instead of the line)."""
    timeout_s = 4
    corpus, run_dir = write_corpus(tmp_path / "corpus"), tmp_path / "run"
    args = text_run(corpus, run_dir, "data.seq_len=16", "model.n_embd=16",
                    "train.batch_size=2", "train.steps=100000", "train.eval_every=100000",
                    "train.log_every=1", "algorithm.inner_steps=2", "workers.count=2",
                    "comm=torchdist", f"comm.timeout_s={timeout_s}")  # fmt: skip
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs, logs = [], []
    try:
        for rank in (0, 1):
            logs.append((open(tmp_path / f"out{rank}", "w"), open(tmp_path / f"err{rank}", "w")))  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "diloco.train", *args],
                    cwd=REPO,
                    env={**ENV, **rendezvous, "RANK": str(rank)},
                    stdout=logs[-1][0],
                    stderr=logs[-1][1],
                    start_new_session=True,
                )  # fmt: skip
            )
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
            assert procs[0].poll() is None, (tmp_path / "err0").read_text()[-3000:]
            time.sleep(0.05)
        assert metrics.exists() and metrics.stat().st_size, "rank 0 logged nothing"
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[0].wait(timeout=timeout_s + 30)
        elapsed = time.monotonic() - stopped
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for files in logs:
            for f in files:
                f.close()
    err = (tmp_path / "err0").read_text()
    assert code == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]  # no traceback, no other message
    assert re.fullmatch(
        r"error: comm: [a-z_ ]+ \(collective #\d+\) failed on rank 0 of 2: a peer died, "
        rf"stalled past comm\.timeout_s={timeout_s}, or the network failed \(.+\)",
        lines[0],
    ), lines[0]
    assert timeout_s - 1 <= elapsed < timeout_s + 30, elapsed
    assert not (run_dir / "summary.json").exists()


def test_every_registered_marker_is_used_and_every_selected_one_exists():
    """A ``-m "not slow"`` selector with no test marked slow selects nothing: it misleads."""
    block = (REPO / "pyproject.toml").read_text().split("markers = [", 1)[1].split("]", 1)[0]
    markers = set(re.findall(r'^\s*"(\w+):', block, flags=re.M))
    assert markers, "no markers found in pyproject.toml"
    sources = "\n".join(p.read_text() for p in (REPO / "tests").glob("*.py"))
    for marker in markers:
        assert f"mark.{marker}" in sources, f"marker {marker} is registered but never used"
    for text in ((REPO / "Makefile").read_text(), (REPO / "README.md").read_text()):
        for selected in re.findall(r'pytest[^\n]*-m "(?:not )?(\w+)"', text):
            assert selected in markers, f"-m {selected}: no such marker"


def test_the_test_command_says_what_it_installs():
    """``make test`` installs Slurm with apt-get and starts a cluster: the README says so there."""
    readme = (REPO / "README.md").read_text()
    after = readme.split("```bash\nmake test\n```", 1)[1].split("\n## ", 1)[0]
    for word in ("torch==2.13.0", "dev extras", "slurm-wlm", "apt-get", "cluster"):
        assert word in after, f"README: the paragraph after `make test` does not mention {word}"
    slurm = (REPO / "tests" / "slurm_cluster.py").read_text()
    assert "apt-get" in slurm and "slurm-wlm" in slurm  # what the README describes is so
