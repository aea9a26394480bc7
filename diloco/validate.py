"""A validator of bucket peers: ``python -m diloco.validate comm.store=... comm.run_id=...``.

It follows the run window by window like a peer that posts nothing (Templar's validators
read the same buckets as the miners). For round r it takes the global model the round
started from (round 0: the seeded init every peer builds; later ``<run_id>/global/<r>``),
gathers the peers' objects with a peer's checks (a malformed, stale or copied object gets
weight 0 and its reason), draws for each peer that posted the batches it trained on (a
worker's data depends only on its id and the seed), scores every accepted payload with the
Gauntlet (:class:`diloco.adversary.validator.Gauntlet`: loss gain on fresh batches, gain on
the peer's own batches against the others', cosine copies blamed on the later arrival, here
the store's own times) and posts the weights ``<run_id>/weights/<r>`` (safetensors ``[K]``:
0 flagged or excluded, else 1, absent peers included). Peers leave out a peer of weight 0
in the newest weights before their round ("flagged by the validator").

Its run dir gets ``scores.jsonl`` (one line a round: weights, scores, reasons) and
``summary.json`` (per peer: rounds accepted, flagged and excluded, by reason).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diloco.build import build_comm, build_parts
from diloco.comm.bucket import VALIDATOR_KEY, BucketComm
from diloco.comm.objects import fingerprint, pack
from diloco.compose import CONF_DIR, one_line, run_cli
from diloco.config import ConfigError, parse
from diloco.data import DataError, load_corpus
from diloco.exchange.codecs import Encoded, make_codec
from diloco.peer import check_peer, newest_global, run_rounds

log = logging.getLogger("diloco")


def _decode(codec: Any, tensors: dict[str, torch.Tensor], names: list[str], p: int) -> Any:
    """One peer's payload row ``[P]`` from its object's tensors (None if it does not decode)."""
    enc = Encoded((1, p), **{n: tensors[f"part{j}"][None] for j, n in enumerate(names)})
    try:
        row = codec.decode(enc)[0].float()
    except Exception:  # untrusted: bit-packed indices past the payload, and the like
        return None
    return row if bool(torch.isfinite(row).all()) else None


class Watcher:
    """The validator's state over the run: its parts, the Gauntlet, each peer's record."""

    def __init__(self, parts: Any, comm: BucketComm, run_dir: Path) -> None:
        self.parts, self.comm, self.run_dir = parts, comm, run_dir
        self.cfg = parts.cfg
        self.gauntlet = parts.exchange.validator
        self.codec = make_codec(self.cfg.codec, feedback=False)
        p = parts.group.num_params
        enc = self.codec.encode(torch.zeros(1, p))
        self.names = [n for n in ("values", "indices", "scales") if getattr(enc, n) is not None]
        self.like = {f"part{j}": getattr(enc, n)[0] for j, n in enumerate(self.names)}
        self.own_size = len(pack(self.like, comm._meta("0")))
        k = self.cfg.workers.count
        self.record: dict[int, dict[str, Any]] = {
            i: {"accepted": 0, "flagged": 0, "absent": 0, "excluded": {}} for i in range(k)
        }
        self.drawn = [0] * k  # batches redrawn per peer so far

    def redraw(self, r: int) -> None:
        """Each peer's batches up to round ``r``: one round's for every round it posted in.

        Read from the store (its rounds' objects), not from the windows this validator saw,
        so that a peer that posted late stays in step.
        """
        h, total = self.parts.algorithm.inner_steps, self.cfg.train.steps
        posts = self.comm.posts(r + 1)
        for i in range(self.cfg.workers.count):
            want = sum(min(h, total - q * h) for q in posts.get(i, []))
            for _ in range(want - self.drawn[i]):
                self.parts.samplers[i].next_batch()
            self.drawn[i] = max(self.drawn[i], want)

    def wait_global(self, r: int) -> bool:
        """Load the model round ``r`` starts from; False if none came in time."""
        if r == 0:
            return True  # every peer starts from the same seeded init, built here too
        deadline = time.monotonic() + self.comm.cfg.join_deadline_s  # type: ignore[attr-defined]
        while time.monotonic() < deadline:
            found = newest_global(self.comm, self.parts, r, only=r)  # kept: it may lag
            if found is not None:
                self.parts.group.global_param.data.copy_(found[1])
                return True
            time.sleep(self.comm.cfg.poll_s)  # type: ignore[attr-defined]
        return False

    def round(self, r: int) -> dict[str, Any]:
        """Gather round ``r``, score it, post its weights; the round's line of scores.jsonl."""
        k = self.cfg.workers.count
        rows = self.comm.collect(str(r), r, self.like, self.own_size)
        self.redraw(r)
        reasons, kinds = dict(self.comm.rejected), dict(self.comm.kinds)
        decoded = {}
        for i, tensors in sorted(rows.items()):
            row = _decode(self.codec, tensors, self.names, self.parts.group.num_params)
            if row is None:
                reasons[i], kinds[i] = f"peer {i}: does not decode to finite values", "malformed"
            else:
                decoded[i] = row
        weights = torch.ones(k)  # an absent peer is not flagged, nor one of a tie
        weights[[i for i in reasons if kinds[i] != "copy_tie"]] = 0.0
        ids = sorted(decoded)
        if ids:
            arrived = [self.comm.arrivals.get(i, math.inf) for i in range(k)]
            times = torch.tensor(arrived, dtype=torch.float64)  # epoch seconds: not float32
            self.gauntlet.arrival = lambda _p: times
            weights[ids] = self.gauntlet.weigh(torch.stack([decoded[i] for i in ids]), ids)
        self.comm.post_weights(r, weights)
        for i in range(k):
            rec = self.record[i]
            if i in reasons:
                rec["excluded"][kinds[i]] = rec["excluded"].get(kinds[i], 0) + 1
            elif i not in decoded:
                rec["absent"] += 1
            else:
                rec["accepted" if weights[i] > 0 else "flagged"] += 1
        line = {
            "round": r,
            "weights": weights.tolist(),
            "scores": self.gauntlet.scores.tolist(),
            "assignment": self.gauntlet.assign.tolist(),
            "excluded": {str(i): why for i, why in reasons.items()},
        }
        log.info("validator round %d: weights %s", r, weights.tolist())
        return line

    def run(self) -> dict[str, Any]:
        """Every round of the run, or until the peers stop posting global models."""
        rounds = run_rounds(self.parts)
        done = 0
        with open(self.run_dir / "scores.jsonl", "w") as out:
            for r in range(rounds):
                if not self.wait_global(r):
                    if not self.comm.rounds_seen(r + 1):  # nothing newer: the run stopped
                        log.warning("validator: no global model of round %d; stopping", r)
                        break
                    log.warning("validator: no global model of round %d; skipped", r)
                    continue
                self.parts.progress.round = r
                line = self.round(r)
                out.write(json.dumps(line) + "\n")
                out.flush()
                done += 1
        summary = {
            "rounds_validated": done,  # rounds scored (a round without a model is skipped)
            "rounds": rounds,
            "peers": {str(i): rec for i, rec in self.record.items()},
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def run(node: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate the config, build the observer's parts, follow the run."""
    resolved: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    resolved.pop("worker", None)
    cfg = parse(resolved)
    check_peer(cfg, None)
    if not os.environ.get(VALIDATOR_KEY):
        raise ConfigError(
            VALIDATOR_KEY,
            "not set: the validator signs its weights with it, and the peers "
            "need the same secret to tell them from anyone's (diloco.swarm sets one)",
        )
    comm, device = build_comm(cfg, peer=-1, fingerprint=fingerprint(resolved))
    assert isinstance(comm, BucketComm)
    parts = build_parts(cfg, comm, device, load_corpus(cfg.data))
    run_dir.mkdir(parents=True, exist_ok=True)
    return Watcher(parts, comm, run_dir).run()


@hydra.main(config_path=str(CONF_DIR), config_name="validate", version_base="1.3")
def _hydra_main(node: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    one_line(lambda: run(node, run_dir), {ConfigError: 2, DataError: 2})


def main() -> None:
    """Console entry point."""
    run_cli(_hydra_main, "validate")


if __name__ == "__main__":
    main()
