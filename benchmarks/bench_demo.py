"""Time a DeMo optimizer step against AdamW on a small GPT and print one JSON line.

Measures, on one process (the DeMo exchange is skipped: a single worker):

* ``demo_step_ms``: ``DeMo.step()`` (weight decay, momentum, chunked DCT, top-k,
  error feedback, aggregation, inverse DCT and sign update) with gradients in place;
* ``adamw_step_ms``: ``torch.optim.AdamW`` step, fused where the device supports it,
  else ``foreach=True``;
* ``train_step_ms``: ``zero_grad`` + forward + backward + ``DeMo.step()``;

and reports ``ratio_demo_over_adamw`` and ``demo_share_of_train_step``.

Usage::

    python benchmarks/bench_demo.py --device cpu --iters 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from demo_optim import DeMo, payload_nbytes
from diloco.models import GPT


def build_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    kwargs = {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd}
    return GPT(args.vocab_size, args.block_size, **kwargs), "diloco.models.GPT"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_adamw(params: list[nn.Parameter], device: torch.device) -> tuple[torch.optim.AdamW, str]:
    try:
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
        opt.step()  # raises here if the fused kernel is unavailable for this device
        return opt, "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True), "foreach"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=192)
    parser.add_argument("--compression-topk", type=int, default=32)
    parser.add_argument("--compression-chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: keep)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, model_source = build_model(args)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=device)
    targets = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=device)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=False)
        _, loss = model(idx, targets)
        assert loss is not None
        loss.backward()

    forward_backward()  # gradients in place for the optimizer-only timings
    demo = DeMo(
        params,
        1e-3,
        compression_topk=args.compression_topk,
        compression_chunk=args.compression_chunk,
        weight_decay=0.1,
    )
    payload = demo.encode()
    demo.apply([t.unsqueeze(0) for t in payload])
    demo_ms = time_ms(demo.step, device, args.iters, args.warmup)

    adamw, adamw_impl = make_adamw(params, device)
    adamw_ms = time_ms(adamw.step, device, args.iters, args.warmup)

    def train_step() -> None:
        forward_backward()
        demo.step()

    train_ms = time_ms(train_step, device, args.iters, args.warmup)

    n_params = sum(p.numel() for p in params)
    result = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": model_source,
        "n_params": n_params,
        "demo_step_ms": round(demo_ms, 3),
        "adamw_step_ms": round(adamw_ms, 3),
        "adamw_impl": adamw_impl,
        "ratio_demo_over_adamw": round(demo_ms / adamw_ms, 3),
        "train_step_ms": round(train_ms, 3),
        "demo_share_of_train_step": round(demo_ms / train_ms, 3),
        "payload_bytes": payload_nbytes(payload),
        "dense_fp32_bytes": 4 * n_params,
        "iters": args.iters,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
