"""K bucket peers on one machine: ``python -m diloco.swarm workers.count=4 [overrides]``.

Starts one ``python -m diloco.peer`` process per worker, each in its own process group, with
the same overrides plus ``worker.id=i``, a fresh ``comm.run_id`` (unless one is given) and
its run dir ``<run dir>/peers/<i>`` (its output in ``peers/<i>.log``); ``swarm.peer_overrides``
adds overrides to single peers (``"1:worker.join_round=3"``). It waits for them (at most
``swarm.timeout_s``; Ctrl-C, SIGTERM or the timeout stops every peer), then writes the run dir as
``diloco.train`` does: ``summary.json`` (the honest peers' mean final eval loss and bytes
per worker, each peer's summary and exit code) and ``metrics.jsonl`` (the lowest-id honest
peer that finished). ``swarm.validator=true`` also starts ``python -m diloco.validate``
(``validator/``). The config is checked once, before any peer starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diloco import metrics as M
from diloco.comm.bucket import VALIDATOR_KEY
from diloco.comm.stores import StoreError, open_store
from diloco.compose import CONF_DIR, one_line, run_cli
from diloco.config import ConfigError, from_dict, parse
from diloco.peer import PeerConfig, check_peer, comm_kind

log = logging.getLogger("diloco")


@dataclass
class SwarmConfig:
    """``swarm.*`` in ``conf/swarm.yaml``."""

    peer_overrides: list[str] = field(default_factory=list)
    timeout_s: float = field(default=3600.0, metadata={"gt": 0.0})
    validator: bool = False  # also start python -m diloco.validate (run dir: validator/)


def peer_overrides(items: list[str], k: int) -> dict[int, list[str]]:
    """``["1:worker.join_round=3", ...]`` -> ``{1: ["worker.join_round=3"]}``, checked."""
    out: dict[int, list[str]] = {}
    for j, item in enumerate(items):
        peer, sep, override = item.partition(":")
        if not sep or not peer.strip().isdigit() or int(peer) >= k or "=" not in override:
            raise ConfigError(
                f"swarm.peer_overrides[{j}]={item}", f"expected ID:key=value with ID in [0, {k})"
            )
        out.setdefault(int(peer), []).append(override.strip())
    return out


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every peer's process group, then SIGKILL what is left.

    Groups of peers that exited too: a peer's children (hivemind's DHT and averager
    processes, its p2pd daemon) outlive a peer that was SIGKILLed alone.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + 5
        while any(_group_alive(p.pid) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
            for p in procs:
                p.poll()  # reap the leader


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _start(cmd: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log_file, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )


def _wait_maddrs(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> list[str]:
    """The multiaddrs the first hivemind peer wrote (it joined the DHT)."""
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"the first peer did not join the DHT ({first_error(path.parent.parent)})"
            )
        time.sleep(0.05)
    return path.read_text().split()


def launch(
    overrides: list[str], k: int, run_dir: Path, sw: SwarmConfig, hivemind: bool = False
) -> tuple[list[int | None], list[int]]:
    """Start the K peers (and the validator), wait; their exit codes (None: timed out), pids.

    ``hivemind``: peer 0 starts first; the others get its multiaddrs as initial peers.
    """
    extra = peer_overrides(sw.peer_overrides, k)
    (run_dir / "peers").mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    if sw.validator:  # the validator signs its weights; the peers check with the same secret
        env.setdefault(VALIDATOR_KEY, secrets.token_hex(16))
    try:
        if sw.validator:
            cmd = [sys.executable, "-m", "diloco.validate", *overrides]
            cmd.append(f"hydra.run.dir={run_dir / 'validator'}")
            procs.append(_start(cmd, run_dir / "validator.log", env))
        deadline = time.monotonic() + sw.timeout_s
        more: list[str] = []
        for i in range(k):
            cmd = [
                sys.executable, "-m", "diloco.peer", *overrides, f"worker.id={i}",
                f"hydra.run.dir={run_dir / 'peers' / str(i)}", *more, *extra.get(i, []),
            ]  # fmt: skip
            if hivemind and i == 0:  # the first peer's multiaddrs bootstrap the others
                (run_dir / "peers" / "0.maddrs").unlink(missing_ok=True)  # a reused run dir
                cmd.append(f"comm.maddrs_file={run_dir / 'peers' / '0.maddrs'}")
            procs.append(_start(cmd, run_dir / "peers" / f"{i}.log", env))
            if hivemind and i == 0:
                maddrs = _wait_maddrs(run_dir / "peers" / "0.maddrs", procs[-1], deadline)
                more = ["comm.initial_peers=[" + ",".join(f"'{a}'" for a in maddrs) + "]"]
        peers = procs[-k:]
        while any(p.poll() is None for p in peers) and time.monotonic() < deadline:
            time.sleep(0.1)
        if sw.validator:  # it scores the last round once the peers posted it
            while procs[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        timed_out = [p.poll() is None for p in procs[-k:]]
        _stop(procs)
    codes = [None if t else p.returncode for p, t in zip(procs[-k:], timed_out, strict=True)]
    return codes, [p.pid for p in procs[-k:]]


def first_error(run_dir: Path) -> str:
    """The first ``error:`` line in the peers' logs (a config error every peer hit)."""
    for log_file in sorted((run_dir / "peers").glob("*.log")):
        for line in log_file.read_text(errors="replace").splitlines():
            if line.startswith("error: "):
                return f"peer {log_file.stem}: {line.removeprefix('error: ')}"
    return "no error line in the logs"


def _validator_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "validator" / "summary.json"
    return {"validator": json.loads(path.read_text())} if path.exists() else {}


def collect(
    run_dir: Path, codes: list[int | None], honest: set[int], pids: list[int] | None = None
) -> dict[str, Any]:
    """The swarm's summary from the peers' run dirs; metrics.jsonl of the first that finished.

    ``final_eval_loss`` and bytes are means over the ``honest`` peers (no misbehaviour
    asked for) that finished, or over every one that did when none of them did.
    """
    peers: dict[str, Any] = {}
    for i, code in enumerate(codes):
        path = run_dir / "peers" / str(i) / "summary.json"
        s = json.loads(path.read_text()) if path.exists() else {}
        peers[str(i)] = {"exit_code": code, "honest": i in honest, **s}
        if pids:
            peers[str(i)]["pid"] = pids[i]
    finished = [int(i) for i, p in peers.items() if "final_eval_loss" in p]
    if not finished:
        raise RuntimeError(f"no peer finished ({first_error(run_dir)}): see {run_dir / 'peers'}")
    counted = [i for i in finished if i in honest] or finished
    first = counted[0]
    shutil.copyfile(run_dir / "peers" / str(first) / "metrics.jsonl", run_dir / "metrics.jsonl")
    done = [peers[str(i)] for i in counted]
    summary = {
        **{k: v for k, v in peers[str(first)].items() if k not in ("peer", "exit_code", "honest")},
        "final_eval_loss": sum(p["final_eval_loss"] for p in done) / len(done),
        "comm_bytes_per_worker": sum(p["comm_bytes_per_worker"] for p in done) / len(done),
        "comm_bytes_total": sum(peers[str(i)]["comm_bytes_per_worker"] for i in finished),
        "peers_finished": len(finished),
        "peers_counted": counted,
        **_validator_summary(run_dir),
        "peers": peers,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def honest_peers(extra: dict[int, list[str]], k: int) -> set[int]:
    """The peers asked for no misbehaviour (behaviour, kill) in ``swarm.peer_overrides``."""
    odd = ("worker.behavior=", "worker.kill_at_round=", "worker.kill_mid_round=")
    return {
        i
        for i in range(k)
        if not any(o.startswith(odd) and o != "worker.behavior=honest" for o in extra.get(i, []))
    }


def bucket_store(cfg: Any, mine: list[str]) -> str:
    """The store as every peer names it (an absolute path), checked once; added to ``mine``."""
    store = cfg.comm["store"]
    if "://" not in store or store.startswith("file://"):  # the peers' path, whatever their cwd
        path = store.removeprefix("file://")
        store = "file://" + str(Path(path).resolve())
    try:  # one line now, rather than one per peer
        open_store(store, cfg.comm.get("endpoint_url"), cfg.comm["store_timeout_s"]).check()
    except (ValueError, StoreError) as err:
        raise ConfigError(f"comm.store={cfg.comm['store']}", str(err)) from None
    mine.append(f"comm.store={store}")
    return store


def run(node: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Check the config, start the peers, wait, and write the swarm's run dir."""
    resolved: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    sw = from_dict(SwarmConfig, resolved.pop("swarm", {}) or {}, "swarm")
    resolved.pop("worker", None)
    cfg = parse(resolved)
    check_peer(cfg, PeerConfig())
    k = cfg.workers.count
    peer_overrides(sw.peer_overrides, k)
    kind = comm_kind(cfg)
    if sw.validator and kind != "bucket":
        raise ConfigError("swarm.validator=true", "the validator reads a store: comm=bucket")
    mine = [
        o
        for o in overrides
        if not o.startswith(("swarm.", "hydra.", "comm=", "comm.store=", "comm.run_id="))
    ]
    run_id = cfg.comm["run_id"]
    if not any(o.startswith("comm.run_id=") for o in overrides):
        run_id = f"{run_dir.name.replace('.', '-')}-{uuid.uuid4().hex[:8]}"
    mine += [f"comm={kind}", f"comm.run_id={run_id}"]
    where = "the DHT" if kind == "hivemind" else f"store {bucket_store(cfg, mine)}"
    log.info("swarm: %d peers, %s, run %s", k, where, run_id)
    # SIGTERM (timeout, a scheduler) unwinds like Ctrl-C, so the peers are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    codes, pids = launch(mine, k, run_dir, sw, hivemind=kind == "hivemind")
    honest = honest_peers(peer_overrides(sw.peer_overrides, k), k)
    summary = collect(run_dir, codes, honest, pids)
    log.info("summary (%s)\n%s", run_dir, M.format_table([summary], M.SUMMARY_COLUMNS))
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="swarm", version_base="1.3")
def _hydra_main(node: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    args = (node, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    out = one_line(lambda: run(*args), {ConfigError: 2, RuntimeError: 1})
    return float(out["final_eval_loss"])


def main() -> None:
    """Console entry point."""
    run_cli(_hydra_main, "swarm")


if __name__ == "__main__":
    main()
