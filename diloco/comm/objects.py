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
    (``train`` but for when it logs and evaluates), the seed, the number of workers and the
    data but for where it lives. What a peer may set for itself (its id, threads, device,
    logging, evaluation, the transport's timing) is left out.
    """
    data = {k: v for k, v in (node.get("data") or {}).items() if k not in ("path", "cache_dir")}
    keys = ("model", "optimizer", "algorithm", "codec", "aggregator", "seed")
    shared = {k: node.get(k) for k in keys}
    logging_keys = ("log_every", "eval_every", "eval_sequences")
    shared["train"] = {k: v for k, v in (node.get("train") or {}).items() if k not in logging_keys}
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


def check_state(
    theirs: Any,
    own: Any,
    shapes: set[tuple[int, ...]],
    max_abs: float,
    path: str = "state",
    settings: bool = False,
) -> None:
    """``theirs`` must be a state like ``own``; ValueError naming the path where it is not.

    The structure: every key of ``own`` present, a list of ``own``'s length where ``own``'s
    is not empty, scalars of ``own``'s type (counters may differ). The settings (an
    optimizer's ``param_groups``: learning rate, momentum...) equal ``own``'s. Tensors: of
    ``own``'s shape and dtype where ``own`` has one, else a scalar or the shape of one of
    the parameters (``shapes``), finite, at most ``max_abs`` in magnitude. An optimizer's
    per-parameter ``state`` may hold buffers ``own`` has not made yet.
    """
    if isinstance(theirs, torch.Tensor):
        if isinstance(own, torch.Tensor):
            if (theirs.shape, theirs.dtype) != (own.shape, own.dtype):
                raise ValueError(
                    f"{path}: {theirs.dtype}{list(theirs.shape)} != {own.dtype}{list(own.shape)}"
                )
        elif theirs.dim() > 0 and tuple(theirs.shape) not in shapes:
            raise ValueError(f"{path}: shape {list(theirs.shape)} is no parameter's")
        bad = (
            theirs.is_floating_point()
            and theirs.numel() > 0
            and not (bool(torch.isfinite(theirs).all()) and float(theirs.abs().max()) <= max_abs)
        )
        if bad:
            raise ValueError(f"{path}: not finite, or above {max_abs:g}")
        return
    if isinstance(theirs, dict):
        if own is not None and not isinstance(own, dict):
            raise ValueError(f"{path}: a map where a {type(own).__name__} is due")
        mine = own or {}
        for key in mine:
            if key not in theirs:
                raise ValueError(f"{path}.{key}: missing")
        for key, value in theirs.items():
            sub = f"{path}.{key}"
            if key == "state" and isinstance(value, dict) and not settings:  # per parameter
                for k, v in value.items():
                    check_state(v, mine.get("state", {}).get(k), shapes, max_abs, f"{sub}.{k}")
            else:
                inner = settings or key == "param_groups"
                check_state(value, mine.get(key), shapes, max_abs, sub, inner)
        return
    if isinstance(theirs, list):
        if own is not None and not isinstance(own, list):
            raise ValueError(f"{path}: a list where a {type(own).__name__} is due")
        if own and len(theirs) != len(own):
            raise ValueError(f"{path}: {len(theirs)} entries, not {len(own)}")
        for i, v in enumerate(theirs):
            check_state(v, own[i] if own else None, shapes, max_abs, f"{path}[{i}]", settings)
        return
    if own is None:
        return
    if settings:
        same = theirs == own or (
            isinstance(own, float)
            and isinstance(theirs, float)
            and math.isnan(own)
            and math.isnan(theirs)
        )
        if not same:
            raise ValueError(f"{path}: {theirs!r} != {own!r}")
    elif type(theirs) is not type(own) and not {type(theirs), type(own)} <= {int, float}:
        raise ValueError(f"{path}: a {type(theirs).__name__} where a {type(own).__name__} is due")


def pack_global(flat: torch.Tensor, state: Any, step: int, meta: dict[str, str]) -> bytes:
    """The model a round starts from, the algorithm's state and the step, as one object."""
    tensors, skeleton = pack_state(state)
    body = {"global": flat, **{f"s.{k}": v for k, v in tensors.items()}}
    return pack(body, {**meta, "state": skeleton, "step": str(step)})


def read_global(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    like: torch.Tensor,
    own: Any,
    step: int,
    shapes: set[tuple[int, ...]],
    max_abs: float = 1e6,
) -> tuple[torch.Tensor, Any, int]:
    """Check a global checkpoint against this peer's model ``like`` and state ``own``.

    ``step``: the step its round starts at; ``shapes``: the parameters' (state buffers must
    have one). Returns the model, the state and the step; ValueError (why) if it does not fit.
    """
    flat = tensors.get("global")
    if flat is None or flat.shape != like.shape or flat.dtype != like.dtype:
        raise ValueError(f"the model is not {like.dtype}{list(like.shape)}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the model is not finite")
    if number(meta.get("step", "")) != step:
        raise ValueError(f"step {meta.get('step')!r}: its round starts at step {step}")
    if float(flat.abs().max()) > max_abs:
        raise ValueError(f"the model has entries above {max_abs:g}")
    state = unpack_state(
        {k[2:]: v for k, v in tensors.items() if k.startswith("s.")}, meta.get("state", "")
    )
    check_state(state, own, shapes, max_abs)
    return flat, state, step
