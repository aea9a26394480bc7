"""One hivemind averaging round's wall time versus payload size, N peer processes on loopback.

Each peer is a process of this script holding a :class:`diloco.comm.p2p.HivemindComm`: a
hivemind DHT over libp2p and one ``DecentralizedAverager`` per payload size (matchmaking and
butterfly all-reduce from hivemind; Ryabinin et al., "Moshpit SGD: Communication-Efficient
Decentralized Training on Heterogeneous Unreliable Devices", arXiv:2103.03239), plus the
comm's one-element "was my all-reduce whole" vote after every all-reduce. Everything listens
on 127.0.0.1 only.

For every payload size ``P`` (fp32 elements; ``--sizes``) each peer runs one warm-up exchange
(it starts that size's averager process and waits up to ``--join-deadline-s`` for the full
group) and ``--rounds`` timed ones, each a call of ``comm.all_reduce_mean`` on a ``[1, P]``
row ``w(peer, round) b + peer`` (``b`` a seeded standard normal); every round has its own
round number, so its own group key. Peers are not synchronized, so a peer's own call time
includes waiting for the others; the *round* time is ``max(end) - max(start)`` over the
peers: from the last peer calling to the last peer returning (matchmaking of a full group,
which starts at once, the butterfly all-reduce, the vote). The warm-up of every size waits
for the full group (``comm.first``), so every size starts with the peers together; a peer
more than ``--matchmaking-s`` late to a round is left out of it (then alone, and usually
late to the next ones as well). Measured and printed, as one JSON object, per size:

- ``round_s_median`` / ``round_s_min``: the round time over the timed rounds that all N
  peers averaged in as one group (``rounds_full``; the others are ``rounds_not_full``);
- ``payload_MBps``: ``4 P / 1e6`` over the median round time (the fp32 payload, whatever the
  wire compression);
- ``sent_bytes_per_peer``: the median per-peer, per-round delta of ``comm.sent`` (what the
  comm counts: the butterfly formula on hivemind's serialized payload; hivemind keeps no
  byte counters) against ``2 (n-1)/n 4 P`` (``formula_bytes``);
- ``lo_bytes_per_peer``: the loopback interface's transmitted bytes from the first peer's
  start to the last peer's end of a round, over N (median over rounds): real traffic,
  including TCP/IP framing, the DHT and the vote, and anything else using ``lo`` meanwhile;
- ``max_abs_err`` / ``max_rel_err``: against the true mean of the group's payloads (checked
  at ``1e-5`` absolute for ``--compression none``, ``1e-2`` relative to the largest |mean|
  for ``fp16``), and the group sizes seen.

The window (``--matchmaking-s``, 3 s) does not enter a full group's round time (it starts as
soon as the N-th peer joins); it bounds how late a peer may be and still join, which on a
loaded 2-core machine is sometimes more than a second. ``comm.request_timeout_s`` must stay
below it (2 s here). Rounds that are not whole still happen (a follower giving up on a
leader that had counted it in, a peer losing the vote's result): they are counted, not timed.

The parent starts peer 0, waits for its multiaddrs file, starts the others with those
multiaddrs as initial peers, each in its own process group (``start_new_session``), and
kills every group (SIGTERM, then SIGKILL) when done, on error or after ``--timeout``: the
p2p daemons and averager processes hivemind starts live in their peer's group.

Usage::

    python benchmarks/bench_hivemind.py                     # 3 peers, 1e4 .. 4e6 floats
    python benchmarks/bench_hivemind.py --n 4 --sizes 10000 1000000 --compression fp16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_SIZES = [10_000, 100_000, 1_000_000, 4_000_000]
TOLERANCE = {"none": ("abs", 1e-5), "fp16": ("rel", 1e-2)}
ROUNDS_PER_SIZE = 1000  # size s uses round numbers (s+1)*1000 + k: distinct group keys


def lo_tx_bytes() -> int | None:
    """Bytes the loopback interface has transmitted (``/proc/net/dev``), None if unknown."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    except (OSError, ValueError, IndexError):
        pass
    return None


def weight(peer: int, round_: int) -> float:
    """Peer ``peer``'s multiple of the base vector in round ``round_``."""
    return (peer + 1) * (1.0 + 0.01 * (round_ % ROUNDS_PER_SIZE))


def payload(base: torch.Tensor, peer: int, round_: int) -> torch.Tensor:
    """Peer ``peer``'s payload in round ``round_``: ``w(peer, round) base + peer``.

    ``base`` is a seeded standard normal of the size, the same on every peer: the mean over
    a group is ``mean(w) base + mean(peer)``, checked in two passes over ``P`` (cheap next
    to the round, so checking does not make the peers drift apart between rounds).
    """
    return base * weight(peer, round_) + float(peer)


def expected_mean(base: torch.Tensor, members: list[int], round_: int) -> torch.Tensor:
    """The mean of the members' payloads in round ``round_``."""
    w = sum(weight(p, round_) for p in members) / len(members)
    return base * w + sum(members) / len(members)


# -- one peer ---------------------------------------------------------------------------------


def run_peer(args: argparse.Namespace) -> None:
    """Build this peer's HivemindComm, run every size's rounds, write one JSON line each."""
    from diloco.comm.p2p import HivemindComm, HivemindConfig

    torch.set_num_threads(1)
    work = Path(args.workdir)
    cfg = HivemindConfig(
        initial_peers=list(args.initial_peers),
        host="127.0.0.1",
        run_id=args.run_id,
        maddrs_file=str(work / "0.maddrs") if args.peer == 0 else None,
        compression=args.compression,
        matchmaking_s=args.matchmaking_s,
        request_timeout_s=args.request_timeout_s,
        join_deadline_s=args.join_deadline_s,
        chunk_timeout_s=args.chunk_timeout_s,
    )
    comm = HivemindComm(cfg, num_workers=args.n, peer=args.peer, fingerprint="bench")
    kind, tol = TOLERANCE[args.compression]
    try:
        with open(work / f"peer{args.peer}.jsonl", "a") as out:
            for s, numel in enumerate(args.sizes):
                r0 = (s + 1) * ROUNDS_PER_SIZE
                base = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
                comm.first = True  # a new size starts a new averager: wait for the full group
                last_end = 0.0
                for k in range(args.rounds + 1):
                    r = r0 + k
                    comm.round_of = lambda r=r: r  # type: ignore[misc]
                    row = payload(base, args.peer, r).unsqueeze(0)
                    sent0, recv0 = comm.sent.item(), comm.recv.item()
                    lo0 = lo_tx_bytes()
                    start, t0 = time.time(), time.perf_counter()
                    mean = comm.all_reduce_mean(row)
                    call_s, end = time.perf_counter() - t0, time.time()
                    lo1 = lo_tx_bytes()
                    members = sorted(p for p, rs in comm.took_part.items() if r in rs)
                    want = expected_mean(base, members, r)
                    err = float((mean - want).abs().max())
                    rel = err / max(float(want.abs().max()), 1e-30)
                    check_s = time.time() - end
                    rec = {
                        "peer": args.peer, "P": numel, "round": r, "warmup": k == 0,
                        "start": start, "end": end, "call_s": call_s, "check_s": check_s,
                        "off_call_s": None if k == 0 else start - last_end,
                        "sent": comm.sent.item() - sent0, "recv": comm.recv.item() - recv0,
                        "group": comm.group_sizes[-1], "members": members,
                        "max_abs_err": err, "max_rel_err": rel,
                        "ok": (err if kind == "abs" else rel) <= tol,
                        "lo_start": lo0, "lo_end": lo1,
                    }  # fmt: skip
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    last_end = end
        # the others may still be receiving this peer's last parts: leave together
        (work / f"done{args.peer}").touch()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            (work / f"done{i}").exists() for i in range(args.n)
        ):
            time.sleep(0.1)
        summary = comm.summary()
        summary["hivemind"].pop("multiaddrs", None)
        (work / f"summary{args.peer}.json").write_text(json.dumps(summary))
    finally:
        comm.close()


# -- the parent -------------------------------------------------------------------------------


def start_peer(
    args: argparse.Namespace, i: int, maddrs: list[str], work: Path
) -> subprocess.Popen[bytes]:
    """Start peer ``i`` of this script in its own process group, its output to a log file."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--peer", str(i), "--n", str(args.n),
        "--workdir", str(work), "--run-id", args.run_id, "--rounds", str(args.rounds),
        "--sizes", *map(str, args.sizes), "--compression", args.compression,
        "--matchmaking-s", str(args.matchmaking_s),
        "--request-timeout-s", str(args.request_timeout_s),
        "--join-deadline-s", str(args.join_deadline_s),
        "--chunk-timeout-s", str(args.chunk_timeout_s),
        "--initial-peers", *maddrs,
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    with open(work / f"peer{i}.log", "wb") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every peer's process group, then SIGKILL what is left of it.

    A group is signalled even when its leader (the peer) has exited: hivemind's p2p daemon
    or an averager process may outlive it.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + 5
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)


def wait_file(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> str:
    """The text of ``path`` once it exists (the first peer's multiaddrs)."""
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"peer 0 exited ({proc.returncode}) before joining the DHT")
        if time.monotonic() > deadline:
            raise TimeoutError("peer 0 did not write its multiaddrs in time")
        time.sleep(0.05)
    return path.read_text()


def summarize(records: list[dict[str, Any]], n: int, sizes: list[int]) -> list[dict[str, Any]]:
    """Per size: round times, throughput, bytes per peer against the formula, errors."""
    out = []
    for numel in sizes:
        mine = [r for r in records if r["P"] == numel]
        by_round: dict[int, list[dict[str, Any]]] = {}
        for r in mine:
            if not r["warmup"]:
                by_round.setdefault(r["round"], []).append(r)
        # rounds every peer averaged in, as one group of n (others: a peer left out or late)
        full = {
            k: v for k, v in by_round.items() if len(v) == n and all(r["group"] == n for r in v)
        }
        times = [max(r["end"] for r in v) - max(r["start"] for r in v) for v in full.values()]
        skew = [max(r["start"] for r in v) - min(r["start"] for r in v) for v in full.values()]
        lo = []
        for v in full.values():
            first, last = min(v, key=lambda r: r["start"]), max(v, key=lambda r: r["end"])
            if first["lo_start"] is not None and last["lo_end"] is not None:
                lo.append((last["lo_end"] - first["lo_start"]) / n)
        timed = [r for v in full.values() for r in v]
        formula = 2 * (n - 1) / n * 4 * numel
        row: dict[str, Any] = {
            "P": numel,
            "payload_bytes": 4 * numel,
            "rounds_full": len(full),
            "rounds_not_full": len(by_round) - len(full),
        }
        if times:
            med = statistics.median(times)
            sent = statistics.median(r["sent"] for r in timed)
            row |= {
                "round_s_median": round(med, 4),
                "round_s_min": round(min(times), 4),
                "round_s_all": [round(t, 4) for t in times],
                "arrival_skew_s_median": round(statistics.median(skew), 4),
                "peer_call_s_median": round(statistics.median(r["call_s"] for r in timed), 4),
                "payload_MBps": round(4 * numel / 1e6 / med, 2),
                "sent_bytes_per_peer": sent,
                "formula_bytes": formula,
                "sent_over_formula": round(sent / formula, 6),
                "lo_bytes_per_peer": statistics.median(lo) if lo else None,
                "lo_over_formula": round(statistics.median(lo) / formula, 4) if lo else None,
            }
        row |= {
            "group_sizes": sorted({r["group"] for r in mine}),
            "max_abs_err": max((r["max_abs_err"] for r in mine), default=None),
            "max_rel_err": max((r["max_rel_err"] for r in mine), default=None),
            "checks_ok": bool(mine) and all(r["ok"] for r in mine),
        }
        out.append(row)
    return out


def run_parent(args: argparse.Namespace) -> int:
    """Start the peers, wait for them (at most ``--timeout``), print the summary."""
    import hivemind

    load_before = os.getloadavg()
    begin = time.monotonic()
    deadline = begin + args.timeout
    procs: list[subprocess.Popen[bytes]] = []
    error = None
    if args.keep_dir is not None:  # the peers' logs and records stay there
        Path(args.keep_dir).mkdir(parents=True, exist_ok=True)
        if any(Path(args.keep_dir).iterdir()):
            sys.exit(f"--keep-dir {args.keep_dir}: not empty")
    where: contextlib.AbstractContextManager[str] = (
        tempfile.TemporaryDirectory(prefix="bench_hivemind_")
        if args.keep_dir is None
        else contextlib.nullcontext(args.keep_dir)
    )
    with where as tmp:
        work = Path(tmp).resolve()
        try:
            procs.append(start_peer(args, 0, [], work))
            maddrs = wait_file(work / "0.maddrs", procs[0], deadline).split()
            procs += [start_peer(args, i, maddrs, work) for i in range(1, args.n)]
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            if any(p.poll() is None for p in procs):
                error = f"timed out after {args.timeout:g} s"
            elif any(p.returncode for p in procs):
                error = f"peer exit codes {[p.returncode for p in procs]}"
        except (RuntimeError, TimeoutError) as err:
            error = str(err)
        finally:
            stop(procs)
        records = []
        for i in range(args.n):
            path = work / f"peer{i}.jsonl"
            if path.exists():
                records += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        summaries = []
        for i in range(args.n):
            path = work / f"summary{i}.json"
            if path.exists():
                summaries.append(json.loads(path.read_text())["hivemind"])
        if error:
            for i in range(len(procs)):
                tail = (work / f"peer{i}.log").read_text(errors="replace")[-3000:]
                print(f"--- peer {i} log (tail) ---\n{tail}", file=sys.stderr)
    results = summarize(records, args.n, args.sizes)
    report = {
        "bench": "hivemind_loopback",
        "peers": args.n,
        "compression": args.compression,
        "rounds": args.rounds,
        "matchmaking_s": args.matchmaking_s,
        "request_timeout_s": args.request_timeout_s,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "hivemind": hivemind.__version__,
        "torch": torch.__version__,
        "results": results,
        "comm_stats": [
            {k: s[k] for k in ("exchanges", "partial", "alone", "redone")} for s in summaries
        ],
        "total_s": round(time.monotonic() - begin, 1),
        "error": error,
    }
    print(json.dumps(report))
    ok = error is None and all(r.get("checks_ok") for r in results)
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3, help="peer processes")
    parser.add_argument(
        "--sizes", type=lambda x: int(float(x)), nargs="+", default=DEFAULT_SIZES,
        help="payload sizes in floats (1e6 or 1000000)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size")
    parser.add_argument("--compression", choices=sorted(TOLERANCE), default="none")
    parser.add_argument("--timeout", type=float, default=600.0, help="the whole run, seconds")
    parser.add_argument("--matchmaking-s", type=float, default=3.0, help="a round's window")
    parser.add_argument("--request-timeout-s", type=float, default=2.0, help="< matchmaking")
    parser.add_argument("--join-deadline-s", type=float, default=30.0, help="warm-up window")
    parser.add_argument("--chunk-timeout-s", type=float, default=5.0)
    parser.add_argument("--keep-dir", default=None, help="keep peers' logs and records here")
    parser.add_argument("--peer", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default=f"bench{os.getpid()}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 2:
        parser.error("--n: at least 2 peers")
    if args.peer is not None:
        run_peer(args)
    else:
        sys.exit(run_parent(args))


if __name__ == "__main__":
    main()
