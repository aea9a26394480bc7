"""The objects bucket peers exchange: safetensors payloads and states, checked on arrival.

Nothing here unpickles: a safetensors header is JSON, read with :mod:`json` within the
object's bounds; an algorithm's state is its tensors plus a tagged-JSON skeleton
(:func:`pack_state`). A peer's object is untrusted until :func:`read_payload` passed it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from typing import Any

import torch

FORMAT = "diloco-bucket-1"


def number(name: str) -> int | None:
    """A key segment that is a peer id or round number (ASCII digits only), else None."""
    return int(name) if re.fullmatch(r"[0-9]{1,9}", name) else None


def fingerprint(node: dict[str, Any]) -> str:
    """A short hash of what the peers of one run must share (a resolved config).

    The model, the optimizers, the algorithm, the codec, the aggregator, the schedule
    (``train``), the seed, the number of workers and the data but for where it lives.
    What a peer may set for itself (its id, threads, device, logging, the transport's
    timing) is left out.
    """
    data = {k: v for k, v in (node.get("data") or {}).items() if k not in ("path", "cache_dir")}
    keys = ("model", "optimizer", "algorithm", "codec", "aggregator", "train", "seed")
    shared = {k: node.get(k) for k in keys}
    shared.update(data=data, workers=(node.get("workers") or {}).get("count"))
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (not the metadata)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """One safetensors object (CPU copies of ``tensors``; ``metadata`` in its header)."""
    from safetensors.torch import save

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(cpu, metadata={"format": FORMAT, **metadata})


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors object; ValueError (one line) if it is not one.

    The header is JSON (read with :mod:`json`, bounded by the object's size); nothing is
    unpickled.
    """
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"header of {n} bytes in an object of {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        tensors = load(data)
    except Exception as err:  # any parse failure of untrusted bytes
        raise ValueError(f"not a safetensors object ({type(err).__name__})") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("metadata is not a string map")
    return tensors, meta


def read_payload(
    data: bytes, peer: int, round_key: str, like: dict[str, torch.Tensor], run: str = ""
) -> tuple[dict[str, torch.Tensor], str]:
    """Check one peer's object against this peer's own tensors ``like``; tensors and digest.

    ``run``: the run's :func:`fingerprint` (another run's objects are excluded; "": any).
    Raises ValueError with the reason it is excluded.
    """
    tensors, meta = unpack(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r} != {FORMAT!r}")
    if run and meta.get("run") != run:
        raise ValueError(f"another run's object (config {meta.get('run')!r}, not {run!r})")
    if meta.get("peer") != str(peer):
        raise ValueError(f"posted as peer {peer} but claims peer {meta.get('peer')!r}")
    if meta.get("round") != round_key:
        raise ValueError(f"stale: made for round {meta.get('round')!r}, not {round_key}")
    if sorted(tensors) != sorted(like):
        raise ValueError(f"tensors {sorted(tensors)} != {sorted(like)}")
    for name, t in tensors.items():
        ref = like[name]
        if t.dtype != ref.dtype or t.shape != ref.shape:
            raise ValueError(
                f"{name}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)} != "
                f"{str(ref.dtype).removeprefix('torch.')}{list(ref.shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: non-finite values")
    return tensors, tensor_digest(tensors)


# -- algorithm state as safetensors: tensors apart, the rest as tagged JSON ---------------------


def pack_state(state: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Split a nested state (dicts with int or str keys, lists, tensors, scalars) for storage.

    Tensors become entries ``t<i>``; the skeleton is JSON in which a dict is
    ``{"d": [[key, value], ...]}`` (int keys stay ints), a tensor ``{"t": "t<i>"}``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x
            return {"t": name}
        if isinstance(x, dict):
            return {"d": [[k, enc(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"l": [enc(v) for v in x]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"v": x}
        raise TypeError(f"cannot store a {type(x).__name__} in a global checkpoint")

    return tensors, json.dumps(enc(state))


def unpack_state(tensors: dict[str, torch.Tensor], skeleton: str) -> Any:
    """Inverse of :func:`pack_state`; ValueError for a malformed skeleton."""

    def dec(node: Any) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            raise ValueError("malformed state skeleton")
        ((tag, v),) = node.items()
        if tag == "t":
            if v not in tensors:
                raise ValueError(f"state names a missing tensor {v!r}")
            return tensors[v]
        if tag == "d":
            return {k: dec(x) for k, x in v}
        if tag == "l":
            return [dec(x) for x in v]
        if tag == "v":
            return v
        raise ValueError(f"unknown tag {tag!r} in state skeleton")

    try:
        return dec(json.loads(skeleton))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"malformed state skeleton ({err})") from None


def check_state(theirs: Any, own: Any, bound: int, path: str = "state") -> None:
    """``theirs`` must have ``own``'s structure and settings; ValueError naming the path.

    Dicts: every key of ``own`` with an equal value (recursively), except under an
    optimizer's per-parameter ``state``, which may hold buffers ``own`` has not made yet.
    Every tensor of ``theirs`` must be finite, of at most ``bound`` entries, and of
    ``own``'s shape and dtype where ``own`` has one.
    """
    if isinstance(theirs, torch.Tensor):
        if theirs.numel() > bound or (
            theirs.is_floating_point() and not bool(torch.isfinite(theirs).all())
        ):
            raise ValueError(f"{path}: a tensor of {theirs.numel()} entries, or not finite")
        if isinstance(own, torch.Tensor) and (theirs.shape, theirs.dtype) != (own.shape, own.dtype):
            raise ValueError(
                f"{path}: {theirs.dtype}{list(theirs.shape)} != {own.dtype}{list(own.shape)}"
            )
        return
    if isinstance(own, dict):
        if not isinstance(theirs, dict):
            raise ValueError(f"{path}: not a map")
        for key in own:
            if key not in theirs:
                raise ValueError(f"{path}.{key}: missing")
        for key, value in theirs.items():
            if key == "state" and isinstance(value, dict):  # optimizer buffers, by parameter
                for k, v in value.items():
                    check_state(v, own.get("state", {}).get(k), bound, f"{path}.state.{k}")
            elif key in own:
                check_state(value, own[key], bound, f"{path}.{key}")
            else:
                check_state(value, None, bound, f"{path}.{key}")
        return
    if isinstance(own, list):
        if not isinstance(theirs, list) or len(theirs) != len(own):
            raise ValueError(f"{path}: not a list of {len(own)}")
        for i, (t, o) in enumerate(zip(theirs, own, strict=True)):
            check_state(t, o, bound, f"{path}[{i}]")
        return
    if isinstance(theirs, dict):
        for k, v in theirs.items():
            check_state(v, None, bound, f"{path}.{k}")
    elif isinstance(theirs, list):
        for i, v in enumerate(theirs):
            check_state(v, None, bound, f"{path}[{i}]")
    elif (
        own is not None
        and theirs != own
        and not (
            isinstance(own, float)
            and isinstance(theirs, float)
            and math.isnan(own)
            and math.isnan(theirs)
        )
    ):
        raise ValueError(f"{path}: {theirs!r} != {own!r}")


def pack_global(flat: torch.Tensor, state: Any, step: int, meta: dict[str, str]) -> bytes:
    """The model a round starts from, the algorithm's state and the step, as one object."""
    tensors, skeleton = pack_state(state)
    body = {"global": flat, **{f"s.{k}": v for k, v in tensors.items()}}
    return pack(body, {**meta, "state": skeleton, "step": str(step)})


def read_global(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], like: torch.Tensor, own: Any, steps: int
) -> tuple[torch.Tensor, Any, int]:
    """Check a global checkpoint against this peer's model ``like`` and state ``own``.

    Returns the model, the state and the step; ValueError (the reason) if it does not fit.
    """
    flat = tensors.get("global")
    if flat is None or flat.shape != like.shape or flat.dtype != like.dtype:
        raise ValueError(f"the model is not {like.dtype}{list(like.shape)}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the model is not finite")
    step = number(meta.get("step", ""))
    if step is None or step > steps:
        raise ValueError(f"step {meta.get('step')!r} is not in [0, {steps}]")
    state = unpack_state(
        {k[2:]: v for k, v in tensors.items() if k.startswith("s.")}, meta.get("state", "")
    )
    check_state(state, own, 4 * like.numel())
    return flat, state, step
