"""Time forward + backward + AdamW step of GPT configs on this machine's CPU.

Prints one JSON line per config, e.g.:

    python benchmarks/bench_model.py --configs 4x128 4x192 4x256 6x256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diloco.models import GPT


def parse_config(text: str) -> tuple[int, int]:
    n_layer, n_embd = text.lower().split("x")
    return int(n_layer), int(n_embd)


def bench(args: argparse.Namespace, n_layer: int, n_embd: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = GPT(
        args.vocab_size, args.block_size, n_layer=n_layer, n_head=args.n_head, n_embd=n_embd
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    targets = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))

    def step() -> float:
        _, loss = model(idx, targets)
        assert loss is not None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {
        "n_layer": n_layer,
        "n_head": args.n_head,
        "n_embd": n_embd,
        "vocab_size": args.vocab_size,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "params": model.num_params(),
        "non_embedding_params": model.num_params(non_embedding=True),
        "step_ms_median": round(ms, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "tokens_per_s": round(args.batch_size * args.block_size / (ms / 1e3)),
        "est_s_4workers_x600": round(4 * 600 * ms / 1e3, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["4x128", "4x192", "4x256", "6x256"],
        help="n_layer x n_embd pairs",
    )
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="0 keeps torch's default")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for cfg in args.configs:
        n_layer, n_embd = parse_config(cfg)
        print(json.dumps(bench(args, n_layer, n_embd)), flush=True)


if __name__ == "__main__":
    main()
