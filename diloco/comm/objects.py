"""The objects bucket peers exchange: safetensors payloads and states, checked on arrival.

Nothing here unpickles: a safetensors header is JSON, read with :mod:`json` within the
object's bounds; an algorithm's state is its tensors plus a tagged-JSON skeleton
(:func:`pack_state`). A peer's object is untrusted until :func:`read_payload` passed it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch

FORMAT = "diloco-bucket-1"


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
    data: bytes, peer: int, round_key: str, like: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str]:
    """Check one peer's object against this peer's own tensors ``like``; tensors and digest.

    Raises ValueError with the reason it is excluded.
    """
    tensors, meta = unpack(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r} != {FORMAT!r}")
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
