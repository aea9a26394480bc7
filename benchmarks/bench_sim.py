"""What K simulated workers cost against one model on the same tokens; prints JSON lines.

Measured in one process, interleaved (each timing round runs every variant once; medians):

* ``inner``: one inner step (forward, backward, per-worker clipping, AdamW) of K workers of
  batch B through :class:`diloco.workers.WorkerGroup`, ``batched`` and ``loop``, against one
  model on K x B sequences (forward, backward, clipping, ``torch.optim.AdamW``): the ratio's
  limit is 1.0x. Total tokens per step are kept at ``--tokens`` sequences (B = tokens / K).
* ``demo``: a DeMo inner step (encode, all-gather, decode, sign update) of the trainer
  against a DDP one, same workers and batch; and the four workers' encodes one after the
  other against one ``DeMo.encode_many``.
* ``outer``: DiLoCo's round end (payload, exchange, outer Nesterov step, pull) against H=50
  inner steps.
* ``scale``: peak memory of K workers of a tiny GPT, each K in its own process; bytes per
  worker from the slope.

Usage::

    python benchmarks/bench_sim.py                      # CPU: default GPT and a small one
    python benchmarks/bench_sim.py --device cuda --models gpu --dtype bf16
    python benchmarks/bench_sim.py --only scale --scale-ks 32 64 128 256
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from demo_optim import DeMo
from diloco.models import GPT
from diloco.workers import WorkerGroup

MODELS = {  # name: (n_layer, n_head, n_embd, vocab, seq_len)
    "default": (4, 6, 192, 256, 128),  # conf/model/gpt.yaml on the byte corpus: 1.84M
    "small": (2, 2, 64, 256, 64),
    "gpu": (6, 8, 384, 2048, 256),  # 10.9M
    "tiny": (1, 2, 32, 256, 32),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], iters: int, device: torch.device) -> dict:
    """Median ms of each function, timed in turn ``iters`` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def inner(args: argparse.Namespace, model_name: str, k: int, device: torch.device) -> dict:
    n_layer, n_head, n_embd, vocab, seq = MODELS[model_name]
    b = max(1, args.tokens // k)
    torch.manual_seed(0)

    def gpt() -> GPT:
        return GPT(vocab, seq, n_layer=n_layer, n_head=n_head, n_embd=n_embd).to(device)

    opt = partial(
        torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=args.fused
    )  # conf/optimizer/adamw.yaml
    one = gpt()
    one_opt = opt(one.parameters())
    x = torch.randint(0, vocab, (k, b, seq), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16")

    def one_step() -> None:
        one_opt.zero_grad(set_to_none=False)
        with autocast:
            loss = one(x.view(k * b, seq), x.view(k * b, seq))[1]
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(one.parameters(), 1.0)
        one_opt.step()

    fns: dict[str, Callable[[], Any]] = {"one": one_step}
    groups = {}
    for mode in args.modes:
        if mode == "loop" and k > args.loop_max_k:
            continue
        precision = "bf16" if args.dtype == "bf16" else "fp32"  # workers.precision
        compiled = args.compile and mode == "batched"  # workers.compile
        group = WorkerGroup(gpt(), range(k), opt, mode, precision, compiled)
        groups[mode] = group

        def step(group: WorkerGroup = group) -> None:
            group.forward_backward([(x[i], x[i]) for i in range(k)])
            group.clip_grads(1.0)
            group.optimizer_step(1.0)

        fns[mode] = step
    ms = interleaved(fns, args.iters, device)
    out: dict[str, Any] = {"bench": "inner", "model": model_name, "params": one.num_params()}
    out.update(k=k, batch=b, seq_len=seq, one_ms=round(ms["one"], 2))
    for mode in groups:
        out[f"{mode}_ms"] = round(ms[mode], 2)
        out[f"ratio_{mode}"] = round(ms[mode] / ms["one"], 3)
    return out


def trainer_for(*overrides: str) -> Any:
    from omegaconf import OmegaConf

    from diloco.compose import compose
    from diloco.config import parse
    from diloco.trainer import Trainer

    node = compose(["logger.mode=disabled", *overrides])
    cfg = parse(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    import tempfile

    return Trainer.from_config(cfg, tempfile.mkdtemp())


def demo(args: argparse.Namespace, device: torch.device) -> dict:
    common = [f"device={device}", "workers.count=4", f"workers.threads={torch.get_num_threads()}"]
    ddp, dm = trainer_for("algorithm=ddp", *common), trainer_for("algorithm=demo", *common)
    opts = dm.group.optimizers
    fns = {
        "ddp": ddp._inner_step, "demo": dm._inner_step,
        "encode_each": lambda: [o.encode() for o in opts],
        "encode_many": lambda: DeMo.encode_many(opts),
    }  # fmt: skip
    ms = interleaved(fns, args.iters, device)
    return {
        "bench": "demo", "workers": 4, "ddp_step_ms": round(ms["ddp"], 2),
        "demo_step_ms": round(ms["demo"], 2),
        "ratio_demo_over_ddp": round(ms["demo"] / ms["ddp"], 3),
        "encode_each_ms": round(ms["encode_each"], 2),
        "encode_many_ms": round(ms["encode_many"], 2),
    }  # fmt: skip


def outer(args: argparse.Namespace, device: torch.device) -> dict:
    t = trainer_for("algorithm=diloco", f"device={device}", "workers.count=4")

    def h_steps() -> None:
        for _ in range(50):
            t._inner_step()

    ms = interleaved({"inner_h50": h_steps, "outer": t._sync}, max(2, args.iters // 3), device)
    return {
        "bench": "outer", "workers": 4, "h": 50, "inner_h50_ms": round(ms["inner_h50"], 1),
        "outer_ms": round(ms["outer"], 2), "outer_share": round(ms["outer"] / ms["inner_h50"], 4),
    }  # fmt: skip


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM; ru_maxrss would carry the parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def scale_one(k: int, device: torch.device) -> dict:
    """One process: K workers of the tiny GPT, one inner step; peak resident memory."""
    n_layer, n_head, n_embd, vocab, seq = MODELS["tiny"]
    base = peak_rss()
    group = WorkerGroup(
        GPT(vocab, seq, n_layer=n_layer, n_head=n_head, n_embd=n_embd).to(device),
        range(k), partial(torch.optim.AdamW, lr=1e-3), "batched",
    )  # fmt: skip
    x = torch.randint(0, vocab, (k, 1, seq), device=device)
    group.forward_backward([(x[i], x[i]) for i in range(k)])
    group.clip_grads(1.0)
    group.optimizer_step(1.0)
    peak = peak_rss()
    return {"k": k, "params": group.num_params, "peak_rss_bytes": peak, "base_bytes": base}


def scale(args: argparse.Namespace) -> dict:
    rows = []
    for k in args.scale_ks:
        cmd = [sys.executable, __file__, "--scale-one", str(k), "--device", args.device]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout))
    first, last = rows[0], rows[-1]
    per = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / (last["k"] - first["k"])
    return {
        "bench": "scale", "model": "tiny", "params": first["params"],
        "peak_rss_bytes": {r["k"]: r["peak_rss_bytes"] for r in rows},
        "bytes_per_worker": round(per),
        "bytes_per_param_per_worker": round(per / first["params"], 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["default", "small"], choices=sorted(MODELS))
    p.add_argument("--ks", nargs="+", type=int, default=[1, 4, 8, 16, 64])
    p.add_argument("--tokens", type=int, default=32, help="sequences per step over all workers")
    p.add_argument("--modes", nargs="+", default=["batched", "loop"], choices=["batched", "loop"])
    p.add_argument("--loop-max-k", type=int, default=64, help="skip the loop above this K")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--fused", type=int, default=1, help="AdamW's fused kernel (1: as conf/)")
    p.add_argument("--compile", action="store_true", help="workers.compile for batched")
    p.add_argument("--only", nargs="+", default=["inner", "demo", "outer", "scale"])
    p.add_argument("--scale-ks", nargs="+", type=int, default=[32, 64, 128, 256])
    p.add_argument("--scale-one", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.scale_one:
        print(json.dumps(scale_one(args.scale_one, device)))
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    head = {"device": where, "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(head))
    if "inner" in args.only:
        for model in args.models:
            for k in args.ks:
                print(json.dumps(inner(args, model, k, device)), flush=True)
    if "demo" in args.only:
        print(json.dumps(demo(args, device)), flush=True)
    if "outer" in args.only:
        print(json.dumps(outer(args, device)), flush=True)
    if "scale" in args.only:
        print(json.dumps(scale(args)), flush=True)


if __name__ == "__main__":
    main()
